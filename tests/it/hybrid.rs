//! Scenarios of a real hybrid host: credentials that the SSM agent rotates in place, `register` and
//! `deregister`, and configuration from Parameter Store. The AWS emulator (moto) is real; the SSM agent
//! and `systemctl` are stand-in scripts (host paths are configuration); the two SSM APIs moto lacks
//! are served by a local stub (`support::ssm_stub`); the ECS agent is the supervisor tests' stand-in
//! image on the real Docker engine.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::ssm_stub::SsmStub;
use crate::support::{moto_helper, orders_csv, unique, write_exec, Options, PrivateMoto, World};

fn creds_file(id: &str, secret: &str) -> String {
    format!("[default]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n")
}

/// The SSM agent's identity_config.json naming `creds` (default profile) and an expiry in an hour.
fn write_identity(ssm_dir: &Path, creds: &Path) {
    std::fs::create_dir_all(ssm_dir.join("runtimeconfig")).unwrap();
    let now = std::time::SystemTime::now();
    std::fs::write(
        ssm_dir.join("runtimeconfig/identity_config.json"),
        format!(
            r#"{{"ShareFile":"{}","ShareProfile":"","CredentialsRetrievedAt":"{}","CredentialsExpiresAt":"{}"}}"#,
            creds.display(),
            humantime::format_rfc3339(now),
            humantime::format_rfc3339(now + Duration::from_secs(3600)),
        ),
    )
    .unwrap();
}

/// The daemon follows the SSM agent's rotation of its credentials file, in place and with no restart:
/// with IAM authentication on in the emulator, the daemon starts with key A (named by
/// identity_config.json, not the environment), processes a file; the file is truncated, left empty
/// for 2 s (the last good key keeps working), then written with key B; key A is deleted in the
/// emulator; a second file is processed with B. No error is logged and no secret appears in the log.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_rotated_in_place_are_followed_without_a_restart() {
    let moto = PrivateMoto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "7")]);
    let keys: serde_json::Value =
        serde_json::from_str(&moto_helper(&moto.endpoint, &["iam-setup"])).unwrap();
    let key = |user: &str, i: usize| {
        (
            keys[user][i][0].as_str().unwrap().to_string(),
            keys[user][i][1].as_str().unwrap().to_string(),
        )
    };
    let (a, b, admin) = (key("agent", 0), key("agent", 1), key("admin", 0));

    let ssm_dir_holder = tempfile::tempdir().unwrap();
    let ssm_dir = ssm_dir_holder.path().join("ssm");
    let creds = ssm_dir_holder.path().join("credentials");
    std::fs::write(&creds, creds_file(&a.0, &a.1)).unwrap();
    write_identity(&ssm_dir, &creds);
    let w = World::with(
        "rotate",
        Options {
            endpoint: Some(moto.endpoint.clone()),
            creds: Some(admin.clone()),
            extra: format!("[host]\nssm_dir = \"{}\"\n", ssm_dir.display()),
            ..Options::default()
        },
    )
    .await;
    let mut cmd = w.agent(&["run"]);
    // The daemon must get its credentials from the SSM agent's file, not from the environment.
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let mut agent = w.start_cmd(cmd);

    w.put("input/one.csv", orders_csv(0, 20)).await;
    w.wait_for("output/one.csv", Duration::from_secs(30), &agent)
        .await;

    // Rotation in place: truncate, a pause with the file empty, then the new key.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&creds)
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        f.write_all(creds_file(&b.0, &b.1).as_bytes()).unwrap();
    }
    agent
        .wait_log("AWS credentials rotated", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    moto_helper(
        &moto.endpoint,
        &["delete-key", "agent", &a.0, &admin.0, &admin.1],
    );

    w.put("input/two.csv", orders_csv(100, 20)).await;
    w.wait_for("output/two.csv", Duration::from_secs(30), &agent)
        .await;
    assert_eq!(w.items().await.len(), 40);
    let (code, _) = agent.terminate(Duration::from_secs(20));
    assert_eq!(code, 0);
    let log = agent.log_text();
    assert!(!log.contains(" ERROR "), "no error burst:\n{log}");
    for bad in [
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ] {
        assert!(!log.contains(bad), "{bad} in the log:\n{log}");
    }
    for secret in [&a.1, &b.1, &admin.1] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret key reached the log"
        );
    }
}

