//! The receiver and its pool of workers. The receiver asks SQS for only as many messages as there are
//! free worker slots (at most 10, SQS's limit), so no message waits invisible in a local buffer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{classify, code, describe, ErrorClass};
use crate::limits::SQS_MAX_RECEIVE_BATCH;
use crate::telemetry::Episode;

/// Apply a new `queue.max_in_flight`: more slots at once; fewer as running files finish (the
/// surplus permits are taken and forgotten in the background).
fn resize(slots: &Arc<Semaphore>, capacity: &mut usize, want: usize) {
    if want == *capacity {
        return;
    }
    tracing::info!(
        from = *capacity,
        to = want,
        "queue.max_in_flight changed from {} to {want}: resizing the worker pool",
        *capacity
    );
    if want > *capacity {
        slots.add_permits(want - *capacity);
    } else {
        let surplus = (*capacity - want) as u32;
        let slots = slots.clone();
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(surplus).await {
                p.forget();
            }
        });
    }
    *capacity = want;
}

/// How often the spool's free space is looked at again while it is below `spool.min_free`.
const ROOM_RECHECK: Duration = Duration::from_secs(2);

/// The first wait after a failed receive.
const RECEIVE_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two receive attempts while the queue is unreachable: at most two
/// requests a minute during an outage, and work resumes within 30 s of its end (tests/it/faults.rs).
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The receiver's state: worker slots, the tasks working on messages, the backoff while the queue
/// cannot be reached.
struct Pool {
    worker: Arc<Worker>,
    slots: Arc<Semaphore>,
    /// Slots in existence (`queue.max_in_flight` as last applied).
    capacity: usize,
    /// Busy workers and the pool's size, for the in-flight and free-slot gauges.
    busy: Arc<AtomicUsize>,
    size: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
    backoff: Backoff,
    /// The receive failures going on (logged once, with a count when receiving works again).
    failing: Episode,
}

/// What waiting for free slots gave.
enum Slots {
    Free(Vec<OwnedSemaphorePermit>),
    /// The configuration changed (slots were resized): wait again.
    Resized,
    Stop,
}

