//! Bounded memory: a file of a few hundred megabytes goes through the whole path (download to spool,
//! validation, DynamoDB writes, output upload) with a peak resident set far below its size.
//!
//! Kept in its own test binary so that `getrusage(RUSAGE_CHILDREN)` sees only the agent processes this
//! test starts.

mod support;

use std::time::Duration;

use support::*;

/// ~300 MB of orders whose rows carry a wide extra column (ignored by the processor), so the file is
/// large while the number of DynamoDB writes stays small enough for the emulator.
#[tokio::test(flavor = "multi_thread")]
async fn a_300_mb_file_is_processed_with_peak_rss_far_below_its_size() {
    let w = World::new("memory").await;
    let rows = 6_000;
    let pad = "x".repeat(50_000);
    let mut csv = format!("{HEADER},Notes\n").into_bytes();
    for i in 0..rows {
        csv.extend_from_slice(order_row(&format!("{i}"), i).as_bytes());
        csv.push(b',');
        csv.extend_from_slice(pad.as_bytes());
        csv.push(b'\n');
    }
    let size = csv.len() as u64;
    assert!(size > 290_000_000, "{size}");
    w.put("input/huge.csv", csv).await;

    let out = w
        .agent(&["process", &format!("s3://{}/input/huge.csv", w.bucket)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let peak = usage.ru_maxrss as u64 * 1024;
    eprintln!("file {size} bytes, agent peak RSS {peak} bytes");
    assert!(
        peak < size / 5,
        "peak RSS {peak} bytes is not far below the file's {size} bytes"
    );
    assert_eq!(w.items().await.len(), rows);
    let output = w.get("output/huge.csv").await.unwrap();
    assert_eq!(output.iter().filter(|b| **b == b'\n').count(), rows + 1);
    let _ = Duration::from_secs(0);
}
