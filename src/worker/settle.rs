//! Where a message is settled. Two pure functions decide: [`judge`] turns one file's failure into a
//! [`Verdict`] (retry, give up, ...), and [`decide`] turns the message's file ends into a
//! [`Settlement`]. [`Worker::perform`] then does what the settlement says with SQS. The heartbeat that
//! keeps a message invisible while its files are worked on lives here too.

use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;

use super::Worker;
use crate::backoff::Backoff;
use crate::config::QueueConfig;
use crate::error::{describe, ProcessError};
use crate::limits::sqs_visibility_secs;
use crate::metrics::MessageOutcome;

/// What happens to a message once its files are done with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Every file is finished (or needs no work): delete the message.
    Delete,
    /// Shutdown cut a file short: make the message visible again at once, for another worker.
    Release,
    /// A file may succeed later: the message returns after a delay drawn from `[step/2, step]`.
    RetryAfter { step: Duration, reason: String },
    /// No file can ever succeed as it is (each has its error report): to the dead-letter queue with
    /// the reason, or, without one, deleted with the reason logged.
    DeadLetter(String),
}

/// How one file of a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileEnd {
    /// Processed, superseded by a newer upload, or matched by no pipeline.
    Done,
    /// Given up, with its error report stored: `s3://bucket/key: reason`.
    Failed(String),
    /// Worth another try later (the rest of the message's files wait for it).
    Retry(String),
    /// Stopped by shutdown before it was finished.
    Cancelled,
}

impl FileEnd {
    /// Whether the message's remaining files are left for the next receive.
    pub(crate) fn stops_the_message(&self) -> bool {
        matches!(self, FileEnd::Retry(_) | FileEnd::Cancelled)
    }
}

/// What to do about one file's failure, from its class and how often the message was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Cancelled,
    /// A newer upload has its own event; this one is acknowledged.
    Superseded(String),
    /// Try again on a later receive; `reported` when the failure was already reported elsewhere
    /// (an unavailable pipeline is reported once, not per file).
    Retry {
        reason: String,
        reported: bool,
    },
    /// Write an error report and give the file up.
    GiveUp(String),
}

/// Judge a failure on the `receive_count`-th receive of a queue whose redrive moves messages after
/// `max_receives` (None: never). A transient failure on the last receive SQS allows is given up here,
/// with a reason and an error report, rather than moved bare by SQS's redrive on the next receive.
pub(crate) fn judge(err: ProcessError, receive_count: u32, max_receives: Option<u32>) -> Verdict {
    let retries_left = max_receives.map_or(true, |m| receive_count < m);
    match err {
        ProcessError::Cancelled => Verdict::Cancelled,
        ProcessError::Superseded(reason) => Verdict::Superseded(reason),
        ProcessError::Transient(reason) if retries_left => Verdict::Retry {
            reason,
            reported: false,
        },
        ProcessError::Unavailable(reason) if retries_left => Verdict::Retry {
            reason,
            reported: true,
        },
        ProcessError::Transient(r) | ProcessError::Unavailable(r) => Verdict::GiveUp(format!(
            "gave up after {receive_count} receives (the queue's maxReceiveCount): {r}"
        )),
        ProcessError::Permanent(reason) => Verdict::GiveUp(reason),
    }
}