/// One host's world for `register`: a temporary host root (ECS config files with the user's own lines,
/// the SSM agent's directory), a stand-in `amazon-ssm-agent` that registers and publishes credentials
/// the way the real one does, a stand-in `systemctl` that logs what it is asked, the SSM stub, a
/// container instance registered in the emulator whose ARN the stand-in ECS agent reports.
struct Host {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    code_file: std::path::PathBuf,
    stub: SsmStub,
    cluster: String,
    arn: String,
    instance: String,
    container: String,
    ecs: aws_sdk_ecs::Client,
}

const CODE: &str = "ACTIVATION-CODE-SECRET-5f1e";
const HOST_SECRET: &str = "host-secret-key-9d2c";

impl Host {
    async fn new(test: &str) -> Host {
        let endpoint = crate::support::moto_endpoint();
        let d = crate::support::docker::docker().await;
        let id = unique(test);
        let image = crate::support::docker::test_image(&d, &id).await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let instance = "mi-0123456789abcdef0".to_string();
        let stub = SsmStub::start(&instance);

        // The emulator's side: a cluster and the container instance the agent will report.
        let cluster = format!("c-{id}");
        let (ecs, arn) = crate::support::cluster_with_instance(&endpoint, &cluster).await;

        // The host: the user's own ECS settings, the stand-in agent's port and the ARN it reports.
        std::fs::create_dir_all(root.join("etc/ecs")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/ecs/data")).unwrap();
        std::fs::write(
            root.join("etc/ecs/ecs.config"),
            format!("# my own settings\nECS_LOGLEVEL=debug\nECS_FAKE_PORT={port}\n"),
        )
        .unwrap();
        std::fs::write(
            root.join("var/lib/ecs/ecs.config"),
            "# keep me\nECS_RESERVED_MEMORY=32\n",
        )
        .unwrap();
        std::fs::write(root.join("var/lib/ecs/fake-arn"), &arn).unwrap();
        std::fs::write(root.join("var/lib/ecs/data/agent.db"), "state").unwrap();
        let ssm_dir = root.join("ssm");
        let creds = root.join("aws/credentials");
        write_exec(
            &root.join("amazon-ssm-agent"),
            &format!(
                r#"#!/bin/sh
# Stand-in for amazon-ssm-agent -register: records the call, then writes what the real agent writes.
echo "$@" | sed 's/-code [^ ]*/-code <seen>/' >> {root}/ssm-agent-calls
[ "$4" = "{CODE}" ] || {{ echo "wrong activation code" >&2; exit 1; }}
mkdir -p {ssm}/runtimeconfig {root}/aws
printf '{{"ManagedInstanceID":"{instance}","Region":"us-east-1"}}' > {ssm}/registration
printf '[default]\naws_access_key_id = AKIAHOSTCREDS\naws_secret_access_key = {HOST_SECRET}\n' > {creds}
printf '{{"ShareFile":"{creds}","ShareProfile":""}}' > {ssm}/runtimeconfig/identity_config.json
"#,
                root = root.display(),
                ssm = ssm_dir.display(),
                creds = creds.display(),
            ),
        );
        write_exec(
            &root.join("systemctl"),
            &format!(
                "#!/bin/sh\necho \"$@\" >> {}/systemctl-calls\ncase \"$1\" in is-active) exit 3;; esac\nexit 0\n",
                root.display()
            ),
        );
        let code_file = root.join("activation-code");
        std::fs::write(&code_file, format!("{CODE}\n")).unwrap();
        let container = format!("offload-test-reg-{id}");
        let config = root.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[agent]
log_level = "trace"
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[aws.endpoints]
ssm = "{stub}"
[queue]
name = "unused"
[host]
ssm_dir = "{ssm}"
ssm_agent = "{root}/amazon-ssm-agent"
systemctl = "{root}/systemctl"
state_dir = "{root}/state"
[ecs_agent]
image = "{image}"
allow_pull = false
container_name = "{container}"
introspection_url = "http://127.0.0.1:{port}/v1/metadata"
task_iam_roles = false
host_root = "{root}"
health_interval = "200ms"
start_timeout = "30s"
[[pipeline]]
name = "p"
bucket = "b"
prefix = "in/"
processor = "orders-csv"
table = "t"
output_prefix = "out/"
"#,
                stub = stub.endpoint,
                ssm = ssm_dir.display(),
                root = root.display(),
            ),
        )
        .unwrap();
        Host {
            dir,
            config,
            code_file,
            stub,
            cluster,
            arn,
            instance,
            container,
            ecs,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_offload-agent"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "trace")
            .env_remove("JOURNAL_STREAM")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn register(&self) -> (i32, String) {
        self.run(&[
            "register",
            "--region",
            "us-east-1",
            "--cluster",
            &self.cluster,
            "--activation-id",
            "act-1234",
            "--activation-code-file",
            self.code_file.to_str().unwrap(),
            "--timeout",
            "60s",
        ])
    }

    fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    fn count(&self, rel: &str, needle: &str) -> usize {
        self.file(rel)
            .lines()
            .filter(|l| l.starts_with(needle))
            .count()
    }

    async fn agent_container(&self) -> bool {
        let d = crate::support::docker::docker().await;
        d.inspect_container(&self.container, None).await.is_ok()
    }
}

/// `register` takes a fresh host to registered (SSM agent registered once, credentials published,
/// instance online per the SSM stub — which saw the host's own key, the ECS config written as a keyed
/// merge, the agent started and registered, the container instance ACTIVE); a second run changes
/// nothing and invokes the SSM agent no more. `deregister` undoes it all, and a second run is no error.
/// The activation code and the host's secret key appear in no output at trace level.
#[tokio::test(flavor = "multi_thread")]
async fn register_twice_then_deregister_twice() {
    let h = Host::new("register").await;
    let (code, out) = h.register();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&h.arn) && out.contains(&h.instance), "{out}");
    let (code, again) = h.register();
    assert_eq!(code, 0, "{again}");
    assert!(again.contains("already registered"), "{again}");
    assert_eq!(
        h.file("ssm-agent-calls").lines().count(),
        1,
        "the SSM agent registered once"
    );
    for text in [&out, &again] {
        assert!(!text.contains(CODE), "the activation code was printed");
        assert!(!text.contains(HOST_SECRET), "a secret key was printed");
    }
    let etc = h.file("etc/ecs/ecs.config");
    assert_eq!(h.count("etc/ecs/ecs.config", "ECS_CLUSTER="), 1, "{etc}");
    assert!(etc.contains(&format!("ECS_CLUSTER={}", h.cluster)));
    assert!(
        etc.starts_with("# my own settings\nECS_LOGLEVEL=debug\n"),
        "{etc}"
    );
    let var = h.file("var/lib/ecs/ecs.config");
    assert!(
        var.starts_with("# keep me\nECS_RESERVED_MEMORY=32\n"),
        "{var}"
    );
    for key in ["AWS_DEFAULT_REGION=", "ECS_EXTERNAL=", "ECS_BACKEND_HOST="] {
        assert_eq!(h.count("var/lib/ecs/ecs.config", key), 1, "{key} in {var}");
    }
    let calls = h.stub.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.target.ends_with("DescribeInstanceInformation")
                && c.access_key_id == "AKIAHOSTCREDS"),
        "online check signed with the host's own credentials: {calls:?}"
    );
    let systemctl = h.file("systemctl-calls");
    assert!(
        systemctl.contains("enable amazon-ssm-agent")
            && systemctl.contains("start amazon-ssm-agent")
    );
    assert!(h.agent_container().await);

    let (code, out) = h.run(&["deregister"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(HOST_SECRET));
    let left = h
        .ecs
        .list_container_instances()
        .cluster(&h.cluster)
        .send()
        .await
        .unwrap();
    assert!(
        !left.container_instance_arns().contains(&h.arn),
        "container instance still registered: {left:?}"
    );
    assert!(!h.agent_container().await, "agent container removed");
    assert!(h
        .stub
        .calls()
        .iter()
        .any(|c| c.target.ends_with("DeregisterManagedInstance")));
    assert!(!h.root().join("ssm/registration").exists());
    assert_eq!(
        h.file("etc/ecs/ecs.config"),
        format!(
            "# my own settings\nECS_LOGLEVEL=debug\nECS_FAKE_PORT={}\n",
            {
                let etc = etc.clone();
                etc.lines()
                    .find_map(|l| l.strip_prefix("ECS_FAKE_PORT=").map(String::from))
                    .unwrap()
            }
        )
    );
    assert_eq!(
        h.file("var/lib/ecs/ecs.config"),
        "# keep me\nECS_RESERVED_MEMORY=32\n"
    );
    assert!(
        !h.root().join("var/lib/ecs/data/agent.db").exists(),
        "agent state cleared"
    );
    let (code, out) = h.run(&["deregister"]);
    assert_eq!(code, 0, "second deregister: {out}");
}

