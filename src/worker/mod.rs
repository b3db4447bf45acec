//! The file-event worker pool, in the order a message goes through it: [`receive`] asks SQS for as
//! many messages as there are free workers; [`Worker::handle_message`] parses the event and routes each
//! object to its pipeline; [`run`] runs one object through its pipeline (spool, processor, outputs);
//! [`settle`] decides what happens to the message and does it.

pub(crate) mod receive;
pub(crate) mod run;
pub(crate) mod settle;

use std::sync::Arc;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, Pipeline};
use crate::error::ProcessError;
use crate::event::{self, Event, ObjectRef};
use crate::metrics::{FileOutcome, MessageOutcome, Metrics, Skipped};
pub(crate) use run::{FileReport, ObjectProcessor};
use settle::{FileEnd, Heartbeat, Receipt, Settlement, Verdict};

/// Settles the messages of one queue; shared by all workers of a daemon.
pub(crate) struct Worker {
    pub(crate) objects: Arc<ObjectProcessor>,
    pub(crate) config: watch::Receiver<Arc<Config>>,
    pub(crate) stats: Arc<Metrics>,
    pub(crate) queue_url: String,
    pub(crate) dlq_url: Option<String>,
    /// Receives after which SQS's redrive moves a message (the queue's `maxReceiveCount`): on the last
    /// one the agent gives up itself, with a reason and an error report, before SQS would move it bare.
    pub(crate) max_receives: Option<u32>,
    /// Files of one key are processed one at a time, in the order their events arrive, so that an
    /// older upload never lands after a newer one on this host.
    pub(crate) key_locks: KeyLocks,
}

/// One async lock per (bucket, key) being processed; entries disappear when nobody holds them.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
);

impl KeyLocks {
    /// Entries nobody holds are dropped when the map grows past this many.
    const PRUNE_ABOVE: usize = 1024;

