//! The admin endpoint and `offload-agent status` against a daemon on the AWS emulator: the counters
//! equal what happened, readiness follows the queue, and a non-loopback address needs consent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A world whose daemon serves the admin endpoint on a port of its own; returns the port too.
async fn world_on_port(name: &str) -> (World, u16) {
    let port = free_port();
    let w = World::with(
        name,
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            ..Options::default()
        },
    )
    .await;
    (w, port)
}

async fn get(port: u16, path: &str) -> (u16, String) {
    offload_agent::admin::get(
        format!("127.0.0.1:{port}").parse().unwrap(),
        path,
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `name{labels} value` lines of an exposition, keyed by `name{labels}`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("name value");
        m.insert(key.to_string(), value.parse().expect("a number"));
    }
    m
}

async fn wait_ready(port: u16, want: u16, agent: &Agent) -> String {
    let start = Instant::now();
    loop {
        if let Ok((code, body)) = offload_agent::admin::get(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "/readyz",
            Duration::from_secs(2),
        )
        .await
        {
            if code == want {
                return body;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "/readyz never answered {want}; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two good files (one with rejected rows) and one that is not an orders CSV: `/metrics` counts
/// exactly that, `status --json` agrees, and the human `status` names the pipeline and the error.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_status_count_what_happened() {
    let (w, port) = world_on_port("metrics").await;
    let agent = w.start();
    wait_ready(port, 200, &agent).await;
    assert_eq!(get(port, "/healthz").await, (200, "ok\n".into()));

    w.put("input/good.csv", orders_csv(0, 20)).await;
    let mut mixed = orders_csv(100, 5);
    mixed.push_str(&order_row("bad", 1).replace("651.21", "lots"));
    mixed.push('\n');
    w.put("input/mixed.csv", mixed).await;
    w.put("input/wrong.csv", "a,b,c\n1,2,3\n").await;
    w.wait_for("output/good.csv", WAIT, &agent).await;
    w.wait_for("output/mixed.csv", WAIT, &agent).await;
    w.wait_for("output/errors/input/wrong.csv.json", WAIT, &agent)
        .await;
    w.wait_queue_empty(WAIT, &agent).await;

    let (code, text) = get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.ends_with("# EOF\n"));
    let m = parse_metrics(&text);
    let want = [
        (
            "offload_files_total{pipeline=\"orders\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "offload_files_total{pipeline=\"orders\",outcome=\"rejected\"}",
            1.0,
        ),
        (
            "offload_files_total{pipeline=\"orders\",outcome=\"permanent_error\"}",
            1.0,
        ),
        (
            "offload_files_total{pipeline=\"orders\",outcome=\"transient_retry\"}",
            0.0,
        ),
        ("offload_rows_written_total{pipeline=\"orders\"}", 25.0),
        ("offload_rows_rejected_total{pipeline=\"orders\"}", 1.0),
        ("offload_messages_total{outcome=\"received\"}", 3.0),
        ("offload_messages_total{outcome=\"deleted\"}", 3.0),
        ("offload_messages_total{outcome=\"dead_lettered\"}", 1.0),
        (
            "offload_file_processing_seconds_count{pipeline=\"orders\"}",
            2.0,
        ),
        ("offload_files_in_flight", 0.0),
        ("offload_worker_slots_free", 4.0),
        ("offload_sqs_errors_total", 0.0),
    ];
    for (key, value) in want {
        assert_eq!(m.get(key), Some(&value), "{key} in:\n{text}");
    }
    assert!(m["offload_downloaded_bytes_total"] > 0.0);
    assert!(m["offload_uploaded_bytes_total"] > 0.0);
    assert!(m["offload_sqs_receives_total"] >= 1.0);
    assert!(text.contains("offload_build_info{version=\""), "{text}");
    assert!(!text.contains("good.csv"), "no object keys as labels");

    let out = w.agent(&["status", "--json"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["worker"]["files_done"], 2);
    assert_eq!(doc["worker"]["files_failed"], 1);
    assert_eq!(doc["worker"]["pipelines"][0]["rows_written"], 25);
    let errors = doc["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{doc}");
    assert!(errors[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("/input/wrong.csv"));
    assert!(errors[0]["reason"]
        .as_str()
        .unwrap()
        .contains("lacks columns"));

    let out = w.agent(&["status"]).output().unwrap();
    let human = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{human}");
    assert!(human.contains("ready"), "{human}");
    assert!(human.contains("2 files done, 1 failed"), "{human}");
    assert!(
        human.contains("pipeline orders: 1 ok, 1 with rejected rows"),
        "{human}"
    );
    assert!(human.contains("input/wrong.csv"), "{human}");
}

/// Deleting the queue turns `/readyz` to 503 with the reason (and `status` exits 1); provisioning
/// it again turns it back to 200, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_queue() {
    let (w, port) = world_on_port("readyz").await;
    let agent = w.start();
    wait_ready(port, 200, &agent).await;
    w.delete_queue().await;
    let why = wait_ready(port, 503, &agent).await;
    assert!(why.contains("queue unreachable"), "{why}");
    let out = w.agent(&["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT READY"));
    let out = w.agent(&["provision"]).output().unwrap();
    assert!(out.status.success());
    wait_ready(port, 200, &agent).await;
    assert_eq!(get(port, "/healthz").await.0, 200);
}

/// No daemon: `status` says so and exits 3. A non-loopback address without `allow_remote` is a
/// configuration error (78) naming the key; with it, the daemon serves there.
#[tokio::test(flavor = "multi_thread")]
async fn status_without_a_daemon_and_remote_binds_need_consent() {
    let port = free_port();
    let w = World::new("remote").await;
    let out = w
        .agent(&["status", "--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("offload-agent is not running"));

    let mut cmd = w.agent(&["run"]);
    cmd.env("OFFLOAD_AGENT_ADMIN__LISTEN", format!("0.0.0.0:{port}"));
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.listen"), "{err}");
    assert!(err.contains("allow_remote"), "{err}");

    let mut cmd = w.agent(&["run"]);
    cmd.env("OFFLOAD_AGENT_ADMIN__LISTEN", format!("0.0.0.0:{port}"))
        .env("OFFLOAD_AGENT_ADMIN__ALLOW_REMOTE", "true");
    let agent = w.start_cmd(cmd);
    wait_ready(port, 200, &agent).await;
}

fn rss_file_kb(pid: i32) -> u64 {
    offload_agent::pages::status_kb(Some(pid as u32), "RssFile:")
        .expect("RssFile in /proc/PID/status")
}

/// An idle daemon unmaps the pages of its binary that only start-up ran, 30 s after READY (the
/// debug log says how much), its mapped-file memory drops, and it keeps working: a file sent after
/// the release is processed, and the admin endpoint answers.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_daemon_unmaps_its_start_up_code_and_keeps_working() {
    let (w, port) = world_on_port("pages").await;
    let agent = w.start();
    wait_ready(port, 200, &agent).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = rss_file_kb(agent.pid());
    agent
        .wait_log("unmapped the pages of start-up code", WAIT)
        .await;
    let released = rss_file_kb(agent.pid());
    eprintln!("RssFile {started} kB 3 s after READY, {released} kB after the release");
    assert!(
        released * 3 < started * 2,
        "RssFile {started} kB before the release, {released} kB after; log:\n{}",
        agent.log_text()
    );
    w.put("input/after.csv", orders_csv(0, 10)).await;
    w.wait_for("output/after.csv", WAIT, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    assert_eq!(get(port, "/healthz").await.0, 200);
    assert_eq!(w.items().await.len(), 10);
}

/// Local clients that misbehave do not delay the health checks: waves of 500 connections that send
/// half a request header and then nothing (a new wave every 3 s) and 50 that ask for `/metrics` and
/// read the answer a byte a second, for 20 s. Meanwhile `/healthz`, `/readyz` and `/metrics` from a
/// fresh client each answer within `ANSWER_WITHIN`, every time, and a `/metrics` scrape every 100 ms
/// completes within it too (alone the slowest answer takes tens of milliseconds; the bound leaves room
/// for the rest of the suite running on the same two cores);
/// the daemon's RSS stays under 64 MiB; once the bad clients are gone its file descriptors are back
/// where they were.
#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_local_clients_do_not_delay_the_health_checks() {
    const ANSWER_WITHIN: Duration = Duration::from_secs(2);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (w, port) = world_on_port("adminload").await;
    let agent = w.start();
    wait_ready(port, 200, &agent).await;
    let pid = agent.pid();
    let fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let until = Instant::now() + Duration::from_secs(20);

    let mut bad = tokio::task::JoinSet::new();
    bad.spawn(async move {
        let mut held = Vec::new();
        while Instant::now() < until {
            for _ in 0..500 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
                    held.push(s);
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            held.clear();
        }
    });
    for _ in 0..50 {
        bad.spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut byte = [0u8; 1];
            while Instant::now() < until {
                if matches!(s.read(&mut byte).await, Ok(0) | Err(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let scraper = tokio::spawn(async move {
        let mut scrapes = 0;
        while Instant::now() < until {
            let (code, body) = offload_agent::admin::get(addr, "/metrics", ANSWER_WITHIN)
                .await
                .unwrap_or_else(|e| panic!("a /metrics scrape failed under load: {e}"));
            assert_eq!(code, 200);
            assert!(body.contains("offload_files_in_flight"), "{body}");
            scrapes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        scrapes
    });

    let mut checks = 0;
    let mut slowest = Duration::ZERO;
    let mut peak_rss_kb = 0;
    while Instant::now() < until {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let t = Instant::now();
            let (code, _) = offload_agent::admin::get(addr, path, ANSWER_WITHIN)
                .await
                .unwrap_or_else(|e| panic!("GET {path} under load: {e}"));
            assert_eq!(code, 200, "GET {path} under load");
            slowest = slowest.max(t.elapsed());
            checks += 1;
        }
        let rss = offload_agent::pages::status_kb(Some(pid as u32), "VmRSS:")
            .expect("the daemon's VmRSS in /proc/PID/status");
        peak_rss_kb = peak_rss_kb.max(rss);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scrapes = scraper.await.unwrap();
    while bad.join_next().await.is_some() {}
    println!(
        "{checks} health checks under load, slowest {slowest:?}; {scrapes} scrapes; peak RSS {peak_rss_kb} KiB"
    );
    assert!(
        checks > 60 && scrapes > 100,
        "{checks} checks, {scrapes} scrapes"
    );
    assert!(peak_rss_kb < 64 * 1024, "peak RSS {peak_rss_kb} KiB");

    // Nothing left behind: the descriptors the bad clients held are closed.
    let start = Instant::now();
    loop {
        let now = fds();
        if now <= before + 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{now} file descriptors, {before} before the bad clients"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(port, "/healthz").await.0, 200);
    drop(agent);
}

fn fill(path: &std::path::Path, mib: usize) {
    std::fs::write(path, vec![b'x'; mib << 20]).unwrap();
}

/// The spool on an 8 MiB tmpfs with `spool.min_free = "2MiB"` (resumes above 3 MiB). Filled to
/// 1 MiB free: `/readyz` is 503 naming `spool.min_free`, the status line and `status` say so, the
/// gauge shows it, and three uploaded files stay in the queue unreceived (the emulator's counts).
/// Space freed: ready again, the files processed. A 2 MiB object with 3 MiB free (1 MiB above the
/// mark) is not downloaded and comes back; processed once there is room. Nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_spool_short_of_space_stops_receiving_until_there_is_room() {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor.sh");
    let port = free_port();
    let w = World::with(
        "spool-low",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            retry_base: "1s",
            retry_max: "2s",
            extra: format!(
                r#"
[[pipeline]]
name = "sizes"
bucket = "{{bucket}}"
prefix = "big/"
output_prefix = "big-out/"
[pipeline.processor.command]
program = "{SCRIPT}"
args = ["{{input}}", "{{output_dir}}"]
user = "root"
"#
            ),
            ..Options::default()
        },
    )
    .await;
    let small = SmallDisk::mount(&w.dir.path().join("small"), "8m");
    let filler = small.0.join("filler");
    fill(&filler, 7);
    let mut cmd = w.agent(&["run"]);
    cmd.env("OFFLOAD_AGENT_SPOOL__DIR", small.0.join("spool"))
        .env("OFFLOAD_AGENT_SPOOL__MIN_FREE", "2MiB");
    let agent = w.start_cmd(cmd);

    let why = wait_ready(port, 503, &agent).await;
    assert!(why.contains("below spool.min_free (2 MiB)"), "{why}");
    let m = parse_metrics(&get(port, "/metrics").await.1);
    let free = m["offload_spool_free_bytes"];
    assert!(free > 0.0 && free < (2 << 20) as f64, "{free}");
    let status = w
        .agent(&["status", "--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(
        text.contains("spool:") && text.contains("spool.min_free"),
        "{text}"
    );

    for i in 0..3 {
        w.put(&format!("input/wait-{i}.csv"), orders_csv(i * 10, 10))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(w.depth(&w.queue).await, (3, 0), "a message was received");
    assert!(w.get("output/wait-0.csv").await.is_none());
    assert!(agent.log_text().contains("not receiving until"));

    // Room again (5 MiB free, above the resume mark): ready, and the files go through.
    fill(&filler, 3);
    wait_ready(port, 200, &agent).await;
    for i in 0..3 {
        w.wait_for(&format!("output/wait-{i}.csv"), WAIT, &agent)
            .await;
    }
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(agent.log_text().contains("the spool has room again"));

    // 3 MiB free, still receiving, but a 2 MiB object does not fit above the 2 MiB mark: not
    // downloaded.
    fill(&filler, 5);
    w.put("big/big.bin", vec![b'\n'; 2 << 20]).await;
    agent.wait_log("not downloaded", WAIT).await;
    assert!(w.get("big-out/big.bin/count.txt").await.is_none());
    std::fs::remove_file(&filler).unwrap();
    let count = w.wait_for("big-out/big.bin/count.txt", WAIT, &agent).await;
    assert_eq!(String::from_utf8_lossy(&count), format!("{}\n", 2 << 20));
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());
    assert_eq!(w.items().await.len(), 30);
    drop(agent);
}
