//! The daemon: owns the task tree, turns signals into shutdown and reload, talks to systemd.
//!
//! Shutdown is two-phase. The first SIGTERM/SIGINT stops the receiver; in-flight files get
//! `agent.shutdown_grace` to finish. When the grace runs out (or a second signal arrives) the workers
//! are told to abort: each releases its message (visibility 0) so another consumer takes it at once.
//! Nothing half-done is acknowledged, and results are idempotent, so the rerun is safe.

mod facts;
mod queues;
mod settings;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::RotatingCredentials;
use crate::ecs_agent::Supervisor;
use crate::metrics::Metrics;
use crate::processors::container::Owner;
use crate::spool::Spool;
use crate::telemetry::LogHandle;
use crate::worker::ObjectProcessor;
use facts::{follow_ecs_status, status_line, DaemonFacts};
use settings::Settings;

/// What the outside world asks of a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// SIGTERM / SIGINT: drain and stop (a second one aborts in-flight work at once).
    Stop,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// After the grace period, how long releasing the unfinished messages may take.
const RELEASE_BUDGET: Duration = Duration::from_secs(8);

/// Forward SIGTERM, SIGINT and SIGHUP into a channel (production's control source).
pub(crate) fn signals() -> Result<mpsc::Receiver<Control>> {
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
pub(crate) fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// After the grace period, how long releasing the unfinished messages may take, and then how long the
/// ECS agent's supervisor may take to stop.
const SUPERVISOR_BUDGET: Duration = Duration::from_secs(8);

/// The longest shutdown beyond `agent.shutdown_grace`: releasing messages, then stopping the supervisor.
pub(crate) const SHUTDOWN_OVERHEAD: Duration =
    Duration::from_secs(RELEASE_BUDGET.as_secs() + SUPERVISOR_BUDGET.as_secs());

/// `TimeoutStopSec=` of `systemd/offload-agent.service` (a test checks that they agree).
pub(crate) const UNIT_TIMEOUT_STOP: Duration = Duration::from_secs(60);

/// How often the status line is refreshed (and the watchdog fed, if it wants it less often).
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How long after READY, and after each reload, the pages only start-up ran are unmapped
/// ([`crate::pages`]): by then the first long poll, the pre-flight checks and the first status
/// have run, so what faults back in is what the daemon keeps using.
const RELEASE_STARTUP_PAGES_AFTER: Duration = Duration::from_secs(30);

/// A running daemon: what its main loop acts on.
struct Daemon {
    settings: Settings,
    control: mpsc::Receiver<Control>,
    stats: Arc<Metrics>,
    objects: Arc<ObjectProcessor>,
    /// Parameter Store's client, for refreshes.
    ssm: aws_sdk_ssm::Client,
    /// The rotating credentials every client shares, when they come from a file.
    credentials: Option<RotatingCredentials>,
    /// Cancelled by the first stop signal: the receiver takes no new messages.
    stop: CancellationToken,
    /// Cancelled when the grace runs out (or a second signal comes): workers release what they hold.
    abort: CancellationToken,
    /// The receiver and its workers; ends only once stopped.
    pool: JoinHandle<()>,
    supervisor: Option<JoinHandle<()>>,
    ecs_status: Option<watch::Receiver<crate::ecs_agent::Status>>,
    /// The admin endpoint could not listen (reported in the status line).
    admin_failed: bool,
    /// `WatchdogSec=`'s interval, when systemd asked for one.
    watchdog: Option<Duration>,
    /// Milliseconds since `started` at the last beat of a task of its own: the watchdog is fed only
    /// while it keeps beating too, so a wedged runtime feeds nothing.
    beat: Arc<AtomicU64>,
    beater: JoinHandle<()>,
    started: Instant,
    /// Milliseconds since `started` at the main loop's last turn (`/healthz`).
    turned: Arc<AtomicU64>,
    /// The SSM managed instance id as last read (`/status`, the registered gauge).
    managed_instance: Arc<Mutex<Option<String>>>,
    /// Restarts the SSM agent when it stops refreshing the rotating credentials.
    ssm_watchdog: crate::watchdog::SsmWatchdog,
    /// The `STATUS=` last sent.
    status: String,
    /// When Parameter Store is read again (None without `ssm.parameters_path`).
    next_refresh: Option<Instant>,
    /// When the pages only start-up ran are unmapped (after READY and after each reload).
    release_pages_at: Option<Instant>,
}

/// Run the daemon until `control` says stop (or closes). `env` is the environment used for reloads.
///
/// Ready (for systemd) means configured and running: the queue may still be missing or unreachable,
/// which is a degraded state shown in `STATUS=` and recovered from without a restart.
pub(crate) async fn run(
    config_path: PathBuf,
    cfg: Config,
    env: BTreeMap<String, String>,
    log: LogHandle,
    control: mpsc::Receiver<Control>,
) -> Result<()> {
    let mut daemon = Daemon::start(config_path, cfg, env, log, control).await?;
    daemon.serve().await?;
    daemon.drain().await;
    Ok(())
}

/// Say at once when there are no credentials, and write the CA bundle the processors get. Neither
/// stops the daemon: it keeps running (the ECS agent's supervisor, the admin endpoint, a later
/// `register`), its calls fail and are retried, and the log says why.
async fn check_egress(clients: &crate::aws::Clients, cfg: &Config) {
    if let Err(e) = clients.require_credentials().await {
        tracing::error!(error = %e, "{e}");
    }
    if let Err(e) = crate::registration::egress::write_bundle(cfg) {
        let e = crate::error::chain(&e);
        tracing::warn!(error = %e, "cannot write the CA bundle for the processors: {e}");
    }
}

impl Daemon {
    /// Everything up to READY: settings (with Parameter Store), clients, the spool, the supervisor,
    /// the worker pool and the admin endpoint.
    async fn start(
        path: PathBuf,
        cfg: Config,
        env: BTreeMap<String, String>,
        log: LogHandle,
        control: mpsc::Receiver<Control>,
    ) -> Result<Daemon> {
        // Before it starts any process: its cgroup subtree, if systemd delegated one, is taken over
        // (and the way command processors are limited logged) while the daemon is alone in it.
        let confinement = crate::processors::cgroup::Confinement::for_daemon();
        let mut clients = crate::aws::clients(&cfg).await?;
        let (tx, config_rx) = watch::channel(Arc::new(cfg.clone()));
        let mut settings = Settings {
            path,
            env,
            params: None,
            params_failing: false,
            current: cfg,
            tx,
            log,
        };
        if settings.start(&clients.ssm).await {
            clients = crate::aws::clients(&settings.current).await?;
        }
        let cfg = settings.current.clone();
        check_egress(&clients, &cfg).await;
        let stats = Arc::new(Metrics::new());
        let spool = open_spool(&cfg, &stats)?;
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        for p in &cfg.pipelines {
            stats.pipeline(&p.name);
        }

        // The ECS agent's supervisor runs whatever the queue's state, and the worker pool whatever
        // the supervisor's.
        let (supervisor, ecs_status) =
            start_supervisor(&cfg, config_rx.clone(), &stop, &stats, &clients);
        let credentials = clients.credentials.clone();
        let ssm = clients.ssm.clone();
        let objects = Arc::new(ObjectProcessor::new(
            crate::processors::Context::new(clients, &cfg, Owner::Daemon, stats.clone())
                .confined(confinement),
            spool,
        ));
        // Containers a killed predecessor left running go first; then every pipeline is checked once.
        tokio::spawn(clean_and_check(objects.clone(), cfg.clone()));
        let pool = tokio::spawn(queues::serve(
            objects.clone(),
            cfg.clone(),
            config_rx,
            stats.clone(),
            stop.clone(),
            abort.clone(),
        ));
        let started = Instant::now();
        let beat = Arc::new(AtomicU64::new(0));
        let mut daemon = Daemon {
            settings,
            control,
            stats,
            objects,
            ssm,
            credentials,
            stop,
            abort,
            pool,
            supervisor,
            ecs_status,
            admin_failed: false,
            watchdog: watchdog_interval(),
            beater: tokio::spawn(beat_every(BEAT_EVERY, started, beat.clone())),
            beat,
            started,
            turned: Arc::new(AtomicU64::new(0)),
            managed_instance: Arc::new(Mutex::new(None)),
            ssm_watchdog: crate::watchdog::SsmWatchdog::default(),
            status: String::new(),
            next_refresh: None,
            release_pages_at: Some(Instant::now() + RELEASE_STARTUP_PAGES_AFTER),
        };
        if cfg.admin.enabled {
            daemon.start_admin(&cfg).await;
        }
        daemon.next_refresh = daemon.settings.params_delay().map(|d| Instant::now() + d);
        let names: Vec<&str> = cfg.pipelines.iter().map(|p| p.name.as_str()).collect();
        let names = match names.is_empty() {
            true => "none".to_string(),
            false => names.join(", "),
        };
        tracing::info!(
            pipelines = cfg.pipelines.len(),
            "offload-agent ready: pipelines {names}; ECS agent supervision {} (version {})",
            if cfg.ecs_agent.enabled { "on" } else { "off" },
            env!("CARGO_PKG_VERSION")
        );
        daemon.status = daemon.status_line();
        notify(&[NotifyState::Ready, NotifyState::Status(&daemon.status)]);
        Ok(daemon)
    }

    async fn start_admin(&mut self, cfg: &Config) {
        match crate::admin::bind(cfg.admin.addr()).await {
            Ok(listener) => {
                let addr = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(listen = %addr, "admin endpoint on http://{addr}: /healthz /readyz /metrics /status");
                let facts = Arc::new(DaemonFacts {
                    metrics: self.stats.clone(),
                    objects: self.objects.clone(),
                    ecs: self.ecs_status.clone(),
                    managed_instance: self.managed_instance.clone(),
                    turned: self.turned.clone(),
                    started: self.started,
                    stopping: self.stop.clone(),
                });
                tokio::spawn(crate::admin::serve(listener, facts, self.stop.clone()));
            }
            // Files keep flowing without the endpoint; the problem stays in the status line.
            Err(e) => {
                tracing::error!(error = %e, "admin endpoint not available: {e}");
                self.admin_failed = true;
            }
        }
    }

    fn status_line(&self) -> String {
        let mut line = status_line(
            &self.stats,
            &self.objects.unavailable(),
            self.ecs_status.as_ref(),
        );
        if self.admin_failed {
            line.push_str("; admin endpoint not available (see the log)");
        }
        line
    }

    /// The main loop, until a stop signal: reloads, Parameter Store refreshes, the page release,
    /// and the status, watchdog and gauges every tick.
    async fn serve(&mut self) -> Result<()> {
        let every = self
            .watchdog
            .map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let refresh = self.next_refresh;
            let release = self.release_pages_at;
            tokio::select! {
                c = self.control.recv() => match c {
                    Some(Control::Reload) => self.reload().await,
                    Some(Control::Stop) | None => return Ok(()),
                },
                _ = sleep_until(refresh), if refresh.is_some() => self.refresh().await,
                _ = sleep_until(release), if release.is_some() => {
                    self.release_pages_at = None;
                    release_startup_pages();
                }
                _ = tick.tick() => self.tick().await,
                r = &mut self.pool => {
                    // The pool ends only when stopped; anything else is a bug worth a restart.
                    anyhow::bail!("the worker pool ended unexpectedly: {r:?}");
                }
            }
        }
    }

    /// SIGHUP: Parameter Store and the files read again, what changed applied.
    async fn reload(&mut self) {
        notify(&[NotifyState::Reloading]);
        self.settings.fetch_params(&self.ssm).await;
        let ok = self.settings.reload("SIGHUP");
        self.stats.config_reload(ok);
        if ok {
            let n = self.settings.current.pipelines.len();
            tracing::info!(pipelines = n, "configuration reloaded ({n} pipeline(s))");
            let (objects, cfg) = (self.objects.clone(), self.settings.current.clone());
            tokio::spawn(async move { objects.preflight(&cfg).await });
        }
        self.rescheduled();
        notify(&[NotifyState::Ready]);
    }

    /// Parameter Store's refresh interval came round.
    async fn refresh(&mut self) {
        self.settings.fetch_params(&self.ssm).await;
        if self.settings.params.is_some() {
            let ok = self.settings.reload("Parameter Store refresh");
            self.stats.config_reload(ok);
        }
        self.rescheduled();
    }

    /// After a reload: the next refresh, and the page release once the new configuration has run.
    fn rescheduled(&mut self) {
        self.next_refresh = self.settings.params_delay().map(|d| Instant::now() + d);
        self.release_pages_at = Some(Instant::now() + RELEASE_STARTUP_PAGES_AFTER);
    }

    async fn tick(&mut self) {
        self.turned.store(self.elapsed_ms(), Ordering::Relaxed);
        self.stats.sample_rows();
        // A file read: off the runtime's worker threads.
        let host = self.settings.current.host.clone();
        let (reg, identity) = tokio::task::spawn_blocking(move || {
            (
                crate::registration::ssm::registration(&host).ok().flatten(),
                crate::credentials::IdentityConfig::read(&host.identity_config()).ok(),
            )
        })
        .await
        .unwrap_or((None, None));
        if let Some(id) = identity {
            self.watch_ssm_agent(&id);
        }
        self.stats
            .registered(crate::metrics::Registered::Ssm, reg.is_some());
        *self
            .managed_instance
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reg.map(|r| r.managed_instance_id);
        if let Some(c) = &self.credentials {
            self.stats.credentials_reloaded_total(c.reloads());
        }
        // The gauge and readiness follow the spool's space while every slot is busy too.
        self.objects
            .spool_has_room(self.settings.current.spool.min_free);
        if let Some(skew) = self.objects.ctx.clients.clock.skew_seconds() {
            self.stats.clock_skew(skew);
        }
        let line = self.status_line();
        if line != self.status {
            self.status = line;
            notify(&[NotifyState::Status(&self.status)]);
        }
        let last = self.beat.load(Ordering::Relaxed);
        if self.watchdog.is_some() && self.elapsed_ms().saturating_sub(last) < BEAT_STALE_MS {
            notify(&[NotifyState::Watchdog]);
        }
    }

    /// The SSM agent watchdog's turn: a stuck agent's unit restarted (in the background).
    fn watch_ssm_agent(&mut self, id: &crate::credentials::IdentityConfig) {
        let cfg = &self.settings.current;
        if !cfg.watchdog.ssm_agent {
            return;
        }
        let verdict = self.ssm_watchdog.observe(
            cfg.watchdog.ssm_limits(),
            id,
            Instant::now().into_std(),
            std::time::SystemTime::now(),
        );
        if let crate::watchdog::Verdict::Restart(why) = verdict {
            let unit = cfg.host.ssm_service.clone();
            let systemctl = crate::host::Systemctl::new(cfg.host.systemctl.clone());
            self.stats.ssm_agent_restarted();
            tracing::warn!(unit = %unit, restarts = self.ssm_watchdog.restarts(), "restarting the SSM agent: {why}");
            tokio::spawn(async move {
                match systemctl.must(&["restart", &unit]).await {
                    Ok(()) => tracing::info!(unit = %unit, "SSM agent restarted by the watchdog"),
                    Err(e) => {
                        let e = crate::error::chain(&e);
                        tracing::error!(unit = %unit, error = %e, "the watchdog could not restart the SSM agent: {e}")
                    }
                }
            });
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Two-phase shutdown: the grace for in-flight files, then releasing what is unfinished, then the
    /// supervisor.
    async fn drain(mut self) {
        let grace = self.settings.current.agent.shutdown_grace;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            in_flight = self.stats.in_flight(),
            "shutting down: no new messages; finishing the {} file(s) in flight within agent.shutdown_grace ({})",
            self.stats.in_flight(),
            humantime::format_duration(grace)
        );
        notify(&[NotifyState::Stopping]);
        self.stop.cancel();
        let finished = tokio::select! {
            r = tokio::time::timeout(grace, &mut self.pool) => r.is_ok(),
            c = self.control.recv() => {
                if c.is_some() {
                    tracing::warn!("second stop signal: aborting in-flight files now");
                }
                false
            }
        };
        if !finished {
            // The designed way out of a long file (delivered again, processed idempotently): not a
            // problem to act on.
            tracing::info!("agent.shutdown_grace ran out: releasing the unfinished messages to the queue; they are delivered again and processed from the start");
            self.abort.cancel();
            if tokio::time::timeout(RELEASE_BUDGET, &mut self.pool)
                .await
                .is_err()
            {
                tracing::error!("workers did not stop in time; exiting anyway (their messages return after the visibility timeout)");
            }
        }
        if let Some(s) = self.supervisor.take() {
            if tokio::time::timeout(SUPERVISOR_BUDGET, s).await.is_err() {
                tracing::warn!("the ECS agent's supervisor did not stop within {SUPERVISOR_BUDGET:?}; exiting anyway (the agent's container keeps running)");
            }
        }
        self.beater.abort();
        let stats = self.stats.summary();
        tracing::info!(stats = %stats, "stopped: {stats}");
    }
}

/// The ECS agent's supervisor and its status, when `ecs_agent.enabled`.
fn start_supervisor(
    cfg: &Config,
    config: watch::Receiver<Arc<Config>>,
    stop: &CancellationToken,
    stats: &Arc<Metrics>,
    clients: &crate::aws::Clients,
) -> (
    Option<JoinHandle<()>>,
    Option<watch::Receiver<crate::ecs_agent::Status>>,
) {
    if !cfg.ecs_agent.enabled {
        tracing::info!("ECS agent supervision is off (ecs_agent.enabled = false)");
        return (None, None);
    }
    let (sup, status) = Supervisor::new(config, stop.clone());
    let sup = sup
        .with_ecs(clients.ecs.clone())
        .with_s3(clients.s3.clone());
    tokio::spawn(follow_ecs_status(status.clone(), stats.clone()));
    (Some(tokio::spawn(sup.run())), Some(status))
}

/// Check every pipeline once, and remove the processor containers a killed predecessor left.
async fn clean_and_check(objects: Arc<ObjectProcessor>, cfg: Config) {
    tokio::spawn(sweep_processor_containers(objects.clone()));
    objects.preflight(&cfg).await;
}

/// Waits between looks for Docker while it does not answer (at boot it may still be starting).
const SWEEP_RETRY_MIN: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(60);

/// The processor containers an earlier run left, removed once Docker answers. Docker may still be
/// starting (at boot the daemon does not wait for it): that is said once at info and looked at again
/// with a backoff, not a warning; a container pipeline's files say for themselves when Docker is
/// missing.
async fn sweep_processor_containers(objects: Arc<ObjectProcessor>) {
    let mut backoff = crate::backoff::Backoff::new(SWEEP_RETRY_MIN, SWEEP_RETRY_MAX);
    let mut waited = false;
    loop {
        match objects.ctx.docker.remove_orphans().await {
            Ok(n) => {
                if waited {
                    tracing::info!(removed = n, "Docker answers: looked for processor containers left by an earlier run ({n} removed)");
                }
                objects
                    .ctx
                    .metrics
                    .leftovers_removed(crate::metrics::Leftover::Container, n);
                return;
            }
            Err(e) => {
                if !waited {
                    tracing::info!(error = %e, "processor containers left by an earlier run are looked for once Docker answers ({e})");
                    waited = true;
                } else {
                    tracing::debug!(error = %e, "Docker still does not answer: {e}");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// The spool, opened and cleaned of what an earlier run left.
fn open_spool(cfg: &Config, stats: &Metrics) -> Result<Spool> {
    let spool = Spool::open(&cfg.spool.dir).with_context(|| {
        format!(
            "cannot create spool.dir {} (run as the offload-agent user, or fix its ownership)",
            cfg.spool.dir.display()
        )
    })?;
    match spool.clean_stale() {
        Ok(0) => {}
        Ok(n) => {
            stats.leftovers_removed(crate::metrics::Leftover::Spool, n);
            tracing::info!(
                files = n,
                "removed {n} spool file(s) left by an earlier run; their messages return through SQS"
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, dir = %cfg.spool.dir.display(), "cannot clean the spool {} ({e}); check its ownership and free space", cfg.spool.dir.display())
        }
    }
    Ok(spool)
}

/// How often the beat task beats, and how old its last beat may be for the watchdog to be fed.
const BEAT_EVERY: Duration = Duration::from_millis(500);
const BEAT_STALE_MS: u64 = 5_000;

async fn beat_every(every: Duration, started: Instant, beat: Arc<AtomicU64>) {
    let mut t = tokio::time::interval(every);
    loop {
        t.tick().await;
        beat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn sleep_until(at: Option<Instant>) {
    tokio::time::sleep_until(at.unwrap_or_else(Instant::now)).await
}

fn release_startup_pages() {
    match crate::pages::release_startup_pages() {
        Ok(r) => tracing::debug!(
            mappings = r.mappings,
            resident_kib = r.kib,
            "unmapped the pages of start-up code; what runs next maps back from the page cache"
        ),
        Err(e) => {
            tracing::debug!(error = %e, "could not unmap the pages of start-up code; they stay mapped")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit gives the daemon at least the longest shutdown the default configuration allows, and
    /// `UNIT_TIMEOUT_STOP` (what `config check` compares against) is what the unit says.
    #[test]
    fn the_unit_covers_the_longest_shutdown() {
        let unit = include_str!("../../systemd/offload-agent.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .expect("TimeoutStopSec= in the unit");
        let in_unit = humantime::parse_duration(line.trim()).unwrap();
        assert_eq!(in_unit, UNIT_TIMEOUT_STOP);
        assert!(crate::config::DEFAULT_SHUTDOWN_GRACE + SHUTDOWN_OVERHEAD < UNIT_TIMEOUT_STOP);
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
        stats
            .queue
            .fail("queue q not found".into(), crate::metrics::QUEUE_ADVICE);
        assert!(status_line(&stats, &[], None).contains("queue q not found for 0 s"));
        stats.queue.ok();
        assert!(!status_line(&stats, &[], None).contains("not found"));
        let gone = [("thumbs".to_string(), "image x is not present".to_string())];
        assert!(
            status_line(&stats, &gone, None).ends_with("pipeline thumbs unavailable (see the log)")
        );
    }
}
