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
use crate::telemetry::Episode;
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
    let mut missing = Episode::default();
    loop {
        match clients.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                if let Some(url) = out.queue_url() {
                    stats.queue_found();
                    if let Some(ended) = missing.ended() {
                        tracing::info!(
                            queue = name,
                            attempts = ended.occurrences,
                            "{what} {name} found ({url}) after {} failed lookup(s) over {}",
                            ended.occurrences,
                            ended.lasted_text()
                        );
                    }
                    return Some(url.to_string());
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let (line, problem, advice) = match crate::error::egress_failure(&e) {
                    // The way out is the problem, not the queue: say that, not "provision".
                    Some(line) => (line.to_string(), line.to_string(), EGRESS_ADVICE),
                    None => (
                        format!("cannot find the {what} {name}: {}", describe(&e)),
                        format!("{what} {name} not found"),
                        QUEUE_ADVICE,
                    ),
                };
                stats.queue_missing(problem, advice);
                if missing.occurred(&line) {
                    tracing::error!(
                        queue = name,
                        retry_in_s = delay.as_secs(),
                        "{line}; {advice}; looking again every {} at most, without a restart",
                        humantime::format_duration(RESOLVE_BACKOFF_MAX)
                    );
                } else {
                    tracing::debug!(queue = name, retry_in_s = delay.as_secs(), "{line}");
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
        .map_err(|e| {
            let e = describe(&e);
            tracing::warn!(error = %e, "cannot read the redrive policy of {queue_url} ({e}): SQS may move failing messages to its dead-letter queue without a reason attribute")
        })
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
    let dlq = match (&dlq_url, max_receives) {
        (Some(d), Some(n)) => format!("dead-letter queue {d}, SQS's redrive after {n} receives"),
        (Some(d), None) => format!("dead-letter queue {d}"),
        (None, _) => "no dead-letter queue".to_string(),
    };
    tracing::info!(
        queue = %queue_url,
        dead_letter_queue = dlq_url.as_deref().unwrap_or(""),
        max_receives = max_receives.unwrap_or(0),
        pipelines = cfg.pipelines.len(),
        max_in_flight = cfg.queue.max_in_flight,
        "receiving from {queue_url} ({dlq}; up to {} files at once, {} pipeline(s))",
        cfg.queue.max_in_flight,
        cfg.pipelines.len()
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
