//! The sections of the configuration other than the pipelines: each a type whose `Default` holds the
//! defaults (the one place they are written; `config/agent.toml` is checked against them by a test)
//! and whose `read` takes its keys from a [`Reader`] with their limits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::humantime_serde_compat;
use super::reader::Reader;
use crate::limits::{SQS_MAX_VISIBILITY, SQS_MAX_WAIT};

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/offload-agent/spool";
pub const DEFAULT_MAX_LINE_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_WRITE_CONCURRENCY: usize = 4;
pub const DEFAULT_WRITE_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_ECS_IMAGE: &str = "amazon/amazon-ecs-agent:latest";
pub const DEFAULT_ECS_TARBALL: &str = "/var/cache/ecs/ecs-agent.tar";
pub const DEFAULT_ECS_CONTAINER: &str = "ecs-agent";
pub const DEFAULT_ECS_INTROSPECTION: &str = "http://127.0.0.1:51678/v1/metadata";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_HOST_ROOT: &str = "/";
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_UNHEALTHY_AFTER: Duration = Duration::from_secs(90);
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
pub const DEFAULT_HEALTHY_RESET_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_AGENT_LOG_MAX_SIZE: &str = "16m";
pub const DEFAULT_AGENT_LOG_MAX_FILES: u64 = 4;
pub const DEFAULT_SSM_DIR: &str = "/var/lib/amazon/ssm";
pub const DEFAULT_SSM_AGENT: &str = "/usr/bin/amazon-ssm-agent";
pub const DEFAULT_SSM_SERVICE: &str = "amazon-ssm-agent";
pub const DEFAULT_DOCKER_SERVICE: &str = "docker";
pub const DEFAULT_SYSTEMCTL: &str = "systemctl";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/offload-agent";
pub const DEFAULT_SYSTEMD_DIR: &str = "/etc/systemd/system";
pub const DEFAULT_SSM_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Where, under the SSM agent's state directory, it says which credentials file it rotates.
pub const SSM_IDENTITY_CONFIG: &str = "runtimeconfig/identity_config.json";

/// A day, the upper limit of several waits.
const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3600);

/// `[agent]`: the daemon itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            log_level: DEFAULT_LOG_LEVEL.to_string(),
        }
    }
}

impl AgentConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let agent = AgentConfig {
            shutdown_grace: r.duration("shutdown_grace", d.shutdown_grace, Duration::ZERO, HOUR),
            log_level: r.string("log_level", &d.log_level),
        };
        if tracing_subscriber::EnvFilter::try_new(&agent.log_level).is_err() {
            let msg = format!(
                "\"{}\" is not a level or filter (use error, warn, info, debug or trace)",
                agent.log_level
            );
            r.invalid("log_level", msg);
        }
        agent
    }
}

/// `[aws]`: region, endpoints, timeouts and where credentials come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AwsConfig {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub profile: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub call_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// A shared credentials file to follow (re-read when it changes); `profile` picks the section.
    pub credentials_file: Option<PathBuf>,
    /// Per-service endpoint overrides (`[aws.endpoints]`: s3, sqs, dynamodb, ssm, ecs), over
    /// `endpoint_url`.
    pub endpoints: Endpoints,
    /// Whether the default credentials and region chains may ask the EC2 instance metadata
    /// service. Off: on a datacenter host it only costs time-outs (or answers from a firewall).
    pub imds: bool,
}

/// `[aws.endpoints]`: one URL per service, each optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Endpoints {
    pub s3: Option<String>,
    pub sqs: Option<String>,
    pub dynamodb: Option<String>,
    pub ssm: Option<String>,
    pub ecs: Option<String>,
}

/// The services `[aws.endpoints]` knows.
pub const ENDPOINT_SERVICES: [&str; 5] = ["s3", "sqs", "dynamodb", "ssm", "ecs"];

impl Endpoints {
    /// The override for one service of [`ENDPOINT_SERVICES`].
    pub fn get(&self, service: &str) -> Option<&str> {
        match service {
            "s3" => self.s3.as_deref(),
            "sqs" => self.sqs.as_deref(),
            "dynamodb" => self.dynamodb.as_deref(),
            "ssm" => self.ssm.as_deref(),
            "ecs" => self.ecs.as_deref(),
            _ => None,
        }
    }

