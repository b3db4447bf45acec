//! Docker harness for the ECS agent supervisor: a real engine (started by `scripts/test`), a stand-in
//! agent image imported from a busybox-static root filesystem (no registry is reachable), and one
//! supervisor per test with its own container name, port and host directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListImagesOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use offload_agent::config::Config;
use offload_agent::ecs_agent::{State, Status, Supervisor};
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;

pub const SETUP: &str = "run the tests with `scripts/test` (it installs docker.io and busybox-static \
                         and starts dockerd), or: apt-get install docker.io busybox-static && dockerd &";

/// The engine on /var/run/docker.sock; panics naming the set-up command if it does not answer.
pub async fn docker() -> Docker {
    connect("/var/run/docker.sock").await
}

pub async fn connect(socket: &str) -> Docker {
    let d = Docker::connect_with_unix(socket, 120, bollard::API_DEFAULT_VERSION)
        .unwrap_or_else(|e| panic!("no Docker socket ({e}): {SETUP}"));
    let d = d
        .negotiate_version()
        .await
        .unwrap_or_else(|e| panic!("Docker does not answer ({e}): {SETUP}"));
    d.ping()
        .await
        .unwrap_or_else(|e| panic!("Docker does not answer ({e}): {SETUP}"));
    d
}

/// The stand-in agent: serves introspection JSON on $ECS_FAKE_PORT, and obeys control files in
/// /var/lib/ecs (bound from the test's host directory): fake-crash (exit at start with that code),
/// fake-exit (exit with that code now), fake-arn (report registration), fake-silent (stop answering while it exists).
const AGENT_SCRIPT: &str = r#"#!/bin/sh
CTL=/var/lib/ecs
PORT=${ECS_FAKE_PORT:-51678}
echo "start $(cat /version)" >> $CTL/fake-starts
if [ -f $CTL/fake-crash ]; then echo "crashing with $(cat $CTL/fake-crash)"; exit $(cat $CTL/fake-crash); fi
mkdir -p /www/v1
write_meta() {
  ARN=null
  if [ -f $CTL/fake-arn ]; then ARN="\"$(cat $CTL/fake-arn)\""; fi
  # Written aside and renamed: httpd must never serve a half-written (empty) file, which reads as a
  # failed health check and restarts the healthy period (the cause of a flaky backoff-reset test).
  echo "{\"Cluster\":\"${ECS_CLUSTER:-default}\",\"ContainerInstanceArn\":$ARN,\"Version\":\"fake $(cat /version)\"}" > /www/v1/.metadata
  mv /www/v1/.metadata /www/v1/metadata
}
write_meta
# Silent from the start when asked: never answer, not even for the first moments.
if [ -f $CTL/fake-silent ]; then SILENT=1; else httpd -p 127.0.0.1:$PORT -h /www; fi
echo "agent $(cat /version) listening on $PORT"
while true; do
  if [ -f $CTL/fake-exit ]; then code=$(cat $CTL/fake-exit); rm -f $CTL/fake-exit; echo "exiting with $code"; exit $code; fi
  if [ -f $CTL/fake-silent ]; then killall httpd 2>/dev/null; SILENT=1;
  elif [ -n "$SILENT" ]; then httpd -p 127.0.0.1:$PORT -h /www; SILENT=; fi
  write_meta
  usleep 100000
done
"#;