/// The settlement of a message whose files ended as `ends` (in order; processing stops at the first
/// end that [stops the message](FileEnd::stops_the_message)), on its `receive_count`-th receive.
pub(crate) fn decide(ends: &[FileEnd], receive_count: u32, queue: &QueueConfig) -> Settlement {
    if ends.contains(&FileEnd::Cancelled) {
        return Settlement::Release;
    }
    if let Some(reason) = ends.iter().find_map(|e| match e {
        FileEnd::Retry(r) => Some(r),
        _ => None,
    }) {
        let step = Backoff::step(
            queue.retry_base,
            queue.retry_max,
            receive_count.saturating_sub(1),
        );
        return Settlement::RetryAfter {
            step,
            reason: reason.clone(),
        };
    }
    let failed: Vec<&str> = ends
        .iter()
        .filter_map(|e| match e {
            FileEnd::Failed(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        Settlement::Delete
    } else {
        Settlement::DeadLetter(failed.join("; "))
    }
}

/// The SQS message being settled.
pub(crate) struct Receipt<'a> {
    /// SQS's message id, for the log lines.
    pub(crate) id: &'a str,
    pub(crate) handle: &'a str,
    pub(crate) body: &'a str,
}

impl Worker {
    /// Carry out `settlement` for the message.
    pub(crate) async fn perform(&self, m: &Receipt<'_>, settlement: Settlement) {
        match settlement {
            Settlement::Delete => self.delete(m).await,
            Settlement::Release => self.release(m).await,
            Settlement::RetryAfter { step, reason } => {
                let delay = Backoff::jitter(step);
                self.stats.message(MessageOutcome::Retried);
                tracing::info!(
                    retry_in_s = delay.as_secs(),
                    %reason,
                    "SQS message {} returns to the queue in {} s: {reason}",
                    m.id,
                    delay.as_secs()
                );
                let _ = self.set_visibility(m, delay).await;
            }
            Settlement::DeadLetter(reason) => self.dead_letter(m, &reason).await,
        }
    }

    fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.objects.ctx.clients.sqs
    }

    async fn delete(&self, m: &Receipt<'_>) {
        match self
            .sqs()
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(m.handle)
            .send()
            .await
        {
            Ok(_) => self.stats.message(MessageOutcome::Deleted),
            // Results are idempotent: if the delete is lost, the redelivery rewrites the same items.
            Err(e) => {
                let e = describe(&e);
                tracing::warn!(error = %e, "could not delete SQS message {} ({e}); it will be delivered and processed again (idempotently)", m.id)
            }
        }
    }

    /// Returns whether SQS accepted the change.
    async fn set_visibility(&self, m: &Receipt<'_>, after: Duration) -> bool {
        match self
            .sqs()
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(m.handle)
            .visibility_timeout(sqs_visibility_secs(after))
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) => {
                let e = describe(&e);
                tracing::warn!(error = %e, "could not change the visibility of SQS message {} ({e}); it returns when its current timeout ends", m.id);
                false
            }
        }
    }

    /// Make the message visible again at once, for another worker or agent.
    async fn release(&self, m: &Receipt<'_>) {
        let r = tokio::time::timeout(RELEASE_TIMEOUT, self.set_visibility(m, Duration::ZERO)).await;
        match r {
            Ok(true) => {
                self.stats.message(MessageOutcome::Released);
                tracing::info!(
                    "shutting down: SQS message {} released to the queue unfinished (delivered again at once)",
                    m.id
                )
            }
            Ok(false) => {} // logged by set_visibility; counted as not released
            Err(_) => tracing::warn!("shutting down: releasing SQS message {} timed out; it returns when its visibility timeout ends", m.id),
        }
    }

    /// Send the message to the dead-letter queue with the reason, then delete it from the main queue.
    /// Without a dead-letter queue, record the failure in the log and delete the message.
    async fn dead_letter(&self, m: &Receipt<'_>, reason: &str) {
        let Some(dlq) = &self.dlq_url else {
            // SQS cannot hide a message for more than 12 hours from its receipt, so "keep it hidden"
            // would mean re-failing it forever: the error report (or, for a message that is no event,
            // this log line with its body) is the record, and the message is deleted.
            let excerpt: String = m.body.chars().take(2000).collect();
            tracing::error!(%reason, body = %excerpt, "SQS message {} failed for good ({reason}) and no queue.dead_letter_queue is configured: the failure is recorded (error report, this log) and the message deleted", m.id);
            self.delete(m).await;
            return;
        };
        let reason_attr: String = sqs_safe(reason).chars().take(1000).collect();
        let sent = self
            .sqs()
            .send_message()
            .queue_url(dlq)
            .message_body(if m.body.is_empty() {
                "(empty body)".to_string()
            } else {
                sqs_safe(m.body)
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
                tracing::info!(dead_letter_queue = %dlq, "SQS message {} moved to the dead-letter queue {dlq}: {reason}", m.id);
                self.delete(m).await;
            }
            Err(e) => {
                let e = describe(&e);
                tracing::warn!(error = %e, "could not send SQS message {} to the dead-letter queue {dlq} ({e}); it will come back and be tried again", m.id);
            }
        }
    }
}

/// How long shutdown waits for SQS to take a released message back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// SQS accepts only these characters in bodies and attribute values (#x9, #xA, #xD, #x20-#xD7FF,
/// #xE000-#xFFFD, #x10000-#x10FFFF); anything else (control characters from an object key) becomes
/// U+FFFD.
pub(crate) fn sqs_safe(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 => '\u{fffd}',
            '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data_type is set")
}