/// `register` with a missing activation code is bad input (78) and runs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn register_without_an_activation_code_is_a_configuration_error() {
    let h = Host::new("register-nocode").await;
    std::fs::write(&h.code_file, "").unwrap();
    let (code, out) = h.register();
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("activation code"), "{out}");
    assert_eq!(h.file("ssm-agent-calls"), "");
}

/// Configuration from Parameter Store, refreshed while the daemon runs: `queue.max_in_flight` changed in
/// the emulator is applied live (logged old -> new); an unparsable value is reported naming the
/// parameter and the previous value stays in force; files keep flowing; `config check` says where the
/// value came from and redacts a SecureString.
#[tokio::test(flavor = "multi_thread")]
async fn parameter_store_changes_apply_live_and_bad_values_are_named() {
    let path = format!("/oa/{}", unique("params"));
    let w = World::with(
        "params",
        Options {
            extra: format!("[ssm]\nparameters_path = \"{path}\"\nrefresh_interval = \"1s\"\n"),
            ..Options::default()
        },
    )
    .await;
    let put = |name: &str, value: &str, secure: bool| {
        let ssm = w.clients.ssm.clone();
        let (name, value) = (format!("{path}/{name}"), value.to_string());
        async move {
            ssm.put_parameter()
                .name(name)
                .value(value)
                .overwrite(true)
                .r#type(if secure {
                    aws_sdk_ssm::types::ParameterType::SecureString
                } else {
                    aws_sdk_ssm::types::ParameterType::String
                })
                .send()
                .await
                .unwrap();
        }
    };
    put("queue/max_in_flight", "2", false).await;
    put("agent/log_level", "info,offload_agent=debug", true).await;

    let out = w.agent(&["config", "check"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("max_in_flight = 2"), "{text}");
    assert!(
        text.contains(&format!(
            "queue.max_in_flight: SSM parameter {path}/queue/max_in_flight"
        )),
        "{text}"
    );
    assert!(text.contains("<redacted: SecureString>"), "{text}");
    assert!(!text.contains("offload_agent=debug"), "{text}");

    let agent = w.start();
    agent
        .wait_log("max_in_flight=2", Duration::from_secs(20))
        .await;
    put("queue/max_in_flight", "3", false).await;
    agent
        .wait_log("queue.max_in_flight 2 -> 3", Duration::from_secs(20))
        .await;
    put("queue/max_in_flight", "lots", false).await;
    agent
        .wait_log(
            &format!("queue.max_in_flight (in SSM parameter {path}/queue/max_in_flight)"),
            Duration::from_secs(20),
        )
        .await;
    w.put("input/after.csv", orders_csv(0, 10)).await;
    w.wait_for("output/after.csv", Duration::from_secs(30), &agent)
        .await;
    assert!(
        !agent.log_text().contains("max_in_flight 3 ->"),
        "the bad value was not applied"
    );
}

