//! Bring-your-own processors end to end: the daemon against the AWS emulator runs a real container
//! image (busybox-static, `docker import`ed: no registry is reachable) and a real program
//! (`tests/fixtures/processor.sh`, the same script the image runs) for each file. Needs moto and dockerd
//! (`scripts/test` starts both).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::docker::{busybox_rootfs, docker, image_id, import_rootfs};
use crate::support::*;
use bollard::query_parameters::ListContainersOptionsBuilder;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(60);
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor.sh");

static IMAGE: OnceCell<String> = OnceCell::const_new();

/// The test processor image, named by a hash of its content (imported once per content, reused after).
async fn image() -> String {
    IMAGE
        .get_or_init(|| async {
            let script = std::fs::read(SCRIPT).unwrap();
            let tar = busybox_rootfs(
                &[("process.sh", &script, 0o755)],
                &["tmp", "etc", "dev", "proc", "sys"],
                &[
                    "sh", "wc", "tr", "mkdir", "ln", "sleep", "echo", "cat", "dd", "env", "cut",
                    "sort", "printf", "[", "test",
                ],
            );
            let hash = hex::encode(&Sha256::digest(&tar)[..8]);
            let name = format!("offload-test-processor:{hash}");
            let d = docker().await;
            if image_id(&d, &name).await.is_none() {
                import_rootfs(&d, tar, &name, "[\"/process.sh\"]").await;
            }
            name
        })
        .await
        .clone()
}

struct Setup {
    box_timeout: &'static str,
    visibility_timeout: &'static str,
}

/// A world with two more pipelines: `box/` through the container processor (outputs under `boxed/`),
/// `cmd/` through the command processor as nobody with 24 MiB (outputs under `cmdout/`). Exit 4 is
/// permanent for both; 137
/// (out of memory) too for the container.
async fn world(name: &str, s: Setup) -> World {
    let image = image().await;
    let extra = format!(
        r#"
[[pipeline]]
name = "box"
bucket = "{{bucket}}"
prefix = "box/"
output_prefix = "boxed/"
[pipeline.processor.container]
image = "{image}"
memory = "24m"
timeout = "{timeout}"
permanent_exit_codes = [4, 137]

[[pipeline]]
name = "cmd"
bucket = "{{bucket}}"
prefix = "cmd/"
output_prefix = "cmdout/"
[pipeline.processor.command]
program = "{SCRIPT}"
args = ["{{input}}", "{{output_dir}}"]
timeout = "2s"
permanent_exit_codes = [4, 137]
user = "nobody"
memory = "24m"
"#,
        timeout = s.box_timeout,
    );
    let w = World::with(
        name,
        Options {
            extra,
            retry_base: "1s",
            retry_max: "2s",
            visibility_timeout: s.visibility_timeout,
            ..Options::default()
        },
    )
    .await;
    searchable(w.dir.path());
    w
}

