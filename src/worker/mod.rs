//! The file-event worker pool: receive S3 events from SQS, route them to pipelines, have each file
//! processed (`object`), and settle each message: keep it invisible while it is worked on, then delete
//! it, back it off, dead-letter it or release it.

pub mod event;
pub mod object;
pub mod objects;
pub mod pool;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{describe, ProcessError};
use crate::metrics::{FileOutcome, MessageOutcome, Metrics};
use event::Event;
pub use object::{FileReport, ObjectProcessor};

/// Settles the messages of one queue; shared by all workers of a daemon.
pub struct Worker {
    pub objects: Arc<ObjectProcessor>,
    pub config: watch::Receiver<Arc<Config>>,
    pub stats: Arc<Metrics>,
    pub queue_url: String,
    pub dlq_url: Option<String>,
    /// Receives after which SQS's redrive moves a message (the queue's `maxReceiveCount`): on the last
    /// one the agent gives up itself, with a reason and an error report, before SQS would move it bare.
    pub max_receives: Option<u32>,
    /// Files of one key are processed one at a time, in the order their events arrive, so that an
    /// older upload never lands after a newer one on this host.
    pub key_locks: KeyLocks,
}

/// One async lock per (bucket, key) being processed; entries disappear when nobody holds them.
#[derive(Debug, Default)]
pub struct KeyLocks(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
);