    fn read(e: &mut Reader<'_>) -> Self {
        let endpoints = Endpoints {
            s3: e.opt_string("s3"),
            sqs: e.opt_string("sqs"),
            dynamodb: e.opt_string("dynamodb"),
            ssm: e.opt_string("ssm"),
            ecs: e.opt_string("ecs"),
        };
        for service in ENDPOINT_SERVICES {
            if let Some(url) = endpoints.get(service) {
                check_http_url(e, service, url);
            }
        }
        endpoints
    }
}

fn check_http_url(r: &mut Reader<'_>, key: &str, url: &str) {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        r.invalid(
            key,
            format!("\"{url}\" must start with http:// or https://"),
        );
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            profile: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            credentials_file: None,
            endpoints: Endpoints::default(),
            imds: false,
        }
    }
}

impl AwsConfig {
    /// The endpoint for one service: its own override, else `endpoint_url`, else the SDK's default.
    pub fn endpoint_for(&self, service: &str) -> Option<&str> {
        self.endpoints.get(service).or(self.endpoint_url.as_deref())
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let aws = AwsConfig {
            region: r.opt_string("region"),
            endpoint_url: r.opt_string("endpoint_url"),
            profile: r.opt_string("profile"),
            call_timeout: r.duration("call_timeout", d.call_timeout, Duration::from_secs(1), HOUR),
            connect_timeout: r.duration(
                "connect_timeout",
                d.connect_timeout,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            credentials_file: r.opt_string("credentials_file").map(PathBuf::from),
            endpoints: r.section("endpoints", Endpoints::read),
            imds: r.boolean("imds", d.imds),
        };
        if let Some(url) = &aws.endpoint_url {
            check_http_url(r, "endpoint_url", url);
        }
        aws
    }
}

/// `[network]`: the way out to AWS. The section's values, each unset one filled from the standard
/// environment variables; see [`crate::egress`].
pub type NetworkConfig = crate::egress::Egress;

/// Read `[network]`; `env` is the process environment, for the keys the section leaves unset.
pub(super) fn read_network(r: &mut Reader<'_>, env: &BTreeMap<String, String>) -> NetworkConfig {
    let no_proxy = match r.table.get("no_proxy").map(|v| v.kind.clone()) {
        Some(config::ValueKind::String(s)) => {
            r.take("no_proxy");
            Some(crate::egress::split_list(&s))
        }
        Some(_) => Some(r.string_list("no_proxy")),
        None => None,
    };
    let declared = crate::egress::Declared {
        https_proxy: r.opt_string("https_proxy"),
        http_proxy: r.opt_string("http_proxy"),
        no_proxy,
        ca_bundle: r.opt_string("ca_bundle").map(PathBuf::from),
        use_fips: r.boolean("use_fips", false),
        use_dual_stack: r.boolean("use_dual_stack", false),
    };
    let (egress, problems) = crate::egress::Egress::resolve(declared, env);
    for p in problems {
        match p.source {
            crate::egress::Source::Key(key) => {
                r.invalid(key.trim_start_matches("network."), p.message)
            }
            crate::egress::Source::Env(var) => r
                .problems
                .push(format!("{var} (in the environment): {}", p.message)),
        }
    }
    egress
}

/// `[queue]`: the SQS queue of S3 events, and how its messages are received and retried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueConfig {
    pub name: Option<String>,
    pub url: Option<String>,
    pub dead_letter_queue: Option<String>,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde_compat")]
    pub visibility_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub wait_time: Duration,
    pub max_receive_count: u32,
    #[serde(with = "humantime_serde_compat")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub retry_max: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: None,
            url: None,
            dead_letter_queue: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            wait_time: DEFAULT_WAIT_TIME,
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            retry_base: DEFAULT_RETRY_BASE,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

impl QueueConfig {
    /// The redrive policy's `maxReceiveCount` for this queue: enough receives for a transient
    /// failure's delay (`retry_base` doubling per receive) to reach `retry_max`, plus one receive at
    /// it, and never fewer than `max_receive_count` (with fewer, SQS would give up before
    /// `retry_max`; the agent gives up by itself on the last one, with a reason).
    pub fn redrive_receives(&self) -> u32 {
        let to_cap = crate::backoff::Backoff::steps_to_cap(self.retry_base, self.retry_max);
        self.max_receive_count.max(to_cap + 1)
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let one_second = Duration::from_secs(1);
        let queue = QueueConfig {
            name: r.opt_string("name"),
            url: r.opt_string("url"),
            dead_letter_queue: r.opt_string("dead_letter_queue"),
            max_in_flight: r.uint("max_in_flight", d.max_in_flight as u64, 1, 1024) as usize,
            visibility_timeout: r.duration(
                "visibility_timeout",
                d.visibility_timeout,
                Duration::from_secs(5),
                SQS_MAX_VISIBILITY,
            ),
            wait_time: r.duration("wait_time", d.wait_time, Duration::ZERO, SQS_MAX_WAIT),
            max_receive_count: r.uint("max_receive_count", d.max_receive_count as u64, 1, 1000)
                as u32,
            retry_base: r.duration("retry_base", d.retry_base, one_second, SQS_MAX_VISIBILITY),
            retry_max: r.duration("retry_max", d.retry_max, one_second, SQS_MAX_VISIBILITY),
        };
        match (&queue.name, &queue.url) {
            (None, None) => r.problem(
                "name",
                None,
                "missing; set queue.name (the queue's name) or queue.url",
            ),
            (Some(_), Some(_)) => {
                r.problem("url", None, "set either queue.name or queue.url, not both")
            }
            _ => {}
        }
        queue
    }
}

/// A SHA-256 in hex (64 digits, either case; kept lower-case).
fn read_sha256(r: &mut Reader<'_>, k: &str) -> Option<String> {
    let v = r.opt_string(k)?;
    let hex = v.trim().trim_start_matches("sha256:").to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(hex)
    } else {
        r.invalid(
            k,
            format!("{v:?} is not a SHA-256 (64 hex digits, as `sha256sum` prints)"),
        );
        None
    }
}

