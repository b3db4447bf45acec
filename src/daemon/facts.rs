//! What the daemon tells the world about itself: systemd's one-line `STATUS=`, the admin endpoint's
//! facts (alive, ready, the `/status` document), and the ECS agent's gauges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{FileOutcome, Metrics};
use crate::status::{EcsAgent, Readiness, Registration, StatusDoc, Unavailable, WorkerStatus};
use crate::worker::ObjectProcessor;

/// The one-line summary systemd shows (`STATUS=`), from the same counters the log uses.
pub(super) fn status_line(
    stats: &Metrics,
    unavailable: &[(String, String)],
    ecs: Option<&watch::Receiver<crate::ecs_agent::Status>>,
) -> String {
    let mut parts = Vec::new();
    if let Some(rx) = ecs {
        parts.push(format!("ECS agent {}", rx.borrow().state));
    }
    parts.push(format!("{} in flight", stats.in_flight()));
    parts.push(format!(
        "{} files done",
        stats.files_total(&[FileOutcome::Ok, FileOutcome::Rejected])
    ));
    let failed = stats.files_total(&[FileOutcome::PermanentError, FileOutcome::TransientRetry]);
    if failed > 0 {
        parts.push(format!("{failed} failed"));
    }
    if let Some(problem) = stats.queue.describe() {
        parts.push(problem);
    }
    if let Some(problem) = stats.spool_problem() {
        parts.push(problem);
    }
    for (pipeline, _) in unavailable {
        parts.push(format!("pipeline {pipeline} unavailable (see the log)"));
    }
    parts.join("; ")
}

/// What the admin endpoint reports about this daemon.
pub(super) struct DaemonFacts {
    pub(super) metrics: Arc<Metrics>,
    pub(super) objects: Arc<ObjectProcessor>,
    pub(super) ecs: Option<watch::Receiver<crate::ecs_agent::Status>>,
    /// The SSM managed instance id, as the main loop last read it (off the runtime's threads).
    pub(super) managed_instance: Arc<Mutex<Option<String>>>,
    /// Milliseconds since `started` at the main loop's last turn.
    pub(super) turned: Arc<AtomicU64>,
    pub(super) started: Instant,
    pub(super) stopping: CancellationToken,
}

/// The main loop turns at least every STATUS_EVERY; this much silence means it is stuck.
const ALIVE_WITHIN: Duration = Duration::from_secs(10);

impl crate::admin::Facts for DaemonFacts {
    fn alive(&self) -> Result<(), String> {
        let last = self.turned.load(Ordering::Relaxed);
        let silent = (self.started.elapsed().as_millis() as u64).saturating_sub(last);
        if silent < ALIVE_WITHIN.as_millis() as u64 {
            Ok(())
        } else {
            Err(format!(
                "the main loop has not turned for {} s",
                silent / 1000
            ))
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.stopping.is_cancelled() {
            return Err("shutting down: not taking new work".into());
        }
        if let Some(problem) = self.metrics.queue.describe() {
            return Err(problem);
        }
        if let Some(problem) = self.metrics.spool_problem() {
            return Err(problem);
        }
        if !self.metrics.queue_seen() {
            return Err("the queue has not been reached yet".into());
        }
        Ok(())
    }

    fn status(&self) -> StatusDoc {
        let m = &self.metrics;
        let ecs = self.ecs.as_ref().map(|rx| rx.borrow().clone());
        let meta = ecs.as_ref().and_then(|s| s.metadata.clone());
        StatusDoc {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            ready: Readiness::of(self.ready()),
            registration: Registration {
                managed_instance_id: self
                    .managed_instance
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                cluster: meta.as_ref().and_then(|m| m.cluster.clone()),
                container_instance_arn: meta
                    .as_ref()
                    .and_then(|m| m.container_instance_arn.clone()),
            },
            ecs_agent: ecs.map(|s| EcsAgent {
                state: s.state.to_string(),
                reason: s.reason,
                version: meta.as_ref().and_then(|m| m.version.clone()),
                restarts: s.restarts,
                adoptions: s.adoptions,
                last_exit_code: s.last_exit_code,
                image: s.running_image,
                desired_image: s.desired_image,
                last_update: s.last_update,
            }),
            worker: WorkerStatus {
                in_flight: m.in_flight(),
                free_slots: m.free_slots(),
                files_done: m.files_total(&[FileOutcome::Ok, FileOutcome::Rejected]),
                files_failed: m
                    .files_total(&[FileOutcome::PermanentError, FileOutcome::TransientRetry]),
                rows_per_second_1m: m.rows_per_second(),
                queue_problem: m.queue.describe(),
                spool_free_bytes: Some(m.spool_free_bytes()),
                spool_problem: m.spool_problem(),
                pipelines: m.by_pipeline(),
                unavailable_pipelines: self
                    .objects
                    .unavailable()
                    .into_iter()
                    .map(|(pipeline, reason)| Unavailable { pipeline, reason })
                    .collect(),
            },
            recent_errors: m.recent_errors(),
            clock_skew_seconds: self.objects.ctx.clients.clock.skew_seconds(),
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Keep the ECS agent's gauges and restart counter in step with the supervisor's status.
pub(super) async fn follow_ecs_status(
    mut rx: watch::Receiver<crate::ecs_agent::Status>,
    metrics: Arc<Metrics>,
) {
    let all: Vec<String> = crate::ecs_agent::State::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut restarts = 0;
    let mut updates = (0, 0, 0);
    loop {
        {
            let s = rx.borrow_and_update();
            let now = (s.updates, s.rollbacks, s.refusals);
            metrics.ecs_agent_updates(
                now.0.saturating_sub(updates.0),
                now.1.saturating_sub(updates.1),
                now.2.saturating_sub(updates.2),
            );
            updates = now;
            metrics.ecs_agent(&s.state.to_string(), &all);
            if s.restarts > restarts {
                metrics.ecs_agent_restarted(s.restarts - restarts, s.last_exit_code);
            }
            restarts = s.restarts;
            let arn = s
                .metadata
                .as_ref()
                .and_then(|m| m.container_instance_arn.as_ref());
            metrics.registered(crate::metrics::Registered::Ecs, arn.is_some());
            metrics.ecs_agent_connected(s.connected);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