/// An outage of Parameter Store (here: its endpoint's server stopped) never stops the daemon: the
/// refresh fails with a warning, the configuration in force stays, files keep being processed.
#[tokio::test(flavor = "multi_thread")]
async fn a_parameter_store_outage_keeps_the_daemon_working() {
    let mut ssm_moto = PrivateMoto::start(&[]);
    let path = format!("/oa/{}", unique("outage"));
    let w = World::with(
        "ssm-outage",
        Options {
            extra: format!(
                "[ssm]\nparameters_path = \"{path}\"\nrefresh_interval = \"1s\"\n[aws.endpoints]\nssm = \"{}\"\n",
                ssm_moto.endpoint
            ),
            ..Options::default()
        },
    )
    .await;
    w.clients
        .ssm
        .put_parameter()
        .name(format!("{path}/queue/max_in_flight"))
        .value("3")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let mut agent = w.start();
    agent
        .wait_log("max_in_flight=3", Duration::from_secs(20))
        .await;
    ssm_moto.stop();
    agent
        .wait_log(
            "cannot read configuration from Parameter Store",
            Duration::from_secs(30),
        )
        .await;
    let start = Instant::now();
    w.put("input/during.csv", orders_csv(0, 10)).await;
    w.wait_for("output/during.csv", Duration::from_secs(30), &agent)
        .await;
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        !agent.log_text().contains("queue.max_in_flight 3 ->"),
        "the configuration in force stayed"
    );
    let (code, _) = agent.terminate(Duration::from_secs(20));
    assert_eq!(code, 0);
}

