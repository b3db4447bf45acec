//! Bounded memory: a file of a few hundred megabytes goes through the whole path (download to spool,
//! validation, DynamoDB writes, output upload) with a peak resident set far below its size.
//!
//! The peak is the kernel's `VmHWM` of the agent process, which `process` prints. (`getrusage` of
//! children would count the test's own memory: a child spawned with a shared address space inherits
//! the parent's high-water mark across `exec`.)

mod support;

use support::*;

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
