//! The command line as an operator meets it: exit codes, configuration errors, `config check`,
//! `process` on one S3 object and `process --dry-run` on a local file.

use std::process::Command;

use crate::support::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_offload-agent"));
    c.env_remove("RUST_LOG");
    c
}

/// Every configuration problem is reported at once, naming key and file, with exit status 78.
#[test]
fn configuration_errors_exit_78_and_name_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        r#"
[queue]
name = "q"
wait_time = "forever"
max_in_flight = 0
colour = "red"

[[pipeline]]
name = "p"
bucket = "b"
prefix = "in/"
processor = "orders-csv"
table = "T"
output_prefix = "in/out/"
"#,
    )
    .unwrap();
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "4 configuration errors",
        "queue.wait_time",
        "queue.max_in_flight",
        "queue.colour (in ",
        "agent.toml",
        "pipeline[0].output_prefix",
        "endless loop",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }

    let out = bin()
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

/// `config check` prints the effective configuration with defaults and environment overrides.
#[test]
fn config_check_prints_the_effective_configuration() {
    let out = bin()
        .args(["config", "check", "--config", "config/agent.toml"])
        .env("OFFLOAD_AGENT_QUEUE__MAX_IN_FLIGHT", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_in_flight = 3"), "{text}");
    assert!(text.contains("shutdown_grace = \"20s\""), "{text}");
    assert!(text.contains("[[pipeline]]"), "{text}");
    // The shipped demo configuration is valid too.
    let out = bin()
        .args(["config", "check", "--config", "config/demo.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--help` documents the exit codes; bad usage exits 64.
#[test]
fn help_and_usage_errors() {
    let out = bin().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("EXIT STATUS"), "{help}");
    assert!(help.contains("78"), "{help}");
    let out = bin().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = bin()
        .args(["process", "--config", "config/demo.toml", "not-a-url"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// `process --dry-run` validates a local file, prints each reject, writes nothing, and exits 65 when
/// rows would be rejected (0 when all are valid).
#[test]
fn dry_run_lists_rejects_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.csv");
    std::fs::write(&good, orders_csv(0, 50)).unwrap();
    let out = bin()
        .args(["process", "--dry-run", "--config", "/nonexistent.toml"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("50 rows: 50 valid, 0 rejected"));

    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!("{}{}\n", orders_csv(0, 3), order_row("100000001", 9)),
    )
    .unwrap();
    let out = bin()
        .args(["process", "--dry-run"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "Line,OrderId,Reason",
            "5,100000001,duplicate OrderId (first seen on line 3)"
        ]
    );
    let not_csv = dir.path().join("x.bin");
    std::fs::write(&not_csv, [0u8, 159, 146, 150, 0, 1, 2]).unwrap();
    let out = bin()
        .args(["process", "--dry-run"])
        .arg(&not_csv)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid orders CSV"));
}

/// `process s3://…` runs one object through its pipeline without SQS and prints a summary.
#[tokio::test(flavor = "multi_thread")]
async fn process_one_object_without_the_queue() {
    let w = World::new("cli-process").await;
    w.put("input/one.csv", orders_csv(0, 30)).await;
    let out = w
        .agent(&["process", &format!("s3://{}/input/one.csv", w.bucket)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 written"), "{text}");
    assert_eq!(w.items().await.len(), 30);
    assert_eq!(
        String::from_utf8(w.get("output/one.csv").await.unwrap())
            .unwrap()
            .lines()
            .count(),
        31
    );
    let out = w
        .agent(&["process", &format!("s3://{}/input/missing.csv", w.bucket)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer exists"));
}

/// A shutdown grace that, with the release and supervisor budgets, would outlast the unit's
/// TimeoutStopSec is warned about by `config check` (systemd would kill the daemon mid-shutdown); and
/// a daemon without a region is a configuration error (78, no restart loop under systemd).
#[test]
fn config_check_warns_when_shutdown_outlasts_the_unit_and_no_region_is_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let body = "[queue]\nname = \"q\"\n[ecs_agent]\nenabled = false\n[spool]\ndir = \"SPOOL\"\n[[pipeline]]\nname = \"p\"\nbucket = \"b\"\nprefix = \"in/\"\nprocessor = \"orders-csv\"\ntable = \"T\"\noutput_prefix = \"out/\"\n"
        .replace("SPOOL", &dir.path().join("spool").display().to_string());
    std::fs::write(&path, format!("[agent]\nshutdown_grace = \"50s\"\n{body}")).unwrap();
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("WARNING: agent.shutdown_grace (50s)") && text.contains("TimeoutStopSec=1m"),
        "{text}"
    );

    std::fs::write(&path, &body).unwrap();
    let out = bin()
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("aws.region"));
}

/// A shared directory (here the world-writable /tmp) is refused as the spool with a configuration error
/// naming the key: the daemon would make it private and delete files in it.
#[test]
fn a_shared_spool_directory_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[aws]\nregion = \"us-east-1\"\n[queue]\nname = \"q\"\n[spool]\ndir = \"/tmp\"\n[ecs_agent]\nenabled = false\n[[pipeline]]\nname = \"p\"\nbucket = \"b\"\nprefix = \"in/\"\nprocessor = \"orders-csv\"\ntable = \"T\"\noutput_prefix = \"out/\"\n",
    )
    .unwrap();
    let out = bin().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spool.dir") && err.contains("shared"), "{err}");
}
