//! The `container` processor: the user's image, run once per file by the host's Docker engine, with the
//! input bind-mounted read-only at `/input/<name>`, an empty `/output`, memory/CPU/process limits, no
//! capabilities, `no-new-privileges` and no network unless configured. Containers carry labels that
//! mark them as ours, are removed after their run, and a restarted daemon removes those a crash left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use tracing::Instrument;

use super::external::{self, Exit, OutputLog, Stream};
use super::{Context, Job, Outcome, ProcessFuture, Processor};
use crate::config::ContainerSpec;
use crate::docker;
use crate::error::{chain, ProcessError};

/// Set on every processor container; its value is the pipeline's name.
pub(crate) const PIPELINE_LABEL: &str = "offload-agent.pipeline";
/// Who started the container: `daemon` (removed by the next daemon start if left behind) or `process`.
pub(crate) const OWNER_LABEL: &str = "offload-agent.owner";
/// The spool directory of the agent that started it: a daemon removes only its own leftovers.
pub(crate) const SPOOL_LABEL: &str = "offload-agent.spool";

const DRAIN: Duration = Duration::from_secs(2);
/// How long a SIGKILLed container's out-of-memory event may lag behind its exit (containerd reports
/// the two separately, and on cgroup v1 the exit can win).
const OOM_LAG: Duration = Duration::from_secs(2);

/// Which program runs processor containers, so that a daemon's start-up removes only its own orphans
/// and never the container of an `offload-agent process` running beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Daemon,
    Process,
}

impl Owner {
    fn label(self) -> &'static str {
        match self {
            Owner::Daemon => "daemon",
            Owner::Process => "process",
        }
    }
}

/// The Docker engine, connected on first use (hosts with only orders-csv and command pipelines never
/// need one). A failed connection is tried again by the next file.
pub(crate) struct Engine {
    socket: String,
    owner: Owner,
    spool: String,
    docker: tokio::sync::OnceCell<Docker>,
}

impl Engine {
    pub(crate) fn new(socket: &str, owner: Owner, spool: &std::path::Path) -> Engine {
        Engine {
            socket: socket.to_string(),
            owner,
            spool: spool.display().to_string(),
            docker: tokio::sync::OnceCell::new(),
        }
    }

    pub(crate) async fn get(&self) -> Result<&Docker, ProcessError> {
        self.docker
            .get_or_try_init(|| docker::connect(&self.socket))
            .await
            .map_err(|e| {
                ProcessError::Unavailable(format!(
                    "{} (container processors need Docker: start it, or fix ecs_agent.docker_socket)",
                    chain(&e)
                ))
            })
    }

    /// Remove the processor containers a previous daemon left (killed while they ran; their messages
    /// come back through SQS). Returns how many were removed; does nothing without Docker.
    pub(crate) async fn remove_orphans(&self) -> Result<usize, ProcessError> {
        if !std::path::Path::new(&self.socket).exists() {
            return Ok(0);
        }
        let docker = self.get().await?;
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{OWNER_LABEL}={}", self.owner.label()),
                format!("{SPOOL_LABEL}={}", self.spool),
            ],
        )]);
        let list = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| {
                ProcessError::Transient(format!("cannot list processor containers: {e}"))
            })?;
        let mut n = 0;
        for c in list {
            let Some(id) = c.id else { continue };
            match remove(docker, &id).await {
                Ok(()) => {
                    n += 1;
                    tracing::info!(container = %id, pipeline = c.labels.as_ref().and_then(|l| l.get(PIPELINE_LABEL)).map(String::as_str).unwrap_or(""), "removed processor container {id} left by an earlier run");
                }
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove processor container {id} left by an earlier run ({e}); remove it with `docker rm -f {id}`")
                }
            }
        }
        Ok(n)
    }

    /// Whether `image` is present, pulling it when allowed. A missing image makes the pipeline
    /// unavailable (an operator loads it), not each file a failure.
    pub(crate) async fn ensure_image(&self, spec: &ContainerSpec) -> Result<(), ProcessError> {
        let docker = self.get().await?;
        match docker.inspect_image(&spec.image).await {
            Ok(_) => return Ok(()),
            Err(e) if docker::is_not_found(&e) => {}
            Err(e) => {
                return Err(ProcessError::Transient(format!(
                    "cannot inspect image {}: {e}",
                    spec.image
                )))
            }
        }
        if !spec.pull {
            return Err(ProcessError::Unavailable(format!(
                "image {} is not present on this host; load it (`docker load -i image.tar`) or set \
                 processor.container.pull = true to pull it from its registry",
                spec.image
            )));
        }
        tracing::info!(image = %spec.image, "pulling the processor image {}", spec.image);
        let mut pull = docker.create_image(
            Some(
                CreateImageOptionsBuilder::default()
                    .from_image(&spec.image)
                    .build(),
            ),
            None,
            None,
        );
        while let Some(step) = pull.next().await {
            step.map_err(|e| {
                ProcessError::Unavailable(format!("cannot pull image {}: {e}", spec.image))
            })?;
        }
        Ok(())
    }
}

