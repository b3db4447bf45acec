//! The latency floor, for `scripts/bench`: the bare SDK making exactly the agent's calls for each file,
//! in the same order, against the same endpoints — a long poll waiting when the upload is made,
//! GetObject, BatchWriteItem of the items `orders-csv` would build from the file (batches of 25,
//! `in-flight` of them at once), PutObject of an output of the same size under `output/`, and
//! DeleteMessage — with nothing else: no spool file, no validation report, no heartbeat, no metrics.
//! The benchmark times it from the upload to the output object, as it times the agent.
//!
//! `latency-floor <endpoint> <dynamodb-endpoint> <queue-url> <table> <files> <in-flight>`: handles
//! `files` files (up to `in-flight` at once), then prints one JSON line and exits.

use std::path::Path;
use std::sync::Arc;

use aws_config::BehaviorVersion;
use aws_sdk_s3::primitives::ByteStream;
use offload_agent::event::{parse, Event};
use offload_agent::processors::table::{Source, BATCH_SIZE};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[path = "support/floor.rs"]
mod floor;
use floor::{items, write, Item};

struct Floor {
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    ddb: aws_sdk_dynamodb::Client,
    queue: String,
    table: String,
    in_flight: usize,
    scratch: tempfile::TempDir,
}

/// The items of a file, built as `orders-csv` builds them (the parser needs a path: a scratch file).
fn items_of(scratch: &Path, name: &str, body: &[u8], src: &Source) -> anyhow::Result<Vec<Item>> {
    let path = scratch.join(name.replace('/', "_"));
    std::fs::write(&path, body)?;
    let items = items(&path, src);
    let _ = std::fs::remove_file(&path);
    items
}

impl Floor {
    /// One message: the file's calls, then its deletion. Returns how many files it held.
    async fn handle(self: Arc<Self>, body: String, receipt: String) -> anyhow::Result<usize> {
        let objects = match parse(&body) {
            Ok(Event::Objects { objects, .. }) => objects,
            _ => Vec::new(),
        };
        for obj in &objects {
            let got = self
                .s3
                .get_object()
                .bucket(&obj.bucket)
                .key(&obj.key)
                .send()
                .await?;
            let etag = got.e_tag().unwrap_or_default().to_string();
            let bytes = got.body.collect().await?.into_bytes();
            let src = Source {
                bucket: obj.bucket.clone(),
                key: obj.key.clone(),
                etag,
            };
            let items = items_of(self.scratch.path(), &obj.key, &bytes, &src)?;
            let mut tasks = JoinSet::new();
            let mut it = items.into_iter().peekable();
            while it.peek().is_some() {
                if tasks.len() == self.in_flight {
                    tasks.join_next().await.expect("a task")??;
                }
                let batch: Vec<Item> = it.by_ref().take(BATCH_SIZE).collect();
                tasks.spawn(write(self.ddb.clone(), self.table.clone(), batch));
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            let out_key = format!(
                "output/{}",
                obj.key.strip_prefix("input/").unwrap_or(&obj.key)
            );
            self.s3
                .put_object()
                .bucket(&obj.bucket)
                .key(out_key)
                .body(ByteStream::from(bytes))
                .send()
                .await?;
        }
        self.sqs
            .delete_message()
            .queue_url(&self.queue)
            .receipt_handle(receipt)
            .send()
            .await?;
        Ok(objects.len())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, dynamodb, queue, table, files, in_flight] = args.as_slice() else {
        anyhow::bail!(
            "usage: latency-floor <endpoint> <dynamodb-endpoint> <queue-url> <table> <files> <in-flight>"
        );
    };
    let (files, in_flight): (usize, usize) = (files.parse()?, in_flight.parse()?);
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .build(),
    );
    let ddb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&conf)
            .endpoint_url(dynamodb)
            .build(),
    );
    // The receive client's attempt timeout covers the long poll, as the agent's does.
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&conf)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(std::time::Duration::from_secs(50))
                    .build(),
            )
            .build(),
    );
    // Connections and credentials first, as the agent has them when it is idle.
    ddb.describe_table().table_name(table).send().await?;
    let floor = Arc::new(Floor {
        s3,
        sqs,
        ddb,
        queue: queue.clone(),
        table: table.clone(),
        in_flight,
        scratch: tempfile::tempdir()?,
    });
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tasks = JoinSet::new();
    let (mut done, mut started) = (0usize, 0usize);
    println!("{}", serde_json::json!({"ready": true}));
    while done < files {
        let free = slots.available_permits().clamp(1, 10) as i32;
        let got = floor
            .sqs
            .receive_message()
            .queue_url(&floor.queue)
            .max_number_of_messages(free)
            .wait_time_seconds(20)
            .send()
            .await?;
        for m in got.messages.unwrap_or_default() {
            let (Some(body), Some(receipt)) = (m.body, m.receipt_handle) else {
                continue;
            };
            let permit = slots.clone().acquire_owned().await?;
            let floor = floor.clone();
            started += 1;
            tasks.spawn(async move {
                let n = floor.handle(body, receipt).await;
                drop(permit);
                n
            });
        }
        while let Some(finished) = tasks.try_join_next() {
            done += finished??;
        }
        if slots.available_permits() == 0 {
            if let Some(finished) = tasks.join_next().await {
                done += finished??;
            }
        }
    }
    while let Some(finished) = tasks.join_next().await {
        done += finished??;
    }
    println!(
        "{}",
        serde_json::json!({"files": done, "messages": started})
    );
    Ok(())
}
