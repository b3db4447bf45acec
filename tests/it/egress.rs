//! Behind a company's egress: every AWS call through an authenticating squid whose own `hosts_file` is
//! the only place the emulator's test name ([`EMULATOR_NAME`]) resolves, a TLS front signed by a CA the test
//! makes, and the failures an operator meets there (a wrong password, a missing CA, no credentials).

use std::time::{Duration, Instant};

use crate::support::squid::{Squid, TestCa, TlsFront, EMULATOR_NAME};
use crate::support::{orders_csv, World};

const USER: &str = "svc-offload";
/// Has characters that must be percent-encoded in a URL, and is easy to find in a log.
const PASSWORD: &str = "Pa55-w0rd-zeta";

/// The world's configuration with the emulator under its proxy-only name, `port` its port there, and
/// `network` as the `[network]` section.
fn behind_proxy(w: &World, scheme: &str, port: u16, network: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&w.config).unwrap();
    let text = text.replace(
        &format!("endpoint_url = \"{}\"", w.endpoint),
        &format!("endpoint_url = \"{scheme}://{EMULATOR_NAME}:{port}\""),
    );
    let path = w
        .dir
        .path()
        .join(format!("behind-proxy-{}.toml", crate::support::unique("c")));
    std::fs::write(&path, format!("{text}\n[network]\n{network}\n")).unwrap();
    path
}

fn moto_port(w: &World) -> u16 {
    w.endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Files are processed end to end with every call through squid: SQS, S3, DynamoDB and Parameter
/// Store each show in its access log under the proxy-only name, and the password is in no line the
/// daemon logged.
#[tokio::test(flavor = "multi_thread")]
async fn files_are_processed_through_an_authenticating_proxy() {
    let w = World::new("egress-squid").await;
    let squid = Squid::start(USER, PASSWORD);
    // Configuration from Parameter Store too: its calls go through the proxy like the others.
    let params = format!("/oa/{}", crate::support::unique("egress"));
    w.clients
        .ssm
        .put_parameter()
        .name(format!("{params}/queue/max_in_flight"))
        .value("3")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let config = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!(
            "http_proxy = \"{}\"\n[ssm]\nparameters_path = \"{params}\"",
            squid.url()
        ),
    );
    let agent = w.start_cmd(w.agent_with(&config, &["run"]));
    w.put("input/a.csv", orders_csv(0, 25)).await;
    w.wait_for("output/a.csv", Duration::from_secs(60), &agent)
        .await;
    assert_eq!(w.items().await.len(), 25);
    let log = squid.access_log();
    let through = |what: &str| {
        log.lines()
            .any(|l| l.contains(&format!("http://{EMULATOR_NAME}:")) && l.contains(what))
    };
    assert!(through("target=AmazonSQS.ReceiveMessage"), "SQS: {log}");
    assert!(
        through("target=AmazonSSM.GetParametersByPath"),
        "Parameter Store: {log}"
    );
    assert!(
        through("target=DynamoDB_20120810.BatchWriteItem"),
        "DynamoDB: {log}"
    );
    assert!(
        through(&format!("GET http://{EMULATOR_NAME}:")),
        "S3 download: {log}"
    );
    assert!(
        through(&format!("PUT http://{EMULATOR_NAME}:")),
        "S3 upload: {log}"
    );
    assert!(!log.contains(" 407 "), "every call authenticated: {log}");
    let daemon_log = agent.log_text();
    assert!(
        !daemon_log.contains(PASSWORD),
        "the password leaked into the log:\n{daemon_log}"
    );
    // The effective configuration shows the proxy without its password, and where it came from.
    let out = w
        .agent_with(&config, &["config", "check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{USER}:***@127.0.0.1:{}", squid.port)),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
}