/// `register` behind a proxy with a private CA: drop-ins for the SSM agent and Docker with the
/// variables (systemd's `%` escaped), the ECS agent's env file with the proxy, `NO_PROXY` with the
/// link-local addresses and the Docker socket, and `SSL_CERT_FILE` at the CA bundle, which its container
/// gets read-only; Docker is not restarted without `--restart-docker`. Twice → one copy of each;
/// `deregister` → all of it gone, the operator's own drop-in untouched.
#[tokio::test(flavor = "multi_thread")]
async fn register_writes_the_egress_for_every_agent_and_deregister_removes_it() {
    let h = Host::new("register-egress").await;
    let root = h.root().to_path_buf();
    let ca = crate::support::squid::TestCa::make();
    let systemd = root.join("systemd");
    std::fs::create_dir_all(systemd.join("docker.service.d")).unwrap();
    std::fs::write(
        systemd.join("docker.service.d/mine.conf"),
        "[Service]\nLimitNOFILE=1\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&h.config).unwrap();
    let text = text.replace(
        "[ecs_agent]",
        &format!("systemd_dir = \"{}\"\n[ecs_agent]", systemd.display()),
    );
    std::fs::write(
        &h.config,
        format!(
            "{text}\n[network]\nhttps_proxy = \"http://svc:p%40ss@proxy.corp.example:3128\"\nno_proxy = \".corp.example\"\nca_bundle = \"{}\"\n",
            ca.ca_pem.display()
        ),
    )
    .unwrap();
    for run in 0..2 {
        let (code, out) = h.register();
        assert_eq!(code, 0, "run {run}: {out}");
        assert!(!out.contains("p%40ss"), "the password was printed: {out}");
        if run == 0 {
            assert!(out.contains("docker needs a restart"), "{out}");
        }
    }
    let ssm = h.file("systemd/amazon-ssm-agent.service.d/offload-agent-egress.conf");
    for line in [
        "Environment=\"HTTPS_PROXY=http://svc:p%%40ss@proxy.corp.example:3128\"",
        "Environment=\"https_proxy=http://svc:p%%40ss@proxy.corp.example:3128\"",
        "Environment=\"no_proxy=.corp.example,localhost,127.0.0.0/8,::1,169.254.169.254,169.254.170.2,fd00:ec2::254\"",
    ] {
        assert_eq!(ssm.matches(line).count(), 1, "{line} in {ssm}");
    }
    let bundle = root.join("state/ca-bundle.pem");
    assert!(
        ssm.contains(&format!(
            "Environment=\"SSL_CERT_FILE={}\"",
            bundle.display()
        )),
        "{ssm}"
    );
    let pem = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        pem.ends_with(&std::fs::read_to_string(&ca.ca_pem).unwrap()),
        "the CA comes last"
    );
    assert!(
        pem.matches("BEGIN CERTIFICATE").count() > 1,
        "the system's roots come first"
    );
    let docker = h.file("systemd/docker.service.d/offload-agent-egress.conf");
    assert!(
        docker.contains("HTTPS_PROXY=http://svc:p%%40ss@proxy.corp.example:3128"),
        "{docker}"
    );
    assert!(!docker.contains("SSL_CERT_FILE"), "{docker}");
    let var = h.file("var/lib/ecs/ecs.config");
    for key in ["HTTPS_PROXY=", "NO_PROXY=", "SSL_CERT_FILE="] {
        assert_eq!(h.count("var/lib/ecs/ecs.config", key), 1, "{key} in {var}");
    }
    assert!(var.contains("NO_PROXY=.corp.example,localhost,127.0.0.0/8,::1,169.254.169.254,169.254.170.2,fd00:ec2::254,/var/run/docker.sock"), "{var}");
    assert!(
        var.contains("SSL_CERT_FILE=/etc/offload-agent/ca-bundle.pem"),
        "{var}"
    );
    let systemctl = h.file("systemctl-calls");
    assert!(systemctl.contains("daemon-reload"), "{systemctl}");
    assert!(
        systemctl.contains("try-restart amazon-ssm-agent"),
        "{systemctl}"
    );
    assert!(!systemctl.contains("restart docker"), "{systemctl}");
    // The agent's container: the proxy in its environment, the bundle bound read-only.
    let d = crate::support::docker::docker().await;
    let c = d.inspect_container(&h.container, None).await.unwrap();
    let env = c.config.and_then(|c| c.env).unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e == "HTTPS_PROXY=http://svc:p%40ss@proxy.corp.example:3128"),
        "{env:?}"
    );
    assert!(
        env.iter()
            .any(|e| e.starts_with("NO_PROXY=") && e.contains("169.254.170.2")),
        "{env:?}"
    );
    let binds = c.host_config.and_then(|h| h.binds).unwrap_or_default();
    assert!(
        binds.contains(&format!(
            "{}:/etc/offload-agent/ca-bundle.pem:ro",
            bundle.display()
        )),
        "{binds:?}"
    );

    let (code, out) = h.run(&["deregister"]);
    assert_eq!(code, 0, "{out}");
    assert!(!systemd
        .join("amazon-ssm-agent.service.d/offload-agent-egress.conf")
        .exists());
    assert!(!systemd
        .join("docker.service.d/offload-agent-egress.conf")
        .exists());
    assert!(!bundle.exists());
    assert_eq!(
        h.file("systemd/docker.service.d/mine.conf"),
        "[Service]\nLimitNOFILE=1\n"
    );
    assert_eq!(
        h.file("var/lib/ecs/ecs.config"),
        "# keep me\nECS_RESERVED_MEMORY=32\n"
    );
}

