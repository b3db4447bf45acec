//! The daemon: owns the task tree, turns signals into shutdown and reload, talks to systemd.
//!
//! Shutdown is two-phase. The first SIGTERM/SIGINT stops the receiver; in-flight files get
//! `agent.shutdown_grace` to finish. When the grace runs out (or a second signal arrives) the workers
//! are told to abort: each releases its message (visibility 0) so another consumer takes it at once.
//! Nothing half-done is acknowledged, and results are idempotent, so the rerun is safe.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::aws::Clients;
use crate::backoff::Backoff;
use crate::config::{self, Config};
use crate::ecs_agent::Supervisor;
use crate::error::describe;
use crate::metrics::{FileOutcome, Metrics};
use crate::params::ParameterLayer;
use crate::processors::container::Owner;
use crate::spool::Spool;
use crate::telemetry::LogHandle;
use crate::worker::{receive, ObjectProcessor, Worker};
use sd_notify::NotifyState;
use tokio::time::Instant;

/// What the outside world asks of a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM / SIGINT: drain and stop (a second one aborts in-flight work at once).
    Stop,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// After the grace period, how long releasing the unfinished messages may take.
const RELEASE_BUDGET: Duration = Duration::from_secs(8);

/// Forward SIGTERM, SIGINT and SIGHUP into a channel (production's control source).
pub fn signals() -> Result<mpsc::Receiver<Control>> {
    use futures::StreamExt;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let c = if sig == SIGHUP {
                Control::Reload
            } else {
                Control::Stop
            };
            if tx.send(c).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Tell systemd about our state (Type=notify); a no-op when not started by systemd.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// The configuration's layers and the running configuration. SIGHUP and Parameter Store refreshes go
/// through [`Settings::reload`]: live settings are applied and logged old -> new; the rest are logged as
/// taking effect after a restart; an invalid result leaves the running configuration in force.
struct Settings {
    path: PathBuf,
    env: BTreeMap<String, String>,
    /// The last Parameter Store layer read successfully (`None` without `ssm.parameters_path`, or before
    /// the first successful read).
    params: Option<ParameterLayer>,
    /// Whether the last attempt to read Parameter Store failed (retried sooner than the interval).
    params_failing: bool,
    current: Config,
    tx: watch::Sender<Arc<Config>>,
    log: LogHandle,
}

/// After a failed Parameter Store read, the next attempt comes this soon (or at the interval, if shorter).
const PARAMS_RETRY: Duration = Duration::from_secs(30);

impl Settings {
    /// Read Parameter Store into the layer. An outage keeps the last layer and never stops the daemon.
    async fn fetch_params(&mut self, ssm: &aws_sdk_ssm::Client) {
        let Some(path) = self.current.ssm.parameters_path.clone() else {
            self.params = None;
            return;
        };
        match crate::params::fetch(ssm, &path).await {
            Ok(layer) => {
                if self.params_failing {
                    tracing::info!(path = %path, "Parameter Store is reachable again");
                }
                tracing::debug!(path = %path, parameters = layer.parameters.len(), "read Parameter Store");
                self.params_failing = false;
                self.params = Some(layer);
            }
            Err(e) => {
                self.params_failing = true;
                tracing::warn!(path = %path, error = %e, "cannot read configuration from Parameter Store; keeping the configuration in force and retrying");
            }
        }
    }

    /// When Parameter Store is due again.
    fn params_delay(&self) -> Option<Duration> {
        self.current.ssm.parameters_path.as_ref()?;
        let every = self.current.ssm.refresh_interval;
        Some(if self.params_failing {
            every.min(PARAMS_RETRY)
        } else {
            every
        })
    }

    /// Load every layer and apply what changed. `why` names the trigger in the log.
    fn reload(&mut self, why: &str) -> bool {
        let new = match config::load_with(&self.path, self.params.as_ref(), &self.env) {
            Ok(l) => l.config,
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "configuration reload failed; keeping the running configuration");
                return false;
            }
        };
        let changes = self.current.changes(&new);
        if changes.is_empty() {
            tracing::debug!(trigger = why, "configuration unchanged");
            return true;
        }
        for c in &changes {
            if c.live {
                tracing::info!(trigger = why, setting = %c.key, old = %c.old, new = %c.new, "configuration change applied: {} {} -> {}", c.key, c.old, c.new);
            } else {
                tracing::warn!(trigger = why, setting = %c.key, old = %c.old, new = %c.new, "configuration change takes effect after a restart: {} {} -> {}", c.key, c.old, c.new);
            }
        }
        self.log.set_level(&new.agent.log_level);
        self.current = new.clone();
        let _ = self.tx.send(Arc::new(new));
        true
    }
}