async fn remove(docker: &Docker, id: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await
    {
        Err(e) if docker::is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// A created container, removed when dropped (an abandoned future, a panic) unless removed already.
struct Created {
    docker: Docker,
    id: String,
    removed: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (docker, id) = (self.docker.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = remove(&docker, &id).await;
            });
        }
    }
}

pub(crate) struct Container<'a> {
    spec: &'a ContainerSpec,
    ctx: &'a Context,
}

impl<'a> Container<'a> {
    pub(crate) fn new(spec: &'a ContainerSpec, ctx: &'a Context) -> Self {
        Container { spec, ctx }
    }

    fn create_body(&self, job: &Job<'_>, output_dir: &std::path::Path) -> ContainerCreateBody {
        let spec = self.spec;
        let name = job
            .files
            .input
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "input".into());
        let input = format!("/input/{name}");
        let mut env = external::contract_env(job, &self.ctx.region, &input, "/output");
        // With a network, the container leaves the host the way the daemon does; without, nothing.
        let networked = spec.network != "none";
        let ca = self.ctx.ca_bundle.as_ref().filter(|_| networked);
        if networked {
            env.extend(
                self.ctx
                    .egress
                    .child_env(ca.map(|_| crate::ecs_agent::spec::CONTAINER_CA_BUNDLE)),
            );
        }
        let labels = HashMap::from([
            (PIPELINE_LABEL.to_string(), job.pipeline.name.clone()),
            (
                OWNER_LABEL.to_string(),
                self.ctx.docker.owner.label().to_string(),
            ),
            (SPOOL_LABEL.to_string(), self.ctx.docker.spool.clone()),
        ]);
        let bind = |source: &std::path::Path, target: &str, read_only: bool| Mount {
            source: Some(source.display().to_string()),
            target: Some(target.to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        let memory = spec.memory_bytes().map(|b| b as i64);
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec
                .args
                .as_ref()
                .map(|a| external::substitute(a, &input, "/output")),
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            user: spec.user.clone(),
            working_dir: Some("/output".into()),
            host_config: Some(HostConfig {
                mounts: Some(
                    [
                        Some(bind(&job.files.input, &input, true)),
                        Some(bind(output_dir, "/output", false)),
                        ca.map(|p| bind(p, crate::ecs_agent::spec::CONTAINER_CA_BUNDLE, true)),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                ),
                memory,
                // No swap beyond the memory limit: exceeding it is an out-of-memory kill.
                memory_swap: memory,
                nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: Some(spec.pids_limit as i64),
                network_mode: Some(spec.network.clone()),
                readonly_rootfs: Some(spec.read_only),
                tmpfs: spec.read_only.then(|| {
                    HashMap::from([("/tmp".to_string(), "rw,nosuid,nodev,size=64m".to_string())])
                }),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn run(&self, job: &Job<'_>) -> Result<Outcome, ProcessError> {
        let spec = self.spec;
        self.ctx.docker.ensure_image(spec).await?;
        let docker = self.ctx.docker.get().await?.clone();
        let output_dir = external::make_output_dir(job, spec.user.is_some())?;
        let what = format!("container {}", spec.image);
        let created = docker
            .create_container(None, self.create_body(job, &output_dir))
            .await
            .map_err(|e| ProcessError::Transient(format!("cannot create a {what}: {e}")))?;
        let mut created = Created {
            docker: docker.clone(),
            id: created.id,
            removed: false,
        };
        let id = created.id.clone();
        let started = Instant::now();
        docker.start_container(&id, None).await.map_err(|e| {
            let e = e.to_string();
            ProcessError::Transient(format!(
                "cannot start the {what}: {e}{}",
                docker::advice(&e)
            ))
        })?;
        tracing::debug!(container = %id, image = %spec.image, "processor container started");
        // Long-lived requests: give them a client whose timeout outlasts the processor's.
        let long = docker
            .clone()
            .with_timeout(spec.timeout + Duration::from_secs(120));
        let log = Arc::new(Mutex::new(OutputLog::default()));
        let pump = tokio::spawn(pump_logs(long.clone(), id.clone(), log.clone()).in_current_span());
        let mut waiter = long.wait_container(
            &id,
            Some(
                WaitContainerOptionsBuilder::default()
                    .condition("not-running")
                    .build(),
            ),
        );
        let since = std::time::SystemTime::now();
        let timed_out = tokio::select! {
            w = waiter.next() => {
                if let Some(Err(e)) = &w {
                    if !matches!(e, DockerError::DockerContainerWaitError { .. }) {
                        return Err(ProcessError::Transient(format!("lost the {what} while waiting for it: {e}")));
                    }
                }
                false
            }
            _ = tokio::time::sleep(spec.timeout) => true,
            _ = job.cancel.cancelled() => {
                let _ = remove(&docker, &id).await;
                created.removed = true;
                return Err(ProcessError::Cancelled);
            }
        };
        if timed_out {
            let _ = docker
                .kill_container(
                    &id,
                    Some(
                        KillContainerOptionsBuilder::default()
                            .signal("KILL")
                            .build(),
                    ),
                )
                .await;
        }
        let oom_possible = !timed_out && spec.memory_bytes().is_some();
        let state = stopped_state(&docker, &id, since, oom_possible).await;
        let _ = tokio::time::timeout(DRAIN, pump).await;
        remove(&docker, &id)
            .await
            .map_err(|e| ProcessError::Transient(format!("cannot remove the {what} {id}: {e}")))?;
        created.removed = true;
        let exit = exit_of(timed_out, spec.timeout, state)
            .ok_or_else(|| ProcessError::Transient(format!("cannot learn how the {what} ended")))?;
        external::finish(
            job,
            &what,
            &exit,
            &spec.permanent_exit_codes,
            &log,
            &output_dir,
            started.elapsed(),
        )
        .await
    }
}

/// Feed the container's stdout and stderr into `log` until it ends.
async fn pump_logs(docker: Docker, id: String, log: Arc<Mutex<OutputLog>>) {
    let mut s = docker.logs(
        &id,
        Some(
            LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    while let Some(Ok(chunk)) = s.next().await {
        let (stream, bytes) = match chunk {
            bollard::container::LogOutput::StdErr { message } => (Stream::Stderr, message),
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => (Stream::Stdout, message),
            bollard::container::LogOutput::StdIn { .. } => continue,
        };
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .feed(stream, &bytes);
    }
}

/// The state of the stopped container `id`. With `oom_possible` (a memory limit, no SIGKILL of ours),
/// an exit by SIGKILL (137) that Docker did not attribute to the OOM killer is asked about again:
/// Docker may not know yet.
async fn stopped_state(
    docker: &Docker,
    id: &str,
    since: std::time::SystemTime,
    oom_possible: bool,
) -> Option<bollard::models::ContainerState> {
    let mut state = docker
        .inspect_container(id, None)
        .await
        .ok()
        .and_then(|c| c.state)?;
    if oom_possible && state.exit_code == Some(137) && state.oom_killed != Some(true) {
        let late = late_oom(docker, id, since).await;
        if late {
            tracing::debug!(container = %id, "Docker reported the out-of-memory kill after the exit");
        }
        state.oom_killed = Some(late);
    }
    Some(state)
}

/// Whether Docker reports an out-of-memory kill of container `id` since `since`, waiting up to
/// [`OOM_LAG`] for the event to arrive after the exit: its state's flag, or its `oom` event (which
/// Docker logs even when the flag was settled by an exit that came first).
async fn late_oom(docker: &Docker, id: &str, since: std::time::SystemTime) -> bool {
    let epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let deadline = Instant::now() + OOM_LAG;
    let filters = HashMap::from([("container", vec![id]), ("event", vec!["oom"])]);
    loop {
        let options = EventsOptionsBuilder::default()
            .since(&format!("{:.3}", epoch(since) - 1.0))
            .until(&format!("{:.3}", epoch(std::time::SystemTime::now())))
            .filters(&filters)
            .build();
        let events = docker.events(Some(options)).take(1).collect::<Vec<_>>();
        if let Ok(found) = tokio::time::timeout(OOM_LAG, events).await {
            if found.iter().any(|e| e.is_ok()) {
                return true;
            }
        }
        let flagged = docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed);
        if flagged == Some(true) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How the container ended, from its state after it stopped (None: Docker did not say).
fn exit_of(
    timed_out: bool,
    timeout: Duration,
    state: Option<bollard::models::ContainerState>,
) -> Option<Exit> {
    if timed_out {
        return Some(Exit::TimedOut(timeout));
    }
    match state? {
        s if s.oom_killed == Some(true) => Some(Exit::OutOfMemory(None)),
        s => Some(Exit::Code(s.exit_code.unwrap_or(-1))),
    }
}

impl Processor for Container<'_> {
    fn process<'a>(&'a self, job: &'a Job<'a>) -> ProcessFuture<'a> {
        Box::pin(self.run(job))
    }
}