/// The SSM agent watchdog, with a stand-in `systemctl` (host paths are configuration):
/// identity_config.json says the credentials were retrieved two hours ago. After the grace (2 s)
/// exactly one `restart amazon-ssm-agent`, logged with the reason and counted in
/// `offload_ssm_agent_restarts_total`; none more within `ssm_restart_interval`, while the daemon
/// keeps processing files with the credentials it holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_ssm_agent_is_restarted_once_per_interval() {
    let holder = tempfile::tempdir().unwrap();
    let root = holder.path();
    let ssm_dir = root.join("ssm");
    let creds = root.join("credentials");
    std::fs::write(&creds, creds_file("testing", "testing")).unwrap();
    std::fs::create_dir_all(ssm_dir.join("runtimeconfig")).unwrap();
    let now = std::time::SystemTime::now();
    std::fs::write(
        ssm_dir.join("runtimeconfig/identity_config.json"),
        format!(
            r#"{{"ShareFile":"{}","ShareProfile":"","CredentialsRetrievedAt":"{}","CredentialsExpiresAt":"{}"}}"#,
            creds.display(),
            humantime::format_rfc3339(now - Duration::from_secs(7200)),
            humantime::format_rfc3339(now + Duration::from_secs(3600)),
        ),
    )
    .unwrap();
    let calls = root.join("systemctl-calls");
    write_exec(
        &root.join("systemctl"),
        &format!("#!/bin/sh\necho \"$@\" >> {}\nexit 0\n", calls.display()),
    );
    let port = crate::support::free_port();
    let w = World::with(
        "ssm-watchdog",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            extra: format!(
                "[host]\nssm_dir = \"{}\"\nsystemctl = \"{}/systemctl\"\n[watchdog]\nssm_stale_grace = \"2s\"\nssm_restart_interval = \"1h\"\n",
                ssm_dir.display(),
                root.display()
            ),
            ..Options::default()
        },
    )
    .await;
    let agent = w.start();
    agent
        .wait_log("restarting the SSM agent", Duration::from_secs(30))
        .await;
    w.put("input/while-stuck.csv", orders_csv(0, 5)).await;
    w.wait_for("output/while-stuck.csv", Duration::from_secs(30), &agent)
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = agent.log_text();
    assert!(
        log.contains("retrieved 120 min ago (more than watchdog.ssm_credentials_max_age, 45 min)"),
        "{log}"
    );
    assert!(log.contains("SSM agent restarted by the watchdog"), "{log}");
    let made = std::fs::read_to_string(&calls).unwrap_or_default();
    assert_eq!(
        made.lines()
            .filter(|l| *l == "restart amazon-ssm-agent")
            .count(),
        1,
        "{made}"
    );
    let (_, metrics) = offload_agent::admin::get(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "/metrics",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        metrics.contains("offload_ssm_agent_restarts_total 1\n"),
        "{metrics}"
    );
}

