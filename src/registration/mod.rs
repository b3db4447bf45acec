//! `register` and `deregister`: put a datacenter host into service as an SSM hybrid managed instance
//! (`mi-…`) in an ECS Anywhere cluster, and take it back out. Both are idempotent and print every step
//! with its outcome; neither ever prints the activation code.

pub(crate) mod egress;
pub(crate) mod env_file;
pub(crate) mod ssm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{RemoveContainerOptionsBuilder, StopContainerOptionsBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ecs_agent::{self, introspection, spec, State, Supervisor};
use crate::error::describe;
use crate::host::Systemctl;

/// The daemon's own unit: when it runs, `register` asks it (reload) to start the agent.
pub(crate) const SERVICE_UNIT: &str = "offload-agent.service";
/// Keys `register` writes to `/etc/ecs/ecs.config`.
const ETC_KEYS: [&str; 1] = ["ECS_CLUSTER"];
/// Keys `register` writes to `/var/lib/ecs/ecs.config`.
const VAR_KEYS: [&str; 3] = ["AWS_DEFAULT_REGION", "ECS_EXTERNAL", "ECS_BACKEND_HOST"];
/// What `register` remembers for `deregister`, under `host.state_dir`.
const STATE_FILE: &str = "registration.json";

/// Why `register` or `deregister` stopped; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Bad input (exit 78).
    #[error("{0}")]
    Input(String),
    /// An AWS side (or the SSM agent, or the ECS agent) did not answer in time (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The task IAM role rules could not be removed (exit 1).
    #[error(transparent)]
    Firewall(#[from] crate::ecs_agent::firewall::Error),
    /// `systemctl` could not be run or failed (exit 1).
    #[error(transparent)]
    Host(#[from] crate::host::Error),
    /// A file of the host's could not be read, written or removed (exit 1).
    #[error("cannot {action} {}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the SSM agent writes does not hold what it should (exit 1).
    #[error("{} is not the SSM agent's {what}", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A failed file operation on `path`, for `map_err`.
    pub(crate) fn file(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::File {
            action,
            path,
            source,
        }
    }
}

/// `register`'s inputs.
pub(crate) struct RegisterArgs {
    pub(crate) region: Option<String>,
    pub(crate) cluster: String,
    pub(crate) activation_id: String,
    /// Never logged: `Debug` is not derived.
    pub(crate) activation_code: String,
    pub(crate) reregister: bool,
    /// Bound on each wait (credentials, online, agent registered, ACTIVE).
    pub(crate) timeout: Duration,
    /// Leave out the endpoint checks that come first.
    pub(crate) skip_preflight: bool,
    /// Restart Docker when its egress drop-in changed.
    pub(crate) restart_docker: bool,
}

/// What `register` recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Saved {
    pub(crate) managed_instance_id: String,
    pub(crate) region: String,
    pub(crate) cluster: String,
    pub(crate) container_instance_arn: String,
}

fn step(what: &str, outcome: impl std::fmt::Display) {
    println!("{what:<7} {outcome}");
}

fn state_path(cfg: &Config) -> PathBuf {
    cfg.host.state_dir.join(STATE_FILE)
}

fn load_state(cfg: &Config) -> Option<Saved> {
    let text = std::fs::read_to_string(state_path(cfg)).ok()?;
    serde_json::from_str(&text).ok()
}

fn etc_config(cfg: &Config) -> PathBuf {
    spec::host_path(&cfg.ecs_agent, spec::ENV_FILES[1])
}

fn var_config(cfg: &Config) -> PathBuf {
    spec::host_path(&cfg.ecs_agent, spec::ENV_FILES[0])
}

/// Register this host. See `offload-agent register --help`.
pub(crate) async fn register(mut cfg: Config, a: RegisterArgs) -> Result<(), Error> {
    let region = a
        .region
        .clone()
        .or_else(|| cfg.aws.region.clone())
        .ok_or_else(|| Error::Input("no region: pass --region, or set aws.region".into()))?;
    for (name, v) in [
        ("--cluster", &a.cluster),
        ("--activation-id", &a.activation_id),
    ] {
        if v.trim().is_empty() {
            return Err(Error::Input(format!("{name} must not be empty")));
        }
    }
    cfg.aws.region = Some(region.clone());
    let deadline = || Instant::now() + a.timeout;
    let systemctl = Systemctl::new(cfg.host.systemctl.clone());

    // 0. Every endpoint answers, through the egress, before anything changes.
    if a.skip_preflight {
        step("preflight", "skipped (--skip-preflight)");
    } else {
        let report = crate::preflight::run(&cfg, None).await;
        let failed = report.rows.iter().filter(|r| !r.ok).count();
        if failed > 0 {
            print!("{}", report.render());
            return Err(Error::Unavailable(format!(
                "{failed} endpoint(s) did not answer (above, with what to fix): nothing was changed; \
                 fix the egress, or pass --skip-preflight"
            )));
        }
        let checked = report.rows.iter().filter(|r| r.skipped.is_none()).count();
        step("preflight", format!("{checked} endpoint(s) answered"));
    }

    // 1. The egress of the SSM agent, Docker and the ECS agent: before the SSM agent registers, so
    //    that its registration goes out the same way.
    egress::write(&cfg, &systemctl, a.restart_docker).await?;

    // 2. The SSM agent: keep an existing registration unless asked not to.
    let instance = register_ssm(&cfg, &a, &region, &systemctl).await?;
    let file = ssm::wait_for_credentials(&cfg.host, deadline()).await?;
    step(
        "ssm",
        format!("rotating credentials published in {}", file.display()),
    );
    // From here on every AWS call uses the host's own credentials (the file just published).
    let clients = crate::aws::clients(&cfg)
        .await
        .map_err(|e| Error::Input(e.to_string()))?;
    ssm::wait_online(&clients.ssm, &instance, deadline()).await?;
    step("ssm", format!("{instance} is online in Systems Manager"));

    // 3. Docker.
    ensure_docker(&cfg, &systemctl, deadline()).await?;

    // 4. The ECS agent's configuration: our keys once each, the user's lines untouched.
    write_ecs_config(&cfg, &a.cluster, &region)?;

    // 5. The agent registers itself with ECS once it runs with that configuration.
    let arn = start_agent(&cfg, &clients, &systemctl, deadline()).await?;
    step("ecs", format!("the ECS agent registered as {arn}"));
    confirm_active(&clients.ecs, &a.cluster, &arn, deadline()).await?;
    step(
        "ecs",
        "the container instance is ACTIVE with its agent connected",
    );

    let saved = Saved {
        managed_instance_id: instance.clone(),
        region,
        cluster: a.cluster.clone(),
        container_instance_arn: arn.clone(),
    };
    save_state(&cfg, &saved)?;
    println!();
    println!("managed instance:   {instance}");
    println!("cluster:            {}", a.cluster);
    println!("container instance: {arn}");
    Ok(())
}

/// The SSM agent registered with the activation (or its registration kept); the managed instance id.
async fn register_ssm(
    cfg: &Config,
    a: &RegisterArgs,
    region: &str,
    systemctl: &Systemctl,
) -> Result<String, Error> {
    let existing = ssm::registration(&cfg.host)?;
    match existing {
        Some(r) if !a.reregister => {
            step(
                "ssm",
                format!(
                    "already registered as {} (kept; --reregister registers again)",
                    r.managed_instance_id
                ),
            );
            Ok(r.managed_instance_id)
        }
        _ => {
            if a.activation_code.trim().is_empty() {
                return Err(Error::Input(
                    "no activation code: put it in a file for --activation-code-file, or in OFFLOAD_AGENT_ACTIVATION_CODE".into(),
                ));
            }
            let unit = &cfg.host.ssm_service;
            // The agent must not run while it is re-registered (it would keep the old identity).
            let _ = systemctl.run(&["stop", unit]).await;
            step(
                "ssm",
                format!(
                    "running {} -register -id {} -region {region} (code hidden)",
                    cfg.host.ssm_agent.display(),
                    a.activation_id
                ),
            );
            ssm::run_register(
                &cfg.host.ssm_agent,
                &cfg.network.child_env(None),
                &ssm::Activation {
                    id: a.activation_id.clone(),
                    code: a.activation_code.clone(),
                    region: region.to_string(),
                },
            )
            .await?;
            systemctl.must(&["enable", unit]).await?;
            systemctl.must(&["start", unit]).await?;
            let r = ssm::registration(&cfg.host)?.ok_or_else(|| {
                Error::Failed(format!(
                    "the SSM agent registered but {} is missing",
                    cfg.host.ssm_registration().display()
                ))
            })?;
            step(
                "ssm",
                format!(
                    "registered as {}; {unit} enabled and started",
                    r.managed_instance_id
                ),
            );
            Ok(r.managed_instance_id)
        }
    }
}

/// The ECS agent's configuration files: the cluster in /etc/ecs/ecs.config, the region, ECS_EXTERNAL
/// and the backend (when an ECS endpoint is configured) in /var/lib/ecs/ecs.config.
fn write_ecs_config(cfg: &Config, cluster: &str, region: &str) -> Result<(), Error> {
    let changed = env_file::apply(&etc_config(cfg), &[(ETC_KEYS[0], cluster)], &[])?;
    step(
        "ecs",
        format!(
            "{}: ECS_CLUSTER={} ({})",
            etc_config(cfg).display(),
            cluster,
            if changed { "written" } else { "already so" }
        ),
    );
    let mut var: Vec<(&str, &str)> = vec![(VAR_KEYS[0], region), (VAR_KEYS[1], "true")];
    let backend = cfg.aws.endpoint_for("ecs").map(String::from);
    let mut remove = Vec::new();
    match &backend {
        Some(url) => var.push((VAR_KEYS[2], url.as_str())),
        None => remove.push(VAR_KEYS[2]),
    }
    let changed = env_file::apply(&var_config(cfg), &var, &remove)?;
    let shown: Vec<String> = var.iter().map(|(k, v)| format!("{k}={v}")).collect();
    step(
        "ecs",
        format!(
            "{}: {} ({})",
            var_config(cfg).display(),
            shown.join(" "),
            if changed { "written" } else { "already so" }
        ),
    );

    Ok(())
}

fn save_state(cfg: &Config, saved: &Saved) -> Result<(), Error> {
    let path = state_path(cfg);
    std::fs::create_dir_all(&cfg.host.state_dir)
        .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(saved).unwrap_or_default()))
        .map_err(Error::file("write", &path))
}