/// A root filesystem of busybox-static, the given files (path, content, mode), empty directories, and
/// the applets as symbolic links in /bin.
pub fn busybox_rootfs(files: &[(&str, &[u8], u32)], dirs: &[&str], applets: &[&str]) -> Vec<u8> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("busybox-static is not installed: {SETUP}"));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("bin/busybox", &std::fs::read(busybox).unwrap(), 0o755);
    for (path, data, mode) in files {
        add(path, data, *mode);
    }
    for dir in dirs {
        add(&format!("{dir}/.keep"), b"", 0o644);
    }
    for applet in applets {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_cksum();
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn rootfs_tar(version: &str) -> Vec<u8> {
    busybox_rootfs(
        &[
            ("agent.sh", AGENT_SCRIPT.as_bytes(), 0o755),
            ("version", version.as_bytes(), 0o644),
        ],
        &["www", "tmp", "var/lib/ecs", "etc/ecs"],
        &[
            "sh", "cat", "echo", "httpd", "mkdir", "mv", "rm", "usleep", "killall", "sleep",
            "date", "[", "test",
        ],
    )
}

/// `docker import` a root filesystem as `name` (repo:tag) with `cmd` as its command.
pub async fn import_rootfs(d: &Docker, tar: Vec<u8>, name: &str, cmd: &str) {
    let (repo, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
    let mut s = d.create_image(
        Some(
            CreateImageOptionsBuilder::default()
                .from_src("-")
                .repo(repo)
                .tag(tag)
                .changes(vec![format!("CMD {cmd}")])
                .build(),
        ),
        Some(bollard::body_full(tar.into())),
        None,
    );
    while let Some(r) = s.next().await {
        r.unwrap();
    }
}

/// `docker import` a stand-in agent image as `repo:tag`; returns its id.
pub async fn import_image(d: &Docker, repo: &str, tag: &str, version: &str) -> String {
    import_rootfs(
        d,
        rootfs_tar(version),
        &format!("{repo}:{tag}"),
        "[\"/agent.sh\"]",
    )
    .await;
    image_id(d, &format!("{repo}:{tag}")).await.unwrap()
}

pub async fn image_id(d: &Docker, name: &str) -> Option<String> {
    d.inspect_image(name).await.ok().and_then(|i| i.id)
}

pub async fn tag(d: &Docker, src: &str, repo: &str, tag: &str) {
    d.tag_image(
        src,
        Some(
            TagImageOptionsBuilder::default()
                .repo(repo)
                .tag(tag)
                .build(),
        ),
    )
    .await
    .unwrap();
}

pub async fn untag(d: &Docker, name: &str) {
    let _ = d
        .remove_image(
            name,
            Some(RemoveImageOptionsBuilder::default().noprune(true).build()),
            None,
        )
        .await;
}

/// `docker save` an image into a tarball.
pub async fn save(d: &Docker, name: &str, path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut s = d.export_image(name);
    while let Some(chunk) = s.next().await {
        f.write_all(&chunk.unwrap()).unwrap();
    }
}

static BASE: OnceCell<String> = OnceCell::const_new();

/// The process id a test tag of `offload-test-ecs-agent` carries: `base-PID` here, `NAME-PID-N-NANOS`
/// from [`super::unique`]; its first all-digit part.
fn tag_pid(tag: &str) -> Option<u32> {
    tag.split('-')
        .find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
}

/// Remove the `offload-test-ecs-agent` tags of test processes that are gone. The shared image is a
/// static, which has no destructor, and a test that panics leaves its tag: each process sweeps up
/// after the earlier ones.
async fn sweep_stale_tags(d: &Docker) {
    let filters = std::collections::HashMap::from([("reference", vec!["offload-test-ecs-agent"])]);
    let Ok(images) = d
        .list_images(Some(
            ListImagesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
    else {
        return;
    };
    for tag in images.iter().flat_map(|i| i.repo_tags.iter()) {
        let Some((_, t)) = tag.split_once(':') else {
            continue;
        };
        if tag_pid(t).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = d
                .remove_image(
                    tag,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
    }
}

/// A per-test image name pointing at the shared stand-in image (built once per test process).
pub async fn test_image(d: &Docker, name: &str) -> String {
    let base = BASE
        .get_or_init(|| async {
            let d = docker().await;
            sweep_stale_tags(&d).await;
            import_image(
                &d,
                "offload-test-ecs-agent",
                &format!("base-{}", std::process::id()),
                "v1",
            )
            .await;
            format!("offload-test-ecs-agent:base-{}", std::process::id())
        })
        .await;
    tag(d, base, "offload-test-ecs-agent", name).await;
    format!("offload-test-ecs-agent:{name}")
}

/// One supervisor under test.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub image: String,
    pub port: u16,
    pub config: Config,
    pub tx: watch::Sender<Arc<Config>>,
    pub status: watch::Receiver<Status>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// What the supervisor logged at info and above, as the journal's MESSAGE lines with their level.
    pub log: Arc<std::sync::Mutex<Vec<u8>>>,
}

/// A writer into a shared buffer, for a test's own log subscriber.
#[derive(Clone)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Rig {
    /// Wait until the supervisor has logged a line containing `needle` (a state is published just
    /// before its line is written).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log_lines().iter().any(|l| l.contains(needle)) {
            assert!(
                start.elapsed() < timeout,
                "the supervisor never logged {needle:?}:\n{}",
                self.log_lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The supervisor's log lines so far (`LEVEL message fields`), info and above.
    pub fn log_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.log.lock().unwrap())
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn tarball(&self) -> PathBuf {
        self.dir.path().join("agent-image.tar")
    }

    /// The `[ecs_agent]` settings of a rig, in TOML.
    fn ecs_agent_toml(dir: &Path, name: &str, image: &str, port: u16, iam: bool) -> String {
        format!(
            r#"enabled = true
image = "{image}"
image_tarball = "{tarball}"
allow_pull = false
container_name = "{name}"
introspection_url = "http://127.0.0.1:{port}/v1/metadata"
task_iam_roles = {iam}
host_root = "{root}"
health_interval = "200ms"
unhealthy_after = "2s"
start_timeout = "20s"
restart_backoff_min = "200ms"
restart_backoff_max = "3s"
healthy_reset_after = "2s"
"#,
            tarball = dir.join("agent-image.tar").display(),
            root = dir.display(),
        )
    }

    /// This rig's `[ecs_agent]` settings (its engine's socket too), for a daemon's configuration.
    pub fn ecs_agent_section(&self) -> String {
        format!(
            "{}docker_socket = \"{}\"\n",
            Self::ecs_agent_toml(
                self.root(),
                &self.name,
                &self.image,
                self.port,
                self.config.ecs_agent.task_iam_roles
            ),
            self.config.ecs_agent.docker_socket
        )
    }

    /// A configuration for this rig, in TOML so that it goes through the same validation as the daemon's.
    pub fn make_config(dir: &Path, name: &str, image: &str, port: u16, iam: bool) -> Config {
        let text = format!(
            r#"
[queue]
name = "unused"
[ecs_agent]
{ecs}
[[pipeline]]
name = "p"
bucket = "b"
prefix = "in/"
processor = "orders-csv"
table = "t"
output_prefix = "out/"
"#,
            ecs = Self::ecs_agent_toml(dir, name, image, port, iam),
        );
        offload_agent::config::from_toml_str(&text, "rig.toml").unwrap()
    }

    /// Prepare (image tagged, env file with the port) without starting.
    pub async fn prepare(test: &str, iam: bool) -> Rig {
        Self::prepare_on(test, iam, None).await
    }

    /// The same against another engine (`socket`), where the image is imported afresh.
    pub async fn prepare_on(test: &str, iam: bool, socket: Option<&str>) -> Rig {
        let d = match socket {
            Some(sock) => connect(sock).await,
            None => docker().await,
        };
        let id = format!("{test}-{}", std::process::id());
        let name = format!("offload-test-{id}");
        let image = match socket {
            Some(_) => {
                import_image(&d, "offload-test-ecs-agent", &id, "v1").await;
                format!("offload-test-ecs-agent:{id}")
            }
            None => test_image(&d, &id).await,
        };
        let port = super::free_port();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/ecs")).unwrap();
        std::fs::write(
            dir.path().join("etc/ecs/ecs.config"),
            format!("# written by the test\nECS_CLUSTER=test-{id}\nECS_FAKE_PORT={port}\n"),
        )
        .unwrap();
        let mut config = Self::make_config(dir.path(), &name, &image, port, iam);
        if let Some(sock) = socket {
            config.ecs_agent.docker_socket = sock.to_string();
        }
        let (tx, _rx) = watch::channel(Arc::new(config.clone()));
        let (_s, status) = watch::channel(Status::default());
        Rig {
            dir,
            name,
            image,
            port,
            config,
            tx,
            status,
            shutdown: CancellationToken::new(),
            task: None,
            log: Default::default(),
        }
    }

    /// Start a supervisor (again).
    pub fn start(&mut self) {
        self.start_with_systemctl("systemctl");
    }

    /// Start with another `systemctl` (to imitate an active ecs.service).
    pub fn start_with_systemctl(&mut self, systemctl: &str) {
        self.config.host.systemctl = systemctl.to_string();
        self.start_supervisor(None, None);
    }

    /// Start with an ECS client that `DescribeContainerInstances` goes to (a stub's).
    pub fn start_with_ecs(&mut self, ecs: aws_sdk_ecs::Client) {
        self.start_supervisor(Some(ecs), None);
    }

    /// Start with an S3 client that `ecs_agent.image_url` is fetched through (the emulator's).
    pub fn start_with_s3(&mut self, s3: aws_sdk_s3::Client) {
        self.start_supervisor(None, Some(s3));
    }

    fn start_supervisor(
        &mut self,
        ecs: Option<aws_sdk_ecs::Client>,
        s3: Option<aws_sdk_s3::Client>,
    ) {
        let (tx, rx) = watch::channel(Arc::new(self.config.clone()));
        self.tx = tx;
        self.shutdown = CancellationToken::new();
        let (mut sup, status) = Supervisor::new(rx, self.shutdown.clone());
        if let Some(ecs) = ecs {
            sup = sup.with_ecs(ecs);
        }
        if let Some(s3) = s3 {
            sup = sup.with_s3(s3);
        }
        self.status = status;
        // This supervisor's own subscriber (the tests share a process): what it logs, as lines.
        use tracing::instrument::WithSubscriber;
        let out = Captured(self.log.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        self.task = Some(tokio::spawn(sup.run().with_subscriber(subscriber)));
    }

    /// Stop the supervisor (the container stays, unless stop_agent_on_exit).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("supervisor stops within 30 s")
                .unwrap();
        }
    }

    /// Like SIGHUP: hand the (possibly changed) configuration to the supervisor.
    pub fn reload(&self) {
        self.tx.send(Arc::new(self.config.clone())).unwrap();
    }

    pub fn ctl(&self, file: &str, content: &str) {
        let p = self.dir.path().join("var/lib/ecs").join(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn unctl(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.path().join("var/lib/ecs").join(file));
    }

    pub fn starts(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("var/lib/ecs/fake-starts"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn current(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Wait until the status satisfies `pred`; panic with the last status after `timeout`.
    pub async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Status {
        let start = Instant::now();
        loop {
            let s = self.current();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > timeout {
                panic!("{what}: not reached within {timeout:?}; last status: {s:#?}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.status.changed()).await;
        }
    }

    /// Wait until an update is reported done and the agent answers as `version` (the stand-in's
    /// "fake v2").
    pub async fn wait_updated(&mut self, version: &str, timeout: Duration) -> Status {
        let s = self
            .wait(&format!("updated to {version}"), timeout, |s| {
                s.last_update
                    .as_deref()
                    .is_some_and(|u| u.starts_with("updated the ECS agent from"))
            })
            .await;
        assert_eq!(
            s.metadata.as_ref().and_then(|m| m.version.as_deref()),
            Some(version)
        );
        s
    }

    pub async fn wait_state(&mut self, state: State, timeout: Duration) -> Status {
        self.wait(&format!("state {state}"), timeout, |s| s.state == state)
            .await
    }

    /// The container's id and whether it runs, per Docker.
    pub async fn container(&self) -> Option<(String, bool, String)> {
        let d = connect(&self.config.ecs_agent.docker_socket).await;
        let c = d.inspect_container(&self.name, None).await.ok()?;
        Some((
            c.id.unwrap_or_default(),
            c.state.and_then(|s| s.running).unwrap_or(false),
            c.image.unwrap_or_default(),
        ))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
        let _ = std::process::Command::new("docker")
            .args(["rmi", "--no-prune", &self.image])
            .output();
    }
}

/// A private Docker engine (own socket, data and exec roots, no bridge or iptables changes) that a test
/// may stop and start under the supervisor. `--live-restore` keeps containers running meanwhile, as
/// production hosts configure it.
pub struct PrivateDocker {
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateDocker {
    pub fn socket(&self) -> String {
        self.dir.path().join("docker.sock").display().to_string()
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let child = std::process::Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", self.socket()))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args([
                "--bridge",
                "none",
                "--iptables=false",
                "--ip-masq=false",
                "--live-restore",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd ({e}): {SETUP}"));
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(d) =
                Docker::connect_with_unix(&self.socket(), 5, bollard::API_DEFAULT_VERSION)
            {
                if d.ping().await.is_ok() {
                    return;
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "private dockerd did not start; log:\n{}",
                    std::fs::read_to_string(self.dir.path().join("dockerd.log"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn start() -> PrivateDocker {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("oa-dk")
            .tempdir_in("/tmp")
            .unwrap();
        let mut p = PrivateDocker { dir, child: None };
        p.spawn();
        p.wait_ready().await;
        p
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    /// Stop the engine (containers keep running) and start it again.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    /// Stop the engine; its socket goes away.
    pub fn stop(&mut self) {
        self.terminate();
    }

    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }
}

impl Drop for PrivateDocker {
    fn drop(&mut self) {
        let sock = format!("unix://{}", self.socket());
        if let Ok(out) = std::process::Command::new("docker")
            .args(["-H", &sock, "ps", "-aq"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["-H", &sock, "rm", "-f", id])
                    .output();
            }
        }
        self.terminate();
        // Overlay mounts under the data root would keep the directory busy.
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("data"))
            .output();
    }
}
