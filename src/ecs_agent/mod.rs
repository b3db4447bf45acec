//! Supervision of the Amazon ECS container agent through the Docker API (bollard), doing ecs-init's job
//! better: wait for Docker instead of giving up, adopt a matching running agent instead of recreating
//! it, respect the agent's exit codes (5 terminal, 42 load the desired image), restart with a backoff
//! that resets once the agent has been healthy, and restart an agent that stops answering.

mod fetch;
pub mod firewall;
pub mod introspection;
pub mod policy;
pub mod spec;
mod update;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, EcsAgentConfig};
use crate::docker::{self, is_not_found};
use crate::error::chain;
use crate::host::Systemctl;
use crate::telemetry::Episode;
use introspection::Metadata;
use policy::{Connection, Health, History, Next, Outcome, Silence};
use spec::{ContainerSpec, CONFIG_HASH_LABEL};
use update::{Desired, Image, Updates};

/// Where the supervisor is in the agent's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Disabled,
    WaitingForDocker,
    /// Docker does not answer yet and systemd says its unit is still starting (a slow engine at
    /// boot, a restart): waited for without complaint (logged at info, not warning).
    DockerStarting,
    /// ecs.service (amazon-ecs-init) is active: two supervisors would fight over the container.
    Conflict,
    LoadingImage,
    /// The image is absent and can be neither loaded nor pulled; retried with backoff.
    ImageUnavailable,
    Starting,
    /// Running; not yet answering, or answering but not registered.
    Running,
    /// Answering with a ContainerInstanceArn.
    Registered,
    BackingOff,
    /// Exited 5: not restarted until the configuration changes or SIGHUP.
    Terminal,
    Stopped,
}

impl State {
    /// Every state, for one gauge per state.
    pub const ALL: [State; 12] = [
        State::Disabled,
        State::WaitingForDocker,
        State::DockerStarting,
        State::Conflict,
        State::LoadingImage,
        State::ImageUnavailable,
        State::Starting,
        State::Running,
        State::Registered,
        State::BackingOff,
        State::Terminal,
        State::Stopped,
    ];
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// What the rest of the daemon (logs, status, metrics) sees.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    pub state: State,
    pub reason: String,
    pub container_id: Option<String>,
    pub image_id: Option<String>,
    /// Times the supervisor started the agent after an exit or health failure.
    pub restarts: u64,
    /// Times the supervisor took over an agent container it found running (at its own start, or
    /// when Docker came back with the container still up). Counts up, unlike `reason`, which the
    /// next introspection overwrites.
    pub adoptions: u64,
    pub last_exit_code: Option<i64>,
    /// The delay before the latest restart.
    pub last_backoff: Option<Duration>,
    pub metadata: Option<Metadata>,
    /// The agent's last log lines after a terminal exit.
    pub last_log_lines: Vec<String>,
    /// Whether ECS reports the registered agent connected (`None`: not asked, or it could not be).
    pub connected: Option<bool>,
    /// The image the agent's container runs, and the one the configuration asks for.
    pub running_image: Option<String>,
    pub desired_image: Option<String>,
    /// The last update's outcome ("updated the ECS agent from X to Y", "rolled back from X to Y: why",
    /// "refused the update to X: why").
    pub last_update: Option<String>,
    /// Updates proven, rolled back and refused since the daemon started.
    pub updates: u64,
    pub rollbacks: u64,
    pub refusals: u64,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            state: State::Stopped,
            reason: String::new(),
            container_id: None,
            image_id: None,
            restarts: 0,
            adoptions: 0,
            last_exit_code: None,
            last_backoff: None,
            metadata: None,
            last_log_lines: Vec::new(),
            connected: None,
            running_image: None,
            desired_image: None,
            last_update: None,
            updates: 0,
            rollbacks: 0,
            refusals: 0,
        }
    }
}

pub use policy::{EXIT_CLEAN, EXIT_TERMINAL, EXIT_UPGRADE};

/// Why the agent could not be set up this time (retried with backoff; shown as the state's reason).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error(transparent)]
    Docker(#[from] docker::Error),
    #[error("cannot {action} {name}")]
    Call {
        action: &'static str,
        name: String,
        #[source]
        source: DockerError,
    },
    #[error("image {image} is not present and {} does not exist: copy the ECS agent image tarball there, or set ecs_agent.allow_pull = true", tarball.display())]
    NoImage { image: String, tarball: PathBuf },
    #[error("image {image} is not present, {} does not exist, and pulling failed", tarball.display())]
    Pull {
        image: String,
        tarball: PathBuf,
        #[source]
        source: DockerError,
    },
    #[error("image {image}: {note}")]
    StillMissing {
        image: String,
        note: String,
        #[source]
        source: DockerError,
    },
    #[error("image {image} has no id")]
    NoId { image: String },
    #[error("cannot {action} {}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    EnvFile(#[from] spec::EnvFileError),
    #[error("{of} has SHA-256 {got}, not {want} (ecs_agent.image_sha256): not loaded")]
    Digest {
        of: String,
        want: String,
        got: String,
    },
    #[error("cannot fetch the agent image's tarball {url} (ecs_agent.image_url): {reason}")]
    Fetch { url: String, reason: String },
}

