//! The receiver and its pool of workers. The receiver asks SQS for only as many messages as there are
//! free worker slots (at most 10, SQS's limit), so no message waits invisible in a local buffer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::backoff::Backoff;
use crate::error::{classify, code, describe, ErrorClass};
use crate::limits::SQS_MAX_RECEIVE_BATCH;

/// Apply a new `queue.max_in_flight`: more slots at once; fewer as running files finish (the
/// surplus permits are taken and forgotten in the background).
fn resize(slots: &Arc<Semaphore>, capacity: &mut usize, want: usize) {
    if want == *capacity {
        return;
    }
    tracing::info!(
        from = *capacity,
        to = want,
        "queue.max_in_flight changed: resizing the worker pool"
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

/// The longest wait between two receive attempts while the queue is unreachable: at most two
/// requests a minute during an outage, and work resumes within 30 s of its end (tests/faults.rs).
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Receive and process until `stop` is cancelled; then wait for in-flight messages. Workers watch `abort`
/// (cancelled by the daemon when the shutdown grace runs out) and release what they cannot finish.
pub async fn run(worker: Arc<Worker>, stop: CancellationToken, abort: CancellationToken) {
    let max_in_flight = worker.config.borrow().queue.max_in_flight;
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut capacity = max_in_flight;
    // Busy workers and the pool's size, for the in-flight and free-slot gauges.
    let busy = Arc::new(AtomicUsize::new(0));
    let size = Arc::new(AtomicUsize::new(max_in_flight));
    worker.stats.slots(0, max_in_flight);
    let mut config = worker.config.clone();
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), RECEIVE_BACKOFF_MAX);
    tracing::info!(queue = %worker.queue_url, max_in_flight, "receiver started");
    loop {
        while tasks.try_join_next().is_some() {}
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            r = config.changed() => {
                if r.is_ok() {
                    let want = config.borrow_and_update().queue.max_in_flight;
                    resize(&slots, &mut capacity, want);
                    size.store(want, Ordering::Relaxed);
                    let n = busy.load(Ordering::Relaxed);
                    worker.stats.slots(n, want.saturating_sub(n));
                }
                continue;
            }
            _ = stop.cancelled() => break,
        };
        let mut permits = vec![first];
        while permits.len() < SQS_MAX_RECEIVE_BATCH {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let (vis, wait) = {
            let c = worker.config.borrow();
            (c.queue.visibility_timeout, c.queue.wait_time)
        };
        let receive = worker
            .objects
            .ctx
            .clients
            .sqs_receive
            .receive_message()
            .queue_url(&worker.queue_url)
            .max_number_of_messages(permits.len() as i32)
            .visibility_timeout(vis.as_secs() as i32)
            .wait_time_seconds(wait.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send();
        // Dropping a long poll on shutdown is safe: anything it had received becomes visible again
        // when its visibility timeout ends.
        let result = tokio::select! {
            r = receive => r,
            _ = stop.cancelled() => break,
        };
        match result {
            Ok(out) => {
                backoff.reset();
                let messages = out.messages.unwrap_or_default();
                worker.stats.receive(messages.len());
                for msg in messages {
                    let Some(permit) = permits.pop() else {
                        tracing::error!("SQS returned more messages than asked for; the extra one returns after its visibility timeout");
                        break;
                    };
                    let w = worker.clone();
                    let abort = abort.clone();
                    let (busy, size) = (busy.clone(), size.clone());
                    tasks.spawn(async move {
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
            Err(e) => {
                let delay = backoff.next_delay();
                worker
                    .stats
                    .receive_failed(format!("queue unreachable ({})", describe(&e)));
                match classify(&e) {
                    ErrorClass::Fatal => tracing::error!(
                        queue = %worker.queue_url,
                        code = code(&e).unwrap_or(""),
                        error = %describe(&e),
                        retry_in_s = delay.as_secs(),
                        "cannot receive from the queue (missing queue or no permission?): run `offload-agent provision` or fix the IAM policy"
                    ),
                    _ => tracing::warn!(
                        queue = %worker.queue_url,
                        error = %describe(&e),
                        retry_in_s = delay.as_secs(),
                        "receiving from the queue failed; retrying"
                    ),
                }
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    let n = tasks.len();
    if n > 0 {
        tracing::info!(
            in_flight = n,
            "receiver stopped; waiting for in-flight files"
        );
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("worker pool stopped");
}