/// Find a queue's URL, retrying with backoff while it does not exist (a fatal condition that an operator
/// fixes by running `provision`), until `stop`.
async fn resolve_queue(
    clients: &Clients,
    name: &str,
    what: &str,
    stats: &Metrics,
    stop: &CancellationToken,
) -> Option<String> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        match clients.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                if let Some(url) = out.queue_url() {
                    stats.queue_found();
                    return Some(url.to_string());
                }
            }
            Err(e) => {
                stats.queue_missing(format!("{what} {name} not found"));
                let delay = backoff.next_delay();
                tracing::error!(
                    queue = name,
                    error = %describe(&e),
                    retry_in_s = delay.as_secs(),
                    "cannot find the {what} (run `offload-agent provision`, or check the region and IAM permissions)"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// After the grace period, how long releasing the unfinished messages may take, and then how long the
/// ECS agent's supervisor may take to stop.
const SUPERVISOR_BUDGET: Duration = Duration::from_secs(8);

/// The longest shutdown beyond `agent.shutdown_grace`: releasing messages, then stopping the supervisor.
pub const SHUTDOWN_OVERHEAD: Duration =
    Duration::from_secs(RELEASE_BUDGET.as_secs() + SUPERVISOR_BUDGET.as_secs());

/// `TimeoutStopSec=` of `systemd/offload-agent.service` (a test checks that they agree).
pub const UNIT_TIMEOUT_STOP: Duration = Duration::from_secs(60);

/// How often the status line is refreshed (and the watchdog fed, if it wants it less often).
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How long after READY, and after each reload, the pages only start-up ran are unmapped
/// ([`crate::pages`]): by then the first long poll, the pre-flight checks and the first status
/// have run, so what faults back in is what the daemon keeps using.
const RELEASE_STARTUP_PAGES_AFTER: Duration = Duration::from_secs(30);

/// The one-line summary systemd shows (`STATUS=`), from the same counters the log uses.
fn status_line(
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
    for (pipeline, _) in unavailable {
        parts.push(format!("pipeline {pipeline} unavailable (see the log)"));
    }
    parts.join("; ")
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
async fn serve(
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

/// What the admin endpoint reports about this daemon.
struct DaemonFacts {
    metrics: Arc<Metrics>,
    objects: Arc<ObjectProcessor>,
    ecs: Option<watch::Receiver<crate::ecs_agent::Status>>,
    host: crate::config::HostConfig,
    /// Milliseconds since `started` at the main loop's last turn.
    turned: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    stopping: CancellationToken,
}

/// The main loop turns at least every STATUS_EVERY; this much silence means it is stuck.
const ALIVE_WITHIN: Duration = Duration::from_secs(10);

impl crate::admin::Facts for DaemonFacts {
    fn alive(&self) -> Result<(), String> {
        let last = self.turned.load(std::sync::atomic::Ordering::Relaxed);
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
        if !self.metrics.queue_seen() {
            return Err("the queue has not been reached yet".into());
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let m = &self.metrics;
        let reg = crate::registration::ssm::registration(&self.host)
            .ok()
            .flatten();
        let ecs = self.ecs.as_ref().map(|rx| rx.borrow().clone());
        let meta = ecs.as_ref().and_then(|s| s.metadata.clone());
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": self.ready().err().map_or(serde_json::json!(true), |why| serde_json::json!(why)),
            "registration": {
                "managed_instance_id": reg.as_ref().map(|r| r.managed_instance_id.clone()),
                "cluster": meta.as_ref().and_then(|m| m.cluster.clone()),
                "container_instance_arn": meta.as_ref().and_then(|m| m.container_instance_arn.clone()),
            },
            "ecs_agent": ecs.as_ref().map(|s| serde_json::json!({
                "state": s.state.to_string(),
                "reason": s.reason,
                "version": meta.as_ref().and_then(|m| m.version.clone()),
                "restarts": s.restarts,
                "adoptions": s.adoptions,
                "last_exit_code": s.last_exit_code,
            })),
            "worker": {
                "in_flight": m.in_flight(),
                "free_slots": m.free_slots(),
                "files_done": m.files_total(&[FileOutcome::Ok, FileOutcome::Rejected]),
                "files_failed": m.files_total(&[FileOutcome::PermanentError, FileOutcome::TransientRetry]),
                "rows_per_second_1m": m.rows_per_second(),
                "queue_problem": m.queue.describe(),
                "pipelines": m.by_pipeline(),
                "unavailable_pipelines": self.objects.unavailable().into_iter()
                    .map(|(p, why)| serde_json::json!({"pipeline": p, "reason": why}))
                    .collect::<Vec<_>>(),
            },
            "recent_errors": m.recent_errors(),
        })
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Keep the ECS agent's gauges and restart counter in step with the supervisor's status.
async fn follow_ecs_status(
    mut rx: watch::Receiver<crate::ecs_agent::Status>,
    metrics: Arc<Metrics>,
) {
    let all: Vec<String> = crate::ecs_agent::State::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut restarts = 0;
    loop {
        {
            let s = rx.borrow_and_update();
            metrics.ecs_agent(&s.state.to_string(), &all);
            if s.restarts > restarts {
                metrics.ecs_agent_restarted(s.restarts - restarts, s.last_exit_code);
            }
            restarts = s.restarts;
            let arn = s
                .metadata
                .as_ref()
                .and_then(|m| m.container_instance_arn.as_ref());
            metrics.registered("ecs", arn.is_some());
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Run the daemon until `control` says stop (or closes). `env` is the environment used for reloads.
///
/// Ready (for systemd) means configured and running: the queue may still be missing or unreachable,
/// which is a degraded state shown in `STATUS=` and recovered from without a restart.
pub async fn run(
    config_path: PathBuf,
    cfg: Config,
    env: BTreeMap<String, String>,
    log: LogHandle,
    mut control: mpsc::Receiver<Control>,
) -> Result<()> {
    let mut clients = crate::aws::clients(&cfg).await?;
    let (config_tx, config_rx) = watch::channel(Arc::new(cfg.clone()));
    let mut settings = Settings {
        path: config_path,
        env,
        params: None,
        params_failing: false,
        current: cfg.clone(),
        tx: config_tx,
        log,
    };
    // Parameter Store sits between the files and the environment: read it before anything starts, so
    // that settings only a restart changes come from it too.
    if settings.current.ssm.parameters_path.is_some() {
        settings.fetch_params(&clients.ssm).await;
        if settings.params.is_some() {
            match config::load_with(&settings.path, settings.params.as_ref(), &settings.env) {
                Ok(l) => {
                    settings.current = l.config;
                    settings.log.set_level(&settings.current.agent.log_level);
                    let _ = settings.tx.send(Arc::new(settings.current.clone()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the configuration from Parameter Store is not valid; starting with the files and environment alone")
                }
            }
        }
        if settings.current.aws != cfg.aws || settings.current.host != cfg.host {
            clients = crate::aws::clients(&settings.current).await?;
        }
    }
    let cfg = settings.current.clone();
    let spool = Spool::open(&cfg.spool.dir).with_context(|| {
        format!(
            "cannot create spool.dir {} (run as the offload-agent user, or fix its ownership)",
            cfg.spool.dir.display()
        )
    })?;
    match spool.clean_stale() {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            files = n,
            "removed spool files left by an earlier run; their messages return through SQS"
        ),
        Err(e) => {
            tracing::warn!(error = %e, dir = %cfg.spool.dir.display(), "cannot clean the spool")
        }
    }

    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let stats = Arc::new(Metrics::new());
    for p in &cfg.pipelines {
        stats.pipeline(&p.name);
    }

    // The ECS agent's supervisor runs whatever the queue's state, and the worker pool whatever the
    // supervisor's.
    let (supervisor, ecs_status) = if cfg.ecs_agent.enabled {
        let (sup, status) = Supervisor::new(config_rx.clone(), stop.clone());
        (Some(tokio::spawn(sup.run())), Some(status))
    } else {
        tracing::info!("ECS agent supervision is off (ecs_agent.enabled = false)");
        (None, None)
    };

    if let Some(rx) = &ecs_status {
        tokio::spawn(follow_ecs_status(rx.clone(), stats.clone()));
    }
    let credentials = clients.credentials.clone();
    let ssm = clients.ssm.clone();
    let objects = Arc::new(ObjectProcessor::new(
        crate::processors::Context::new(clients, &cfg, Owner::Daemon, stats.clone()),
        spool,
    ));
    // Containers a killed predecessor left running go first; then every pipeline is checked once.
    tokio::spawn({
        let (objects, cfg) = (objects.clone(), cfg.clone());
        async move {
            if let Err(e) = objects.ctx.docker.remove_orphans().await {
                tracing::warn!(error = %e, "cannot look for processor containers left by an earlier run");
            }
            objects.preflight(&cfg).await;
        }
    });
    let mut pool_task = tokio::spawn(serve(
        objects.clone(),
        cfg.clone(),
        config_rx,
        stats.clone(),
        stop.clone(),
        abort.clone(),
    ));
    let started = Instant::now();
    let turned = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut admin_problem = None;
    if cfg.admin.enabled {
        match crate::admin::bind(cfg.admin.addr()).await {
            Ok(listener) => {
                let addr = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(listen = %addr, "admin endpoint: /healthz /readyz /metrics /status");
                let facts = Arc::new(DaemonFacts {
                    metrics: stats.clone(),
                    objects: objects.clone(),
                    ecs: ecs_status.clone(),
                    host: cfg.host.clone(),
                    turned: turned.clone(),
                    started,
                    stopping: stop.clone(),
                });
                tokio::spawn(crate::admin::serve(listener, facts, stop.clone()));
            }
            // Files keep flowing without the endpoint; the problem stays in the status line.
            Err(e) => {
                tracing::error!(error = %e, "admin endpoint not available");
                admin_problem = Some(e);
            }
        }
    }
    tracing::info!(pipelines = cfg.pipelines.len(), "offload-agent ready");
    let status_of = |stats: &Metrics| {
        let mut line = status_line(stats, &objects.unavailable(), ecs_status.as_ref());
        if admin_problem.is_some() {
            line.push_str("; admin endpoint not available (see the log)");
        }
        line
    };
    let mut status = status_of(&stats);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    // The watchdog is fed only while a second task keeps beating too: a wedged runtime feeds nothing.
    let watchdog = watchdog_interval();
    let beat = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let beater = {
        let beat = beat.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(500));
            loop {
                t.tick().await;
                beat.store(
                    started.elapsed().as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        })
    };
    let mut tick =
        tokio::time::interval(watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_refresh = settings.params_delay().map(|d| Instant::now() + d);
    let mut release_pages_at = Some(Instant::now() + RELEASE_STARTUP_PAGES_AFTER);

    loop {
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    notify(&[NotifyState::Reloading]);
                    settings.fetch_params(&ssm).await;
                    let ok = settings.reload("SIGHUP");
                    stats.config_reload(ok);
                    if ok {
                        tracing::info!(pipelines = settings.current.pipelines.len(), "configuration reloaded");
                        let (objects, cfg) = (objects.clone(), settings.current.clone());
                        tokio::spawn(async move { objects.preflight(&cfg).await });
                    }
                    next_refresh = settings.params_delay().map(|d| Instant::now() + d);
                    release_pages_at = Some(Instant::now() + RELEASE_STARTUP_PAGES_AFTER);
                    notify(&[NotifyState::Ready]);
                }
                Some(Control::Stop) | None => break,
            },
            _ = tokio::time::sleep_until(next_refresh.unwrap_or_else(Instant::now)), if next_refresh.is_some() => {
                settings.fetch_params(&ssm).await;
                if settings.params.is_some() {
                    let ok = settings.reload("Parameter Store refresh");
                    stats.config_reload(ok);
                }
                next_refresh = settings.params_delay().map(|d| Instant::now() + d);
                release_pages_at = Some(Instant::now() + RELEASE_STARTUP_PAGES_AFTER);
            }
            _ = tokio::time::sleep_until(release_pages_at.unwrap_or_else(Instant::now)), if release_pages_at.is_some() => {
                release_pages_at = None;
                match crate::pages::release_startup_pages() {
                    Ok(r) => tracing::debug!(mappings = r.mappings, resident_kib = r.kib, "unmapped the pages of start-up code; what runs next maps back from the page cache"),
                    Err(e) => tracing::debug!(error = %e, "could not unmap the pages of start-up code; they stay mapped"),
                }
            }
            _ = tick.tick() => {
                turned.store(started.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
                stats.sample_rows();
                let ssm = crate::registration::ssm::registration(&settings.current.host);
                stats.registered("ssm", matches!(ssm, Ok(Some(_))));
                if let Some(c) = &credentials {
                    stats.credentials_reloaded_total(c.reloads());
                }
                let line = status_of(&stats);
                if line != status {
                    status = line;
                    notify(&[NotifyState::Status(&status)]);
                }
                let last = beat.load(std::sync::atomic::Ordering::Relaxed);
                if watchdog.is_some() && (started.elapsed().as_millis() as u64).saturating_sub(last) < 5_000 {
                    notify(&[NotifyState::Watchdog]);
                }
            }
            r = &mut pool_task => {
                // The pool ends only when stopped; anything else is a bug worth a restart.
                anyhow::bail!("the worker pool ended unexpectedly: {r:?}");
            }
        }
    }

    let grace = settings.current.agent.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        in_flight = stats.in_flight(),
        "shutting down: no new messages; finishing in-flight files"
    );
    notify(&[NotifyState::Stopping]);
    stop.cancel();
    let finished = tokio::select! {
        r = tokio::time::timeout(grace, &mut pool_task) => r.is_ok(),
        c = control.recv() => { if c.is_some() { tracing::warn!("second stop signal: aborting in-flight files now"); } false }
    };
    if !finished {
        tracing::warn!("shutdown grace ran out: releasing unfinished messages to the queue");
        abort.cancel();
        if tokio::time::timeout(RELEASE_BUDGET, &mut pool_task)
            .await
            .is_err()
        {
            tracing::error!("workers did not stop in time; exiting anyway (their messages return after the visibility timeout)");
        }
    }
    if let Some(s) = supervisor {
        if tokio::time::timeout(SUPERVISOR_BUDGET, s).await.is_err() {
            tracing::warn!("the ECS agent supervisor did not stop in time");
        }
    }
    beater.abort();
    tracing::info!(stats = %stats.summary(), "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit gives the daemon at least the longest shutdown the default configuration allows, and
    /// `UNIT_TIMEOUT_STOP` (what `config check` compares against) is what the unit says.
    #[test]
    fn the_unit_covers_the_longest_shutdown() {
        let unit = include_str!("../systemd/offload-agent.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .expect("TimeoutStopSec= in the unit");
        let in_unit = humantime::parse_duration(line.trim()).unwrap();
        assert_eq!(in_unit, UNIT_TIMEOUT_STOP);
        assert!(config::DEFAULT_SHUTDOWN_GRACE + SHUTDOWN_OVERHEAD < UNIT_TIMEOUT_STOP);
        assert!(unit.contains("RestartPreventExitStatus=64 78"));
        assert!(
            !unit.lines().any(|l| l.starts_with("ExecStartPre=")),
            "a failing ExecStartPre= restarts forever"
        );
    }

    #[test]
    fn the_status_line_says_what_is_wrong() {
        let stats = Metrics::new();
        assert_eq!(status_line(&stats, &[], None), "0 in flight; 0 files done");
        stats.queue.fail("queue q not found".into());
        assert!(status_line(&stats, &[], None).contains("queue q not found for 0 s"));
        stats.queue.ok();
        assert!(!status_line(&stats, &[], None).contains("not found"));
        let gone = [("thumbs".to_string(), "image x is not present".to_string())];
        assert!(
            status_line(&stats, &gone, None).ends_with("pipeline thumbs unavailable (see the log)")
        );
    }
}
