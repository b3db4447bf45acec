//! The booted host: a Debian 12 root filesystem with systemd as PID 1 (made with debootstrap and
//! imported into Docker by `scripts/test`), host network so that it reaches the AWS emulator on
//! 127.0.0.1, the host's Docker socket mounted. `vagrant/provision.sh` installs the freshly built .deb
//! (`scripts/package`), and the test drives the service as an operator would, with `systemctl` and
//! `journalctl`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{order_ids, order_row, orders_csv, repo, unique, Options, World};

const IMAGE: &str = "offload-test-systemd:bookworm";
const SETUP: &str =
    "run the tests with `scripts/test` (it builds the packages with scripts/package and \
                     the systemd image with debootstrap)";

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A command pipeline whose program reports the account it runs as ({bucket}: the world's).
const WHO_PIPELINE: &str = "[[pipeline]]\nname = \"who\"\nbucket = \"{bucket}\"\nprefix = \"who/\"\n\
     output_prefix = \"who-out/\"\nprocessor = { command = { program = \"/usr/local/bin/who-proc\", \
     args = [\"{input}\", \"{output_dir}\"] } }\n";

/// A booted systemd container; removed when dropped.
struct Booted {
    name: String,
}

impl Booted {
    fn start() -> Booted {
        let deb = repo().join("target/packages/offload-agent.deb");
        assert!(deb.exists(), "{} is missing: {SETUP}", deb.display());
        let (code, out) = run(Command::new("docker").args(["image", "inspect", IMAGE]));
        assert_eq!(code, 0, "no image {IMAGE} ({out}): {SETUP}");
        let name = unique("offload-systemd");
        let vagrant = format!("{}:/src/vagrant:ro", repo().join("vagrant").display());
        let pkg = format!("{}:/pkg:ro", repo().join("target/packages").display());
        let (code, out) = run(Command::new("docker").args([
            "run",
            "-d",
            "--name",
            &name,
            "--cap-add",
            "SYS_ADMIN",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--network",
            "host",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &vagrant,
            "-v",
            &pkg,
            IMAGE,
            "/lib/systemd/systemd",
        ]));
        assert_eq!(code, 0, "docker run: {out}");
        let b = Booted { name };
        b.wait("systemd up", Duration::from_secs(60), || {
            let (_, s) = b.sh("systemctl is-system-running");
            s.contains("running") || s.contains("degraded")
        });
        b
    }

    fn sh(&self, script: &str) -> (i32, String) {
        run(Command::new("docker").args(["exec", &self.name, "bash", "-c", script]))
    }

    fn ok(&self, script: &str) -> String {
        let (code, out) = self.sh(script);
        assert_eq!(code, 0, "{script}: {out}");
        out
    }

    fn prop(&self, p: &str) -> String {
        self.sh(&format!("systemctl show -p {p} --value offload-agent"))
            .1
            .trim()
            .to_string()
    }

    /// The journal's latest cursor, to read what comes after it.
    fn cursor(&self) -> String {
        self.ok("journalctl -n 1 --show-cursor --no-pager -o cat")
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("-- cursor: ").map(str::to_string))
            .expect("a journal cursor")
    }

    /// The unit's journal entries after `cursor`: (PRIORITY, MESSAGE). Read as JSON from the cursor
    /// itself and the cursor's entry dropped here: `journalctl --after-cursor` with a match (`-u`,
    /// `-p`) skips the first matching entry after the cursor (systemd 252).
    fn entries_after(&self, cursor: &str) -> Vec<(u8, String)> {
        self.ok(&format!(
            "journalctl -u offload-agent --no-pager -o json --cursor='{cursor}'"
        ))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["__CURSOR"] != cursor)
        .filter_map(|e| {
            let p = e["PRIORITY"].as_str()?.parse().ok()?;
            Some((p, e["MESSAGE"].as_str()?.to_string()))
        })
        .collect()
    }

    fn journal(&self) -> String {
        self.sh("journalctl -u offload-agent --no-pager -o cat").1
    }

    fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            if start.elapsed() > timeout {
                panic!(
                    "{what}: not within {timeout:?}\nstatus: {}\njournal:\n{}",
                    self.sh("systemctl status offload-agent --no-pager").1,
                    self.journal()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Write a file inside the host (through `docker exec -i … cat`).
    fn write(&self, path: &str, text: &str) {
        let mut cmd = Command::new("docker");
        cmd.args([
            "exec",
            "-i",
            &self.name,
            "bash",
            "-c",
            &format!("cat > {path}"),
        ]);
        crate::support::feed(cmd, text, &format!("writing {path}"));
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// The whole life of the service on a booted host, as an operator lives it: install through
/// provision.sh, ready and processing with the documented journal fields, a missing queue at start
/// (active, degraded, recovers without a restart), reload, SIGKILL (restarted, the interrupted file
/// done), a wedged daemon (the watchdog restarts it), a broken configuration (fails once, names the key),
/// a clean stop, purge; then the unit's verification and security score, and the .rpm's contents.
#[tokio::test(flavor = "multi_thread")]
async fn a_booted_debian_host_runs_the_service_as_an_operator_expects() {
    let w = World::with(
        "systemd",
        Options {
            visibility_timeout: "10s",
            // The emulator's bucket notifies the queue of who/ too (World provisions its pipelines).
            extra: WHO_PIPELINE.to_string(),
            ..Options::default()
        },
    )
    .await;
    let b = Booted::start();

    // 1. Install with the provisioning script, against the emulator; with a command pipeline, whose
    // program must run as the package's offload-proc under the unit's sandbox and capabilities.
    b.write(
        "/usr/local/bin/who-proc",
        "#!/bin/sh\nid -un > \"$2/user.txt\"\nif touch /var/lib/offload-agent/x 2>/dev/null; then \
         echo wrote > \"$2/escaped.txt\"; fi\n",
    );
    b.ok("chmod 755 /usr/local/bin/who-proc");
    // A drop-in's [[pipeline]] replaces the list: provision.sh's orders pipeline is written again.
    let pipelines = format!(
        "[[pipeline]]\nname = \"orders\"\nbucket = \"{b}\"\nprefix = \"input/\"\nsuffix = \".csv\"\n\
         processor = \"orders-csv\"\ntable = \"{t}\"\noutput_prefix = \"output/\"\n{WHO_PIPELINE}",
        b = w.bucket,
        t = w.table
    )
    .replace("{bucket}", &w.bucket);
    install(&b, &w, &pipelines);
    assert_eq!(b.prop("ActiveState"), "active");
    assert_eq!(
        b.ok("stat -c %a /var/lib/offload-agent /var/lib/offload-agent/spool"),
        "711\n711\n"
    );
    w.put("who/a.txt", "x\n").await;
    wait_s3(&w, "who-out/a.txt/user.txt", &b).await;
    let user = w.get("who-out/a.txt/user.txt").await.unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&user), "offload-proc\n");
    assert!(
        w.get("who-out/a.txt/escaped.txt").await.is_none(),
        "the command wrote into /var/lib/offload-agent"
    );

    // 2. Ready (Type=notify: active only after READY=1, with a status line), processing, journal fields.
    assert_eq!(b.prop("Type"), "notify");
    assert!(
        b.prop("StatusText").contains("files done"),
        "{}",
        b.prop("StatusText")
    );
    w.put("input/sd-1.csv", orders_csv(0, 20)).await;
    wait_s3(&w, "output/sd-1.csv", &b).await;
    let json = b.ok("journalctl -u offload-agent -o json --no-pager KEY=input/sd-1.csv");
    let entries: Vec<serde_json::Value> = json
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let processed = entries
        .iter()
        .find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.starts_with("processed s3://"))
        })
        .unwrap_or_else(|| panic!("no 'processed' entry for the file:\n{json}"));
    assert_eq!(processed["BUCKET"], w.bucket.as_str());
    assert_eq!(processed["PIPELINE"], "orders");
    assert_eq!(processed["ROWS_WRITTEN"], "20");
    assert!(processed["MESSAGE_ID"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(processed["PRIORITY"], "6");
    // The README's query, as written there.
    let readme = b.ok("journalctl -u offload-agent KEY=input/sd-1.csv --no-pager");
    assert!(readme.contains("processed"), "{readme}");

    // 3. The queue missing at start: active anyway, the status says why, recovers without a restart.
    b.ok("systemctl stop offload-agent");
    w.delete_queue().await;
    let story_from = b.cursor();
    b.ok("systemctl start offload-agent");
    assert_eq!(b.prop("ActiveState"), "active");
    b.wait(
        "status names the missing queue",
        Duration::from_secs(20),
        || b.prop("StatusText").contains("not found"),
    );
    let restarts = b.prop("NRestarts");
    let out = w.agent(&["provision"]).output().unwrap();
    assert!(out.status.success());
    w.put("input/sd-2.csv", orders_csv(100, 5)).await;
    wait_s3(&w, "output/sd-2.csv", &b).await;
    assert_eq!(b.prop("NRestarts"), restarts, "recovered without a restart");

    // 3b. A file with two rejected rows and one that cannot be processed, then a stop: the journal
    // tells that story in its own words.
    let mut mixed = orders_csv(200, 3);
    mixed += &order_row("203", 3).replace("651.21", "lots");
    mixed += "\n";
    mixed += &order_row("", 4);
    mixed += "\n";
    w.put("input/sd-rej.csv", mixed).await;
    wait_s3(&w, "output/sd-rej.csv", &b).await;
    w.put(
        "input/sd-bad.csv",
        "not,the,orders,header\n1,2,3,4\n".to_string(),
    )
    .await;
    b.wait(
        "the bad file dead-lettered",
        Duration::from_secs(30),
        || b.journal().contains("moved to the dead-letter queue"),
    );
    b.ok("systemctl stop offload-agent");
    journal_tells_the_story(&b, &w, &story_from);
    b.ok("systemctl start offload-agent");

    // 4a. Reload applies a changed setting.
    b.write(
        "/etc/offload-agent/conf.d/70-live.toml",
        "[queue]\nmax_in_flight = 2\n",
    );
    b.ok("systemctl reload offload-agent");
    b.wait("reload applied", Duration::from_secs(20), || {
        b.journal().contains("queue.max_in_flight 8 -> 2")
    });

    // 4b. SIGKILL in the middle of a file: systemd restarts the daemon, and the file is finished.
    let before = b.prop("NRestarts").parse::<u32>().unwrap();
    w.put("input/sd-big.csv", orders_csv(10_000, 20_000)).await;
    wait_items(&w, 25, &b).await;
    b.ok("systemctl kill -s SIGKILL offload-agent");
    b.wait("restarted after SIGKILL", Duration::from_secs(30), || {
        b.prop("NRestarts").parse::<u32>().unwrap_or(0) > before
            && b.prop("ActiveState") == "active"
    });
    wait_s3(&w, "output/sd-big.csv", &b).await;

    // 4c. A wedged daemon (stopped with SIGSTOP: no loop turns) is restarted by the watchdog.
    b.ok("mkdir -p /etc/systemd/system/offload-agent.service.d");
    b.write(
        "/etc/systemd/system/offload-agent.service.d/watchdog.conf",
        // TimeoutAbortSec: how long the watchdog's SIGABRT may take before SIGKILL (default: 60 s).
        "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n",
    );
    b.ok("systemctl daemon-reload && systemctl restart offload-agent");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(b.prop("ActiveState"), "active", "fed while healthy");
    let before = b.prop("NRestarts").parse::<u32>().unwrap();
    b.ok("systemctl kill -s SIGSTOP offload-agent");
    b.wait("restarted by the watchdog", Duration::from_secs(40), || {
        b.prop("NRestarts").parse::<u32>().unwrap_or(0) > before
            && b.prop("ActiveState") == "active"
    });
    let journal = b.sh("journalctl --no-pager -o cat").1;
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    // The sandbox (SystemCallFilter, MemoryDenyWriteExecute) lets the daemon unmap its start-up
    // code (30 s after READY; any of this test's daemons will do).
    b.wait("start-up pages unmapped", Duration::from_secs(45), || {
        b.journal().contains("unmapped the pages of start-up code")
    });
    assert!(!b.journal().contains("could not unmap"), "{}", b.journal());
    b.ok("rm /etc/systemd/system/offload-agent.service.d/watchdog.conf && systemctl daemon-reload");

    // 5. A broken configuration fails the unit once, naming the key and the file; no restart loop.
    b.write(
        "/etc/offload-agent/conf.d/80-broken.toml",
        "[queue]\nmax_in_flight = \"many\"\n",
    );
    // The journal's cursor, not a time: a start in the same second as the last one must not count.
    let cursor = b.cursor();
    let (code, _) = b.sh("systemctl restart offload-agent");
    assert_ne!(code, 0, "start with a broken configuration fails");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(b.prop("ActiveState"), "failed");
    // A manual start resets the count of automatic restarts: it stays 0 without a loop.
    assert_eq!(b.prop("NRestarts"), "0", "no restart loop");
    assert_eq!(b.prop("ExecMainStatus"), "78");
    let starts = b
        .entries_after(&cursor)
        .iter()
        .filter(|(_, m)| m.starts_with("Starting offload-agent"))
        .count();
    assert_eq!(starts, 1, "started once, not in a loop");
    let journal = b.journal();
    assert!(
        journal.contains("queue.max_in_flight") && journal.contains("80-broken.toml"),
        "{journal}"
    );
    b.ok("rm /etc/offload-agent/conf.d/80-broken.toml && systemctl reset-failed offload-agent && systemctl start offload-agent");

    // A clean stop, well within TimeoutStopSec.
    let start = Instant::now();
    b.ok("systemctl stop offload-agent");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(b.prop("Result"), "success");
    assert_eq!(b.prop("ExecMainStatus"), "0");

    // The unit verifies clean; its security exposure is printed (and recorded in the README).
    let (code, out) = b.sh(
        // --man=no: the minimal image has no man-db to look Documentation=man: up with (the page's
        // presence is checked below).
        "systemd-analyze verify --man=no /lib/systemd/system/offload-agent.service 2>&1",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("offload-agent.service:"),
        "verify complains: {out}"
    );
    let security = b.ok("systemd-analyze security offload-agent.service --no-pager 2>&1");
    let score = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no score")
        .to_string();
    println!("systemd-analyze security: {score}");

    b.ok("test -s /usr/share/man/man1/offload-agent.1.gz && test -s /usr/share/bash-completion/completions/offload-agent");
    // The operator's documentation, which the man pages point at.
    b.ok("test -s /usr/share/doc/offload-agent/README.md && test -s /usr/share/doc/offload-agent/operations.md && test -s /usr/share/doc/offload-agent/hybrid.md");

    // Purge removes the service, its state and its configuration.
    b.ok("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq offload-agent");
    b.ok("test ! -e /var/lib/offload-agent && test ! -e /etc/offload-agent && test ! -e /lib/systemd/system/offload-agent.service");

    // 6. The .rpm has the same layout and scriptlets.
    let rpm = repo().join("target/packages/offload-agent.rpm");
    let (code, out) = run(Command::new("rpm")
        .args(["-qp", "--list", "--scripts"])
        .arg(&rpm));
    assert_eq!(code, 0, "{out}");
    for want in [
        "/usr/bin/offload-agent",
        "/usr/lib/systemd/system/offload-agent.service",
        "/etc/offload-agent/agent.toml",
        "/usr/share/man/man1/offload-agent.1",
        "/usr/share/doc/offload-agent/operations.md",
        "/usr/lib/tmpfiles.d/offload-agent.conf",
        "systemctl enable offload-agent.service",
        "offload-agent config check",
        "rm -rf /var/lib/offload-agent",
    ] {
        assert!(out.contains(want), "{want} not in the .rpm:\n{out}");
    }
}

/// The unit's journal from a start with the queue missing to a stop — the queue created, a good file,
/// a file with rejected rows, a file that cannot be processed — read as an operator reads it
/// (`journalctl -u offload-agent -o cat`, no verbose fields): every line a sentence with the file, the
/// counts, the outcome, in this order; and `-p warning` holding the two problems, once each.
fn journal_tells_the_story(b: &Booted, w: &World, cursor: &str) {
    let entries = b.entries_after(cursor);
    let read = |max: u8| -> Vec<&str> {
        entries
            .iter()
            .filter(|(p, _)| *p <= max)
            .map(|(_, m)| m.as_str())
            .collect()
    };
    // -p info: what the default view shows, without the debug lines.
    let lines = read(6);
    let text = lines.join("\n");
    let (bucket, queue) = (w.bucket.as_str(), w.queue.as_str());
    let url = |key: &str| format!("s3://{bucket}/{key}");
    // What a person expects to read, in order: every fragment of an entry on one line.
    let story: Vec<Vec<String>> = vec![
        vec!["Starting offload-agent".into()],
        vec!["Started offload-agent".into()],
        vec![
            format!("queue {queue} found (http"),
            "failed lookup(s) over".into(),
        ],
        vec![
            "receiving from http".into(),
            "dead-letter queue http".into(),
        ],
        vec![
            format!("processing {} (", url("input/sd-2.csv")),
            "with pipeline orders".into(),
        ],
        vec![format!(
            "processed {}: 5 rows written, 0 rejected, output {} in ",
            url("input/sd-2.csv"),
            url("output/sd-2.csv")
        )],
        vec![format!("processing {}", url("input/sd-rej.csv"))],
        vec![format!(
            "processed {}: 3 rows written, 2 rejected (rejected rows in {}), output {} in ",
            url("input/sd-rej.csv"),
            url("output/sd-rej.csv.rejects.csv"),
            url("output/sd-rej.csv")
        )],
        vec![format!("processing {}", url("input/sd-bad.csv"))],
        vec![
            format!("{} cannot be processed: ", url("input/sd-bad.csv")),
            "error report".into(),
        ],
        vec![
            "moved to the dead-letter queue http".into(),
            url("input/sd-bad.csv"),
        ],
        vec![
            "shutting down: no new messages".into(),
            "agent.shutdown_grace (5s)".into(),
        ],
        vec!["worker pool stopped".into()],
        vec!["stopped: messages received=".into()],
        vec!["Stopped offload-agent".into()],
    ];
    let mut at = 0;
    for want in &story {
        match lines[at..]
            .iter()
            .position(|l| want.iter().all(|f| l.contains(f.as_str())))
        {
            Some(i) => at += i + 1,
            None => panic!(
                "the journal does not say {want:?} after line {at}:\n{}",
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("{i:3} {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
    // Lines whose place is not fixed (the queue is looked for while the daemon gets ready; systemd's
    // and the daemon's lines about the stop race): once.
    for once in [
        format!("cannot find the queue {queue}"),
        "ready: pipelines orders, who; ECS agent supervision off".to_string(),
        "Stopping offload-agent".to_string(),
    ] {
        let n = lines.iter().filter(|l| l.contains(once.as_str())).count();
        assert_eq!(n, 1, "{once:?} {n} times:\n{text}");
    }
    // No line that is only a name (a span's, a component's): a sentence of several words.
    for l in &lines {
        assert!(
            l.split_whitespace().count() >= 3,
            "a line that says nothing: {l:?}\n{text}"
        );
    }
    // -p warning: exactly the two problems of the story, once each.
    let problems = read(4);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains(&format!("cannot find the queue {queue}"))
            && problems[0].contains("offload-agent provision"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains(&format!("{} cannot be processed", url("input/sd-bad.csv"))),
        "{problems:#?}"
    );
}

/// Install the package with `vagrant/provision.sh` against the world's emulator and resources; the
/// test's settings in conf.d (short grace and waits), and `extra` TOML in a file after them.
fn install(b: &Booted, w: &World, extra: &str) {
    b.ok("install -d -m 0750 /etc/offload-agent/conf.d");
    // The booted hosts share this machine's network namespace: each its own admin port, so that two
    // running at once do not take each other's (the one that lost would warn about it).
    b.write(
        "/etc/offload-agent/conf.d/60-test.toml",
        &format!(
            "[agent]\nshutdown_grace = \"5s\"\nlog_level = \"info,offload_agent::daemon=debug\"\n[queue]\n\
             visibility_timeout = \"10s\"\nwait_time = \"1s\"\nretry_base = \"1s\"\n[admin]\n\
             listen = \"127.0.0.1:{}\"\n",
            crate::support::free_port()
        ),
    );
    if !extra.is_empty() {
        b.write("/etc/offload-agent/conf.d/61-extra.toml", extra);
    }
    let provision = format!(
        "OFFLOAD_REGION=us-east-1 OFFLOAD_QUEUE={q} OFFLOAD_DLQ={dlq} OFFLOAD_BUCKET={b} OFFLOAD_TABLE={t} \
         OFFLOAD_ENDPOINT={e} OFFLOAD_AWS_ACCESS_KEY_ID=testing OFFLOAD_AWS_SECRET_ACCESS_KEY=testing \
         OFFLOAD_DEB=/pkg/offload-agent.deb /src/vagrant/provision.sh",
        q = w.queue,
        dlq = w.dlq,
        b = w.bucket,
        t = w.table,
        e = w.endpoint
    );
    b.ok(&provision);
}

/// Wait until the table holds more than `n` items (a file is under way).
async fn wait_items(w: &World, n: usize, b: &Booted) {
    let start = Instant::now();
    while w.items().await.len() <= n {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", b.journal());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fleet's second day on one host: version N installed and processing a 20,000-row file (3,000
/// rows were done before `apt-get` had unpacked the package), then
/// `apt-get install` of version N+1 (the same build, packaged by `scripts/package` with a bumped
/// version) in the middle of it: the old daemon releases the file, the new one processes it — exact
/// accounting (every id, unchanged ConfirmationIds, one output listing the rows), the edited conffile
/// untouched, the new version running. Then a power cut in the middle of a second file (`docker kill`
/// of the host's systemd: no SIGTERM for anyone) and a boot: the enabled unit is active without help,
/// the spool's leftovers removed, the file back after its visibility timeout and processed, exact
/// accounting for both files — while a Docker slow at boot is still starting (the unit is not ordered
/// after it). Last, a reinstall over an operator's drop-in holding a key this version does not know:
/// the key named, the daemon left running. (The ECS agent's adoption across an upgrade is covered by
/// the supervisor's tests; this host runs without one.)
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_and_a_power_cut_lose_no_file() {
    const ROWS: usize = 20_000;
    let next = repo().join("target/packages/offload-agent-next.deb");
    assert!(next.exists(), "{} is missing: {SETUP}", next.display());
    let w = World::with(
        "upgrade",
        Options {
            visibility_timeout: "10s",
            ..Options::default()
        },
    )
    .await;
    let b = Booted::start();
    // One batch in flight at a time and a 1 s grace: the file is caught in the middle, and
    // the old daemon releases it rather than finishing it.
    install(
        &b,
        &w,
        "[agent]\nshutdown_grace = \"1s\"\n[dynamodb]\nwrite_concurrency = 1\n",
    );
    assert_eq!(b.prop("ActiveState"), "active");
    b.ok("echo '# edited by the operator' >> /etc/offload-agent/agent.toml");
    let conffile = b.ok("sha256sum /etc/offload-agent/agent.toml");
    let version = |b: &Booted| b.ok("dpkg-query -W -f '${Version}' offload-agent");
    let before = version(&b);

    w.put("input/up-1.csv", orders_csv(0, ROWS)).await;
    wait_items(&w, 25, &b).await;
    b.ok("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /pkg/offload-agent-next.deb");
    let after = version(&b);
    assert!(
        after != before && after.contains("next"),
        "{before} -> {after}"
    );
    assert_eq!(b.prop("ActiveState"), "active");
    assert_eq!(b.ok("sha256sum /etc/offload-agent/agent.toml"), conffile);
    wait_s3(&w, "output/up-1.csv", &b).await;
    let journal = b.journal();
    assert!(
        journal.contains("released to the queue unfinished"),
        "the old daemon did not release the file mid-way:\n{journal}"
    );

    // A Docker slow at boot: a stand-in docker.service that takes five minutes to start. The unit
    // wants it but is not ordered after it, so files are processed while it is still starting.
    b.write(
        "/etc/systemd/system/docker.service",
        "[Unit]\nDescription=stand-in for a Docker that is slow at boot\n\
         [Service]\nType=oneshot\nExecStart=/bin/sleep 300\nRemainAfterExit=yes\n\
         [Install]\nWantedBy=multi-user.target\n",
    );
    b.ok("systemctl daemon-reload && systemctl enable docker.service");

    // A power cut: every process of the host killed at once, then a boot.
    w.put("input/up-2.csv", orders_csv(100_000, ROWS)).await;
    // The journal, not a scan of the table (20,000 items take moto seconds to scan on a loaded
    // machine, long enough for the file to finish first): its first batches, then the cut.
    b.wait("the second file under way", Duration::from_secs(60), || {
        b.journal().contains("/input/up-2.csv (")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.get("output/up-2.csv").await.is_none(),
        "the file finished before the power cut: nothing left to test"
    );
    let (code, out) = run(Command::new("docker").args(["kill", &b.name]));
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(Command::new("docker").args(["start", &b.name]));
    assert_eq!(code, 0, "{out}");
    b.wait("booted, the unit active", Duration::from_secs(90), || {
        b.prop("ActiveState") == "active"
    });
    wait_s3(&w, "output/up-2.csv", &b).await;
    let docker = b
        .sh("systemctl show -p ActiveState --value docker.service")
        .1;
    assert_eq!(
        docker.trim(),
        "activating",
        "the file was processed while Docker was still starting"
    );
    assert!(
        b.journal().contains("spool file(s) left by an earlier run"),
        "{}",
        b.journal()
    );
    let files = [
        ("input/up-1.csv".to_string(), order_ids(0, ROWS)),
        ("input/up-2.csv".to_string(), order_ids(100_000, ROWS)),
    ];
    w.account(&files, "output/").await;

    // The operator's older drop-in with a key this version does not know (as one renamed or removed
    // since would be): the upgrade says which key and what to do, and leaves the running daemon
    // running (never a restart into a daemon that cannot start).
    let pid = b.prop("MainPID");
    b.write(
        "/etc/offload-agent/conf.d/70-old.toml",
        "[queue]\nlong_poll = \"20s\"\n",
    );
    let out = b.ok(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall /pkg/offload-agent-next.deb 2>&1",
    );
    for needle in [
        "installed but not restarted",
        "queue.long_poll (in /etc/offload-agent/conf.d/70-old.toml): unknown key",
        "then: systemctl restart offload-agent",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    assert_eq!(b.prop("ActiveState"), "active");
    assert_eq!(b.prop("MainPID"), pid, "the running daemon was left alone");
}

async fn wait_s3(w: &World, key: &str, b: &Booted) {
    w.wait_for_with(key, Duration::from_secs(90), || {
        format!("journal:\n{}", b.journal())
    })
    .await;
}
