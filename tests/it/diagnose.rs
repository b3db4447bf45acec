//! `offload-agent diagnose` against the emulator and the Docker engine, with a secret of every kind
//! planted: a proxy password in the configuration file, an access key, secret key and session token
//! in the credentials file, a SecureString in Parameter Store, activation codes in the ECS agent's env
//! file and the environment. The bundle holds every section and none of the secrets, with the daemon
//! running and with it stopped. Needs moto and dockerd (`scripts/test`).

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;

use crate::support::*;

const PROXY_PASSWORD: &str = "Pr0xyPa55wordDiag";
const ACCESS_KEY: &str = "AKIADIAGN0STICTEST01";
const SECRET_KEY: &str = "DiagSecretKey/Planted+0123456789abcdefABCDEF";
const SESSION_TOKEN: &str =
    "IQoJb3JpZ2luX2VjEDiagnoseSessionTokenPlanted//////////wEaCXVzLWVhc3QtMSJHMEUCIQD";
const SECURE_VALUE: &str = "ParamStoreSecretValue9";
const ACTIVATION_CODE: &str = "ActCodeDiag1234567890";
const ENV_ACTIVATION_CODE: &str = "EnvActivationCode777";

/// Every file the bundle must have, whatever could be collected.
const SECTIONS: [&str; 19] = [
    "MANIFEST.txt",
    "about.txt",
    "config/check.txt",
    "journal/offload-agent.log",
    "journal/ecs.log",
    "journal/amazon-ssm-agent.log",
    "journal/docker.log",
    "docker/info.json",
    "docker/version.json",
    "docker/containers.json",
    "ecs/agent-container.log",
    "ecs/introspection-metadata.json",
    "daemon/status.json",
    "preflight.txt",
    "host/iptables.txt",
    "host/sysctl.txt",
    "host/credentials.txt",
    "ecs/var-lib-ecs-ecs.config",
    "ecs/etc-ecs-ecs.config",
];

/// The bundle's files by their name under its top directory.
fn unpack(path: &std::path::Path) -> BTreeMap<String, String> {
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let name = e.path().unwrap().display().to_string();
        let (_, rel) = name.split_once('/').expect("under one directory");
        let mut text = String::new();
        e.read_to_string(&mut text).unwrap();
        files.insert(rel.to_string(), text);
    }
    files
}

fn check_bundle(files: &BTreeMap<String, String>) {
    for s in SECTIONS {
        assert!(files.contains_key(s), "{s} missing from {:?}", files.keys());
    }
    for (name, text) in files {
        for secret in [
            PROXY_PASSWORD,
            ACCESS_KEY,
            SECRET_KEY,
            SESSION_TOKEN,
            SECURE_VALUE,
            ACTIVATION_CODE,
            ENV_ACTIVATION_CODE,
        ] {
            assert!(!text.contains(secret), "{secret} is in {name}:\n{text}");
        }
    }
}

/// With the daemon running, then stopped: every section, no secret; what could not be collected
/// (the stopped daemon's `/status`) is said in MANIFEST.txt and the command's output.
#[tokio::test(flavor = "multi_thread")]
async fn diagnose_collects_every_section_and_no_secret() {
    let port = free_port();
    let w = World::with(
        "diagnose",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            extra: format!(
                "\n[network]\nhttps_proxy = \"http://diag:{PROXY_PASSWORD}@proxy.invalid:3128\"\nno_proxy = \"127.0.0.1,localhost\"\n"
            ),
            ..Options::default()
        },
    )
    .await;
    let dir = w.dir.path();
    let creds = dir.join("planted-credentials");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\naws_session_token = {SESSION_TOKEN}\n"),
    )
    .unwrap();
    let root = dir.join("host");
    std::fs::create_dir_all(root.join("etc/ecs")).unwrap();
    std::fs::write(
        root.join("etc/ecs/ecs.config"),
        format!("ECS_CLUSTER=diag\nOFFLOAD_ACTIVATION_CODE={ACTIVATION_CODE}\n# registered with {ENV_ACTIVATION_CODE}\n"),
    )
    .unwrap();
    // What `register` writes for the agent (the proxy with its password), and keys an operator put
    // there by hand.
    std::fs::create_dir_all(root.join("var/lib/ecs")).unwrap();
    std::fs::write(
        root.join("var/lib/ecs/ecs.config"),
        format!("HTTPS_PROXY=http://diag:{PROXY_PASSWORD}@proxy.invalid:3128\nAWS_ACCESS_KEY_ID={ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={SECRET_KEY}\nAWS_SESSION_TOKEN={SESSION_TOKEN}\n# old proxy password {SECURE_VALUE}\n"),
    )
    .unwrap();
    let params = format!("/{}", unique("diag"));
    w.clients
        .ssm
        .put_parameter()
        .name(format!("{params}/network/http_proxy"))
        .value(format!("http://ps:{SECURE_VALUE}@proxy.invalid:3128"))
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let with_env = |mut c: std::process::Command| {
        c.env("OFFLOAD_AGENT_AWS__CREDENTIALS_FILE", &creds)
            .env("OFFLOAD_AGENT_SSM__PARAMETERS_PATH", &params)
            .env("OFFLOAD_AGENT_ECS_AGENT__HOST_ROOT", &root)
            .env("OFFLOAD_AGENT_ACTIVATION_CODE", ENV_ACTIVATION_CODE);
        c
    };
    let agent = w.start_cmd(with_env(w.agent(&["run"])));
    agent
        .wait_log("offload-agent ready", Duration::from_secs(60))
        .await;
    // The daemon took its configuration from Parameter Store (and so holds the SecureString).
    agent
        .wait_log("receiving from http", Duration::from_secs(60))
        .await;

    let running = dir.join("running.tar.gz");
    let out = with_env(w.agent(&[
        "diagnose",
        "--since",
        "1h",
        &format!("--output={}", running.display()),
    ]))
    .output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("wrote ") && text.contains("secrets redacted"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&running).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let files = unpack(&running);
    check_bundle(&files);
    let manifest = &files["MANIFEST.txt"];
    assert!(
        manifest.contains("ok             daemon/status.json"),
        "{manifest}"
    );
    assert!(files["daemon/status.json"].contains("\"version\""));
    assert!(
        manifest.contains("ok             docker/info.json"),
        "{manifest}"
    );
    assert!(files["config/check.txt"].contains("<redacted: SecureString>"));
    assert!(files["config/check.txt"].contains("http://diag:"));
    assert!(files["ecs/etc-ecs-ecs.config"].contains("ECS_CLUSTER=diag"));
    assert!(files["host/credentials.txt"].contains("planted-credentials"));
    assert!(files["preflight.txt"].contains("preflight for region us-east-1"));
    assert!(files["about.txt"].contains("since 1h"));

    drop(agent);
    let stopped = dir.join("stopped.tar.gz");
    let out = with_env(w.agent(&["diagnose", &format!("-o{}", stopped.display())]))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("not collected daemon/status.json"), "{text}");
    let files = unpack(&stopped);
    check_bundle(&files);
    assert!(
        files["MANIFEST.txt"].contains("NOT COLLECTED  daemon/status.json: nothing answers"),
        "{}",
        files["MANIFEST.txt"]
    );
}