/// Receive and process until `stop` is cancelled; then wait for in-flight messages. Workers watch `abort`
/// (cancelled by the daemon when the shutdown grace runs out) and release what they cannot finish.
pub(crate) async fn run(worker: Arc<Worker>, stop: CancellationToken, abort: CancellationToken) {
    let mut pool = Pool::new(worker);
    let mut config = pool.worker.config.clone();
    loop {
        while pool.tasks.try_join_next().is_some() {}
        let permits = match pool.free_slots(&mut config, &stop).await {
            Slots::Free(p) => p,
            Slots::Resized => continue,
            Slots::Stop => break,
        };
        let min_free = pool.worker.config.borrow().spool.min_free;
        if !pool.worker.objects.spool_has_room(min_free) {
            // Nothing is received while the spool is short of space; files in flight go on.
            drop(permits);
            tokio::select! {
                _ = tokio::time::sleep(ROOM_RECHECK) => continue,
                _ = stop.cancelled() => break,
            }
        }
        // Dropping a long poll on shutdown is safe: anything it had received becomes visible again
        // when its visibility timeout ends.
        let result = tokio::select! {
            r = pool.receive(permits.len()) => r,
            _ = stop.cancelled() => break,
        };
        match result {
            Ok(messages) => {
                pool.backoff.reset();
                if let Some(ended) = pool.failing.ended() {
                    tracing::info!(
                        queue = %pool.worker.queue_url,
                        failures = ended.occurrences,
                        "receiving from {} again; it had failed {ended}: {}",
                        pool.worker.queue_url,
                        ended.key
                    );
                }
                pool.worker.stats.receive(messages.len());
                pool.dispatch(messages, permits, &abort);
            }
            Err(e) => {
                drop(permits);
                let delay = pool.failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    pool.drain().await;
}

impl Pool {
    fn new(worker: Arc<Worker>) -> Pool {
        let max_in_flight = worker.config.borrow().queue.max_in_flight;
        worker.stats.slots(0, max_in_flight);
        tracing::debug!(
            max_in_flight,
            "worker pool of {max_in_flight} slots started"
        );
        Pool {
            worker,
            slots: Arc::new(Semaphore::new(max_in_flight)),
            capacity: max_in_flight,
            busy: Arc::new(AtomicUsize::new(0)),
            size: Arc::new(AtomicUsize::new(max_in_flight)),
            tasks: JoinSet::new(),
            backoff: Backoff::new(RECEIVE_BACKOFF_MIN, RECEIVE_BACKOFF_MAX),
            failing: Episode::default(),
        }
    }

    /// Wait for a free slot, then take every other free one (up to SQS's batch limit).
    async fn free_slots(
        &mut self,
        config: &mut watch::Receiver<Arc<Config>>,
        stop: &CancellationToken,
    ) -> Slots {
        let first = tokio::select! {
            p = self.slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Slots::Stop,
            },
            r = config.changed() => {
                if r.is_ok() {
                    let want = config.borrow_and_update().queue.max_in_flight;
                    resize(&self.slots, &mut self.capacity, want);
                    self.size.store(want, Ordering::Relaxed);
                    let n = self.busy.load(Ordering::Relaxed);
                    self.worker.stats.slots(n, want.saturating_sub(n));
                }
                return Slots::Resized;
            }
            _ = stop.cancelled() => return Slots::Stop,
        };
        let mut permits = vec![first];
        while permits.len() < SQS_MAX_RECEIVE_BATCH {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Slots::Free(permits)
    }

    /// One long poll for at most `n` messages.
    async fn receive(&self, n: usize) -> Result<Vec<Message>, ReceiveError> {
        let (vis, wait) = {
            let c = self.worker.config.borrow();
            (c.queue.visibility_timeout, c.queue.wait_time)
        };
        let out = self
            .worker
            .objects
            .ctx
            .clients
            .sqs_receive
            .receive_message()
            .queue_url(&self.worker.queue_url)
            .max_number_of_messages(n as i32)
            .visibility_timeout(vis.as_secs() as i32)
            .wait_time_seconds(wait.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await?;
        Ok(out.messages.unwrap_or_default())
    }

    /// A task per message, each holding one slot until its message is settled.
    fn dispatch(
        &mut self,
        messages: Vec<Message>,
        mut permits: Vec<OwnedSemaphorePermit>,
        abort: &CancellationToken,
    ) {
        for msg in messages {
            let Some(permit) = permits.pop() else {
                tracing::error!("SQS returned more messages than asked for; the extra one returns after its visibility timeout");
                break;
            };
            let w = self.worker.clone();
            let abort = abort.clone();
            let (busy, size) = (self.busy.clone(), self.size.clone());
            self.tasks.spawn(async move {
                let gauges = |n: usize| {
                    w.stats
                        .slots(n, size.load(Ordering::Relaxed).saturating_sub(n))
                };
                gauges(busy.fetch_add(1, Ordering::Relaxed) + 1);
                w.clone().handle_message(msg, abort).await;
                gauges(busy.fetch_sub(1, Ordering::Relaxed) - 1);
                drop(permit);
            });
        }
    }

    /// Report a failed receive (once per episode: the repeats at debug); the wait before the next
    /// one.
    fn failed(&mut self, e: &ReceiveError) -> Duration {
        let delay = self.backoff.next_delay();
        let queue = &self.worker.queue_url;
        let (fatal, line) = match crate::error::egress_failure(e) {
            Some(line) => {
                self.worker
                    .stats
                    .receive_failed(line.to_string(), crate::metrics::EGRESS_ADVICE);
                (true, line.to_string())
            }
            None => {
                self.worker.stats.receive_failed(
                    format!("queue unreachable ({})", describe(e)),
                    crate::metrics::QUEUE_ADVICE,
                );
                match classify(e) {
                    ErrorClass::Fatal => (
                        true,
                        format!(
                            "cannot receive from {queue}: {} (missing queue or no permission: run \
                             `offload-agent provision` or fix the IAM policy)",
                            describe(e)
                        ),
                    ),
                    _ => (
                        false,
                        format!("cannot receive from {queue}: {}", describe(e)),
                    ),
                }
            }
        };
        let first = self.failing.occurred(&line);
        let code = code(e).unwrap_or("");
        let retry_in_s = delay.as_secs();
        match (first, fatal) {
            (false, _) => tracing::debug!(queue = %queue, code, retry_in_s, "{line}; retrying"),
            (true, true) => tracing::error!(
                queue = %queue,
                code,
                retry_in_s,
                "{line}; retrying every {}s at most, logged again when it ends",
                RECEIVE_BACKOFF_MAX.as_secs()
            ),
            (true, false) => tracing::warn!(
                queue = %queue,
                code,
                retry_in_s,
                "{line}; retrying every {}s at most, logged again when it ends",
                RECEIVE_BACKOFF_MAX.as_secs()
            ),
        }
        delay
    }

    async fn drain(mut self) {
        while self.tasks.try_join_next().is_some() {}
        let n = self.tasks.len();
        if n > 0 {
            tracing::info!(
                in_flight = n,
                "receiver stopped; waiting for {n} file(s) in flight"
            );
        }
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("worker pool stopped: no file in flight");
    }
}

type ReceiveError = aws_sdk_sqs::error::SdkError<
    aws_sdk_sqs::operation::receive_message::ReceiveMessageError,
    aws_smithy_runtime_api::client::orchestrator::HttpResponse,
>;
