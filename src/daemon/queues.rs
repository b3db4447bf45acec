//! The queues a daemon serves: found by name (waiting for an operator while they do not exist), their
//! redrive limit read, then the worker pool started on them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::aws::Clients;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::describe;
use crate::metrics::Metrics;
use crate::metrics::{EGRESS_ADVICE, QUEUE_ADVICE};
use crate::worker::{receive, ObjectProcessor, Worker};

/// Waits between attempts to find a queue that does not exist (yet).
const RESOLVE_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESOLVE_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Find a queue's URL, retrying with backoff while it does not exist (a fatal condition that an operator
/// fixes by running `provision`), until `stop`.
async fn resolve_queue(
    clients: &Clients,
    name: &str,
    what: &str,
    stats: &Metrics,
    stop: &CancellationToken,
) -> Option<String> {
    let mut backoff = Backoff::new(RESOLVE_BACKOFF_MIN, RESOLVE_BACKOFF_MAX);
    loop {
        match clients.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                if let Some(url) = out.queue_url() {
                    stats.queue_found();
                    return Some(url.to_string());
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                match crate::error::egress_failure(&e) {
                    // The way out is the problem, not the queue: say that, not "provision".
                    Some(line) => {
                        stats.queue_missing(line.to_string(), EGRESS_ADVICE);
                        tracing::error!(queue = name, retry_in_s = delay.as_secs(), "{line}");
                    }
                    None => {
                        stats.queue_missing(format!("{what} {name} not found"), QUEUE_ADVICE);
                        tracing::error!(
                            queue = name,
                            error = %describe(&e),
                            retry_in_s = delay.as_secs(),
                            "cannot find the {what} ({QUEUE_ADVICE})"
                        );
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// The queue's redrive `maxReceiveCount`, if it has a redrive policy (read once at start; a change
/// needs a restart, like the queue itself).
async fn redrive_max_receives(clients: &Clients, queue_url: &str) -> Option<u32> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let out = clients
        .sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| tracing::warn!(error = %describe(&e), "cannot read the queue's redrive policy; SQS may move failing messages to its dead-letter queue without a reason attribute"))
        .ok()?;
    let policy = out.attributes()?.get(&QueueAttributeName::RedrivePolicy)?;
    let v: serde_json::Value = serde_json::from_str(policy).ok()?;
    match &v["maxReceiveCount"] {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Resolve the queues (waiting for an operator if need be), then receive and process until `stop`.
pub(super) async fn serve(
    objects: Arc<ObjectProcessor>,
    cfg: Config,
    config: watch::Receiver<Arc<Config>>,
    stats: Arc<Metrics>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let clients = &objects.ctx.clients;
    let main = match (&cfg.queue.url, &cfg.queue.name) {
        (Some(url), _) => {
            stats.queue_found();
            Some(url.clone())
        }
        (None, Some(name)) => resolve_queue(clients, name, "queue", &stats, &stop).await,
        (None, None) => None,
    };
    let Some(queue_url) = main else { return };
    let dlq_url = match &cfg.queue.dead_letter_queue {
        Some(name) if name.starts_with("https://") || name.starts_with("http://") => {
            Some(name.clone())
        }
        Some(name) => {
            match resolve_queue(clients, name, "dead-letter queue", &stats, &stop).await {
                Some(url) => Some(url),
                None => return,
            }
        }
        None => None,
    };
    let max_receives = redrive_max_receives(clients, &queue_url).await;
    tracing::info!(
        queue = %queue_url,
        dead_letter_queue = dlq_url.as_deref().unwrap_or(""),
        max_receives = max_receives.unwrap_or(0),
        pipelines = cfg.pipelines.len(),
        "receiving from the queue"
    );
    let worker = Arc::new(Worker {
        objects,
        config,
        stats,
        queue_url,
        dlq_url,
        max_receives,
        key_locks: Default::default(),
    });
    receive::run(worker, stop, abort).await;
}
