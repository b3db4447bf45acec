//! The floor of the DynamoDB write path, for `scripts/bench`: the bare SDK writing pre-built items,
//! the same items `orders-csv` would write for a file, in batches of 25 with N requests in flight,
//! retrying what DynamoDB returns unprocessed. Prints one JSON line with the CPU seconds of the
//! writing phase only (building the items is not counted).
//!
//! `cargo run --release --example ddb-floor -- <endpoint> <table> <orders.csv> <in-flight>`

use std::path::Path;
use std::time::Instant;

use aws_config::BehaviorVersion;
use offload_agent::processors::table::{Source, BATCH_SIZE};
use tokio::task::JoinSet;

#[path = "support/floor.rs"]
mod floor;
use floor::{items, write};

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn floor_source() -> Source {
    Source {
        bucket: "floor".into(),
        key: "input/floor.csv".into(),
        etag: "\"floor\"".into(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, table, csv, in_flight] = args.as_slice() else {
        anyhow::bail!("usage: ddb-floor <endpoint> <table> <orders.csv> <in-flight>");
    };
    let in_flight: usize = in_flight.parse()?;
    let build0 = cpu_seconds();
    let items = items(Path::new(csv), &floor_source())?;
    // Not in the floor: parsing, validating and building the items (the agent pays it; printed so
    // that the benchmark can say how much of the gap it is).
    let build_cpu = cpu_seconds() - build0;
    let rows = items.len();
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    let ddb = aws_sdk_dynamodb::Client::new(&conf);
    // One request first, so that connecting and credentials are not in the figure.
    ddb.describe_table().table_name(table).send().await?;

    let mut batches = Vec::with_capacity(rows.div_ceil(BATCH_SIZE));
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        batches.push(it.by_ref().take(BATCH_SIZE).collect::<Vec<_>>());
    }
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut tasks = JoinSet::new();
    for batch in batches {
        if tasks.len() == in_flight {
            tasks.join_next().await.expect("a task")??;
        }
        tasks.spawn(write(ddb.clone(), table.clone(), batch));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "wall_s": wall,
            "cpu_s": cpu,
            "cpu_s_per_million": cpu * 1e6 / rows as f64,
            "build_cpu_s_per_million": build_cpu * 1e6 / rows as f64,
        })
    );
    Ok(())
}