/// The same from the standard variables alone, as a systemd drop-in would set them; `config check`
/// names the variable each value came from.
#[tokio::test(flavor = "multi_thread")]
async fn the_standard_proxy_variables_are_honoured_and_named() {
    let w = World::new("egress-env").await;
    let squid = Squid::start(USER, PASSWORD);
    let config = behind_proxy(&w, "http", moto_port(&w), "");
    w.put("input/e.csv", orders_csv(0, 5)).await;
    let url = format!("s3://{}/input/e.csv", w.bucket);
    let out = w
        .agent_with(&config, &["process", &url])
        .env("http_proxy", squid.url())
        .env("NO_PROXY", "corp.example")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(squid.access_log().contains(EMULATOR_NAME));
    let out = w
        .agent_with(&config, &["config", "check"])
        .env("http_proxy", squid.url())
        .env("NO_PROXY", "corp.example")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("network.http_proxy: http_proxy in the environment"),
        "{text}"
    );
    assert!(
        text.contains("network.no_proxy: NO_PROXY in the environment"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
}

/// A wrong password is one line naming the proxy (without any password), the 407 and the key; a host
/// in `no_proxy` is reached directly, so none of its calls reach squid.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_password_and_no_proxy_are_reported_plainly() {
    let w = World::new("egress-407").await;
    let squid = Squid::start(USER, PASSWORD);
    w.put("input/p.csv", orders_csv(0, 3)).await;
    let url = format!("s3://{}/input/p.csv", w.bucket);
    let wrong = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!(
            "http_proxy = \"{}\"",
            squid.url_as(USER, "not-the-password")
        ),
    );
    let out = w.agent_with(&wrong, &["process", &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("407 Proxy Authentication Required"), "{err}");
    assert!(
        err.contains(&format!("{USER}:***@127.0.0.1:{}", squid.port)),
        "{err}"
    );
    assert!(err.contains("network.http_proxy"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // A proxy that does not answer (nothing listens on its port): one line naming it and the key.
    let closed = crate::support::free_port();
    let down = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!("http_proxy = \"http://{USER}:{PASSWORD}@127.0.0.1:{closed}\""),
    );
    let out = w.agent_with(&down, &["process", &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "the proxy http://{USER}:***@127.0.0.1:{closed} does not answer"
        )),
        "{err}"
    );
    assert!(err.contains("network.http_proxy"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
    // The retries before it are logged; the failure is one line.
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("offload-agent:"))
            .count(),
        1,
        "{err}"
    );

    let before = squid.access_log().lines().count();
    let direct = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!(
            "http_proxy = \"{}\"\nno_proxy = [\"{EMULATOR_NAME}\"]",
            squid.url()
        ),
    );
    let out = w.agent_with(&direct, &["process", &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Directly, the proxy-only name does not resolve: the proof that squid was bypassed.
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("dns error") || err.contains("failed to lookup"),
        "{err}"
    );
    assert_eq!(
        squid.access_log().lines().count(),
        before,
        "{}",
        squid.access_log()
    );
}

