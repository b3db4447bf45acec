//! A company's egress for the tests, on 127.0.0.1 only: Debian's squid with basic authentication and a
//! `hosts_file` of its own (a test-only name, [`EMULATOR_NAME`], resolves there and nowhere else, so a
//! call that reaches the emulator under that name went through squid), a CA the test makes (openssl),
//! and a TLS front for the emulator with a certificate of that CA.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// The name the emulator has behind the proxy, and only there. Without a dot: moto reads a dotted host
/// name as a virtual-hosted S3 bucket.
pub const EMULATOR_NAME: &str = "moto-behind-proxy";

fn need(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/lib/squid"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{program} is missing: run the tests with `scripts/test` (it installs squid and openssl with apt), \
         or `apt-get install squid openssl`"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// squid on a free port of 127.0.0.1; killed when dropped.
pub struct Squid {
    pub port: u16,
    pub user: String,
    pub password: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Squid {
    /// Start squid requiring `user`/`password`, with [`EMULATOR_NAME`] mapped to 127.0.0.1.
    pub fn start(user: &str, password: &str) -> Squid {
        let squid = need("squid");
        let auth = need("basic_ncsa_auth");
        let dir = tempfile::tempdir().unwrap();
        // squid drops to its own user: it must read its files and write its logs.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let hash = Command::new("openssl")
            .args(["passwd", "-apr1", password])
            .output()
            .expect("openssl (apt-get install openssl)");
        let hash = String::from_utf8(hash.stdout).unwrap();
        std::fs::write(dir.path().join("passwd"), format!("{user}:{}", hash.trim())).unwrap();
        std::fs::write(
            dir.path().join("hosts"),
            format!("127.0.0.1 {EMULATOR_NAME}\n"),
        )
        .unwrap();
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             logformat offload %rm %ru %>Hs target=%{{X-Amz-Target}}>h auth=%{{Proxy-Authorization}}>h\n\
             access_log stdio:{d}/access.log offload\n\
             logfile_rotate 0\n\
             hosts_file {d}/hosts\n\
             cache deny all\n\
             coredump_dir {d}\n\
             netdb_filename none\n\
             pinger_enable off\n\
             shutdown_lifetime 0 seconds\n\
             auth_param basic program {auth} {d}/passwd\n\
             auth_param basic realm offload-test\n\
             acl authed proxy_auth REQUIRED\n\
             http_access allow authed\n\
             http_access deny all\n",
            auth = auth.display()
        );
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).unwrap();
        std::fs::write(dir.path().join("access.log"), "").unwrap();
        std::fs::set_permissions(
            dir.path().join("access.log"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        let child = Command::new(squid)
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let s = Squid {
            port,
            user: user.into(),
            password: password.into(),
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "squid did not listen on 127.0.0.1:{port}: {}{}",
                std::fs::read_to_string(s.dir.path().join("stderr.log")).unwrap_or_default(),
                std::fs::read_to_string(s.dir.path().join("cache.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// `http://user:password@127.0.0.1:port`.
    pub fn url(&self) -> String {
        self.url_as(&self.user, &self.password)
    }

    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The access log so far (squid writes each line when the request ends).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA of the test's own, and a certificate it signed for [`EMULATOR_NAME`].
pub struct TestCa {
    /// Holds the files (removed when dropped).
    _dir: tempfile::TempDir,
    /// The CA's certificate (PEM): what `network.ca_bundle` names.
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl TestCa {
    pub fn make() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=Offload Test Root CA/O=Offload Tests"])
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")));
        run(Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes"])
            .args(["-subj", &format!("/CN={EMULATOR_NAME}")])
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")));
        std::fs::write(
            p("ext.cnf"),
            format!("subjectAltName=DNS:{EMULATOR_NAME}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("server.pem")));
        TestCa {
            ca_pem: p("ca.pem"),
            cert_pem: p("server.pem"),
            key_pem: p("server.key"),
            _dir: dir,
        }
    }
}

/// TLS in front of the emulator: accepts TLS with the CA's certificate for [`EMULATOR_NAME`] and
/// forwards the plain bytes to `upstream` (`127.0.0.1:PORT`).
pub struct TlsFront {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(ca: &TestCa, upstream: &str) -> TlsFront {
        use rustls_pki_types::pem::PemObject;
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&ca.cert_pem)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&ca.key_pem).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsFront { port, task }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