    pub(crate) async fn lock(&self, bucket: &str, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let name = format!("{bucket}\0{key}");
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > KeyLocks::PRUNE_ABOVE {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(&name).and_then(|w| w.upgrade()) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(name, Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

impl Worker {
    /// Handle one SQS message from receipt to settlement.
    pub(crate) async fn handle_message(
        self: Arc<Self>,
        msg: aws_sdk_sqs::types::Message,
        abort: CancellationToken,
    ) {
        let message_id = msg.message_id().unwrap_or("").to_string();
        let span = tracing::info_span!("message", message_id = %message_id);
        self.handle(msg, abort).instrument(span).await
    }

    async fn handle(&self, msg: aws_sdk_sqs::types::Message, abort: CancellationToken) {
        let Some(handle) = msg.receipt_handle() else {
            tracing::error!(
                "SQS message {} came without a receipt handle; SQS will deliver it again",
                msg.message_id().unwrap_or("(no id)")
            );
            return;
        };
        let m = Receipt {
            id: msg.message_id().unwrap_or(""),
            handle,
            body: msg.body().unwrap_or(""),
        };
        let receive_count: u32 = msg
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let message_id = msg.message_id().unwrap_or("");
        self.stats.message(MessageOutcome::Received);
        let cfg = self.config.borrow().clone();
        let settlement = match event::parse(m.body) {
            Err(e) => {
                tracing::error!(reason = %e, "SQS message {message_id} is not an S3 event ({e}); moving it to the dead-letter queue");
                Settlement::DeadLetter(e.to_string())
            }
            Ok(Event::Test { bucket }) => {
                self.stats.event_skipped(Skipped::Test);
                tracing::info!(
                    bucket = bucket.as_deref().unwrap_or(""),
                    "s3:TestEvent received from bucket {} (S3 checks the notification target); acknowledged",
                    bucket.as_deref().unwrap_or("(none named)")
                );
                Settlement::Delete
            }
            Ok(Event::Nothing { ignored }) => {
                self.stats.event_skipped(Skipped::Other);
                tracing::info!(
                    ignored,
                    "SQS message {message_id} announces no created object ({ignored} other record(s)); acknowledged"
                );
                Settlement::Delete
            }
            Ok(Event::Objects { objects, ignored }) => {
                if ignored > 0 {
                    tracing::info!(ignored, "SQS message {message_id}: skipping {ignored} record(s) that are not ObjectCreated");
                }
                // Keep the message invisible while we work, however long the files take; stopped
                // (dropped) before the message is settled.
                let _heartbeat = Heartbeat::start(
                    self.objects.ctx.clients.sqs.clone(),
                    self.queue_url.clone(),
                    handle.to_string(),
                    cfg.queue.visibility_timeout,
                );
                let mut ends = Vec::with_capacity(objects.len());
                for obj in &objects {
                    let end = self
                        .file(&cfg, obj, receive_count, message_id, &abort)
                        .await;
                    let stop = end.stops_the_message();
                    ends.push(end);
                    if stop {
                        break;
                    }
                }
                settle::decide(&ends, receive_count, &cfg.queue)
            }
        };
        self.perform(&m, settlement).await;
    }

    /// Route one object to its pipeline and run it there; how it ended, with its metrics, logs and
    /// error report done.
    async fn file(
        &self,
        cfg: &Config,
        obj: &ObjectRef,
        receive_count: u32,
        message_id: &str,
        abort: &CancellationToken,
    ) -> FileEnd {
        let Some(pipeline) = cfg.route(&obj.bucket, &obj.key) else {
            self.stats.event_skipped(Skipped::Unmatched);
            tracing::info!(bucket = %obj.bucket, key = %obj.key, "no pipeline matches {}; acknowledged without processing", obj.url());
            return FileEnd::Done;
        };
        let span = tracing::info_span!("file", bucket = %obj.bucket, key = %obj.key, pipeline = %pipeline.name);
        let result = async {
            let _one_at_a_time = tokio::select! {
                g = self.key_locks.lock(&obj.bucket, &obj.key) => g,
                _ = abort.cancelled() => return Err(ProcessError::Cancelled),
            };
            match obj.size {
                Some(size) => tracing::info!(
                    size,
                    "processing {} ({}) with pipeline {}",
                    obj.url(),
                    crate::disk::human(size),
                    pipeline.name
                ),
                None => tracing::info!("processing {} with pipeline {}", obj.url(), pipeline.name),
            }
            self.objects.process(cfg, pipeline, obj, abort, None).await
        }
        .instrument(span.clone())
        .await;
        let verdict = match result {
            Ok(report) => {
                let _enter = span.enter();
                self.processed(pipeline, &report);
                return FileEnd::Done;
            }
            Err(e) => settle::judge(e, receive_count, self.max_receives),
        };
        self.failed(pipeline, obj, verdict, receive_count, message_id)
            .instrument(span)
            .await
    }

    fn processed(&self, pipeline: &Pipeline, report: &FileReport) {
        let (written, rejected) = report.rows.map_or((0, 0), |r| (r.written, r.rejected));
        self.stats.file_done(
            &pipeline.name,
            report.elapsed.as_secs_f64(),
            written,
            rejected,
            report.bytes,
        );
        let last = report.outputs.last().map(String::as_str).unwrap_or("");
        let elapsed_ms = report.elapsed.as_millis() as u64;
        let url = format!("s3://{}/{}", report.bucket, report.key);
        let out_bucket = pipeline.output_bucket();
        // The rejects report is named on its own.
        let outputs: Vec<&String> = report
            .outputs
            .iter()
            .filter(|k| Some(*k) != report.rejects.as_ref())
            .collect();
        let outputs = match outputs.as_slice() {
            [] => "no output".to_string(),
            [one] => format!("output s3://{out_bucket}/{one}"),
            [.., last] => format!(
                "{} outputs, the last s3://{out_bucket}/{last}",
                outputs.len()
            ),
        };
        if let Some(rows) = &report.rows {
            let rejects = match &report.rejects {
                Some(k) => format!(" (rejected rows in s3://{out_bucket}/{k})"),
                None => String::new(),
            };
            let skipped = rows.rows.saturating_sub(rows.written + rows.rejected);
            let skipped = match skipped {
                0 => String::new(),
                n => format!(", {n} skipped"),
            };
            tracing::info!(
                rows = rows.rows,
                rows_written = rows.written,
                rows_rejected = rows.rejected,
                output = %last,
                rejects = report.rejects.as_deref().unwrap_or(""),
                bytes = report.bytes,
                elapsed_ms,
                "processed {url}: {} rows written, {} rejected{skipped}{rejects}, {outputs} in {elapsed_ms} ms",
                rows.written,
                rows.rejected,
            );
        } else {
            tracing::info!(
                outputs = report.outputs.len(),
                output = %last,
                bytes = report.bytes,
                elapsed_ms,
                summary = %report.summary,
                "processed {url}: {}, {outputs} in {elapsed_ms} ms",
                report.summary
            );
        }
    }

    /// Act on the verdict about a file that failed: count and log it, and write the error report of
    /// one given up.
    async fn failed(
        &self,
        pipeline: &Pipeline,
        obj: &ObjectRef,
        verdict: Verdict,
        receive_count: u32,
        message_id: &str,
    ) -> FileEnd {
        match verdict {
            Verdict::Cancelled => FileEnd::Cancelled,
            Verdict::Superseded(reason) => {
                self.stats.file(&pipeline.name, FileOutcome::Superseded);
                tracing::info!(%reason, "{} was superseded by a newer upload ({reason}); acknowledged, the newer upload's own event processes it", obj.url());
                FileEnd::Done
            }
            Verdict::Retry { reason, reported } => {
                self.stats.file(&pipeline.name, FileOutcome::TransientRetry);
                if reported {
                    // Reported once by pipeline (see ObjectProcessor::note); the file waits.
                    tracing::debug!(%reason, receive_count, "{} waits: pipeline {} is unavailable ({reason}); the message will be retried", obj.url(), pipeline.name);
                } else {
                    self.stats.error(&pipeline.name, &obj.url(), &reason);
                    tracing::warn!(%reason, receive_count, "{} failed for now: {reason}; the message returns to the queue and is retried (receive {receive_count})", obj.url());
                }
                FileEnd::Retry(reason)
            }
            Verdict::GiveUp(reason) => {
                self.stats.file(&pipeline.name, FileOutcome::PermanentError);
                self.stats.error(&pipeline.name, &obj.url(), &reason);
                match self
                    .objects
                    .write_error_report(pipeline, obj, &reason, message_id)
                    .await
                {
                    Ok(report) => {
                        tracing::error!(%reason, report = %report, "{} cannot be processed: {reason}; error report {report}", obj.url());
                        FileEnd::Failed(format!("{}: {reason}", obj.url()))
                    }
                    Err(e) => {
                        tracing::warn!(%reason, error = %e, "{} cannot be processed ({reason}), and its error report could not be written ({e}); retrying later", obj.url());
                        FileEnd::Retry(e.to_string())
                    }
                }
            }
        }
    }
}