/// Docker must answer; when it is installed but stopped, start it through systemd.
async fn ensure_docker(
    cfg: &Config,
    systemctl: &Systemctl,
    deadline: Instant,
) -> Result<(), Error> {
    let socket = &cfg.ecs_agent.docker_socket;
    if crate::docker::connect(socket).await.is_ok() {
        step("docker", format!("answering on {socket}"));
        return Ok(());
    }
    let unit = &cfg.host.docker_service;
    if !systemctl.exists(unit).await {
        return Err(Error::Failed(format!(
            "Docker does not answer on {socket} and {unit}.service is not installed: install Docker (Debian: apt-get install docker.io)"
        )));
    }
    systemctl.must(&["start", unit]).await?;
    loop {
        match crate::docker::connect(socket).await {
            Ok(_) => {
                step("docker", format!("started {unit}; answering on {socket}"));
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Unavailable(format!(
                    "{} (started {unit}): check `systemctl status {unit}`",
                    crate::error::chain(&e)
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Start (or restart with the new configuration) the agent and wait for its ContainerInstanceArn.
/// A running daemon is asked to do it (reload); otherwise the supervisor runs here until the agent
/// registered, and the daemon adopts the container when it starts.
async fn start_agent(
    cfg: &Config,
    clients: &crate::aws::Clients,
    systemctl: &Systemctl,
    deadline: Instant,
) -> Result<String, Error> {
    if !cfg.ecs_agent.enabled {
        step(
            "ecs",
            "note: ecs_agent.enabled = false, so the daemon will not supervise the agent started now",
        );
    }
    if cfg.ecs_agent.enabled && systemctl.is_active(SERVICE_UNIT).await {
        systemctl.must(&["reload", SERVICE_UNIT]).await?;
        step(
            "ecs",
            format!("asked the running {SERVICE_UNIT} to restart the agent"),
        );
        loop {
            if let Ok(m) =
                introspection::fetch(&cfg.ecs_agent.introspection_url, Duration::from_secs(2)).await
            {
                if let Some(arn) = m.container_instance_arn {
                    return Ok(arn);
                }
            }
            if Instant::now() >= deadline {
                return Err(agent_timeout(cfg, "no ContainerInstanceArn yet"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut here = cfg.clone();
    here.ecs_agent.enabled = true;
    // The agent keeps running when `register` ends: the daemon adopts it.
    here.ecs_agent.stop_agent_on_exit = false;
    let (_tx, rx) = watch::channel(Arc::new(here));
    let stop = CancellationToken::new();
    let (sup, mut status) = Supervisor::new(rx, stop.clone());
    let sup = sup.with_s3(clients.s3.clone());
    let task = tokio::spawn(sup.run());
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    let mut last = String::new();
    let result = loop {
        let s = status.borrow_and_update().clone();
        if s.state == State::Registered {
            if let Some(arn) = s.metadata.and_then(|m| m.container_instance_arn) {
                break Ok(arn);
            }
        }
        if s.state == State::Terminal || s.state == State::Conflict {
            break Err(Error::Failed(format!(
                "the ECS agent cannot run: {}",
                s.reason
            )));
        }
        let line = format!("{}: {}", s.state, s.reason);
        if line != last && s.state != State::Stopped {
            step("ecs", format!("agent {line}"));
            last = line;
        }
        tokio::select! {
            r = status.changed() => if r.is_err() { break Err(Error::Failed("the supervisor stopped".into())) },
            _ = &mut sleep => break Err(agent_timeout(cfg, &last)),
        }
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    result
}

fn agent_timeout(cfg: &Config, last: &str) -> Error {
    Error::Unavailable(format!(
        "the ECS agent did not register in time (last: {last}): check `docker logs {}`, ECS_CLUSTER, that the \
         host reaches ecs.<region>.amazonaws.com on 443, and that the instance's role allows ecs:RegisterContainerInstance",
        cfg.ecs_agent.container_name
    ))
}

/// `DescribeContainerInstances` says ACTIVE with the agent connected.
async fn confirm_active(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    arn: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let mut last;
    loop {
        match ecs
            .describe_container_instances()
            .cluster(cluster)
            .container_instances(arn)
            .send()
            .await
        {
            Ok(out) => match out.container_instances().first() {
                Some(ci) if ci.status() == Some("ACTIVE") && ci.agent_connected() => return Ok(()),
                Some(ci) => {
                    last = format!(
                        "status {}, agent connected: {}",
                        ci.status().unwrap_or("?"),
                        ci.agent_connected()
                    )
                }
                None => last = "not found in the cluster".into(),
            },
            Err(e) => last = describe(&e),
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "ECS does not show {arn} ACTIVE in cluster {cluster} ({last})"
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Take the host back out. See `offload-agent deregister --help`.
pub(crate) async fn deregister(cfg: Config, keep_ssm: bool) -> Result<(), Error> {
    let systemctl = Systemctl::new(cfg.host.systemctl.clone());
    let saved = load_state(&cfg);
    let mut cfg = cfg;
    if cfg.aws.region.is_none() {
        cfg.aws.region = saved.as_ref().map(|s| s.region.clone());
    }
    let clients = crate::aws::clients(&cfg)
        .await
        .map_err(|e| Error::Input(e.to_string()))?;

    // 1. ECS: the agent knows its own ARN; the saved state is the fallback.
    deregister_ecs(&cfg, &clients, saved.as_ref()).await?;
    // 2. The agent's container and the host changes made for it.
    remove_agent(&cfg).await?;
    // 3. SSM, with the host's own credentials (which stop working right after).
    if keep_ssm {
        step("ssm", "kept (--keep-ssm)");
    } else {
        deregister_ssm(&cfg, &clients, &systemctl).await?;
    }
    // 4. Our keys out of the ECS config files; the agent's saved state cleared; the egress drop-ins
    //    and CA bundle removed.
    remove_ecs_config(&cfg)?;
    egress::remove(&cfg, &systemctl).await?;
    let _ = std::fs::remove_file(state_path(&cfg));
    Ok(())
}

/// Deregister the container instance (as the agent reports it, else as `register` saved it).
async fn deregister_ecs(
    cfg: &Config,
    clients: &crate::aws::Clients,
    saved: Option<&Saved>,
) -> Result<(), Error> {
    let live = introspection::fetch(&cfg.ecs_agent.introspection_url, Duration::from_secs(2))
        .await
        .ok()
        .and_then(|m| Some((m.cluster?, m.container_instance_arn?)));
    let target =
        live.or_else(|| saved.map(|s| (s.cluster.clone(), s.container_instance_arn.clone())));
    match target {
        Some((cluster, arn)) => {
            match clients
                .ecs
                .deregister_container_instance()
                .cluster(&cluster)
                .container_instance(&arn)
                .force(true)
                .send()
                .await
            {
                Ok(_) => step("ecs", format!("deregistered {arn} from cluster {cluster}")),
                Err(e) => {
                    let text = describe(&e);
                    if text.contains("not found")
                        || text.contains("NotFound")
                        || text.contains("does not exist")
                    {
                        step("ecs", format!("{arn} is not registered (already gone)"));
                    } else {
                        return Err(Error::Failed(format!(
                            "cannot deregister {arn} from cluster {cluster}: {text}"
                        )));
                    }
                }
            }
        }
        None => step("ecs", "no container instance known (agent not answering, nothing saved): nothing to deregister"),
    }

    Ok(())
}

/// Stop and remove the agent's container, and the task IAM role network rules.
async fn remove_agent(cfg: &Config) -> Result<(), Error> {
    match crate::docker::connect(&cfg.ecs_agent.docker_socket).await {
        Ok(docker) => {
            let name = &cfg.ecs_agent.container_name;
            let _ = docker
                .stop_container(
                    name,
                    Some(StopContainerOptionsBuilder::default().t(10).build()),
                )
                .await;
            match docker
                .remove_container(
                    name,
                    Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                )
                .await
            {
                Ok(()) => step("docker", format!("stopped and removed container {name}")),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => step("docker", format!("no container {name}")),
                Err(e) => {
                    return Err(Error::Failed(format!(
                        "cannot remove container {name}: {e}"
                    )))
                }
            }
        }
        Err(e) => step("docker", format!("{e}: no agent container to remove")),
    }
    if cfg.ecs_agent.task_iam_roles {
        match tokio::task::spawn_blocking(ecs_agent::cleanup).await {
            Ok(Ok(n)) => step("host", format!("removed {n} task IAM role network rule(s)")),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(Error::Failed(e.to_string())),
        }
    }

    Ok(())
}

/// Deregister the managed instance and disable the SSM agent.
async fn deregister_ssm(
    cfg: &Config,
    clients: &crate::aws::Clients,
    systemctl: &Systemctl,
) -> Result<(), Error> {
    match ssm::registration(&cfg.host)? {
        Some(r) => {
            let id = &r.managed_instance_id;
            match ssm::deregister(&clients.ssm, id).await? {
                true => step("ssm", format!("deregistered managed instance {id}")),
                false => step("ssm", format!("{id} was already deregistered")),
            }
            let unit = &cfg.host.ssm_service;
            let _ = systemctl.run(&["disable", "--now", unit]).await;
            let path = cfg.host.ssm_registration();
            std::fs::remove_file(&path).map_err(Error::file("remove", &path))?;
            step(
                "ssm",
                format!("{unit} stopped and disabled; {} removed", path.display()),
            );
        }
        None => step("ssm", "not registered"),
    }
    Ok(())
}

/// Our keys out of the ECS configuration files, and the agent's saved state cleared.
fn remove_ecs_config(cfg: &Config) -> Result<(), Error> {
    for (path, keys) in [
        (etc_config(cfg), &ETC_KEYS[..]),
        (var_config(cfg), &VAR_KEYS[..]),
    ] {
        let changed = env_file::apply(&path, &[], keys)?;
        step(
            "ecs",
            format!(
                "{}: {} {}",
                path.display(),
                keys.join(", "),
                if changed { "removed" } else { "not present" }
            ),
        );
    }
    let data = spec::host_path(&cfg.ecs_agent, "var/lib/ecs/data");
    let mut cleared = 0;
    if let Ok(entries) = std::fs::read_dir(&data) {
        for e in entries.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(Error::file("remove", &p))?;
            cleared += 1;
        }
    }
    step(
        "ecs",
        format!(
            "cleared the agent's saved state in {} ({cleared} entries)",
            data.display()
        ),
    );
    Ok(())
}
