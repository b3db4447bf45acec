//! The fault suite: the real daemon against moto on 127.0.0.1, through kills, an outage, a misbehaving
//! network and a fleet of daemons on one queue. Every scenario ends with the same accounting
//! ([`World::account`]): the table holds exactly the expected ids with unchanged ConfirmationIds, every
//! output lists its rows, the main and dead-letter queues are empty, and the daemon is alive.

use std::time::{Duration, Instant};

use crate::support::proxy::{FaultProxy, Faults};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);

use crate::support::order_ids as ids;

/// Send the agent's S3, SQS and DynamoDB calls through `proxy` (the world was provisioned, and the
/// harness keeps talking, to the emulator directly).
fn through(w: &World, proxy: &FaultProxy) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&w.config)
        .unwrap();
    writeln!(
        f,
        "[aws.endpoints]\ns3 = \"{0}\"\nsqs = \"{0}\"\ndynamodb = \"{0}\"",
        proxy.endpoint
    )
    .unwrap();
}

/// Wait for the output of every file (`input/<name>` → `output/<name>`).
async fn wait_outputs(w: &World, files: &[(String, Vec<String>)], agent: &Agent) {
    for (key, _) in files {
        let name = key.trim_start_matches("input/");
        w.wait_for(&format!("output/{name}"), WAIT, agent).await;
    }
}

fn alive(agent: &mut Agent) {
    let child = agent.child.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited; log:\n{}",
        agent.log_text()
    );
}

fn kill(agent: &mut Agent) {
    agent.signal(libc::SIGKILL);
    let _ = agent.child.take().unwrap().wait();
}