/// Let other accounts search (not list) `dir`: the command runs as nobody, and the spool lies in it.
fn searchable(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

fn default_setup() -> Setup {
    Setup {
        box_timeout: "4s",
        visibility_timeout: "30s",
    }
}

/// The processor containers of this world's daemon (by the spool label).
async fn containers(w: &World) -> Vec<String> {
    let spool = w.dir.path().join("spool");
    let filters = HashMap::from([(
        "label",
        vec![format!("offload-agent.spool={}", spool.display())],
    )]);
    docker()
        .await
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn keys_under(w: &World, prefix: &str) -> Vec<String> {
    let out = w
        .clients
        .s3
        .list_objects_v2()
        .bucket(&w.bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(String::from))
        .collect();
    keys.sort();
    keys
}

async fn etag(w: &World, key: &str) -> String {
    let head = w
        .clients
        .s3
        .head_object()
        .bucket(&w.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    // As S3 events carry it: without the quotes of the HTTP header.
    head.e_tag().unwrap().trim_matches('"').to_string()
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

/// The same script, as a container and as a command: each writes `count.txt` and `meta/env.txt` into
/// its output directory; both land under `<output_prefix><key without prefix>/`, with the contract's
/// environment, the processor's output in the log with the file's fields, and nothing left running.
#[tokio::test(flavor = "multi_thread")]
async fn container_and_command_outputs_land_under_the_prefix() {
    let w = world("byo", default_setup()).await;
    let agent = w.start();
    w.put("box/dir/lines.txt", "a\nb\nc\n").await;
    w.put("cmd/dir/lines.txt", "a\nb\nc\nd\n").await;
    let box_count = w
        .wait_for("boxed/dir/lines.txt/count.txt", WAIT, &agent)
        .await;
    let cmd_count = w
        .wait_for("cmdout/dir/lines.txt/count.txt", WAIT, &agent)
        .await;
    assert_eq!(text(box_count), "3\n");
    assert_eq!(text(cmd_count), "4\n");
    w.wait_queue_empty(WAIT, &agent).await;
    for (pipeline, input, out) in [
        ("box", "box/dir/lines.txt", "boxed/dir/lines.txt/"),
        ("cmd", "cmd/dir/lines.txt", "cmdout/dir/lines.txt/"),
    ] {
        assert_eq!(
            keys_under(&w, out).await,
            [
                format!("{out}count.txt"),
                format!("{out}meta/env.txt"),
                format!("{out}meta/vars.txt")
            ]
        );
        let env = text(w.get(&format!("{out}meta/env.txt")).await.unwrap());
        let want = format!(
            "{}\n{input}\n{}\nus-east-1\n{pipeline}\n",
            w.bucket,
            etag(&w, input).await
        );
        assert_eq!(env, want);
        // A clean environment: the daemon's own variables (its credentials first) never reach a
        // processor. (Docker adds HOME and HOSTNAME in a container; the shell adds PWD and SHLVL.)
        let vars = text(w.get(&format!("{out}meta/vars.txt")).await.unwrap());
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_EC2_METADATA_DISABLED",
        ] {
            assert!(!vars.lines().any(|v| v == var), "{pipeline}: {vars}");
        }
        if pipeline == "cmd" {
            assert!(!vars.lines().any(|v| v == "HOME"), "{vars}");
        }
    }
    let log = agent.log_text();
    assert!(log.contains("counted 3 lines"), "{log}");
    assert!(log.contains("counted 4 lines"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("counted 4 lines") && l.contains("cmd/dir/lines.txt")),
        "output lines carry the file's fields: {log}"
    );
    assert!(containers(&w).await.is_empty(), "containers are removed");

    // `process` runs one object through the same processor, without the queue.
    w.put("cmd/once.txt", "1\n2\n").await;
    let out = w
        .agent(&["process", &format!("s3://{}/cmd/once.txt", w.bucket)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "output:    s3://{}/cmdout/once.txt/count.txt",
            w.bucket
        )),
        "{stdout}"
    );
    assert!(stdout.contains("exited 0"), "{stdout}");
}

/// Exit 3 is retried until the queue's maxReceiveCount, then given up with the processor's last
/// output in the error report and the dead-letter queue; exit 4 (in `permanent_exit_codes`) fails at
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn failing_processors_are_retried_or_failed_for_good() {
    let w = world("byofail", default_setup()).await;
    let agent = w.start();
    w.put("cmd/three.txt", "exit 3\n").await;
    w.put("box/four.txt", "exit 4\n").await;
    let four = text(
        w.wait_for("boxed/errors/box/four.txt.json", WAIT, &agent)
            .await,
    );
    assert!(four.contains("exited with code 4"), "{four}");
    assert!(four.contains("failing on purpose with 4"), "{four}");
    let three = text(
        w.wait_for(
            "cmdout/errors/cmd/three.txt.json",
            Duration::from_secs(120),
            &agent,
        )
        .await,
    );
    assert!(three.contains("gave up after 5 receives"), "{three}");
    assert!(three.contains("exited with code 3"), "{three}");
    assert!(
        three.contains("stderr: failing on purpose with 3"),
        "{three}"
    );
    w.wait_queue_empty(WAIT, &agent).await;
    let dlq = w.drain_dlq().await;
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    let log = agent.log_text();
    assert!(
        log.matches("failed for now").count() >= 4,
        "each attempt is logged: {log}"
    );
    assert!(keys_under(&w, "cmdout/three.txt/").await.is_empty());
}

/// A command runs as its account (nobody here), not as the daemon's root: it reads its input and
/// writes its output directory, and cannot write its input, the file's spool directory, the spool or
/// the daemon's own directory.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_runs_as_its_account_and_writes_only_its_output() {
    let w = world("byouser", default_setup()).await;
    let agent = w.start();
    w.put(
        "cmd/who.txt",
        format!("whoami {}\n", w.dir.path().display()),
    )
    .await;
    let uid = text(w.wait_for("cmdout/who.txt/uid.txt", WAIT, &agent).await);
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    assert_eq!(uid, text(nobody.stdout), "the program's uid");
    assert_ne!(uid.trim(), "0");
    let writes = text(w.wait_for("cmdout/who.txt/writes.txt", WAIT, &agent).await);
    assert_eq!(writes.lines().count(), 4, "{writes}");
    assert!(
        writes.lines().all(|l| l.starts_with("refused ")),
        "wrote outside its output directory: {writes}"
    );
    assert!(
        !w.dir.path().join("x").exists() && !w.dir.path().join("spool/x").exists(),
        "{writes}"
    );
}

/// Past its timeout a container is killed and removed, a command's whole process group is killed
/// (the background child too); the failure names the timeout. Symbolic links in the output are
/// refused and nothing is stored; a container or a command over its memory limit is killed and
/// reported as out of memory.
#[tokio::test(flavor = "multi_thread")]
async fn timeouts_links_and_memory_limits() {
    let w = world("byolimits", default_setup()).await;
    let agent = w.start();
    let shared = w.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let pids = shared.join("pids");
    w.put("cmd/slow.txt", format!("sleep 300 {}\n", pids.display()))
        .await;
    w.put("box/slow.txt", "sleep 300 -\n").await;
    w.put("box/evil.txt", "symlink\n").await;
    w.put("box/hog.txt", "oom\n").await;
    w.put("cmd/hog.txt", "oom\n").await;

    let evil = text(
        w.wait_for("boxed/errors/box/evil.txt.json", WAIT, &agent)
            .await,
    );
    assert!(
        evil.contains("passwd is a symbolic link (to /etc/passwd)"),
        "{evil}"
    );
    assert!(
        keys_under(&w, "boxed/evil.txt/").await.is_empty(),
        "nothing stored"
    );
    let hog = text(
        w.wait_for("boxed/errors/box/hog.txt.json", WAIT, &agent)
            .await,
    );
    assert!(hog.contains("out of memory"), "{hog}");
    // The command's memory is looked at by the daemon: killed past 24 MiB resident, reported with
    // what was seen, failed for good (137 is permanent here).
    let cmd_hog = text(
        w.wait_for("cmdout/errors/cmd/hog.txt.json", WAIT, &agent)
            .await,
    );
    assert!(
        cmd_hog.contains("was killed for exceeding its memory limit of 24 MiB")
            && cmd_hog.contains("resident (out of memory)"),
        "{cmd_hog}"
    );
    assert!(
        keys_under(&w, "cmdout/hog.txt/").await.is_empty(),
        "nothing stored"
    );

    agent
        .wait_log("ran longer than its timeout of 2s", WAIT)
        .await;
    agent
        .wait_log("ran longer than its timeout of 4s", WAIT)
        .await;
    let ids = std::fs::read_to_string(&pids).unwrap();
    for pid in ids.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        let start = Instant::now();
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "process {pid} of the timed-out command is still alive"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Every container of this daemon is gone once the failures are handled (retries come later).
    let start = Instant::now();
    loop {
        let left = containers(&w).await;
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            // A retry of slow.txt may be running by now; what must not exist is a container older
            // than the timeout.
            assert!(left.len() <= 1, "{left:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The daemon is SIGKILLed while a container runs: the container outlives it; the next start removes
/// it and the file, its message returning after the visibility timeout, is processed again.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemons_container_is_removed_and_its_file_processed_again() {
    let w = world(
        "byokill",
        Setup {
            box_timeout: "60s",
            visibility_timeout: "6s",
        },
    )
    .await;
    let mut agent = w.start();
    w.put("box/long.txt", "sleep 4 -\n").await;
    let start = Instant::now();
    let orphan = loop {
        if let Some(id) = containers(&w).await.pop() {
            break id;
        }
        assert!(
            start.elapsed() < WAIT,
            "no container started: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    agent.signal(libc::SIGKILL);
    let _ = agent.child.take().unwrap().wait();
    assert_eq!(
        containers(&w).await,
        std::slice::from_ref(&orphan),
        "the container outlives the daemon"
    );
    let again = w.start();
    again.wait_log("removed processor container", WAIT).await;
    let woke = w.wait_for("boxed/long.txt/woke.txt", WAIT, &again).await;
    assert_eq!(text(woke), "woke up\n");
    w.wait_queue_empty(WAIT, &again).await;
    assert!(!containers(&w).await.contains(&orphan));
}

/// A pipeline whose image is not on the host is reported once (at start, by pipeline), not per file;
/// its files wait in the queue, retried, and are processed as soon as the image is loaded.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_is_reported_once_and_files_wait_for_it() {
    let late = format!("offload-test-late:{}", unique("img"));
    let w = World::with(
        "byolate",
        Options {
            extra: format!(
                r#"
[[pipeline]]
name = "late"
bucket = "{{bucket}}"
prefix = "late/"
output_prefix = "lateout/"
processor = {{ container = {{ image = "{late}" }} }}
"#
            ),
            retry_base: "1s",
            retry_max: "2s",
            ..Options::default()
        },
    )
    .await;
    let agent = w.start();
    agent.wait_log("cannot run on this host", WAIT).await;
    w.put("late/a.txt", "x\n").await;
    w.put("late/b.txt", "x\ny\n").await;
    agent.wait_log("is unavailable (", WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = agent.log_text();
    assert_eq!(
        log.matches("cannot run on this host").count(),
        1,
        "reported once: {log}"
    );
    assert!(
        log.contains(&format!("image {late} is not present on this host")),
        "{log}"
    );
    let d = docker().await;
    let (repo, tag) = late.split_once(':').unwrap();
    crate::support::docker::tag(&d, &image().await, repo, tag).await;
    let a = w.wait_for("lateout/a.txt/count.txt", WAIT, &agent).await;
    let b = w.wait_for("lateout/b.txt/count.txt", WAIT, &agent).await;
    assert_eq!((text(a), text(b)), ("1\n".to_string(), "2\n".to_string()));
    agent.wait_log("can run again", WAIT).await;
    assert!(w.drain_dlq().await.is_empty());
    crate::support::docker::untag(&d, &late).await;
}

/// Behind a proxy: a container pipeline with a network (here the host's: no bridge needed) gets the proxy variables and the CA bundle
/// (mounted read-only, `SSL_CERT_FILE` and `AWS_CA_BUNDLE` pointing at it); one with `network = "none"`
/// gets none of it; a command (the host's network) gets the proxy and the host's bundle.
#[tokio::test(flavor = "multi_thread")]
async fn processors_with_a_network_leave_through_the_proxy() {
    let image = image().await;
    let ca = crate::support::squid::TestCa::make();
    let state = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[[pipeline]]
name = "box"
bucket = "{{bucket}}"
prefix = "box/"
output_prefix = "boxed/"
[pipeline.processor.container]
image = "{image}"
timeout = "20s"

[[pipeline]]
name = "netbox"
bucket = "{{bucket}}"
prefix = "netbox/"
output_prefix = "netboxed/"
[pipeline.processor.container]
image = "{image}"
timeout = "20s"
network = "host"

[[pipeline]]
name = "cmd"
bucket = "{{bucket}}"
prefix = "cmd/"
output_prefix = "cmdout/"
[pipeline.processor.command]
program = "{SCRIPT}"
args = ["{{input}}", "{{output_dir}}"]
user = "nobody"

[host]
state_dir = "{state}"

[network]
https_proxy = "http://svc:secret@proxy.corp.example:3128"
no_proxy = [".corp.example"]
ca_bundle = "{ca}"
"#,
        state = state.path().display(),
        ca = ca.ca_pem.display(),
    );
    let w = World::with(
        "byo-egress",
        Options {
            extra,
            ..Options::default()
        },
    )
    .await;
    searchable(w.dir.path());
    let agent = w.start();
    for prefix in ["box", "netbox", "cmd"] {
        w.put(&format!("{prefix}/x.txt"), "a\n").await;
    }
    let vars = |b: Vec<u8>| -> Vec<String> { text(b).lines().map(String::from).collect() };
    let boxed = vars(w.wait_for("boxed/x.txt/meta/vars.txt", WAIT, &agent).await);
    let netboxed = vars(
        w.wait_for("netboxed/x.txt/meta/vars.txt", WAIT, &agent)
            .await,
    );
    let cmd = vars(w.wait_for("cmdout/x.txt/meta/vars.txt", WAIT, &agent).await);
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "AWS_CA_BUNDLE",
    ] {
        assert!(
            netboxed.iter().any(|v| v == var),
            "netbox lacks {var}: {netboxed:?}"
        );
        assert!(cmd.iter().any(|v| v == var), "cmd lacks {var}: {cmd:?}");
        assert!(
            !boxed.iter().any(|v| v == var),
            "box (network none) has {var}: {boxed:?}"
        );
    }
    assert!(
        state.path().join("ca-bundle.pem").exists(),
        "the daemon wrote the bundle"
    );
    assert!(
        !agent.log_text().contains("secret@"),
        "{}",
        agent.log_text()
    );
}