/// Extends a message's visibility every third of the timeout until dropped.
pub(crate) struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub(crate) fn start(
        sqs: aws_sdk_sqs::Client,
        queue_url: String,
        receipt: String,
        vis: Duration,
    ) -> Self {
        use tracing::Instrument;
        let period = (vis / 3).max(Duration::from_secs(1));
        let secs = sqs_visibility_secs(vis);
        let task = tokio::spawn(
            async move {
                let mut failing = crate::telemetry::Episode::default();
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
                        Ok(_) => {
                            if let Some(ended) = failing.ended() {
                                tracing::info!("the message's visibility is extended again; extending it had failed {ended}");
                            }
                            tracing::debug!(visibility_s = secs, "visibility extended")
                        }
                        Err(e) => {
                            let e = describe(&e);
                            if failing.occurred("ChangeMessageVisibility") {
                                tracing::warn!(error = %e, "could not extend the message's visibility ({e}); another consumer may receive it meanwhile (results are idempotent); retrying every {} s", period.as_secs())
                            }
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> QueueConfig {
        QueueConfig {
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(15 * 60),
            ..QueueConfig::default()
        }
    }

    #[test]
    fn failures_are_judged_by_class_and_receives_left() {
        use ProcessError::*;
        let retry = |r: &str, reported| Verdict::Retry {
            reason: r.into(),
            reported,
        };
        let cases: Vec<(ProcessError, u32, Option<u32>, Verdict)> = vec![
            (Cancelled, 1, Some(5), Verdict::Cancelled),
            (
                Superseded("new".into()),
                5,
                Some(5),
                Verdict::Superseded("new".into()),
            ),
            (Transient("slow".into()), 1, Some(5), retry("slow", false)),
            (Transient("slow".into()), 4, Some(5), retry("slow", false)),
            (Transient("slow".into()), 99, None, retry("slow", false)),
            (
                Unavailable("no image".into()),
                1,
                Some(5),
                retry("no image", true),
            ),
            (
                Transient("slow".into()),
                5,
                Some(5),
                Verdict::GiveUp(
                    "gave up after 5 receives (the queue's maxReceiveCount): slow".into(),
                ),
            ),
            (
                Unavailable("no image".into()),
                6,
                Some(5),
                Verdict::GiveUp(
                    "gave up after 6 receives (the queue's maxReceiveCount): no image".into(),
                ),
            ),
            (
                Permanent("not csv".into()),
                1,
                Some(5),
                Verdict::GiveUp("not csv".into()),
            ),
            (
                Permanent("not csv".into()),
                1,
                None,
                Verdict::GiveUp("not csv".into()),
            ),
        ];
        for (err, count, max, want) in cases {
            let shown = format!("{err:?} on receive {count} of {max:?}");
            assert_eq!(judge(err, count, max), want, "{shown}");
        }
    }

    #[test]
    fn a_message_is_settled_by_its_file_ends() {
        use FileEnd::*;
        let q = queue();
        let s = Duration::from_secs;
        let retry = |step, r: &str| Settlement::RetryAfter {
            step,
            reason: r.into(),
        };
        let cases: Vec<(Vec<FileEnd>, u32, Settlement)> = vec![
            (vec![], 1, Settlement::Delete),
            (vec![Done, Done], 1, Settlement::Delete),
            (vec![Done, Cancelled], 3, Settlement::Release),
            (vec![Failed("a".into()), Cancelled], 1, Settlement::Release),
            (vec![Retry("slow".into())], 1, retry(s(10), "slow")),
            (vec![Done, Retry("slow".into())], 2, retry(s(20), "slow")),
            (
                vec![Failed("a".into()), Retry("x".into())],
                4,
                retry(s(80), "x"),
            ),
            (vec![Retry("slow".into())], 30, retry(s(900), "slow")),
            (vec![Retry("slow".into())], 0, retry(s(10), "slow")),
            (
                vec![Failed("a: bad".into())],
                1,
                Settlement::DeadLetter("a: bad".into()),
            ),
            (
                vec![Failed("a: bad".into()), Done, Failed("b: worse".into())],
                1,
                Settlement::DeadLetter("a: bad; b: worse".into()),
            ),
        ];
        for (ends, count, want) in cases {
            assert_eq!(
                decide(&ends, count, &q),
                want,
                "{ends:?} on receive {count}"
            );
        }
    }

    #[test]
    fn only_retries_and_cancellation_stop_a_message() {
        assert!(FileEnd::Retry("x".into()).stops_the_message());
        assert!(FileEnd::Cancelled.stops_the_message());
        assert!(!FileEnd::Done.stops_the_message());
        assert!(!FileEnd::Failed("x".into()).stops_the_message());
    }

    #[test]
    fn sqs_safe_replaces_what_sqs_refuses() {
        assert_eq!(sqs_safe("a\tb\nc\rd"), "a\tb\nc\rd");
        assert_eq!(sqs_safe("a\u{1}b\u{fffe}"), "a\u{fffd}b\u{fffd}");
        assert_eq!(sqs_safe("ünï 🙂"), "ünï 🙂");
    }

    #[test]
    fn visibility_is_clamped_to_sqs_limit() {
        assert_eq!(sqs_visibility_secs(Duration::from_secs(90)), 90);
        assert_eq!(sqs_visibility_secs(Duration::from_secs(100_000)), 43_200);
    }
}
