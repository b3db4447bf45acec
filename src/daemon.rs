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
    let clients = crate::aws::clients(&cfg.aws, cfg.queue.wait_time).await?;
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
    let (config_tx, config_rx) = watch::channel(Arc::new(cfg.clone()));

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

    let mut current = cfg;
    loop {
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    sd_notify("RELOADING=1");
                    match config::load(&config_path, &env) {
                        Ok(new) => {
                            let restart = current.restart_only_differences(&new);
                            if !restart.is_empty() {
                                tracing::warn!(sections = ?restart, "these settings changed but take effect only after a restart");
                            }
                            log.set_level(&new.agent.log_level);
                            tracing::info!(pipelines = new.pipelines.len(), "configuration reloaded");
                            current = new.clone();
                            let _ = config_tx.send(Arc::new(new));
                        }
                        Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
                    }
                    sd_notify("READY=1");
                }
                Some(Control::Stop) | None => break,
            },
            r = &mut pool_task => {
                // The pool ends only when stopped; anything else is a bug worth a restart.
                anyhow::bail!("the worker pool ended unexpectedly: {r:?}");
            }
        }
    }

    let grace = current.agent.shutdown_grace;
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