/// SIGKILL at three points of one file's life — as it starts, in the middle of its writes, and once its
/// output exists (before the message is deleted) — and a restart each time: the file finishes, no row is
/// lost or doubled, no ConfirmationId changes, and the output after the restart is byte-identical to any
/// output stored before the kill.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_any_point_of_a_file_then_restart_loses_nothing() {
    let w = World::with(
        "kill",
        Options {
            visibility_timeout: "5s",
            ..Options::default()
        },
    )
    .await;
    let rows = 3_000;
    let mut files = Vec::new();
    for (n, point) in ["start", "writes", "output"].iter().enumerate() {
        let key = format!("input/kill-{point}.csv");
        let first = n * rows;
        let mut agent = w.start();
        w.put(&key, orders_csv(first, rows)).await;
        let out_key = format!("output/kill-{point}.csv");
        let start = Instant::now();
        let mut before = None;
        loop {
            assert!(start.elapsed() < WAIT, "{point}: kill point never reached");
            let reached = match *point {
                "start" => agent.log_text().contains(&key),
                "writes" => w.items().await.len() >= n * rows + 300,
                _ => {
                    before = w.get(&out_key).await;
                    before.is_some()
                }
            };
            if reached {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(&mut agent);
        let written = w.items().await.len() - n * rows;
        eprintln!("{point}: killed with {written} of {rows} rows written");
        let mut agent = w.start();
        let after = w.wait_for(&out_key, WAIT, &agent).await;
        if let Some(before) = before {
            assert_eq!(before, after, "{point}: the output changed");
        }
        w.wait_queue_empty(WAIT, &agent).await;
        files.push((key, ids(first, rows)));
        w.account(&files, "output/").await;
        alive(&mut agent);
        agent.terminate(Duration::from_secs(30));
    }
}

/// AWS unreachable for 30 s in the middle of a run (every connection dropped at a proxy), files uploaded
/// before and during the outage: the daemon never exits, counts the failures as transient, does not
/// hammer the endpoint, and finishes everything once the service is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_aws_outage_of_30_s_loses_nothing() {
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    let w = World::with(
        "outage",
        Options {
            visibility_timeout: "10s",
            retry_base: "1s",
            retry_max: "10s",
            ..Options::default()
        },
    )
    .await;
    through(&w, &proxy);
    let mut agent = w.start();
    let mut files = Vec::new();
    for i in 0..6 {
        let key = format!("input/before-{i}.csv");
        w.put(&key, orders_csv(i * 200, 200)).await;
        files.push((key, ids(i * 200, 200)));
    }
    w.wait_for("output/before-0.csv", WAIT, &agent).await;

    proxy.set(Faults {
        down: true,
        ..Faults::default()
    });
    let dropped0 = proxy.count(|c| &c.dropped);
    for i in 6..10 {
        let key = format!("input/during-{i}.csv");
        w.put(&key, orders_csv(i * 200, 200)).await;
        files.push((key, ids(i * 200, 200)));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = proxy.count(|c| &c.dropped) - dropped0;
    alive(&mut agent);
    proxy.set(Faults::default());
    let back = Instant::now();

    wait_outputs(&w, &files, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    eprintln!(
        "outage: {during} connection attempts in 30 s; drained {:?} after the end of the outage",
        back.elapsed()
    );
    w.account(&files, "output/").await;
    alive(&mut agent);
    let log = agent.log_text();
    assert!(
        log.contains("cannot receive from http"),
        "failures logged as transient:\n{log}"
    );
    assert!(
        !log.contains("missing queue or no permission"),
        "an outage is not a configuration error:\n{log}"
    );
    // The bound: the receiver's backoff (1 s doubling to 30 s) plus the retries of the files in flight
    // when the outage began (the SDK's attempts, then the file's own backoff). Measured: 24 to 82
    // connection attempts in the 30 s, against thousands for a retry loop without backoff.
    assert!(
        during <= 250,
        "{during} connection attempts during a 30 s outage"
    );
    agent.terminate(Duration::from_secs(30));
}

/// A network that delays every request by 20 ms, answers 10 % of them `503` and resets 5 % in the middle
/// of the response: every file is processed exactly as without faults.
#[tokio::test(flavor = "multi_thread")]
async fn a_misbehaving_network_changes_nothing_in_the_results() {
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    let w = World::with(
        "flaky",
        Options {
            retry_base: "1s",
            retry_max: "5s",
            ..Options::default()
        },
    )
    .await;
    through(&w, &proxy);
    proxy.set(Faults {
        latency: Duration::from_millis(20),
        error_rate: 0.10,
        reset_rate: 0.05,
        ..Faults::default()
    });
    let mut agent = w.start();
    let mut files = Vec::new();
    for i in 0..20 {
        let key = format!("input/flaky-{i}.csv");
        w.put(&key, orders_csv(i * 100, 100)).await;
        files.push((key, ids(i * 100, 100)));
    }
    wait_outputs(&w, &files, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    let (errors, resets) = (proxy.count(|c| &c.errors), proxy.count(|c| &c.resets));
    eprintln!("flaky network: {errors} answers of 503, {resets} resets");
    assert!(errors > 0 && resets > 0, "the proxy injected faults");
    // The SDK's retries are in the log, with what failed the attempt before.
    let log = agent.log_text();
    let retries: Vec<&str> = log.lines().filter(|l| l.contains(" (attempt ")).collect();
    eprintln!(
        "flaky network: {} retries logged, e.g. {:?}",
        retries.len(),
        retries.iter().find(|l| !l.contains("HTTP "))
    );
    assert!(
        retries.iter().any(|l| l.contains("HTTP 503")),
        "a retry after a 503 is logged:\n{log}"
    );
    assert!(
        retries.iter().any(|l| !l.contains("HTTP ")),
        "a retry after a reset is logged:\n{log}"
    );
    proxy.set(Faults::default());
    w.account(&files, "output/").await;
    alive(&mut agent);
    agent.terminate(Duration::from_secs(30));
}

/// Three daemons (separate spools, one queue and table) and 500 files uploaded at once; one of them is
/// SIGKILLed in the middle. The other two finish its work: every file processed, the table holds exactly
/// the expected rows with their ConfirmationIds, every output present.
#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_of_three_shares_500_files_and_survives_losing_one() {
    let w = World::with(
        "fleet",
        Options {
            visibility_timeout: "5s",
            max_in_flight: 8,
            ..Options::default()
        },
    )
    .await;
    let files: Vec<(String, Vec<String>)> = (0..500)
        .map(|i| (format!("input/fleet-{i}.csv"), ids(i * 4, 4)))
        .collect();
    let started = Instant::now();
    futures::future::join_all(
        files
            .iter()
            .enumerate()
            .map(|(i, (key, _))| w.put(key, orders_csv(i * 4, 4))),
    )
    .await;
    let mut fleet: Vec<Agent> = (0..3).map(|n| w.start_replica(n)).collect();
    let mut victim = fleet.remove(0);
    let halfway = Instant::now();
    while w.items().await.len() < 800 {
        assert!(halfway.elapsed() < WAIT, "no progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kill(&mut victim);
    wait_outputs(&w, &files, &fleet[0]).await;
    w.wait_queue_empty(WAIT, &fleet[0]).await;
    eprintln!("fleet: 500 files in {:?}", started.elapsed());
    w.account(&files, "output/").await;
    for agent in &mut fleet {
        alive(agent);
    }
}

/// The spool on a 4 MiB tmpfs (`spool.min_free` 1 MiB): a gzip object of 11 KB that decompresses to
/// 6 MB fits by its announced size but not once decompressed: its download fails with "No space left
/// on device". It waits (its message not acknowledged, nothing written for it, not dead-lettered) while
/// small files keep flowing, and is processed once the filesystem grows. (An object whose announced
/// size does not fit is not downloaded at all: `monitoring::a_spool_short_of_space_…`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_makes_a_large_file_wait_while_small_ones_flow() {
    let w = World::with(
        "fulldisk",
        Options {
            retry_base: "1s",
            retry_max: "4s",
            // Short retries, but enough of them that the waiting file is not given up on (dead-lettered)
            // however long the small files take on a loaded machine.
            max_receive_count: 200,
            ..Options::default()
        },
    )
    .await;
    let disk = SmallDisk::mount(&w.dir.path().join("spool"), "4m");
    let mut cmd = w.agent(&["run"]);
    cmd.env("OFFLOAD_AGENT_SPOOL__MIN_FREE", "1MiB");
    let mut agent = w.start_cmd(cmd);
    let pad = "p".repeat(10_000);
    let mut big = format!("{HEADER},Notes\n");
    for i in 0..600 {
        big.push_str(&format!(
            "{},{pad}\n",
            order_row(&(100_000_000 + i).to_string(), i)
        ));
    }
    assert!(big.len() > 5_000_000);
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(big.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    assert!(gz.len() < 1 << 20, "{}", gz.len());
    w.clients
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key("input/big.csv")
        .content_encoding("gzip")
        .body(gz.into())
        .send()
        .await
        .unwrap();
    let mut files = vec![("input/big.csv".to_string(), ids(0, 600))];
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 1..6 {
        let key = format!("input/small-{i}.csv");
        w.put(&key, orders_csv(i * 1000, 50)).await;
        let name = key.trim_start_matches("input/");
        w.wait_for(&format!("output/{name}"), WAIT, &agent).await;
        files.push((key, ids(i * 1000, 50)));
    }
    agent
        .wait_log("failed for now", Duration::from_secs(30))
        .await;
    assert!(
        w.get("output/big.csv").await.is_none(),
        "big file done on a full disk?"
    );
    assert_eq!(
        w.items().await.len(),
        5 * 50,
        "nothing of the big file written"
    );
    assert_eq!(
        w.depth(&w.dlq).await,
        (0, 0),
        "the big file is not dead-lettered"
    );
    let log = agent.log_text();
    assert!(
        log.contains("No space left"),
        "the log names the cause:\n{log}"
    );

    disk.resize("64m");
    let back = Instant::now();
    w.wait_for("output/big.csv", WAIT, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    eprintln!(
        "full disk: processed {:?} after space returned",
        back.elapsed()
    );
    w.account(&files, "output/").await;
    alive(&mut agent);
    agent.terminate(Duration::from_secs(30));
}

/// Docker stopped and started again under the supervised ECS agent while files flow (a private engine
/// with live restore on a socket of its own, so that the other Docker suites keep theirs): the
/// supervisor waits for the engine, then reconnects and re-adopts the agent's container, which never
/// stopped; the worker does not notice — every file uploaded before, during and after is accounted for.
#[tokio::test(flavor = "multi_thread")]
async fn docker_restarted_under_the_ecs_agent_leaves_the_worker_untouched() {
    let mut engine = crate::support::docker::PrivateDocker::start().await;
    let rig =
        crate::support::docker::Rig::prepare_on("fault-restart", false, Some(&engine.socket()))
            .await;
    let port = free_port();
    let w = World::with(
        "dockerrestart",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            ecs_agent: rig.ecs_agent_section(),
            ..Options::default()
        },
    )
    .await;
    let mut agent = w.start();
    wait_ecs(port, "answered", &agent, |e| !e["version"].is_null()).await;
    let mut files = Vec::new();
    let upload = async |files: &mut Vec<(String, Vec<String>)>, phase: &str, from: usize| {
        for i in from..from + 4 {
            let key = format!("input/{phase}-{i}.csv");
            w.put(&key, orders_csv(i * 300, 300)).await;
            files.push((key, ids(i * 300, 300)));
        }
    };
    upload(&mut files, "before", 0).await;

    engine.stop();
    let waiting = offload_agent::ecs_agent::State::WaitingForDocker.to_string();
    wait_ecs(port, "waited for Docker", &agent, |e| {
        e["state"] == waiting.as_str()
    })
    .await;
    upload(&mut files, "during", 4).await;
    // The worker goes on without Docker: the files uploaded while it is down are done before it returns.
    wait_outputs(&w, &files, &agent).await;
    assert_eq!(
        status(port).await.unwrap()["ecs_agent"]["state"],
        waiting.as_str()
    );

    engine.start_again().await;
    let back = Instant::now();
    upload(&mut files, "after", 8).await;
    agent.wait_log("adopted the running container", WAIT).await;
    wait_ecs(port, "answered again", &agent, |e| {
        e["state"] == "running" && !e["version"].is_null()
    })
    .await;
    eprintln!(
        "docker restart: agent re-adopted {:?} after the engine returned",
        back.elapsed()
    );
    wait_outputs(&w, &files, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    w.account(&files, "output/").await;
    let e = status(port).await.unwrap()["ecs_agent"].clone();
    assert_eq!(e["restarts"], 0, "{e}");
    assert_eq!(
        rig.starts(),
        1,
        "the agent kept running through the Docker restart"
    );
    alive(&mut agent);
    agent.terminate(Duration::from_secs(30));
}

/// AWS's clock 10 minutes ahead of the host's (every answer's `Date` moved by the proxy): files are
/// still processed (the SDK signs with the skew it measured), the skew shows in
/// `offload_clock_skew_seconds` and `/status`, and one warning names time synchronisation however many
/// answers follow.
#[tokio::test(flavor = "multi_thread")]
async fn a_drifted_clock_is_measured_and_named_once() {
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    let port = free_port();
    let w = World::with(
        "skew",
        Options {
            admin_listen: format!("127.0.0.1:{port}"),
            ..Options::default()
        },
    )
    .await;
    through(&w, &proxy);
    proxy.set(Faults {
        date_ahead: Duration::from_secs(600),
        ..Faults::default()
    });
    let agent = w.start();
    w.put("input/skew.csv", orders_csv(0, 5)).await;
    w.wait_for("output/skew.csv", WAIT, &agent).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    let skew = loop {
        let (_, body) = offload_agent::admin::get(addr, "/metrics", Duration::from_secs(5))
            .await
            .unwrap();
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix("offload_clock_skew_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        match value {
            Some(v) if v > 1.0 => break v,
            _ if started.elapsed() > WAIT => panic!("no skew in /metrics:\n{body}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert!((590.0..=610.0).contains(&skew), "{skew}");
    let (_, body) = offload_agent::admin::get(addr, "/status", Duration::from_secs(5))
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shown = doc["clock_skew_seconds"].as_f64().unwrap();
    assert!((590.0..=610.0).contains(&shown), "{body}");
    // More answers, one warning.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = agent.log_text();
    assert_eq!(log.matches("this host's clock is").count(), 1, "{log}");
    assert!(log.contains("time synchronisation"), "{log}");
}
