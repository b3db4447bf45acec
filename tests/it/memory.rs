//! Bounded memory: a file of a few hundred megabytes goes through the whole path (download to spool,
//! validation, DynamoDB writes, output upload) with a peak resident set far below its size.
//!
//! The peak is the kernel's `VmHWM` of the agent process, which `process` prints. (`getrusage` of
//! children would count the test's own memory: a child spawned with a shared address space inherits
//! the parent's high-water mark across `exec`.)

use crate::support::*;

/// ~300 MB of orders whose rows carry a wide extra column (ignored by the processor), so the file is
/// large while the number of DynamoDB writes stays small enough for the emulator.
#[tokio::test(flavor = "multi_thread")]
async fn a_300_mb_file_is_processed_with_peak_rss_far_below_its_size() {
    let w = World::new("memory").await;
    let rows = 6_000;
    let pad = "x".repeat(50_000);
    let path = w.dir.path().join("huge.csv");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(f, "{HEADER},Notes").unwrap();
        for i in 0..rows {
            writeln!(f, "{},{pad}", order_row(&format!("{i}"), i)).unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 290_000_000, "{size}");
    w.clients
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key("input/huge.csv")
        .body(
            aws_sdk_s3::primitives::ByteStream::from_path(&path)
                .await
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let out = w
        .agent(&["process", &format!("s3://{}/input/huge.csv", w.bucket)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let peak: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS:"))
        .and_then(|v| v.trim().trim_end_matches(" bytes").parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in the summary:\n{stdout}"));
    eprintln!("file {size} bytes, agent peak RSS {peak} bytes");
    assert!(
        peak < size / 5,
        "peak RSS {peak} bytes is not far below the file's {size} bytes"
    );
    assert_eq!(w.items().await.len(), rows);
    let output = w.get("output/huge.csv").await.unwrap();
    assert_eq!(output.iter().filter(|b| **b == b'\n').count(), rows + 1);
}

/// The peak resident set the README promises for any file, of any shape.
const RSS_BOUND: u64 = 64 << 20;

fn vm_hwm(pid: i32) -> u64 {
    offload_agent::pages::status_kb(Some(pid as u32), "VmHWM:")
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/<pid>/status")
}

/// Files of hostile shape, one after another through the running daemon: an unbalanced quote early in a
/// large file, one huge line without a newline, a megabyte of blank lines before the rows, and very wide
/// first rows (the whole first megabyte) followed by two million short ones (which once made the duplicate check's Bloom filter far
/// too small, and its candidate set as large as the file). Every file is settled with its rows
/// accounted for, and the daemon's peak RSS (`VmHWM`) stays under the README's bound.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_files_keep_the_daemon_under_its_memory_bound() {
    use std::io::Write;
    let w = World::new("hostile").await;
    let agent = w.start();

    let wide = "x".repeat(50_000);
    type Fill = Box<dyn Fn(&mut dyn Write)>;
    let upload = |name: &'static str, fill: Fill| {
        let path = w.dir.path().join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        fill(&mut f);
        f.flush().unwrap();
        path
    };
    let files = [
        (
            "quote.csv",
            upload("quote.csv", {
                let wide = wide.clone();
                Box::new(move |f| {
                    writeln!(f, "{HEADER},Notes").unwrap();
                    writeln!(f, "{},\"unbalanced", order_row("0", 0)).unwrap();
                    for i in 1..1_600 {
                        writeln!(f, "{},{wide}", order_row(&i.to_string(), i)).unwrap();
                    }
                })
            }),
            // The quoted line is rejected; every later row is written.
            (1_599, 1),
        ),
        (
            "oneline.csv",
            upload(
                "oneline.csv",
                Box::new(|f| {
                    writeln!(f, "{HEADER}").unwrap();
                    writeln!(f, "{}", order_row("100001", 1)).unwrap();
                    let chunk = "y".repeat(1 << 20);
                    for _ in 0..80 {
                        f.write_all(chunk.as_bytes()).unwrap();
                    }
                }),
            ),
            (1, 1),
        ),
        (
            "blank.csv",
            upload(
                "blank.csv",
                Box::new(|f| {
                    writeln!(f, "{HEADER}").unwrap();
                    f.write_all(&vec![b'\n'; 1 << 20]).unwrap();
                    for i in 0..500 {
                        writeln!(f, "{}", order_row(&(200_000 + i).to_string(), i)).unwrap();
                    }
                }),
            ),
            (500, 0),
        ),
        (
            "wide.csv",
            upload("wide.csv", {
                let wide = "w".repeat(300_000);
                Box::new(move |f| {
                    writeln!(f, "{HEADER},Notes").unwrap();
                    for i in 0..4 {
                        writeln!(f, "{},{wide}", order_row(&(300_000 + i).to_string(), i)).unwrap();
                    }
                    // Short rows with distinct ids that fail validation (no date): read by both passes,
                    // written nowhere but the rejects report.
                    for i in 4..2_000_004u64 {
                        writeln!(f, ",,,,,,{i},,1,1,1,1,1,").unwrap();
                    }
                })
            }),
            (4, 2_000_000),
        ),
    ];
    let mut written = 0;
    for (name, path, (good, bad)) in &files {
        w.clients
            .s3
            .put_object()
            .bucket(&w.bucket)
            .key(format!("input/{name}"))
            .body(
                aws_sdk_s3::primitives::ByteStream::from_path(path)
                    .await
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        let out = w
            .wait_for(
                &format!("output/{name}"),
                std::time::Duration::from_secs(300),
                &agent,
            )
            .await;
        let lines = out.iter().filter(|b| **b == b'\n').count();
        assert_eq!(lines, good + 1, "{name}: output rows");
        let rejects = w
            .get(&format!("output/{name}.rejects.csv"))
            .await
            .map_or(0, |r| r.iter().filter(|b| **b == b'\n').count());
        assert_eq!(
            rejects,
            if *bad > 0 { bad + 1 } else { 0 },
            "{name}: rejects"
        );
        written += good;
        let peak = vm_hwm(agent.pid());
        eprintln!(
            "{name}: {} bytes, daemon peak RSS so far {peak} bytes",
            std::fs::metadata(path).unwrap().len()
        );
        assert!(
            peak < RSS_BOUND,
            "{name}: peak RSS {peak} bytes over {RSS_BOUND}"
        );
    }
    assert_eq!(w.items().await.len(), written);
    assert!(w.drain_dlq().await.is_empty());
}