/// `spool.min_free`: a size ("1GiB"), a percentage ("5%") or a number of bytes.
fn read_min_free(r: &mut Reader<'_>, default: crate::disk::MinFree) -> crate::disk::MinFree {
    let Some(v) = r.take("min_free") else {
        return default;
    };
    let text = match &v.kind {
        config::ValueKind::String(s) => s.clone(),
        config::ValueKind::I64(n) if *n >= 0 => n.to_string(),
        config::ValueKind::U64(n) => n.to_string(),
        _ => String::new(),
    };
    match crate::disk::MinFree::parse(&text) {
        Ok(m) => m,
        Err(e) => {
            r.problem("min_free", Some(&v), e);
            default
        }
    }
}

/// `[spool]`: where objects wait on local disk while they are processed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_line_bytes: u64,
    /// A compressed object may decompress to at most this many bytes.
    pub max_decompressed_bytes: u64,
    /// ... and, past its first [`crate::compression::RATIO_GRACE_BYTES`], to at most this many times
    /// its compressed size.
    pub max_compression_ratio: u64,
    /// Below this much free space on the spool's file system the daemon stops receiving.
    pub min_free: crate::disk::MinFree,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_decompressed_bytes: crate::compression::DEFAULT_MAX_DECOMPRESSED_BYTES,
            max_compression_ratio: crate::compression::DEFAULT_MAX_RATIO,
            min_free: crate::disk::DEFAULT_MIN_FREE,
        }
    }
}

impl SpoolConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        SpoolConfig {
            dir: r.path("dir", &d.dir),
            max_line_bytes: r.uint("max_line_bytes", d.max_line_bytes, 1024, 1 << 30),
            max_decompressed_bytes: r.uint(
                "max_decompressed_bytes",
                d.max_decompressed_bytes,
                1 << 20,
                1 << 50,
            ),
            max_compression_ratio: r.uint(
                "max_compression_ratio",
                d.max_compression_ratio,
                2,
                100_000,
            ),
            min_free: read_min_free(r, d.min_free),
        }
    }

    /// The bounds on decompressing one object.
    pub fn decompression(&self) -> crate::compression::Limits {
        crate::compression::Limits {
            max_bytes: self.max_decompressed_bytes,
            max_ratio: self.max_compression_ratio,
        }
    }
}

/// `[dynamodb]`: how orders-csv writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DynamoDbConfig {
    pub write_concurrency: usize,
    pub write_max_attempts: u32,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        DynamoDbConfig {
            write_concurrency: DEFAULT_WRITE_CONCURRENCY,
            write_max_attempts: DEFAULT_WRITE_MAX_ATTEMPTS,
        }
    }
}