/// A fleet's ECS agent update made as an operator makes it (issue 28): one Parameter Store change,
/// `<parameters_path>/ecs_agent/image`, read at the daemon's next refresh; its supervisor updates the
/// running stand-in agent from v1 to v2 and proves it (answering), and `/status` says so. Real
/// Docker, the emulator's Parameter Store.
#[tokio::test(flavor = "multi_thread")]
async fn an_ecs_agent_update_arrives_through_parameter_store() {
    use crate::support::docker::{docker, import_image, Rig};
    use crate::support::{free_port, status, wait_ecs};
    let d = docker().await;
    let rig = Rig::prepare("ssm-update", false).await;
    let path = format!("/oa/{}", unique("agent"));
    let port = free_port();
    let w = World::with(
        "ssm-update",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            ecs_agent: rig.ecs_agent_section(),
            extra: format!("[ssm]\nparameters_path = \"{path}\"\nrefresh_interval = \"1s\"\n"),
            ..Options::default()
        },
    )
    .await;
    let agent = w.start();
    wait_ecs(port, "answered", &agent, |e| e["version"] == "fake v1").await;
    let tag = rig.image.rsplit_once(':').unwrap().1.to_string();
    let v2 = format!("offload-test-ecs-agent:{tag}-v2");
    import_image(&d, "offload-test-ecs-agent", &format!("{tag}-v2"), "v2").await;
    w.clients
        .ssm
        .put_parameter()
        .name(format!("{path}/ecs_agent/image"))
        .value(&v2)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    wait_ecs(port, "updated to v2", &agent, |e| {
        e["version"] == "fake v2"
            && e["last_update"]
                .as_str()
                .is_some_and(|u| u.starts_with("updated the ECS agent from"))
    })
    .await;
    let e = status(port).await.unwrap()["ecs_agent"].clone();
    assert_eq!(e["image"], v2.as_str(), "{e}");
    assert_eq!(e["desired_image"], v2.as_str(), "{e}");
    agent
        .wait_log(&format!("to {v2}"), Duration::from_secs(10))
        .await;
    let _ = Command::new("docker").args(["rmi", &v2]).output();
}