/// Behind TLS (a CONNECT through squid to a front whose certificate a private CA signed): without the
/// CA the failure names `network.ca_bundle`; with it, or with only `AWS_CA_BUNDLE`, files are processed.
#[tokio::test(flavor = "multi_thread")]
async fn a_private_root_ca_is_added_to_the_system_roots() {
    let w = World::new("egress-tls").await;
    let squid = Squid::start(USER, PASSWORD);
    let ca = TestCa::make();
    let front = TlsFront::start(&ca, &w.endpoint).await;
    w.put("input/t.csv", orders_csv(0, 4)).await;
    let url = format!("s3://{}/input/t.csv", w.bucket);
    let proxy = format!("https_proxy = \"{}\"", squid.url());

    let without = behind_proxy(&w, "https", front.port, &proxy);
    let out = w.agent_with(&without, &["process", &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("certificate is not trusted"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("network.ca_bundle"), "{err}");
    assert!(squid
        .access_log()
        .contains(&format!("CONNECT {EMULATOR_NAME}:{}", front.port)));

    let with = behind_proxy(
        &w,
        "https",
        front.port,
        &format!("{proxy}\nca_bundle = \"{}\"", ca.ca_pem.display()),
    );
    let out = w.agent_with(&with, &["process", &url]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = w
        .agent_with(&without, &["process", &url])
        .env("AWS_CA_BUNDLE", &ca.ca_pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.items().await.len(), 4);
}

/// A bad egress value is a configuration error naming the key and the file (exit 78), with the others.
#[tokio::test(flavor = "multi_thread")]
async fn bad_egress_values_are_configuration_errors() {
    let w = World::new("egress-bad").await;
    let empty = w.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let config = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!(
            "https_proxy = \"socks5://u:secretpw@proxy:1080\"\nca_bundle = \"{}\"\nno_proxy = \"ok.example, 10.0.0.0/99\"",
            empty.display()
        ),
    );
    let out = w
        .agent_with(&config, &["config", "check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let file = config.file_name().unwrap().to_string_lossy().to_string();
    for key in [
        "network.https_proxy",
        "network.ca_bundle",
        "network.no_proxy",
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("{key} (in ")))
            .unwrap_or_default();
        assert!(line.contains(&file), "{key}: {err}");
    }
    assert!(!err.contains("secretpw"), "{err}");
}

/// Without any credentials and without the instance metadata service, a command fails at once with
/// where it looked, instead of probing 169.254.169.254 for seconds.
#[tokio::test(flavor = "multi_thread")]
async fn no_credentials_fail_at_once_saying_where_they_were_looked_for() {
    let w = World::new("egress-nocreds").await;
    let home = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/input/x.csv", w.bucket);
    let started = Instant::now();
    let out = w
        .agent(&["process", &url])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env("HOME", home.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("no AWS credentials: looked in"), "{err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(
        err.contains("not the EC2 instance metadata service"),
        "{err}"
    );
    assert!(!err.contains("IMDS"), "{err}");
    // Under a second on a quiet machine; the bound leaves room for a loaded test run.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// `preflight` through squid against the emulator's endpoints: every row answers (exit 0), the route
/// names the proxy without its password; with a wrong password the rows say 407 (exit 69); behind TLS
/// without the CA, the TLS rows name the certificate's issuer (exit 69); `--json` holds the same.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_checks_every_endpoint_through_the_egress() {
    let w = World::new("egress-preflight").await;
    let squid = Squid::start(USER, PASSWORD);
    let good = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!("http_proxy = \"{}\"", squid.url()),
    );
    let out = w.agent_with(&good, &["preflight"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in ["sqs", "s3", "dynamodb", "ssm", "ecs"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{svc} ")))
            .unwrap_or_default();
        assert!(
            row.contains(&format!("via http://{USER}:***@127.0.0.1:{}", squid.port)),
            "{svc}: {text}"
        );
    }
    assert!(text.contains("not checked ssmmessages"), "{text}");
    assert!(text.contains("every endpoint answered"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(squid
        .access_log()
        .contains(&format!("GET http://{EMULATOR_NAME}:")));

    let wrong = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!("http_proxy = \"{}\"", squid.url_as(USER, "wrong-one")),
    );
    let out = w.agent_with(&wrong, &["preflight"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{text}");
    assert!(
        text.contains("FAILED sqs") && text.contains("refused the credentials (407)"),
        "{text}"
    );
    assert!(text.contains("network.http_proxy"), "{text}");
    assert!(!text.contains("wrong-one"), "{text}");

    let ca = TestCa::make();
    let front = TlsFront::start(&ca, &w.endpoint).await;
    let tls = behind_proxy(
        &w,
        "https",
        front.port,
        &format!("https_proxy = \"{}\"", squid.url()),
    );
    let out = w
        .agent_with(&tls, &["preflight", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sqs = doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "sqs")
        .unwrap();
    assert_eq!(sqs["connect"]["ok"], true, "{sqs}");
    assert_eq!(sqs["tls"]["ok"], false, "{sqs}");
    let tls_detail = sqs["tls"]["detail"].as_str().unwrap();
    assert!(tls_detail.contains("CN=Offload Test Root CA"), "{sqs}");
    assert!(
        sqs["fix"].as_str().unwrap().contains("network.ca_bundle"),
        "{sqs}"
    );

    let trusted = behind_proxy(
        &w,
        "https",
        front.port,
        &format!(
            "https_proxy = \"{}\"\nca_bundle = \"{}\"",
            squid.url(),
            ca.ca_pem.display()
        ),
    );
    let out = w.agent_with(&trusted, &["preflight"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("CN=Offload Test Root CA"),
        "the issuer shows: {text}"
    );
}

/// The daemon behind a proxy that refuses its password stays up and says so — in the log and in
/// `/readyz` — instead of advising `provision` for a queue that exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_refused_by_its_proxy_says_so_and_stays_up() {
    let port = crate::support::free_port();
    let w = World::with(
        "egress-daemon-407",
        crate::support::Options {
            admin_listen: format!("127.0.0.1:{port}"),
            ..Default::default()
        },
    )
    .await;
    let squid = Squid::start(USER, PASSWORD);
    let config = behind_proxy(
        &w,
        "http",
        moto_port(&w),
        &format!("http_proxy = \"{}\"", squid.url_as(USER, "stale-password")),
    );
    let agent = w.start_cmd(w.agent_with(&config, &["run"]));
    agent
        .wait_log("407 Proxy Authentication Required", Duration::from_secs(30))
        .await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (code, why) = offload_agent::admin::get(addr, "/readyz", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("407") && why.contains("preflight"), "{why}");
    assert!(!why.contains("provision"), "{why}");
    let log = agent.log_text();
    assert!(!log.contains("run `offload-agent provision`"), "{log}");
    assert!(!log.contains("stale-password"), "{log}");
}

/// The daemon without usable credentials (a profile whose `source_profile` does not exist: unfiltered,
/// the SDK's chain warns "provider failed to provide credentials" at every call — seen with
/// `RUST_LOG=aws_config::meta::credentials=debug`): one line of ours at start says every place it
/// looked, the failing lookups of the queue are said once for the episode, and none of the SDK's own
/// warnings reach the log.
#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_the_daemon_says_so_once_in_its_own_words() {
    let w = World::new("egress-nocreds-run").await;
    let home = tempfile::tempdir().unwrap();
    let aws_config = home.path().join("config");
    std::fs::write(
        &aws_config,
        "[default]\nrole_arn = arn:aws:iam::123456789012:role/offload\nsource_profile = missing\n",
    )
    .unwrap();
    let mut cmd = w.agent(&["run"]);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", &aws_config);
    let mut agent = w.start_cmd(cmd);
    agent
        .wait_log("no AWS credentials: looked in", Duration::from_secs(20))
        .await;
    // Long enough for several receives to fail (the backoff starts at 1 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = agent.log_text();
    let said = |needle: &str, level: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains(needle))
            .count()
    };
    assert_eq!(said("no AWS credentials: looked in", "ERROR"), 1, "{log}");
    assert!(
        !log.contains("provider failed to provide credentials"),
        "the SDK's chain warnings are held back:\n{log}"
    );
    let problems = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    assert!(
        problems <= 3,
        "the credentials and the failing receives said once each, not per retry:\n{log}"
    );
    let (code, _) = agent.terminate(Duration::from_secs(30));
    assert_eq!(code, 0);
}