impl DynamoDbConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        DynamoDbConfig {
            write_concurrency: r.uint("write_concurrency", d.write_concurrency as u64, 1, 64)
                as usize,
            write_max_attempts: r.uint("write_max_attempts", d.write_max_attempts as u64, 1, 100)
                as u32,
        }
    }
}

/// `[ecs_agent]`: supervision of the Amazon ECS container agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EcsAgentConfig {
    pub enabled: bool,
    pub image: String,
    pub image_tarball: PathBuf,
    /// Where the tarball comes from when it is not on the host: `s3://bucket/key`, fetched into
    /// `image_tarball` (so that one configuration change, in Parameter Store, updates a fleet).
    pub image_url: Option<String>,
    /// The tarball's SHA-256 (hex): a tarball that does not match is refused, the running agent kept.
    pub image_sha256: Option<String>,
    /// How long an updated agent has to be healthy before it is rolled back to the previous image.
    #[serde(with = "humantime_serde_compat")]
    pub update_timeout: Duration,
    pub allow_pull: bool,
    pub container_name: String,
    pub introspection_url: String,
    pub stop_agent_on_exit: bool,
    pub task_iam_roles: bool,
    pub docker_socket: String,
    pub host_root: PathBuf,
    #[serde(with = "humantime_serde_compat")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub unhealthy_after: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub start_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub restart_backoff_min: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub restart_backoff_max: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub healthy_reset_after: Duration,
    /// How often ECS is asked whether the registered agent is connected (`DescribeContainerInstances`).
    #[serde(with = "humantime_serde_compat")]
    pub connectivity_interval: Duration,
    /// Reported disconnected this long while introspection answers: restart the agent.
    #[serde(with = "humantime_serde_compat")]
    pub disconnected_after: Duration,
    pub log_max_size: String,
    pub log_max_files: u64,
}

impl Default for EcsAgentConfig {
    fn default() -> Self {
        EcsAgentConfig {
            enabled: true,
            image: DEFAULT_ECS_IMAGE.to_string(),
            image_tarball: PathBuf::from(DEFAULT_ECS_TARBALL),
            image_url: None,
            image_sha256: None,
            update_timeout: Duration::from_secs(300),
            allow_pull: true,
            container_name: DEFAULT_ECS_CONTAINER.to_string(),
            introspection_url: DEFAULT_ECS_INTROSPECTION.to_string(),
            stop_agent_on_exit: false,
            task_iam_roles: true,
            docker_socket: DEFAULT_DOCKER_SOCKET.to_string(),
            host_root: PathBuf::from(DEFAULT_HOST_ROOT),
            health_interval: DEFAULT_HEALTH_INTERVAL,
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            connectivity_interval: Duration::from_secs(180),
            disconnected_after: Duration::from_secs(15 * 60),
            start_timeout: DEFAULT_START_TIMEOUT,
            restart_backoff_min: DEFAULT_RESTART_BACKOFF_MIN,
            restart_backoff_max: DEFAULT_RESTART_BACKOFF_MAX,
            healthy_reset_after: DEFAULT_HEALTHY_RESET_AFTER,
            log_max_size: DEFAULT_AGENT_LOG_MAX_SIZE.to_string(),
            log_max_files: DEFAULT_AGENT_LOG_MAX_FILES,
        }
    }
}

