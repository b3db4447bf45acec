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
use crate::params::ParameterLayer;
use crate::telemetry::LogHandle;
use crate::worker::spool::Spool;
use crate::worker::{pool, Stats, Worker};

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

/// Tell systemd about our state when started with Type=notify (NOTIFY_SOCKET is set); a no-op elsewhere.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
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
    stop: &CancellationToken,
) -> Option<String> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        match clients.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                if let Some(url) = out.queue_url() {
                    return Some(url.to_string());
                }
            }
            Err(e) => {
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

/// Run the daemon until `control` says stop (or closes). `env` is the environment used for reloads.
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

    // The ECS agent's supervisor runs whatever the queue's state, and the worker pool whatever the
    // supervisor's.
    let supervisor = if cfg.ecs_agent.enabled {
        let (sup, _status) = Supervisor::new(config_rx.clone(), stop.clone());
        Some(tokio::spawn(sup.run()))
    } else {
        tracing::info!("ECS agent supervision is off (ecs_agent.enabled = false)");
        None
    };

    // Resolving the queues can wait for an operator; keep answering signals meanwhile.
    let resolved = {
        let resolve = async {
            let main = match (&cfg.queue.url, &cfg.queue.name) {
                (Some(url), _) => Some(url.clone()),
                (None, Some(name)) => resolve_queue(&clients, name, "queue", &stop).await,
                (None, None) => None,
            }?;
            let dlq = match &cfg.queue.dead_letter_queue {
                Some(name) if name.starts_with("https://") || name.starts_with("http://") => {
                    Some(name.clone())
                }
                Some(name) => {
                    Some(resolve_queue(&clients, name, "dead-letter queue", &stop).await?)
                }
                None => None,
            };
            Some((main, dlq))
        };
        tokio::pin!(resolve);
        loop {
            tokio::select! {
                r = &mut resolve => break r,
                c = control.recv() => match c {
                    Some(Control::Reload) => tracing::info!("reload ignored while the queue is not found yet"),
                    Some(Control::Stop) | None => stop.cancel(),
                }
            }
        }
    };
    let Some((queue_url, dlq_url)) = resolved else {
        tracing::info!("stopped before the queue was found");
        if let Some(s) = supervisor {
            let _ = tokio::time::timeout(cfg.agent.shutdown_grace, s).await;
        }
        return Ok(());
    };

    let clients_for_params = clients.ssm.clone();
    let worker = Arc::new(Worker {
        clients,
        config: config_rx,
        spool,
        stats: Stats::default(),
        queue_url: queue_url.clone(),
        dlq_url: dlq_url.clone(),
    });
    let mut pool_task = tokio::spawn(pool::run(worker.clone(), stop.clone(), abort.clone()));
    tracing::info!(
        queue = %queue_url,
        dead_letter_queue = dlq_url.as_deref().unwrap_or(""),
        pipelines = cfg.pipelines.len(),
        "offload-agent ready"
    );
    sd_notify("READY=1\nSTATUS=receiving");

    loop {
        let refresh = settings.params_delay();
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    sd_notify("RELOADING=1");
                    settings.fetch_params(&clients_for_params).await;
                    if settings.reload("SIGHUP") {
                        tracing::info!(pipelines = settings.current.pipelines.len(), "configuration reloaded");
                    }
                    sd_notify("READY=1");
                }
                Some(Control::Stop) | None => break,
            },
            _ = tokio::time::sleep(refresh.unwrap_or(Duration::MAX)), if refresh.is_some() => {
                settings.fetch_params(&clients_for_params).await;
                if settings.params.is_some() {
                    settings.reload("Parameter Store refresh");
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
        in_flight = worker
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        "shutting down: no new messages; finishing in-flight files"
    );
    sd_notify("STOPPING=1");
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
        if tokio::time::timeout(RELEASE_BUDGET, s).await.is_err() {
            tracing::warn!("the ECS agent supervisor did not stop in time");
        }
    }
    tracing::info!(stats = %worker.stats.summary(), "stopped");
    Ok(())
}