/// A Docker call that failed, for `map_err`.
fn call(action: &'static str, name: &str) -> impl FnOnce(DockerError) -> SetupError {
    let name = name.to_string();
    move |source| SetupError::Call {
        action,
        name,
        source,
    }
}

pub struct Supervisor {
    config: watch::Receiver<Arc<Config>>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
    restart_backoff: Backoff,
    /// What the decisions remember between watches.
    history: History,
    /// Waits between attempts to reach Docker, and between attempts to set the agent up (image,
    /// container); each reset by a success.
    docker_backoff: Backoff,
    setup_backoff: Backoff,
    firewall: firewall::Firewall,
    /// Asks ECS whether the registered agent is connected; `None`: not asked.
    ecs: Option<aws_sdk_ecs::Client>,
    /// Fetches the image's tarball from `ecs_agent.image_url`; `None`: an `s3://` URL cannot be fetched.
    s3: Option<aws_sdk_s3::Client>,
    /// The image last proven healthy, an update on trial, a refused one.
    updates: Updates,
    /// The problem going on (Docker away, an image missing, a crashing agent): logged once, its
    /// retries at debug, its end with a count.
    trouble: std::sync::Mutex<Episode>,
}

/// Docker's systemd unit, with its suffix (`docker.service`).
fn docker_unit(cfg: &Config) -> String {
    let unit = &cfg.host.docker_service;
    if unit.contains('.') {
        unit.clone()
    } else {
        format!("{unit}.service")
    }
}

/// A supervisor's reason without its retry delay ("…; retrying in 10.3s"), which differs each time.
fn without_retry_delay(reason: &str) -> &str {
    ["; retrying in ", "; restarting in ", "; checking again in "]
        .iter()
        .filter_map(|m| reason.rfind(m))
        .max()
        .map_or(reason, |i| &reason[..i])
}

/// How long one `DescribeContainerInstances` may take.
const ECS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits between attempts to reach Docker.
const DOCKER_BACKOFF_MIN: Duration = Duration::from_secs(1);
const DOCKER_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Waits between attempts to get the image and the container in place.
const SETUP_BACKOFF_MIN: Duration = Duration::from_secs(1);
const SETUP_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an active ecs.service is looked at again.
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// How long one introspection request may take.
const INTROSPECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Seconds Docker gives the agent between SIGTERM and SIGKILL when the supervisor stops it.
const STOP_GRACE_SECS: i32 = 10;
/// How long shutdown waits for that stop (`ecs_agent.stop_agent_on_exit`).
const STOP_ON_EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// How an attempt to get the agent running ended.
enum Start {
    Running(Running),
    Again,
    Stop,
}

/// A started (or adopted) agent container being watched.
struct Running {
    docker: Docker,
    id: String,
    name: String,
    image: Image,
}

/// Stop the agent's container within its grace (an unresponsive or rolled-back agent); a failure
/// shows when the container is recreated.
async fn stop_agent(agent: &Running) {
    let _ = agent
        .docker
        .stop_container(
            &agent.id,
            Some(
                StopContainerOptionsBuilder::default()
                    .t(STOP_GRACE_SECS)
                    .build(),
            ),
        )
        .await;
}