impl EcsAgentConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let ms = Duration::from_millis;
        let ecs = EcsAgentConfig {
            enabled: r.boolean("enabled", d.enabled),
            image: r.string("image", &d.image),
            image_tarball: r.path("image_tarball", &d.image_tarball),
            image_url: r.opt_string("image_url"),
            image_sha256: read_sha256(r, "image_sha256"),
            update_timeout: r.duration("update_timeout", d.update_timeout, ms(500), DAY),
            allow_pull: r.boolean("allow_pull", d.allow_pull),
            container_name: r.string("container_name", &d.container_name),
            introspection_url: r.string("introspection_url", &d.introspection_url),
            stop_agent_on_exit: r.boolean("stop_agent_on_exit", d.stop_agent_on_exit),
            task_iam_roles: r.boolean("task_iam_roles", d.task_iam_roles),
            docker_socket: r.string("docker_socket", &d.docker_socket),
            host_root: r.path("host_root", &d.host_root),
            health_interval: r.duration("health_interval", d.health_interval, ms(100), HOUR),
            unhealthy_after: r.duration("unhealthy_after", d.unhealthy_after, ms(500), DAY),
            start_timeout: r.duration("start_timeout", d.start_timeout, ms(500), DAY),
            connectivity_interval: r.duration(
                "connectivity_interval",
                d.connectivity_interval,
                ms(500),
                DAY,
            ),
            disconnected_after: r.duration(
                "disconnected_after",
                d.disconnected_after,
                ms(500),
                DAY,
            ),
            restart_backoff_min: r.duration(
                "restart_backoff_min",
                d.restart_backoff_min,
                ms(10),
                HOUR,
            ),
            restart_backoff_max: r.duration(
                "restart_backoff_max",
                d.restart_backoff_max,
                ms(10),
                HOUR,
            ),
            healthy_reset_after: r.duration(
                "healthy_reset_after",
                d.healthy_reset_after,
                ms(100),
                DAY,
            ),
            log_max_size: r.string("log_max_size", &d.log_max_size),
            log_max_files: r.uint("log_max_files", d.log_max_files, 1, 100),
        };
        if !ecs.introspection_url.starts_with("http://") {
            let msg = format!(
                "\"{}\" must be an http:// URL (the agent's introspection endpoint)",
                ecs.introspection_url
            );
            r.invalid("introspection_url", msg);
        }
        if let Some(url) = &ecs.image_url {
            if crate::event::parse_s3_url(url).is_none() {
                let msg =
                    format!("{url:?} must be an s3://bucket/key URL (the agent image's tarball)");
                r.invalid("image_url", msg);
            } else if ecs.image_sha256.is_none() {
                let msg = format!(
                    "{url} is fetched over the network, so its SHA-256 must be given too: set \
                     ecs_agent.image_sha256 to what `sha256sum` prints for the tarball"
                );
                r.invalid("image_url", msg);
            }
        }
        if ecs.container_name.is_empty() || ecs.image.is_empty() {
            r.problems.push(format!(
                "ecs_agent.container_name / ecs_agent.image (in {}): must not be empty",
                r.default_origin()
            ));
        }
        ecs
    }
}

/// `[host]`: where this host keeps what `register`, `deregister` and the credentials provider use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostConfig {
    /// The SSM agent's state directory (`registration`, `runtimeconfig/identity_config.json`).
    pub ssm_dir: PathBuf,
    /// The SSM agent's executable, run by `register`.
    pub ssm_agent: PathBuf,
    /// The SSM agent's systemd unit.
    pub ssm_service: String,
    /// Docker's systemd unit, started by `register` when installed but stopped; asked for its
    /// state by the supervisor when Docker does not answer (activating: no problem yet).
    pub docker_service: String,
    /// The `systemctl` command.
    pub systemctl: String,
    /// Where `register` records what it registered (for `deregister` when the agent is gone).
    pub state_dir: PathBuf,
    /// Where `register` writes systemd drop-ins (the SSM agent's and Docker's egress).
    pub systemd_dir: PathBuf,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            ssm_dir: PathBuf::from(DEFAULT_SSM_DIR),
            ssm_agent: PathBuf::from(DEFAULT_SSM_AGENT),
            ssm_service: DEFAULT_SSM_SERVICE.to_string(),
            docker_service: DEFAULT_DOCKER_SERVICE.to_string(),
            systemctl: DEFAULT_SYSTEMCTL.to_string(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            systemd_dir: PathBuf::from(DEFAULT_SYSTEMD_DIR),
        }
    }
}

impl HostConfig {
    /// `identity_config.json`, which names the rotating credentials file.
    pub fn identity_config(&self) -> PathBuf {
        self.ssm_dir.join(SSM_IDENTITY_CONFIG)
    }

    /// The CA bundle `register` writes for the SSM agent and the ECS agent (the system's roots and
    /// `network.ca_bundle`).
    pub fn ca_bundle(&self) -> PathBuf {
        self.state_dir.join("ca-bundle.pem")
    }

    /// The managed instance id and region the SSM agent registered with.
    pub fn ssm_registration(&self) -> PathBuf {
        self.ssm_dir.join("registration")
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        HostConfig {
            ssm_dir: r.path("ssm_dir", &d.ssm_dir),
            ssm_agent: r.path("ssm_agent", &d.ssm_agent),
            ssm_service: r.string("ssm_service", &d.ssm_service),
            docker_service: r.string("docker_service", &d.docker_service),
            systemctl: r.string("systemctl", &d.systemctl),
            state_dir: r.path("state_dir", &d.state_dir),
            systemd_dir: r.path("systemd_dir", &d.systemd_dir),
        }
    }
}