impl KeyLocks {
    pub async fn lock(&self, bucket: &str, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let name = format!("{bucket}\0{key}");
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
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

/// Receives needed for a transient failure's delay (`retry_base` doubling per receive) to reach
/// `retry_max`, plus one receive at it: a redrive policy with fewer gives up before `retry_max`.
pub fn receives_to_reach(retry_base: Duration, retry_max: Duration) -> u32 {
    let mut n = 1;
    let mut d = retry_base;
    while d < retry_max && n < 64 {
        d = d.saturating_mul(2);
        n += 1;
    }
    n + 1
}

/// SQS accepts only these characters in bodies and attribute values (#x9, #xA, #xD, #x20-#xD7FF,
/// #xE000-#xFFFD, #x10000-#x10FFFF); anything else (control characters from an object key) becomes
/// U+FFFD.
pub fn sqs_safe(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 => '\u{fffd}',
            '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

impl Worker {
    fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.objects.ctx.clients.sqs
    }

    /// Handle one SQS message from receipt to settlement.
    pub async fn handle_message(
        self: Arc<Self>,
        msg: aws_sdk_sqs::types::Message,
        abort: CancellationToken,
    ) {
        let message_id = msg.message_id().unwrap_or("").to_string();
        let span = tracing::info_span!("message", message_id = %message_id);
        self.handle_message_inner(msg, abort).instrument(span).await
    }

    async fn handle_message_inner(
        &self,
        msg: aws_sdk_sqs::types::Message,
        abort: CancellationToken,
    ) {
        let body = msg.body().unwrap_or("").to_string();
        let message_id = msg.message_id().unwrap_or("").to_string();
        let Some(receipt) = msg.receipt_handle().map(String::from) else {
            tracing::error!("message without a receipt handle; SQS will deliver it again");
            return;
        };
        let receive_count: u32 = msg
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        self.stats.message(MessageOutcome::Received);
        let cfg = self.config.borrow().clone();

        let objects = match event::parse(&body) {
            Err(e) => {
                tracing::error!(reason = %e, "message is not an S3 event; moving it to the dead-letter queue");
                self.settle_permanent(&receipt, &body, &e.to_string()).await;
                return;
            }
            Ok(Event::Test { bucket }) => {
                self.stats.event_skipped("test");
                tracing::info!(
                    bucket = bucket.as_deref().unwrap_or(""),
                    "s3:TestEvent received (S3 checks the notification target); acknowledged"
                );
                self.delete(&receipt).await;
                return;
            }
            Ok(Event::Nothing { ignored }) => {
                self.stats.event_skipped("other");
                tracing::info!(
                    ignored,
                    "notification announces no created object; acknowledged"
                );
                self.delete(&receipt).await;
                return;
            }
            Ok(Event::Objects { objects, ignored }) => {
                if ignored > 0 {
                    tracing::info!(ignored, "skipping records that are not ObjectCreated");
                }
                objects
            }
        };

        // Keep the message invisible while we work, however long the files take.
        let heartbeat = Heartbeat::start(
            self.sqs().clone(),
            self.queue_url.clone(),
            receipt.clone(),
            cfg.queue.visibility_timeout,
        );
        let mut transient: Option<String> = None;
        let mut permanent: Vec<String> = Vec::new();
        let mut cancelled = false;
        for obj in &objects {
            let Some(pipeline) = cfg.route(&obj.bucket, &obj.key) else {
                self.stats.event_skipped("unmatched");
                tracing::info!(bucket = %obj.bucket, key = %obj.key, "no pipeline matches this object; acknowledged without processing");
                continue;
            };
            let span = tracing::info_span!("file", bucket = %obj.bucket, key = %obj.key, pipeline = %pipeline.name);
            let result = async {
                let _one_at_a_time = tokio::select! {
                    g = self.key_locks.lock(&obj.bucket, &obj.key) => g,
                    _ = abort.cancelled() => return Err(ProcessError::Cancelled),
                };
                tracing::info!(size = obj.size, "processing");
                self.objects
                    .process(&cfg, pipeline, obj, &abort, None)
                    .await
            }
            .instrument(span.clone())
            .await;
            let _enter = span.enter();
            match result {
                Ok(report) => {
                    let (written, rejected) = report
                        .rows
                        .as_ref()
                        .map_or((0, 0), |r| (r.written, r.rejected));
                    self.stats.file_done(
                        &pipeline.name,
                        report.elapsed.as_secs_f64(),
                        written,
                        rejected,
                        report.bytes,
                    );
                    let last = report.outputs.last().map(String::as_str).unwrap_or("");
                    let elapsed_ms = report.elapsed.as_millis() as u64;
                    if let Some(rows) = &report.rows {
                        let rejects = report.outputs.iter().find(|k| k.ends_with(".rejects.csv"));
                        tracing::info!(
                            rows = rows.rows,
                            rows_written = rows.written,
                            rows_rejected = rows.rejected,
                            output = %last,
                            rejects = rejects.map(String::as_str).unwrap_or(""),
                            bytes = report.bytes,
                            elapsed_ms,
                            "processed"
                        );
                    } else {
                        tracing::info!(
                            outputs = report.outputs.len(),
                            output = %last,
                            bytes = report.bytes,
                            elapsed_ms,
                            summary = %report.summary,
                            "processed"
                        );
                    }
                }
                Err(ProcessError::Cancelled) => {
                    cancelled = true;
                    break;
                }
                Err(ProcessError::Superseded(reason)) => {
                    self.stats.file(&pipeline.name, FileOutcome::Superseded);
                    tracing::info!(%reason, "superseded by a newer upload (its own event processes it); acknowledged");
                }
                Err(ProcessError::Transient(reason))
                    if self.max_receives.map_or(true, |m| receive_count < m) =>
                {
                    self.stats.file(&pipeline.name, FileOutcome::TransientRetry);
                    self.stats.error(&pipeline.name, &file_url(obj), &reason);
                    tracing::warn!(%reason, receive_count, "transient failure; the message will be retried");
                    transient = Some(reason);
                    break;
                }
                Err(ProcessError::Unavailable(reason))
                    if self.max_receives.map_or(true, |m| receive_count < m) =>
                {
                    // Reported once by pipeline (see ObjectProcessor::note); the file waits.
                    self.stats.file(&pipeline.name, FileOutcome::TransientRetry);
                    tracing::debug!(%reason, receive_count, "pipeline unavailable; the message will be retried");
                    transient = Some(reason);
                    break;
                }
                Err(failure) => {
                    // A transient failure on the last receive SQS allows is given up here, with a reason
                    // and an error report, rather than moved bare by SQS's redrive on the next receive.
                    let reason = match failure {
                        ProcessError::Transient(r) | ProcessError::Unavailable(r) => format!(
                            "gave up after {receive_count} receives (the queue's maxReceiveCount): {r}"
                        ),
                        ProcessError::Permanent(r) => r,
                        other => other.to_string(),
                    };
                    self.stats.file(&pipeline.name, FileOutcome::PermanentError);
                    self.stats.error(&pipeline.name, &file_url(obj), &reason);
                    match self
                        .objects
                        .write_error_report(pipeline, obj, &reason, &message_id)
                        .await
                    {
                        Ok(report) => {
                            tracing::error!(%reason, report = %report, "file cannot be processed; error report written");
                            permanent.push(format!("s3://{}/{}: {reason}", obj.bucket, obj.key));
                        }
                        Err(e) => {
                            tracing::warn!(%reason, error = %e, "file cannot be processed, and its error report could not be written; retrying later");
                            transient = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
        }
        drop(heartbeat); // stops extending the visibility before the message is settled

        if cancelled {
            self.release(&receipt).await;
        } else if let Some(reason) = transient {
            let delay = Backoff::jittered(
                cfg.queue.retry_base,
                cfg.queue.retry_max,
                receive_count.saturating_sub(1),
            );
            self.stats.message(MessageOutcome::Retried);
            tracing::info!(retry_in_s = delay.as_secs(), %reason, "message returns to the queue");
            let _ = self.set_visibility(&receipt, delay).await;
        } else if !permanent.is_empty() {
            self.settle_permanent(&receipt, &body, &permanent.join("; "))
                .await;
        } else {
            self.delete(&receipt).await;
        }
    }

    async fn delete(&self, receipt: &str) {
        match self
            .sqs()
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => self.stats.message(MessageOutcome::Deleted),
            // Results are idempotent: if the delete is lost, the redelivery rewrites the same items.
            Err(e) => {
                tracing::warn!(error = %describe(&e), "could not delete the message; it will be delivered and processed again (idempotently)")
            }
        }
    }

    /// Returns whether SQS accepted the change.
    async fn set_visibility(&self, receipt: &str, after: Duration) -> bool {
        let secs = after.as_secs().min(43_200) as i32;
        match self
            .sqs()
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(secs)
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %describe(&e), "could not change the message's visibility; it returns when its current timeout ends");
                false
            }
        }
    }

    /// Make the message visible again at once, for another worker or agent.
    async fn release(&self, receipt: &str) {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            self.set_visibility(receipt, Duration::ZERO),
        )
        .await;
        match r {
            Ok(true) => {
                self.stats.message(MessageOutcome::Released);
                tracing::info!("shutdown: message released to the queue unfinished")
            }
            Ok(false) => {} // logged by set_visibility; counted as not released
            Err(_) => tracing::warn!("shutdown: releasing the message timed out; it returns when its visibility timeout ends"),
        }
    }

    /// Send the message to the dead-letter queue with the reason, then delete it from the main queue.
    /// Without a dead-letter queue, leave it for SQS's redrive policy (or its retention period).
    async fn settle_permanent(&self, receipt: &str, body: &str, reason: &str) {
        let Some(dlq) = &self.dlq_url else {
            // SQS cannot hide a message for more than 12 hours from its receipt, so "keep it hidden"
            // would mean re-failing it forever: the error report (or, for a message that is no event,
            // this log line with its body) is the record, and the message is deleted.
            let excerpt: String = body.chars().take(2000).collect();
            tracing::error!(%reason, body = %excerpt, "no queue.dead_letter_queue configured: the failure is recorded (error report, this log) and the message deleted");
            self.delete(receipt).await;
            return;
        };
        let reason_attr: String = sqs_safe(reason).chars().take(1000).collect();
        let sent = self
            .sqs()
            .send_message()
            .queue_url(dlq)
            .message_body(if body.is_empty() {
                "(empty body)".to_string()
            } else {
                sqs_safe(body)
            })
            .message_attributes("offload-agent-reason", string_attr(&reason_attr))
            .message_attributes(
                "offload-agent-source-queue",
                string_attr(&sqs_safe(&self.queue_url)),
            )
            .send()
            .await;
        match sent {
            Ok(_) => {
                self.stats.message(MessageOutcome::DeadLettered);
                tracing::info!(dead_letter_queue = %dlq, "message moved to the dead-letter queue");
                self.delete(receipt).await;
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), "could not send to the dead-letter queue; the message will come back and be tried again");
            }
        }
    }
}

fn file_url(obj: &event::ObjectRef) -> String {
    format!("s3://{}/{}", obj.bucket, obj.key)
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data_type is set")
}

/// Extends a message's visibility every third of the timeout until stopped.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    fn start(sqs: aws_sdk_sqs::Client, queue_url: String, receipt: String, vis: Duration) -> Self {
        let period = (vis / 3).max(Duration::from_secs(1));
        let secs = vis.as_secs().min(43_200) as i32;
        let task = tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(period).await;
                    match sqs
                        .change_message_visibility()
                        .queue_url(&queue_url)
                        .receipt_handle(&receipt)
                        .visibility_timeout(secs)
                        .send()
                        .await
                    {
                        Ok(_) => tracing::debug!(visibility_s = secs, "visibility extended"),
                        Err(e) => tracing::warn!(error = %describe(&e), "could not extend the message's visibility; another consumer may receive it meanwhile (results are idempotent)"),
                    }
                }
            }
            .in_current_span(),
        );
        Heartbeat { task }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