/// A path from the agent's files, read relative to `host_root` when absolute.
fn under_root(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

impl Supervisor {
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> (Supervisor, watch::Receiver<Status>) {
        let (status, rx) = watch::channel(Status::default());
        let cfg = config.borrow().ecs_agent.clone();
        (
            Supervisor {
                config,
                status,
                shutdown,
                restart_backoff: Backoff::new(cfg.restart_backoff_min, cfg.restart_backoff_max),
                history: History::default(),
                docker_backoff: Backoff::new(DOCKER_BACKOFF_MIN, DOCKER_BACKOFF_MAX),
                setup_backoff: Backoff::new(SETUP_BACKOFF_MIN, SETUP_BACKOFF_MAX),
                firewall: firewall::Firewall::default(),
                ecs: None,
                s3: None,
                updates: Updates::default(),
                trouble: Default::default(),
            },
            rx,
        )
    }

    /// Ask ECS (through this client) whether the registered agent is connected, every
    /// `ecs_agent.connectivity_interval`; restart it once it has been disconnected for
    /// `ecs_agent.disconnected_after` while its introspection answers.
    pub fn with_ecs(mut self, client: aws_sdk_ecs::Client) -> Self {
        self.ecs = Some(client);
        self
    }

    /// Fetch the agent image's tarball from S3 through this client when `ecs_agent.image_url` names
    /// one.
    pub fn with_s3(mut self, client: aws_sdk_s3::Client) -> Self {
        self.s3 = Some(client);
        self
    }

    /// Whether ECS reports the agent of `m` connected; `None` when it cannot say (not registered,
    /// no permission, not reachable).
    async fn ecs_connected(&self, m: &introspection::Metadata) -> Result<Option<bool>, String> {
        let (Some(ecs), Some(cluster), Some(arn)) =
            (&self.ecs, &m.cluster, &m.container_instance_arn)
        else {
            return Ok(None);
        };
        let call = ecs
            .describe_container_instances()
            .cluster(cluster)
            .container_instances(arn)
            .send();
        let out = tokio::time::timeout(ECS_CALL_TIMEOUT, call)
            .await
            .map_err(|_| {
                format!("DescribeContainerInstances did not answer within {ECS_CALL_TIMEOUT:?}")
            })?
            .map_err(|e| format!("DescribeContainerInstances: {}", crate::error::describe(&e)))?;
        Ok(out
            .container_instances()
            .iter()
            .find(|c| c.container_instance_arn() == Some(arn.as_str()))
            .map(|c| c.agent_connected()))
    }

    fn cfg(&self) -> EcsAgentConfig {
        self.config.borrow().ecs_agent.clone()
    }

    /// Change state; log when it or its reason changed.
    fn set(&self, state: State, reason: impl Into<String>) {
        let reason = reason.into();
        let changed = self.status.send_if_modified(|s| {
            if s.state == state && s.reason == reason {
                return false;
            }
            s.state = state;
            s.reason = reason.clone();
            true
        });
        if changed {
            self.log_state(state, &reason);
        }
    }

    /// A state change in the journal, in words: `ECS agent: <reason>`. A problem that repeats (each
    /// retry's reason differs only by its delay) is logged once, and its end with the count; the steps
    /// of the retries between (loading, creating) at debug.
    fn log_state(&self, state: State, reason: &str) {
        let mut trouble = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        match state {
            State::Terminal
            | State::ImageUnavailable
            | State::Conflict
            | State::WaitingForDocker
            | State::DockerStarting
            | State::BackingOff => {
                let problem = format!("{state}: {}", without_retry_delay(reason));
                if !trouble.occurred(&problem) {
                    tracing::debug!(ecs_agent_state = %state, %reason, "ECS agent: {reason}");
                } else if state == State::DockerStarting {
                    tracing::info!(ecs_agent_state = %state, %reason, "ECS agent: {reason}");
                } else if matches!(state, State::WaitingForDocker | State::BackingOff) {
                    tracing::warn!(ecs_agent_state = %state, %reason, "ECS agent: {reason}");
                } else {
                    tracing::error!(ecs_agent_state = %state, %reason, "ECS agent: {reason}");
                }
            }
            State::LoadingImage | State::Starting if trouble.is_open() => {
                tracing::debug!(ecs_agent_state = %state, %reason, "ECS agent: {reason}");
            }
            _ => match trouble.ended() {
                Some(ended) => tracing::info!(
                    ecs_agent_state = %state,
                    %reason,
                    "ECS agent: {reason} (the problem before, {}, happened {ended})",
                    ended.key
                ),
                None => tracing::info!(ecs_agent_state = %state, %reason, "ECS agent: {reason}"),
            },
        }
    }

    /// Docker does not answer: is its unit still starting (no problem, it comes by itself), or is it
    /// away (stopped, failed, not a systemd host: a problem worth a warning)?
    async fn docker_absent(&self, systemctl: &Systemctl) -> State {
        let unit = docker_unit(&self.config.borrow());
        match systemctl.active_state(&unit).await.as_deref() {
            Some("activating" | "reloading") => State::DockerStarting,
            _ => State::WaitingForDocker,
        }
    }

    /// Sleep, unless shutdown or a configuration change comes first (the main loop checks shutdown).
    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.cancelled() => {}
            _ = self.config.changed() => {}
        }
    }

    /// Report a problem, then wait `d` before the next attempt.
    async fn retry_in(
        &mut self,
        state: State,
        reason: &(dyn std::error::Error + Sync),
        d: Duration,
    ) {
        let why = chain(reason);
        self.set(
            state,
            format!(
                "{why}{}; retrying in {:.1}s",
                docker::advice(&why),
                d.as_secs_f64()
            ),
        );
        self.pause(d).await;
    }

    async fn connect(&self, cfg: &EcsAgentConfig) -> Result<Docker, docker::Error> {
        docker::connect(&cfg.docker_socket).await
    }

    /// The image's id: present, else loaded from the tarball, else pulled (if allowed).
    async fn ensure_image(
        &self,
        docker: &Docker,
        cfg: &EcsAgentConfig,
    ) -> Result<String, SetupError> {
        let no_id = || SetupError::NoId {
            image: cfg.image.clone(),
        };
        match docker.inspect_image(&cfg.image).await {
            Ok(i) => return i.id.ok_or_else(no_id),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(call("inspect image", &cfg.image)(e)),
        }
        // From S3 first when the configuration says where it comes from (verified on the way).
        let mut verified = false;
        if let (Some(url), Some(want)) = (&cfg.image_url, &cfg.image_sha256) {
            let s3 = self.s3.as_ref().ok_or_else(|| SetupError::Fetch {
                url: url.clone(),
                reason: "this supervisor has no S3 client".into(),
            })?;
            self.set(
                State::LoadingImage,
                format!("fetching {} from {url}", cfg.image),
            );
            if let fetch::Fetched::Downloaded(n) =
                fetch::fetch(s3, url, &cfg.image_tarball, want).await?
            {
                tracing::info!(
                    url = %url,
                    tarball = %cfg.image_tarball.display(),
                    bytes = n,
                    "ECS agent: fetched {url} into {} ({n} bytes, SHA-256 as configured)",
                    cfg.image_tarball.display()
                );
            }
            verified = true;
        }
        let tarball_note;
        if cfg.image_tarball.exists() {
            if let (Some(want), false) = (&cfg.image_sha256, verified) {
                fetch::check_digest(&cfg.image_tarball, want).await?;
            }
            self.set(
                State::LoadingImage,
                format!("loading {} from {}", cfg.image, cfg.image_tarball.display()),
            );
            docker::load_tarball(docker, &cfg.image_tarball).await?;
            tarball_note = format!(
                "{} was loaded but does not contain it",
                cfg.image_tarball.display()
            );
        } else if cfg.allow_pull {
            self.set(State::LoadingImage, format!("pulling {}", cfg.image));
            let (name, tag) = match cfg.image.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, t),
                _ => (cfg.image.as_str(), "latest"),
            };
            let mut pull = docker.create_image(
                Some(
                    CreateImageOptionsBuilder::default()
                        .from_image(name)
                        .tag(tag)
                        .build(),
                ),
                None,
                None,
            );
            while let Some(r) = pull.next().await {
                if let Err(source) = r {
                    return Err(SetupError::Pull {
                        image: cfg.image.clone(),
                        tarball: cfg.image_tarball.clone(),
                        source,
                    });
                }
            }
            tarball_note = "pulling did not produce it".into();
        } else {
            return Err(SetupError::NoImage {
                image: cfg.image.clone(),
                tarball: cfg.image_tarball.clone(),
            });
        }
        match docker.inspect_image(&cfg.image).await {
            Ok(i) => i.id.ok_or_else(no_id),
            Err(source) => Err(SetupError::StillMissing {
                image: cfg.image.clone(),
                note: tarball_note,
                source,
            }),
        }
    }

    /// Adopt a running container whose hash matches; otherwise (re)create and start it. Returns the
    /// container id and whether it was adopted.
    async fn ensure_container(
        &self,
        docker: &Docker,
        spec: &ContainerSpec,
    ) -> Result<(String, bool), SetupError> {
        let want = spec.hash();
        match docker.inspect_container(&spec.name, None).await {
            Ok(c) => {
                let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
                let hash = c
                    .config
                    .as_ref()
                    .and_then(|cf| cf.labels.as_ref())
                    .and_then(|l| l.get(CONFIG_HASH_LABEL).cloned());
                let id = c.id.clone().unwrap_or_default();
                if running && hash.as_deref() == Some(want.as_str()) {
                    return Ok((id, true));
                }
                if running {
                    tracing::info!(container = %spec.name, "ECS agent: its configuration or image changed: recreating container {}", spec.name);
                    let _ = docker
                        .stop_container(
                            &spec.name,
                            Some(StopContainerOptionsBuilder::default().t(30).build()),
                        )
                        .await;
                }
                docker
                    .remove_container(
                        &spec.name,
                        Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                    )
                    .await
                    .map_err(call("remove the old container", &spec.name))?;
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(call("inspect container", &spec.name)(e)),
        }
        self.set(State::Starting, format!("creating container {}", spec.name));
        let created = docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&spec.name)
                        .build(),
                ),
                spec.create_body(),
            )
            .await
            .map_err(call("create container", &spec.name))?;
        docker
            .start_container(&created.id, None)
            .await
            .map_err(call("start container", &spec.name))?;
        Ok((created.id, false))
    }

    async fn last_log_lines(&self, docker: &Docker, id: &str) -> Vec<String> {
        let mut logs = docker.logs(
            id,
            Some(
                LogsOptionsBuilder::default()
                    .stdout(true)
                    .stderr(true)
                    .tail("20")
                    .build(),
            ),
        );
        let mut lines = Vec::new();
        while let Some(Ok(chunk)) = logs.next().await {
            for l in chunk.to_string().lines() {
                lines.push(l.to_string());
            }
        }
        lines
    }

    /// Watch a running agent until it exits, Docker goes away, it stops answering, the configuration
    /// changes, or shutdown.
    async fn watch(&mut self, agent: &Running, cfg: &EcsAgentConfig) -> Outcome {
        let (docker, id) = (&agent.docker, agent.id.as_str());
        // The wait request lives as long as the agent: give it a client without the usual timeout.
        let waiter_client = docker
            .clone()
            .with_timeout(Duration::from_secs(30 * 86_400));
        let mut waiter = Box::pin(
            waiter_client.wait_container(
                id,
                Some(
                    WaitContainerOptionsBuilder::default()
                        .condition("not-running")
                        .build(),
                ),
            ),
        );
        let mut tick = tokio::time::interval(cfg.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = Health::new(Instant::now());
        let mut connection = Connection::default();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Outcome::Shutdown,
                r = self.config.changed() => {
                    return if r.is_ok() { Outcome::ConfigChanged } else { Outcome::Shutdown };
                }
                w = waiter.next() => return match w {
                    Some(Ok(resp)) => Outcome::Exited(resp.status_code),
                    // bollard reports a non-zero exit as an error carrying the code.
                    Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Outcome::Exited(code),
                    Some(Err(e)) => Outcome::DockerLost(format!("lost the Docker connection: {e}")),
                    None => Outcome::DockerLost("Docker closed the wait request".into()),
                },
                _ = tick.tick() => {
                    if let Some(why) = self.updates.expired(Instant::now(), cfg.update_timeout) {
                        return Outcome::UpdateFailed(why);
                    }
                    match introspection::fetch(&cfg.introspection_url, INTROSPECTION_TIMEOUT).await {
                        Ok(m) => {
                            if health.on_answer(Instant::now(), cfg) {
                                self.restart_backoff.reset();
                                self.history = History::default();
                                tracing::debug!("agent healthy long enough: restart backoff reset");
                            }
                            let (state, reason) = match &m.container_instance_arn {
                                Some(arn) => (State::Registered, format!("registered as {arn}")),
                                None => (State::Running, "answering; not registered yet".to_string()),
                            };
                            self.status.send_modify(|s| s.metadata = Some(m.clone()));
                            self.set(state, reason);
                            self.proven(agent, m.container_instance_arn.is_some());
                            if let Some(why) = self.check_connection(&mut connection, &m, cfg).await {
                                return Outcome::Unhealthy(why);
                            }
                        }
                        Err(e) => match health.on_silence(Instant::now(), cfg, &e.to_string()) {
                            Silence::Unhealthy(why) => return Outcome::Unhealthy(why),
                            Silence::Starting => self.set(State::Running, "running; introspection not answering yet"),
                            Silence::Tolerated => {}
                        },
                    }
                }
            }
        }
    }

    /// When due, ask ECS whether the agent is connected; the reason to restart it, once it has been
    /// disconnected for `disconnected_after`.
    async fn check_connection(
        &self,
        connection: &mut Connection,
        m: &introspection::Metadata,
        cfg: &EcsAgentConfig,
    ) -> Option<String> {
        if self.ecs.is_none()
            || m.container_instance_arn.is_none()
            || !connection.due(Instant::now(), cfg)
        {
            return None;
        }
        let answer = self.ecs_connected(m).await;
        let now = Instant::now();
        let connected = match answer {
            Ok(Some(c)) => Some(c),
            Ok(None) => {
                connection.on_failure(now);
                None
            }
            Err(e) => {
                if connection.on_failure(now) {
                    tracing::info!(error = %e, "cannot ask ECS whether the agent is connected ({e}; ecs:DescribeContainerInstances); asking again every ecs_agent.connectivity_interval");
                }
                None
            }
        };
        let was = self.status.borrow().connected;
        self.status.send_modify(|s| s.connected = connected);
        match connected {
            Some(false) if was != Some(false) => {
                tracing::warn!(
                    "ECS reports the ECS agent disconnected while its introspection answers; it is restarted if that lasts ecs_agent.disconnected_after ({})",
                    humantime::format_duration(cfg.disconnected_after)
                )
            }
            Some(true) if was == Some(false) => {
                tracing::info!("ECS reports the ECS agent connected again")
            }
            _ => {}
        }
        connected.and_then(|c| connection.on_answer(now, c, cfg))
    }

    /// The image to run: the configuration's (loaded, its tarball's digest checked), or the proven
    /// one when the configuration's was refused or rolled back. `None` after a failure was reported
    /// and waited for.
    async fn choose_image(&mut self, docker: &Docker, cfg: &EcsAgentConfig) -> Option<Image> {
        let desired = Desired::of(cfg);
        if let Some(p) = self.updates.instead_of(&desired) {
            return Some(p.clone());
        }
        match self.ensure_image(docker, cfg).await {
            Ok(id) => Some(Image {
                name: cfg.image.clone(),
                id,
            }),
            Err(e @ SetupError::Digest { .. }) => {
                let why = format!("refused the update to {}: {e}", cfg.image);
                match self.updates.refuse(desired, why.clone()).cloned() {
                    Some(p) => {
                        tracing::error!("ECS agent: {why}; the running agent ({}) is kept", p.name);
                        self.status.send_modify(|s| {
                            s.last_update = Some(why);
                            s.refusals += 1;
                        });
                        Some(p)
                    }
                    None => {
                        let d = self.setup_backoff.next_delay();
                        self.retry_in(State::ImageUnavailable, &e, d).await;
                        None
                    }
                }
            }
            Err(e) => {
                let d = self.setup_backoff.next_delay();
                self.retry_in(State::ImageUnavailable, &e, d).await;
                None
            }
        }
    }

    /// The agent answered (`registered`: with a container instance ARN): proven healthy, unless it
    /// is an update whose predecessor was registered and it is not yet.
    fn proven(&mut self, agent: &Running, registered: bool) {
        if !registered && self.updates.needs_registration() {
            return;
        }
        if let Some(done) = self.updates.healthy(agent.image.clone(), registered) {
            tracing::info!("ECS agent: {done}");
            self.status.send_modify(|s| {
                s.last_update = Some(done);
                s.updates += 1;
            });
        }
    }

    /// Run until shutdown. Never returns an error: every problem is a state with a reason, retried.
    pub async fn run(mut self) {
        while !self.shutdown.is_cancelled() {
            let cfg = self.cfg();
            let agent = match self.start(&cfg).await {
                Start::Running(agent) => agent,
                Start::Again => continue,
                Start::Stop => break,
            };
            let outcome = self.watch(&agent, &cfg).await;
            if let Outcome::Exited(code) = outcome {
                self.status.send_modify(|s| {
                    s.last_exit_code = Some(code);
                    // What introspection said ends with the agent that said it.
                    s.metadata = None;
                });
            }
            if !self.act(policy::next(outcome), &agent, &cfg).await {
                break;
            }
        }
        self.set(State::Stopped, "offload-agent is stopping");
    }

    /// Get the agent running: Docker answering, no ecs-init beside us, the image present, the
    /// container adopted or created. `Again` when a step failed (its state and reason are set, and
    /// the wait before the next attempt is done) or, disabled, after a reload.
    async fn start(&mut self, cfg: &EcsAgentConfig) -> Start {
        if !cfg.enabled {
            self.set(State::Disabled, "ecs_agent.enabled = false");
            return if self.wait_for_reload().await {
                Start::Again
            } else {
                Start::Stop
            };
        }
        let systemctl = Systemctl::new(self.config.borrow().host.systemctl.clone());
        // amazon-ecs-init's service manages the same container: two supervisors would fight.
        if systemctl.is_active("ecs.service").await {
            self.set(
                State::Conflict,
                "ecs.service (amazon-ecs-init) is active and manages the agent too: run `systemctl disable --now ecs` to switch over to offload-agent",
            );
            self.pause(CONFLICT_RECHECK).await;
            return Start::Again;
        }
        let docker = match self.connect(cfg).await {
            Ok(d) => {
                self.docker_backoff.reset();
                d
            }
            Err(e) => {
                let d = self.docker_backoff.next_delay();
                match self.docker_absent(&systemctl).await {
                    State::DockerStarting => {
                        let unit = docker_unit(&self.config.borrow());
                        self.set(
                            State::DockerStarting,
                            format!(
                                "{unit} is still starting: waiting for Docker ({}); checking again in {:.1}s",
                                chain(&e),
                                d.as_secs_f64()
                            ),
                        );
                        self.pause(d).await;
                    }
                    state => self.retry_in(state, &e, d).await,
                }
                return Start::Again;
            }
        };
        let Some(image) = self.choose_image(&docker, cfg).await else {
            return Start::Again;
        };
        let image_id = image.id.clone();
        let host = self.config.borrow().host.clone();
        let spec = match ContainerSpec::build(cfg, &host, &image_id) {
            // The chosen image, which is the proven one, not the configuration's, after a rollback.
            Ok(s) => ContainerSpec {
                image: image.name.clone(),
                ..s
            },
            Err(e) => {
                let d = self.setup_backoff.next_delay();
                self.retry_in(State::BackingOff, &e, d).await;
                return Start::Again;
            }
        };
        let (id, adopted) = match self.ensure_container(&docker, &spec).await {
            Ok(x) => x,
            Err(e) => {
                if self.connect(cfg).await.is_err() {
                    return Start::Again; // Docker went away meanwhile: wait for it
                }
                let d = self.setup_backoff.next_delay();
                self.retry_in(State::BackingOff, &e, d).await;
                return Start::Again;
            }
        };
        self.setup_backoff.reset();
        self.updates
            .starting(image.clone(), Instant::now(), cfg.update_timeout);
        self.status.send_modify(|s| {
            s.running_image = Some(image.name.clone());
            s.desired_image = Some(cfg.image.clone());
        });
        self.started(&id, &image_id, &spec.name, adopted);
        if cfg.task_iam_roles {
            self.ensure_firewall().await;
        }
        Start::Running(Running {
            docker,
            id,
            name: spec.name,
            image,
        })
    }

    /// Record a started or adopted container in the status.
    fn started(&self, id: &str, image_id: &str, name: &str, adopted: bool) {
        self.status.send_modify(|s| {
            // What introspection said belongs to the container that said it.
            if s.container_id.as_deref() != Some(id) {
                s.metadata = None;
            }
            s.container_id = Some(id.to_string());
            s.image_id = Some(image_id.to_string());
            if adopted {
                s.adoptions += 1;
            }
        });
        let short = &id[..12.min(id.len())];
        self.set(
            State::Running,
            if adopted {
                format!("adopted the running container {name} ({short})")
            } else {
                format!("started container {name} ({short})")
            },
        );
    }

    async fn ensure_firewall(&self) {
        let fw = self.firewall.clone();
        match tokio::task::spawn_blocking(move || fw.ensure()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                added = n,
                "ECS agent: task IAM role network rules in place ({n} added)"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "ECS agent: cannot set up the network rules for task IAM roles ({e}); tasks cannot get role credentials")
            }
            Err(e) => {
                tracing::warn!(error = %e, "ECS agent: setting up the network rules for task IAM roles failed ({e}); tasks cannot get role credentials")
            }
        }
    }

    /// Do what the policy decided after a watch; false when the supervisor should stop.
    async fn act(&mut self, next: Next, agent: &Running, cfg: &EcsAgentConfig) -> bool {
        match next {
            Next::Stop => {
                if cfg.stop_agent_on_exit {
                    tracing::info!(container = %agent.name, "ECS agent: stopping container {} (ecs_agent.stop_agent_on_exit)", agent.name);
                    let _ = tokio::time::timeout(
                        STOP_ON_EXIT_TIMEOUT,
                        agent.docker.stop_container(
                            &agent.id,
                            Some(
                                StopContainerOptionsBuilder::default()
                                    .t(STOP_GRACE_SECS)
                                    .build(),
                            ),
                        ),
                    )
                    .await;
                }
                false
            }
            Next::Recheck => {
                tracing::info!("ECS agent: configuration reloaded: checking its container");
                true
            }
            Next::WaitForDocker(why) => {
                let systemctl = Systemctl::new(self.config.borrow().host.systemctl.clone());
                let state = self.docker_absent(&systemctl).await;
                self.set(state, why);
                true
            }
            Next::RestartUnhealthy(why) => {
                tracing::warn!(reason = %why, "ECS agent: it stopped answering ({why}): restarting it");
                stop_agent(agent).await;
                self.back_off(format!("restarting the unresponsive ECS agent ({why})"))
                    .await;
                true
            }
            Next::RollBack(why) => {
                stop_agent(agent).await;
                if let Some(report) = self.updates.roll_back(Desired::of(cfg), &why) {
                    tracing::error!(
                        "ECS agent: {report}; not trying it again until the configuration changes"
                    );
                    self.status.send_modify(|s| {
                        s.last_update = Some(report.clone());
                        s.rollbacks += 1;
                    });
                    self.set(State::Starting, report);
                }
                true
            }
            Next::StayStopped => self.stay_stopped().await,
            Next::Terminal => self.terminal(agent).await,
            Next::Upgrade => {
                let loaded = self.upgrade(&agent.docker, cfg).await;
                let then = policy::after_upgrade(loaded, &mut self.history);
                Box::pin(self.act(then, agent, cfg)).await
            }
            Next::RestartNow => {
                // The agent's own update: restart at once with the new image.
                self.status.send_modify(|s| s.restarts += 1);
                true
            }
            Next::RestartAfterBackoff(why) => {
                self.back_off(why).await;
                true
            }
        }
    }

    /// Exit 0: stopped on purpose, stays stopped until a reload; false on shutdown.
    async fn stay_stopped(&mut self) -> bool {
        self.set(
            State::Stopped,
            "the ECS agent exited 0 (stopped on purpose, e.g. `docker stop`): not restarting until SIGHUP or a configuration change",
        );
        let reloaded = self.wait_for_reload().await;
        if reloaded {
            tracing::info!("ECS agent: configuration reloaded: starting it again");
        }
        reloaded
    }

    /// Exit 5: the agent's last log lines kept, stays stopped until a reload; false on shutdown.
    async fn terminal(&mut self, agent: &Running) -> bool {
        let lines = self.last_log_lines(&agent.docker, &agent.id).await;
        for l in &lines {
            tracing::error!(agent_log = %l, "ECS agent's output before its terminal exit: {l}");
        }
        self.status
            .send_modify(|s| s.last_log_lines = lines.clone());
        self.set(
            State::Terminal,
            "the ECS agent exited 5 (terminal error; see its log lines): not restarting until the configuration changes or SIGHUP",
        );
        let reloaded = self.wait_for_reload().await;
        if reloaded {
            tracing::info!(
                "ECS agent: configuration reloaded: retrying it after its terminal exit"
            );
        }
        reloaded
    }

    /// Wait for a reload (SIGHUP or a configuration change); false on shutdown.
    async fn wait_for_reload(&mut self) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            r = self.config.changed() => r.is_ok(),
        }
    }

    /// Count a restart and wait for the restart backoff before it (shutdown or a configuration change
    /// cut the wait short).
    async fn back_off(&mut self, why: String) {
        let d = self.restart_backoff.next_delay();
        self.status.send_modify(|s| {
            s.last_backoff = Some(d);
            s.restarts += 1;
        });
        self.set(
            State::BackingOff,
            format!("{why}; restarting in {:.1}s", d.as_secs_f64()),
        );
        self.pause(d).await;
    }

    /// Exit 42: load the image tarball named in desired-image. Returns whether it was loaded.
    async fn upgrade(&self, docker: &Docker, cfg: &EcsAgentConfig) -> bool {
        let file = spec::host_path(cfg, spec::DESIRED_IMAGE_FILE);
        let wanted = match std::fs::read_to_string(&file) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "ECS agent: it asked for an upgrade (exit 42) but the desired-image file {} cannot be read ({e}); restarting the current image", file.display());
                return false;
            }
        };
        let tarball = under_root(&cfg.host_root, &wanted);
        self.set(
            State::LoadingImage,
            format!("exit 42: loading {}", tarball.display()),
        );
        match docker::load_tarball(docker, &tarball).await {
            Ok(()) => {
                tracing::info!(tarball = %tarball.display(), "ECS agent: desired image loaded from {}", tarball.display());
                true
            }
            Err(e) => {
                let e = chain(&e);
                tracing::error!(error = %e, "ECS agent: cannot load the desired image ({e}); restarting the current one");
                false
            }
        }
    }
}

/// Undo what the supervisor set up on the host: the task IAM role network rules (a future
/// `deregister` builds on this). Returns how many rules were removed.
pub fn cleanup() -> Result<usize, firewall::Error> {
    firewall::Firewall::default().cleanup()
}

#[cfg(test)]
mod tests {
    use super::without_retry_delay;

    #[test]
    fn a_reason_without_its_retry_delay_names_the_problem() {
        assert_eq!(
            without_retry_delay("image x is not present; retrying in 10.3s"),
            "image x is not present"
        );
        assert_eq!(
            without_retry_delay("exited 1; restarting in 2s"),
            "exited 1"
        );
        assert_eq!(
            without_retry_delay("creating container ecs-agent"),
            "creating container ecs-agent"
        );
    }
}