/// `[ssm]`: configuration from SSM Parameter Store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SsmConfig {
    /// Parameters under this path (recursive) map onto configuration keys.
    pub parameters_path: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub refresh_interval: Duration,
}

impl Default for SsmConfig {
    fn default() -> Self {
        SsmConfig {
            parameters_path: None,
            refresh_interval: DEFAULT_SSM_REFRESH,
        }
    }
}

impl SsmConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let ssm = SsmConfig {
            parameters_path: r.opt_string("parameters_path"),
            refresh_interval: r.duration(
                "refresh_interval",
                d.refresh_interval,
                Duration::from_secs(1),
                DAY,
            ),
        };
        if let Some(p) = &ssm.parameters_path {
            if !p.starts_with('/') || p.len() < 2 {
                let msg = format!(
                    "\"{p}\" must be a Parameter Store path such as \"/offload-agent/prod\""
                );
                r.invalid("parameters_path", msg);
            }
        }
        ssm
    }
}

/// `[watchdog]`: recovering the SSM agent when it stops refreshing the rotating credentials.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchdogConfig {
    /// Restart the SSM agent's unit (`host.ssm_service`, through `host.systemctl`) when it is stuck.
    pub ssm_agent: bool,
    /// Credentials retrieved longer ago than this are stale (expired ones are stale at once).
    #[serde(with = "humantime_serde_compat")]
    pub ssm_credentials_max_age: Duration,
    /// Stale for this long before a restart.
    #[serde(with = "humantime_serde_compat")]
    pub ssm_stale_grace: Duration,
    /// At most one restart per this interval.
    #[serde(with = "humantime_serde_compat")]
    pub ssm_restart_interval: Duration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            ssm_agent: true,
            ssm_credentials_max_age: crate::credentials::STALE_AFTER,
            ssm_stale_grace: Duration::from_secs(10 * 60),
            ssm_restart_interval: HOUR,
        }
    }
}

impl WatchdogConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        WatchdogConfig {
            ssm_agent: r.boolean("ssm_agent", d.ssm_agent),
            ssm_credentials_max_age: r.duration(
                "ssm_credentials_max_age",
                d.ssm_credentials_max_age,
                Duration::from_secs(60),
                DAY,
            ),
            ssm_stale_grace: r.duration(
                "ssm_stale_grace",
                d.ssm_stale_grace,
                Duration::from_secs(1),
                DAY,
            ),
            ssm_restart_interval: r.duration(
                "ssm_restart_interval",
                d.ssm_restart_interval,
                Duration::from_secs(60),
                7 * DAY,
            ),
        }
    }

    pub(crate) fn ssm_limits(&self) -> crate::watchdog::SsmLimits {
        crate::watchdog::SsmLimits {
            max_age: self.ssm_credentials_max_age,
            grace: self.ssm_stale_grace,
            interval: self.ssm_restart_interval,
        }
    }
}

/// `[admin]`: the local health, metrics and status endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: String,
    /// Allow a non-loopback `listen` (the endpoint has no authentication).
    pub allow_remote: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: DEFAULT_ADMIN_LISTEN.to_string(),
            allow_remote: false,
        }
    }
}

impl AdminConfig {
    /// The address to bind (validated at load).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.listen
            .parse()
            .unwrap_or_else(|_| DEFAULT_ADMIN_LISTEN.parse().expect("a valid default"))
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let admin = AdminConfig {
            enabled: r.boolean("enabled", d.enabled),
            listen: r.string("listen", &d.listen),
            allow_remote: r.boolean("allow_remote", d.allow_remote),
        };
        match admin.listen.parse::<std::net::SocketAddr>() {
            Err(_) => {
                let msg = format!(
                    "\"{}\" is not an address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\"",
                    admin.listen
                );
                r.invalid("listen", msg);
            }
            Ok(a) if admin.enabled && !a.ip().is_loopback() && !admin.allow_remote => {
                let msg = format!(
                    "{a} is not a loopback address; the endpoint has no authentication, so exposing it \
                     to the network needs admin.allow_remote = true as well"
                );
                r.invalid("listen", msg);
            }
            Ok(_) => {}
        }
        admin
    }
}
