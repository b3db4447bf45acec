//! Typed configuration: layering (file, `conf.d/*.toml`, environment), complete validation.
//!
//! The configuration is read once into a tree of `config::Value`s (which remember the file each value
//! came from), then walked by a [`Reader`] that records *every* problem it meets — unknown keys, missing
//! keys, wrong types, bad durations, pipelines that would feed themselves — so that the operator sees all
//! of them at once, each naming the key and the file. `config/agent.toml` documents every key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Value, ValueKind};
use serde::Serialize;

/// Where the daemon looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/offload-agent/agent.toml";
/// Prefix of environment variables that override the files (`__` separates levels).
pub const ENV_PREFIX: &str = "OFFLOAD_AGENT";

pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/offload-agent/spool";
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_WRITE_CONCURRENCY: usize = 4;
pub const DEFAULT_WRITE_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_MAX_LINE_BYTES: u64 = 1024 * 1024;

/// SQS limits that configuration must respect.
const SQS_MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
const SQS_MAX_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub agent: AgentConfig,
    pub aws: AwsConfig,
    pub queue: QueueConfig,
    pub spool: SpoolConfig,
    pub dynamodb: DynamoDbConfig,
    pub ecs_agent: EcsAgentConfig,
    pub host: HostConfig,
    pub ssm: SsmConfig,
    pub admin: AdminConfig,
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<Pipeline>,
}

/// `[admin]`: the local health, metrics and status endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: String,
    /// Allow a non-loopback `listen` (the endpoint has no authentication).
    pub allow_remote: bool,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

impl AdminConfig {
    /// The address to bind (validated at load).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.listen
            .parse()
            .unwrap_or_else(|_| DEFAULT_ADMIN_LISTEN.parse().expect("a valid default"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    pub log_level: String,
}

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
}

impl AwsConfig {
    /// The endpoint for one service: its own override, else `endpoint_url`, else the SDK's default.
    pub fn endpoint_for(&self, service: &str) -> Option<&str> {
        self.endpoints.get(service).or(self.endpoint_url.as_deref())
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
    /// Docker's systemd unit, started by `register` when installed but stopped.
    pub docker_service: String,
    /// The `systemctl` command.
    pub systemctl: String,
    /// Where `register` records what it registered (for `deregister` when the agent is gone).
    pub state_dir: PathBuf,
}

pub const DEFAULT_SSM_DIR: &str = "/var/lib/amazon/ssm";
pub const DEFAULT_SSM_AGENT: &str = "/usr/bin/amazon-ssm-agent";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/offload-agent";

impl HostConfig {
    /// `identity_config.json`, which names the rotating credentials file.
    pub fn identity_config(&self) -> PathBuf {
        self.ssm_dir.join(crate::credentials::IDENTITY_CONFIG)
    }

    /// The managed instance id and region the SSM agent registered with.
    pub fn ssm_registration(&self) -> PathBuf {
        self.ssm_dir.join("registration")
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

pub const DEFAULT_SSM_REFRESH: Duration = Duration::from_secs(300);

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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_line_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DynamoDbConfig {
    pub write_concurrency: usize,
    pub write_max_attempts: u32,
}

/// `[ecs_agent]`: supervision of the Amazon ECS container agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EcsAgentConfig {
    pub enabled: bool,
    pub image: String,
    pub image_tarball: PathBuf,
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
    pub log_max_size: String,
    pub log_max_files: u64,
}

pub const DEFAULT_ECS_IMAGE: &str = "amazon/amazon-ecs-agent:latest";
pub const DEFAULT_ECS_TARBALL: &str = "/var/cache/ecs/ecs-agent.tar";
pub const DEFAULT_ECS_INTROSPECTION: &str = "http://127.0.0.1:51678/v1/metadata";

/// What a pipeline does with each file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ProcessorKind {
    /// The built-in loader: CSV orders into DynamoDB, an output and a rejects report back to S3.
    #[serde(rename = "orders-csv")]
    OrdersCsv,
    /// The user's container image, run once per file by this host's Docker engine.
    #[serde(rename = "container")]
    Container(ContainerSpec),
    /// The user's program, run once per file directly (no shell).
    #[serde(rename = "command")]
    Command(CommandSpec),
}

impl fmt::Display for ProcessorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessorKind::OrdersCsv => f.write_str("orders-csv"),
            ProcessorKind::Container(c) => write!(f, "container {}", c.image),
            ProcessorKind::Command(c) => write!(f, "command {}", c.program.display()),
        }
    }
}

/// Placeholders `args` may contain; replaced by the paths the processor sees.
pub const ARG_PLACEHOLDERS: [&str; 2] = ["{input}", "{output_dir}"];

pub const DEFAULT_PROCESSOR_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_CONTAINER_NETWORK: &str = "none";

/// `processor = { container = { ... } }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerSpec {
    pub image: String,
    /// Replaces the image's command (placeholders as for `command.args`); absent: the image's CMD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Memory limit, Docker style ("512m", "2g"); no swap beyond it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub network: String,
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub pull: bool,
    pub pids_limit: u64,
    pub permanent_exit_codes: Vec<i64>,
}

impl ContainerSpec {
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory.as_deref().and_then(parse_size)
    }
}

/// `processor = { command = { ... } }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub permanent_exit_codes: Vec<i64>,
}

/// "512m", "2g", "1048576", "64k" (binary units, as Docker reads them) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    pub name: String,
    pub bucket: String,
    pub prefix: String,
    pub suffix: String,
    pub processor: ProcessorKind,
    /// The DynamoDB table (orders-csv only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    pub output_bucket: Option<String>,
    pub output_prefix: String,
    /// Files of this pipeline processed at once (at most `queue.max_in_flight`); absent: no own limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
}

impl Pipeline {
    /// Whether an object belongs to this pipeline.
    pub fn matches(&self, bucket: &str, key: &str) -> bool {
        self.bucket == bucket && key.starts_with(&self.prefix) && key.ends_with(&self.suffix)
    }

    /// The bucket outputs and reports are written to.
    pub fn output_bucket(&self) -> &str {
        self.output_bucket.as_deref().unwrap_or(&self.bucket)
    }

    /// `output_prefix` + the key without the pipeline's input prefix.
    pub fn output_key(&self, key: &str) -> String {
        let rel = key.strip_prefix(self.prefix.as_str()).unwrap_or(key);
        format!("{}{}", self.output_prefix, rel)
    }

    /// Would an object written under `key` in `bucket` trigger this pipeline again?
    fn would_feed_itself(&self) -> bool {
        self.output_bucket() == self.bucket && self.output_prefix.starts_with(&self.prefix)
    }
}

impl Config {
    /// The first pipeline that matches, in configuration order.
    pub fn route(&self, bucket: &str, key: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.matches(bucket, key))
    }

    /// Every setting as a dotted key; the pipeline list is one key, `pipeline`.
    fn flatten(&self) -> BTreeMap<String, toml::Value> {
        fn walk(prefix: &str, v: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
            match v {
                toml::Value::Table(t) if prefix != "pipeline" => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other);
                }
            }
        }
        let mut out = BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(self) {
            walk("", v, &mut out);
        }
        out
    }

    /// What differs between this (running) configuration and `new`, key by key.
    pub fn changes(&self, new: &Config) -> Vec<Change> {
        let (a, b) = (self.flatten(), new.flatten());
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let show = |k: &str, v: Option<&toml::Value>| match v {
            None => "(unset)".to_string(),
            Some(toml::Value::Array(ps)) if k == "pipeline" => {
                let names: Vec<String> = ps
                    .iter()
                    .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(String::from))
                    .collect();
                format!("[{}]", names.join(", "))
            }
            Some(v) => v.to_string(),
        };
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| Change {
                key: k.clone(),
                old: show(k, a.get(k)),
                new: show(k, b.get(k)),
                live: is_live(k),
            })
            .collect()
    }

    /// The effective configuration as TOML, for `config check`. Values set from SecureString
    /// parameters (`secret_keys`) are redacted. AWS credentials never come from the configuration.
    pub fn to_toml(&self, secret_keys: &BTreeSet<String>) -> String {
        let mut v = match toml::Value::try_from(self) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render: {e}\n"),
        };
        for key in secret_keys {
            let mut cur = &mut v;
            let parts: Vec<&str> = key.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let Some(next) = cur.get_mut(*part) else {
                    break;
                };
                if i + 1 == parts.len() {
                    *next = toml::Value::String("<redacted: SecureString>".into());
                    break;
                }
                cur = next;
            }
        }
        toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// One setting that differs between the running configuration and a newly loaded one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
    /// Whether the running daemon applies it (else it takes effect after a restart).
    pub live: bool,
}

/// Settings a running daemon applies on reload; `ecs_agent.*` too, except those in
/// [`ECS_RESTART_KEYS`] (the supervisor re-reads its section whenever the configuration changes).
const LIVE_KEYS: &[&str] = &[
    "agent.log_level",
    "agent.shutdown_grace",
    "queue.max_in_flight",
    "ssm.refresh_interval",
    "pipeline",
];
const ECS_RESTART_KEYS: &[&str] = &[
    "ecs_agent.enabled",
    "ecs_agent.restart_backoff_min",
    "ecs_agent.restart_backoff_max",
];

fn is_live(key: &str) -> bool {
    LIVE_KEYS.contains(&key) || (key.starts_with("ecs_agent.") && !ECS_RESTART_KEYS.contains(&key))
}

/// Every problem found in the configuration. `Display` lists them one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(p: String) -> Self {
        ConfigError { problems: vec![p] }
    }
}

/// The files a configuration path expands to: the file itself, then `conf.d/*.toml` beside it in name
/// order.
pub fn layer_files(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    let dir = path.parent().unwrap_or(Path::new(".")).join("conf.d");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    files
}

/// Load and validate. `env` is the process environment (passed in so tests can control it); only
/// variables starting with `OFFLOAD_AGENT_` are used.
pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    load_with(path, None, env).map(|l| l.config)
}

/// A validated configuration and where each value that is not a default came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Dotted key (`queue.max_in_flight`, `pipeline`) -> its origin (a file, the environment, a
    /// parameter).
    pub origins: BTreeMap<String, String>,
}

/// Load with every layer: the file, `conf.d`, the Parameter Store layer (when given), the environment.
pub fn load_with(
    path: &Path,
    params: Option<&crate::params::ParameterLayer>,
    env: &BTreeMap<String, String>,
) -> Result<Loaded, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::one(format!(
            "configuration file {} does not exist: copy config/agent.toml there, or pass --config PATH",
            path.display()
        )));
    }
    let mut builder = config::Config::builder();
    for file in layer_files(path) {
        builder = builder.add_source(
            config::File::from(file.as_path())
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    if let Some(p) = params {
        builder = builder.add_source(p.clone());
    }
    let env_map: config::Map<String, String> = env
        .iter()
        // Only SECTION__KEY variables are configuration (OFFLOAD_AGENT_ACTIVATION_CODE is not).
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")) && k.contains("__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(env_map)),
    );
    let built = builder
        .build()
        .map_err(|e| ConfigError::one(format!("cannot read configuration: {e}")))?;
    let root = config::Source::collect(&built)
        .map_err(|e| ConfigError::one(format!("cannot read configuration: {e}")))?;
    let mut origins = BTreeMap::new();
    collect_origins("", &root, &path.display().to_string(), &mut origins);
    let config = from_tree(root, &path.display().to_string())?;
    Ok(Loaded { config, origins })
}

/// Walk the merged tree: every leaf (and the pipeline list as a whole) with the layer it came from.
fn collect_origins(
    prefix: &str,
    table: &config::Map<String, Value>,
    default_origin: &str,
    out: &mut BTreeMap<String, String>,
) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            ValueKind::Table(t) => collect_origins(&key, t, default_origin, out),
            _ => {
                out.insert(key, origin_of(v, default_origin));
            }
        }
    }
}

/// Parse a TOML string (tests, `process --dry-run` without a file).
pub fn from_toml_str(text: &str, name: &str) -> Result<Config, ConfigError> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map_err(|e| ConfigError::one(format!("cannot parse {name}: {e}")))?;
    let root = config::Source::collect(&built)
        .map_err(|e| ConfigError::one(format!("cannot parse {name}: {e}")))?;
    from_tree(root, name)
}

/// A table being read: tracks which keys were used and records problems.
struct Reader<'a> {
    path: String,
    table: config::Map<String, Value>,
    used: BTreeSet<String>,
    problems: &'a mut Vec<String>,
    default_origin: &'a str,
}

fn origin_of(v: &Value, default_origin: &str) -> String {
    match v.origin() {
        Some(o) => o.to_string(),
        None => format!("the environment or {default_origin}"),
    }
}

impl<'a> Reader<'a> {
    fn new(
        path: &str,
        table: config::Map<String, Value>,
        problems: &'a mut Vec<String>,
        default_origin: &'a str,
    ) -> Self {
        Reader {
            path: path.to_string(),
            table,
            used: BTreeSet::new(),
            problems,
            default_origin,
        }
    }

    fn key(&self, k: &str) -> String {
        if k.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{}", self.path, k)
        }
    }

    fn take(&mut self, k: &str) -> Option<Value> {
        self.used.insert(k.to_string());
        match self.table.get(k) {
            Some(v) if matches!(v.kind, ValueKind::Nil) => None,
            Some(v) => Some(v.clone()),
            None => None,
        }
    }

    fn problem(&mut self, k: &str, v: Option<&Value>, msg: impl fmt::Display) {
        let origin = match v {
            Some(v) => origin_of(v, self.default_origin),
            None => self.default_origin.to_string(),
        };
        let key = self.key(k);
        self.problems.push(format!("{key} (in {origin}): {msg}"));
    }

    fn opt_string(&mut self, k: &str) -> Option<String> {
        let v = self.take(k)?;
        match &v.kind {
            ValueKind::String(s) => Some(s.clone()),
            _ => {
                self.problem(k, Some(&v), "expected a string");
                None
            }
        }
    }

    fn string(&mut self, k: &str, default: &str) -> String {
        self.opt_string(k).unwrap_or_else(|| default.to_string())
    }

    fn required_string(&mut self, k: &str, what: &str) -> String {
        match self.opt_string(k) {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                let v = self.table.get(k).cloned();
                self.problem(k, v.as_ref(), format!("must not be empty ({what})"));
                String::new()
            }
            None => {
                if !self.table.contains_key(k) {
                    let key = self.key(k);
                    let origin = self.default_origin.to_string();
                    self.problems
                        .push(format!("{key} (in {origin}): missing; required ({what})"));
                }
                String::new()
            }
        }
    }

    fn boolean(&mut self, k: &str, default: bool) -> bool {
        let Some(v) = self.take(k) else {
            return default;
        };
        match v.clone().into_bool() {
            Ok(b) => b,
            Err(_) => {
                self.problem(k, Some(&v), "expected true or false");
                default
            }
        }
    }

    fn uint(&mut self, k: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(v) = self.take(k) else {
            return default;
        };
        match v.clone().into_int() {
            Ok(n) if n >= min as i64 && n <= max as i64 => n as u64,
            Ok(n) => {
                self.problem(
                    k,
                    Some(&v),
                    format!("{n} is out of range (allowed {min} to {max})"),
                );
                default
            }
            Err(_) => {
                self.problem(k, Some(&v), "expected a whole number");
                default
            }
        }
    }

    fn duration(&mut self, k: &str, default: Duration, min: Duration, max: Duration) -> Duration {
        let Some(v) = self.take(k) else {
            return default;
        };
        let text = match &v.kind {
            ValueKind::String(s) => s.clone(),
            _ => {
                self.problem(
                    k,
                    Some(&v),
                    "expected a duration string such as \"30s\" or \"5m\"",
                );
                return default;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d >= min && d <= max => d,
            Ok(_) => {
                self.problem(
                    k,
                    Some(&v),
                    format!(
                        "\"{text}\" is out of range (allowed {} to {})",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(e) => {
                self.problem(
                    k,
                    Some(&v),
                    format!(
                        "\"{text}\" is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""
                    ),
                );
                default
            }
        }
    }

    fn float(&mut self, k: &str, min: f64, max: f64) -> Option<f64> {
        let v = self.take(k)?;
        match v.clone().into_float() {
            Ok(n) if n >= min && n <= max => Some(n),
            Ok(n) => {
                self.problem(
                    k,
                    Some(&v),
                    format!("{n} is out of range (allowed {min} to {max})"),
                );
                None
            }
            Err(_) => {
                self.problem(k, Some(&v), "expected a number");
                None
            }
        }
    }

    fn string_list(&mut self, k: &str) -> Vec<String> {
        let Some(v) = self.take(k) else {
            return Vec::new();
        };
        let items = match v.clone().into_array() {
            Ok(items) => items,
            Err(_) => {
                self.problem(
                    k,
                    Some(&v),
                    "expected a list of strings, e.g. [\"--in\", \"{input}\"]",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.kind {
                ValueKind::String(s) => out.push(s.clone()),
                _ => {
                    self.problem(k, Some(&v), "every element must be a string");
                    return Vec::new();
                }
            }
        }
        out
    }

    fn int_list(&mut self, k: &str, min: i64, max: i64) -> Vec<i64> {
        let Some(v) = self.take(k) else {
            return Vec::new();
        };
        let Ok(items) = v.clone().into_array() else {
            self.problem(k, Some(&v), "expected a list of whole numbers, e.g. [2, 3]");
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.into_int() {
                Ok(n) if (min..=max).contains(&n) => out.push(n),
                _ => {
                    self.problem(
                        k,
                        Some(&v),
                        format!("every element must be a whole number from {min} to {max}"),
                    );
                    return Vec::new();
                }
            }
        }
        out
    }

    fn table(&mut self, k: &str) -> config::Map<String, Value> {
        let Some(v) = self.take(k) else {
            return config::Map::new();
        };
        match v.kind {
            ValueKind::Table(t) => t,
            _ => {
                let v2 = self.table.get(k).cloned();
                self.problem(k, v2.as_ref(), "expected a table");
                config::Map::new()
            }
        }
    }

    /// Report keys present in the table that nothing read.
    fn finish(self) {
        for (k, v) in &self.table {
            if !self.used.contains(k) {
                let key = self.key(k);
                let origin = origin_of(v, self.default_origin);
                self.problems.push(format!(
                    "{key} (in {origin}): unknown key; see config/agent.toml for the keys that exist"
                ));
            }
        }
    }
}

fn from_tree(root: config::Map<String, Value>, origin: &str) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut top = Reader::new("", root, &mut problems, origin);
    let agent_t = top.table("agent");
    let aws_t = top.table("aws");
    let queue_t = top.table("queue");
    let spool_t = top.table("spool");
    let ddb_t = top.table("dynamodb");
    let ecs_t = top.table("ecs_agent");
    let host_t = top.table("host");
    let ssm_t = top.table("ssm");
    let admin_t = top.table("admin");
    let pipeline_v = top.take("pipeline");
    top.finish();

    let mut r = Reader::new("agent", agent_t, &mut problems, origin);
    let agent = AgentConfig {
        shutdown_grace: r.duration(
            "shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
            Duration::ZERO,
            Duration::from_secs(3600),
        ),
        log_level: r.string("log_level", "info"),
    };
    r.finish();
    if tracing_subscriber::EnvFilter::try_new(&agent.log_level).is_err() {
        problems.push(format!(
            "agent.log_level (in {origin}): \"{}\" is not a level or filter (use error, warn, info, debug or trace)",
            agent.log_level
        ));
    }

    let mut r = Reader::new("aws", aws_t, &mut problems, origin);
    let aws = AwsConfig {
        region: r.opt_string("region"),
        endpoint_url: r.opt_string("endpoint_url"),
        profile: r.opt_string("profile"),
        call_timeout: r.duration(
            "call_timeout",
            DEFAULT_CALL_TIMEOUT,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
        connect_timeout: r.duration(
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
            Duration::from_millis(100),
            Duration::from_secs(300),
        ),
        credentials_file: r.opt_string("credentials_file").map(PathBuf::from),
        endpoints: Endpoints::default(),
    };
    let endpoints_t = r.table("endpoints");
    let mut e = Reader::new("aws.endpoints", endpoints_t, r.problems, origin);
    let endpoints = Endpoints {
        s3: e.opt_string("s3"),
        sqs: e.opt_string("sqs"),
        dynamodb: e.opt_string("dynamodb"),
        ssm: e.opt_string("ssm"),
        ecs: e.opt_string("ecs"),
    };
    for service in ENDPOINT_SERVICES {
        if let Some(url) = endpoints.get(service) {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                let v = e.table.get(service).cloned();
                e.problem(
                    service,
                    v.as_ref(),
                    format!("\"{url}\" must start with http:// or https://"),
                );
            }
        }
    }
    e.finish();
    let aws = AwsConfig { endpoints, ..aws };
    if let Some(url) = &aws.endpoint_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let v = r.table.get("endpoint_url").cloned();
            r.problem(
                "endpoint_url",
                v.as_ref(),
                format!("\"{url}\" must start with http:// or https://"),
            );
        }
    }
    r.finish();

    let mut r = Reader::new("queue", queue_t, &mut problems, origin);
    let queue = QueueConfig {
        name: r.opt_string("name"),
        url: r.opt_string("url"),
        dead_letter_queue: r.opt_string("dead_letter_queue"),
        max_in_flight: r.uint("max_in_flight", DEFAULT_MAX_IN_FLIGHT as u64, 1, 1024) as usize,
        visibility_timeout: r.duration(
            "visibility_timeout",
            DEFAULT_VISIBILITY_TIMEOUT,
            Duration::from_secs(5),
            SQS_MAX_VISIBILITY,
        ),
        wait_time: r.duration("wait_time", DEFAULT_WAIT_TIME, Duration::ZERO, SQS_MAX_WAIT),
        max_receive_count: r.uint(
            "max_receive_count",
            DEFAULT_MAX_RECEIVE_COUNT as u64,
            1,
            1000,
        ) as u32,
        retry_base: r.duration(
            "retry_base",
            DEFAULT_RETRY_BASE,
            Duration::from_secs(1),
            SQS_MAX_VISIBILITY,
        ),
        retry_max: r.duration(
            "retry_max",
            DEFAULT_RETRY_MAX,
            Duration::from_secs(1),
            SQS_MAX_VISIBILITY,
        ),
    };
    match (&queue.name, &queue.url) {
        (None, None) => r.problems.push(format!(
            "queue.name (in {origin}): missing; set queue.name (the queue's name) or queue.url"
        )),
        (Some(_), Some(_)) => r.problems.push(format!(
            "queue.url (in {origin}): set either queue.name or queue.url, not both"
        )),
        _ => {}
    }
    r.finish();

    let mut r = Reader::new("spool", spool_t, &mut problems, origin);
    let spool = SpoolConfig {
        dir: PathBuf::from(r.string("dir", DEFAULT_SPOOL_DIR)),
        max_line_bytes: r.uint(
            "max_line_bytes",
            DEFAULT_MAX_LINE_BYTES,
            1024,
            1024 * 1024 * 1024,
        ),
    };
    r.finish();

    let mut r = Reader::new("dynamodb", ddb_t, &mut problems, origin);
    let dynamodb = DynamoDbConfig {
        write_concurrency: r.uint("write_concurrency", DEFAULT_WRITE_CONCURRENCY as u64, 1, 64)
            as usize,
        write_max_attempts: r.uint(
            "write_max_attempts",
            DEFAULT_WRITE_MAX_ATTEMPTS as u64,
            1,
            100,
        ) as u32,
    };
    r.finish();

    let mut r = Reader::new("ecs_agent", ecs_t, &mut problems, origin);
    let ecs_agent = EcsAgentConfig {
        enabled: r.boolean("enabled", true),
        image: r.string("image", DEFAULT_ECS_IMAGE),
        image_tarball: PathBuf::from(r.string("image_tarball", DEFAULT_ECS_TARBALL)),
        allow_pull: r.boolean("allow_pull", true),
        container_name: r.string("container_name", "ecs-agent"),
        introspection_url: r.string("introspection_url", DEFAULT_ECS_INTROSPECTION),
        stop_agent_on_exit: r.boolean("stop_agent_on_exit", false),
        task_iam_roles: r.boolean("task_iam_roles", true),
        docker_socket: r.string("docker_socket", "/var/run/docker.sock"),
        host_root: PathBuf::from(r.string("host_root", "/")),
        health_interval: r.duration(
            "health_interval",
            Duration::from_secs(10),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
        unhealthy_after: r.duration(
            "unhealthy_after",
            Duration::from_secs(90),
            Duration::from_millis(500),
            Duration::from_secs(86_400),
        ),
        start_timeout: r.duration(
            "start_timeout",
            Duration::from_secs(300),
            Duration::from_millis(500),
            Duration::from_secs(86_400),
        ),
        restart_backoff_min: r.duration(
            "restart_backoff_min",
            Duration::from_secs(1),
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        restart_backoff_max: r.duration(
            "restart_backoff_max",
            Duration::from_secs(60),
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        healthy_reset_after: r.duration(
            "healthy_reset_after",
            Duration::from_secs(300),
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        ),
        log_max_size: r.string("log_max_size", "16m"),
        log_max_files: r.uint("log_max_files", 4, 1, 100),
    };
    if !ecs_agent.introspection_url.starts_with("http://") {
        let v = r.table.get("introspection_url").cloned();
        let msg = format!(
            "\"{}\" must be an http:// URL (the agent's introspection endpoint)",
            ecs_agent.introspection_url
        );
        r.problem("introspection_url", v.as_ref(), msg);
    }
    if ecs_agent.container_name.is_empty() || ecs_agent.image.is_empty() {
        r.problems.push(format!(
            "ecs_agent.container_name / ecs_agent.image (in {origin}): must not be empty"
        ));
    }
    r.finish();

    let mut r = Reader::new("host", host_t, &mut problems, origin);
    let host = HostConfig {
        ssm_dir: PathBuf::from(r.string("ssm_dir", DEFAULT_SSM_DIR)),
        ssm_agent: PathBuf::from(r.string("ssm_agent", DEFAULT_SSM_AGENT)),
        ssm_service: r.string("ssm_service", "amazon-ssm-agent"),
        docker_service: r.string("docker_service", "docker"),
        systemctl: r.string("systemctl", "systemctl"),
        state_dir: PathBuf::from(r.string("state_dir", DEFAULT_STATE_DIR)),
    };
    r.finish();

    let mut r = Reader::new("admin", admin_t, &mut problems, origin);
    let admin = AdminConfig {
        enabled: r.boolean("enabled", true),
        listen: r.string("listen", DEFAULT_ADMIN_LISTEN),
        allow_remote: r.boolean("allow_remote", false),
    };
    match admin.listen.parse::<std::net::SocketAddr>() {
        Err(_) => {
            let v = r.table.get("listen").cloned();
            let msg = format!(
                "\"{}\" is not an address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\"",
                admin.listen
            );
            r.problem("listen", v.as_ref(), msg);
        }
        Ok(a) if admin.enabled && !a.ip().is_loopback() && !admin.allow_remote => {
            let v = r.table.get("listen").cloned();
            let msg = format!(
                "{a} is not a loopback address; the endpoint has no authentication, so exposing it \
                 to the network needs admin.allow_remote = true as well"
            );
            r.problem("listen", v.as_ref(), msg);
        }
        Ok(_) => {}
    }
    r.finish();

    let mut r = Reader::new("ssm", ssm_t, &mut problems, origin);
    let ssm = SsmConfig {
        parameters_path: r.opt_string("parameters_path"),
        refresh_interval: r.duration(
            "refresh_interval",
            DEFAULT_SSM_REFRESH,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        ),
    };
    if let Some(p) = &ssm.parameters_path {
        if !p.starts_with('/') || p.len() < 2 {
            let v = r.table.get("parameters_path").cloned();
            r.problem(
                "parameters_path",
                v.as_ref(),
                format!("\"{p}\" must be a Parameter Store path such as \"/offload-agent/prod\""),
            );
        }
    }
    r.finish();

    let mut pipelines = Vec::new();
    match pipeline_v.map(|v| (v.clone(), v.kind)) {
        None => problems.push(format!(
            "pipeline (in {origin}): missing; at least one [[pipeline]] is required"
        )),
        Some((_, ValueKind::Array(items))) => {
            if items.is_empty() {
                problems.push(format!(
                    "pipeline (in {origin}): empty; at least one [[pipeline]] is required"
                ));
            }
            for (i, item) in items.into_iter().enumerate() {
                let item_origin = origin_of(&item, origin);
                let t = match item.kind {
                    ValueKind::Table(t) => t,
                    _ => {
                        problems.push(format!(
                            "pipeline[{i}] (in {item_origin}): expected a table ([[pipeline]])"
                        ));
                        continue;
                    }
                };
                if let Some(p) = read_pipeline(i, t, &mut problems, origin) {
                    pipelines.push(p);
                }
            }
        }
        Some((v, _)) => problems.push(format!(
            "pipeline (in {}): expected an array of tables ([[pipeline]])",
            origin_of(&v, origin)
        )),
    }
    let mut names = BTreeSet::new();
    for p in &pipelines {
        if !names.insert(p.name.clone()) {
            problems.push(format!(
                "pipeline \"{}\" (in {origin}): the name is used twice; pipeline names must be unique",
                p.name
            ));
        }
    }

    if problems.is_empty() {
        Ok(Config {
            agent,
            aws,
            queue,
            spool,
            dynamodb,
            ecs_agent,
            host,
            ssm,
            admin,
            pipelines,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn read_pipeline(
    i: usize,
    t: config::Map<String, Value>,
    problems: &mut Vec<String>,
    origin: &str,
) -> Option<Pipeline> {
    let mut r = Reader::new(&format!("pipeline[{i}]"), t, problems, origin);
    let name = r.required_string("name", "a short name used in logs");
    let bucket = r.required_string("bucket", "the S3 bucket whose events this pipeline takes");
    let prefix = r.string("prefix", "");
    let suffix = r.string("suffix", "");
    let processor_v = r.take("processor");
    let processor = match processor_v.as_ref().map(|v| &v.kind) {
        Some(ValueKind::String(s)) if s == "orders-csv" => Some(ProcessorKind::OrdersCsv),
        Some(ValueKind::String(s)) => {
            let msg = format!(
                "unknown processor \"{s}\"; write \"orders-csv\", {{ container = {{ image = \"...\" }} }} \
                 or {{ command = {{ program = \"/path\" }} }}"
            );
            r.problem("processor", processor_v.as_ref(), msg);
            None
        }
        Some(ValueKind::Table(t)) => read_processor(
            &format!("pipeline[{i}].processor"),
            t.clone(),
            r.problems,
            origin,
        ),
        Some(_) => {
            r.problem(
                "processor",
                processor_v.as_ref(),
                "expected \"orders-csv\" or a table ({ container = {...} } or { command = {...} })",
            );
            None
        }
        None => {
            r.problem(
                "processor",
                None,
                "missing; required (\"orders-csv\", { container = {...} } or { command = {...} })",
            );
            None
        }
    };
    let table = r.opt_string("table");
    let output_bucket = r.opt_string("output_bucket");
    let output_prefix = r.required_string(
        "output_prefix",
        "where outputs, rejects and error reports are written",
    );
    let max_in_flight = r
        .take("max_in_flight")
        .is_some()
        .then(|| r.uint("max_in_flight", 1, 1, 1024) as usize);
    match (&processor, &table) {
        (Some(ProcessorKind::OrdersCsv), None) => r.problem(
            "table",
            None,
            "missing; required by orders-csv (the DynamoDB table orders are written to)",
        ),
        (Some(ProcessorKind::OrdersCsv), Some(t)) if t.is_empty() => {
            let v = r.table.get("table").cloned();
            r.problem("table", v.as_ref(), "must not be empty")
        }
        (Some(ProcessorKind::Container(_) | ProcessorKind::Command(_)), Some(_)) => {
            let v = r.table.get("table").cloned();
            r.problem(
                "table",
                v.as_ref(),
                "only orders-csv writes to a table; remove it (container and command processors write files)",
            )
        }
        _ => {}
    }
    let p = Pipeline {
        name,
        bucket,
        prefix,
        suffix,
        processor: processor.clone().unwrap_or(ProcessorKind::OrdersCsv),
        table,
        output_bucket,
        output_prefix,
        max_in_flight,
    };
    if !p.output_prefix.is_empty() && p.would_feed_itself() {
        let v = r.table.get("output_prefix").cloned();
        let msg = format!(
            "\"{}\" lies under the pipeline's own input prefix \"{}\" in bucket {}: every output would \
             trigger the pipeline again (an endless loop); choose an output_prefix outside the input prefix",
            p.output_prefix, p.prefix, p.bucket
        );
        r.problem("output_prefix", v.as_ref(), msg);
    }
    r.finish();
    processor.map(|_| p)
}

/// `{ container = { ... } }` or `{ command = { ... } }`.
fn read_processor(
    path: &str,
    t: config::Map<String, Value>,
    problems: &mut Vec<String>,
    origin: &str,
) -> Option<ProcessorKind> {
    let mut outer = Reader::new(path, t, problems, origin);
    let kinds: Vec<String> = outer.table.keys().cloned().collect();
    if kinds.len() != 1 {
        outer.problem(
            "",
            None,
            format!(
                "expected exactly one of container or command, found {}",
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                }
            ),
        );
        return None;
    }
    let kind = kinds[0].clone();
    let body = outer.table(&kind);
    outer.finish();
    let sub = format!("{path}.{kind}");
    let before = problems.len();
    let mut r = Reader::new(&sub, body, problems, origin);
    let timeout = r.duration(
        "timeout",
        DEFAULT_PROCESSOR_TIMEOUT,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
    );
    let permanent_exit_codes = r.int_list("permanent_exit_codes", 1, 255);
    let kind = match kind.as_str() {
        "container" => {
            let image = r.required_string("image", "the image to run, e.g. \"acme/resize:1.4\"");
            let args = r.take("args").is_some().then(|| r.string_list("args"));
            let memory = r.opt_string("memory");
            if let Some(m) = &memory {
                if parse_size(m).map_or(true, |b| b < 6 << 20) {
                    let v = r.table.get("memory").cloned();
                    r.problem(
                        "memory",
                        v.as_ref(),
                        format!("\"{m}\" is not a memory size of at least 6m; write e.g. \"512m\" or \"2g\""),
                    );
                }
            }
            let cpus = r.float("cpus", 0.01, 1024.0);
            let network = r.string("network", DEFAULT_CONTAINER_NETWORK);
            let read_only = r.boolean("read_only", false);
            let pull = r.boolean("pull", false);
            let pids_limit = r.uint("pids_limit", 1024, 16, 1 << 22);
            let user = r.opt_string("user");
            ProcessorKind::Container(ContainerSpec {
                image,
                args,
                memory,
                cpus,
                timeout,
                network,
                read_only,
                user,
                pull,
                pids_limit,
                permanent_exit_codes,
            })
        }
        "command" => {
            let program = PathBuf::from(r.required_string(
                "program",
                "the absolute path of the program to run for each file",
            ));
            if !program.as_os_str().is_empty() && !program.is_absolute() {
                let v = r.table.get("program").cloned();
                r.problem(
                    "program",
                    v.as_ref(),
                    format!(
                        "\"{}\" must be an absolute path (no shell or PATH lookup is used)",
                        program.display()
                    ),
                );
            }
            let args = r.string_list("args");
            ProcessorKind::Command(CommandSpec {
                program,
                args,
                timeout,
                permanent_exit_codes,
            })
        }
        other => {
            r.problem(
                "",
                None,
                format!("unknown processor kind \"{other}\"; expected container or command"),
            );
            return None;
        }
    };
    let args: &[String] = match &kind {
        ProcessorKind::Container(c) => c.args.as_deref().unwrap_or(&[]),
        ProcessorKind::Command(c) => &c.args,
        ProcessorKind::OrdersCsv => &[],
    };
    for a in args {
        let mut rest = a.as_str();
        while let Some(open) = rest.find('{') {
            let tail = &rest[open..];
            let close = tail.find('}').map(|c| c + 1).unwrap_or(tail.len());
            let word = &tail[..close];
            if !ARG_PLACEHOLDERS.contains(&word) {
                let v = r.table.get("args").cloned();
                r.problem(
                    "args",
                    v.as_ref(),
                    format!("unknown placeholder {word:?} in {a:?}; the placeholders are {{input}} and {{output_dir}}"),
                );
            }
            rest = &tail[close..];
        }
    }
    r.finish();
    (problems.len() == before).then_some(kind)
}

/// Serialize `Duration`s as humantime strings ("1m 30s") in `config check`.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:4566"

[queue]
name = "offload-events"
dead_letter_queue = "offload-events-dlq"
max_in_flight = 8
visibility_timeout = "60s"
wait_time = "20s"

[spool]
dir = "/tmp/spool"

[[pipeline]]
name = "orders"
bucket = "offload-file-drop"
prefix = "input/"
suffix = ".csv"
processor = "orders-csv"
table = "Order"
output_prefix = "output/"
"#;

    /// Every value `config/agent.toml` sets is the code's default: the reference file cannot drift.
    #[test]
    fn the_reference_file_documents_the_code_defaults() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml"));
        let documented = load(path, &BTreeMap::new()).unwrap();
        // Only what has no default (or where the reference shows an example value) is set here.
        let minimal = from_toml_str(
            r#"
[aws]
region = "us-east-1"
[queue]
name = "offload-events"
dead_letter_queue = "offload-events-dlq"
[[pipeline]]
name = "orders"
bucket = "offload-file-drop"
prefix = "input/"
suffix = ".csv"
processor = "orders-csv"
table = "Order"
output_prefix = "output/"
"#,
            "minimal.toml",
        )
        .unwrap();
        assert_eq!(minimal.changes(&documented), Vec::<Change>::new());
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let c = from_toml_str(GOOD, "test.toml").unwrap();
        assert_eq!(c.queue.max_in_flight, 8);
        assert_eq!(c.queue.visibility_timeout, Duration::from_secs(60));
        assert_eq!(c.agent.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(c.pipelines.len(), 1);
        assert_eq!(c.pipelines[0].output_key("input/a/b.csv"), "output/a/b.csv");
        assert_eq!(
            c.route("offload-file-drop", "input/x.csv").unwrap().name,
            "orders"
        );
        assert!(c.route("offload-file-drop", "input/x.txt").is_none());
        assert!(c.route("other", "input/x.csv").is_none());
        assert!(c.route("offload-file-drop", "output/x.csv").is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_key_and_file() {
        let bad = GOOD
            .replace(
                "wait_time = \"20s\"",
                "wait_time = \"soon\"\ncolour = \"blue\"",
            )
            .replace(
                "visibility_timeout = \"60s\"",
                "visibility_timeout = \"24h\"",
            )
            .replace(
                "output_prefix = \"output/\"",
                "output_prefix = \"input/out/\"",
            )
            .replace("table = \"Order\"\n", "");
        let err = from_toml_str(&bad, "agent.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("queue.wait_time"), "{text}");
        assert!(text.contains("\"soon\" is not a duration"), "{text}");
        assert!(text.contains("queue.colour"), "{text}");
        assert!(text.contains("unknown key"), "{text}");
        assert!(text.contains("queue.visibility_timeout"), "{text}");
        assert!(text.contains("pipeline[0].table"), "{text}");
        assert!(text.contains("endless loop"), "{text}");
        assert_eq!(err.problems.len(), 5, "{text}");
    }

    #[test]
    fn an_empty_input_prefix_loops_unless_outputs_go_elsewhere() {
        let looped = GOOD.replace("prefix = \"input/\"\n", "");
        let err = from_toml_str(&looped, "agent.toml").unwrap_err();
        assert!(err.to_string().contains("endless loop"));
        let elsewhere = looped.replace(
            "output_prefix = \"output/\"",
            "output_prefix = \"output/\"\noutput_bucket = \"results\"",
        );
        from_toml_str(&elsewhere, "agent.toml").unwrap();
    }

    #[test]
    fn queue_name_or_url_is_required_and_unknown_processors_are_named() {
        let bad = GOOD
            .replace("name = \"offload-events\"\n", "")
            .replace("\"orders-csv\"", "\"magic\"");
        let err = from_toml_str(&bad, "agent.toml").unwrap_err().to_string();
        assert!(err.contains("queue.name"), "{err}");
        assert!(err.contains("unknown processor \"magic\""), "{err}");
    }

    #[test]
    fn container_and_command_processors_are_read_and_checked() {
        let base = "[aws]\nregion = \"us-east-1\"\n[queue]\nname = \"q\"\n";
        let good = format!(
            r#"{base}
[[pipeline]]
name = "thumbnails"
bucket = "drop"
prefix = "images/"
processor = {{ container = {{ image = "acme/resize:1.4", memory = "512m", cpus = 0.5, timeout = "10m", permanent_exit_codes = [2, 3] }} }}
output_prefix = "thumbnails/"
max_in_flight = 2

[[pipeline]]
name = "checksums"
bucket = "drop"
prefix = "raw/"
processor = {{ command = {{ program = "/usr/local/bin/checksum", args = ["--in", "{{input}}", "--out", "{{output_dir}}"], timeout = "2m" }} }}
output_prefix = "checksums/"
"#
        );
        let c = from_toml_str(&good, "agent.toml").unwrap();
        let ProcessorKind::Container(spec) = &c.pipelines[0].processor else {
            panic!("{:?}", c.pipelines[0].processor)
        };
        assert_eq!(spec.memory_bytes(), Some(512 << 20));
        assert_eq!(spec.cpus, Some(0.5));
        assert_eq!(spec.network, "none");
        assert_eq!(spec.permanent_exit_codes, [2, 3]);
        assert_eq!(c.pipelines[0].max_in_flight, Some(2));
        assert_eq!(c.pipelines[0].table, None);
        let ProcessorKind::Command(cmd) = &c.pipelines[1].processor else {
            panic!()
        };
        assert_eq!(cmd.timeout, Duration::from_secs(120));
        assert_eq!(cmd.args[1], "{input}");
        // `config check` renders it back to TOML that reads the same.
        let again = from_toml_str(&c.to_toml(&Default::default()), "rendered").unwrap();
        assert_eq!(again.pipelines, c.pipelines);

        let bad = good
            .replace("memory = \"512m\"", "memory = \"lots\"")
            .replace("\"/usr/local/bin/checksum\"", "\"checksum\"")
            .replace("{output_dir}", "{outdir}")
            .replace("cpus = 0.5", "cpus = 0.5, shell = true");
        let err = from_toml_str(&bad, "agent.toml").unwrap_err().to_string();
        for needle in [
            "pipeline[0].processor.container.memory",
            "pipeline[0].processor.container.shell (in ",
            "pipeline[1].processor.command.program",
            "unknown placeholder \"{outdir}\"",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let table = good.replace("max_in_flight = 2", "max_in_flight = 2\ntable = \"t\"");
        let err = from_toml_str(&table, "agent.toml").unwrap_err().to_string();
        assert!(err.contains("only orders-csv writes to a table"), "{err}");
        let two = good.replace(
            "{ container = {",
            "{ command = { program = \"/x\" }, container = {",
        );
        let err = from_toml_str(&two, "agent.toml").unwrap_err().to_string();
        assert!(
            err.contains("expected exactly one of container or command"),
            "{err}"
        );
        let no_table = GOOD.replace("table = \"Order\"\n", "");
        let err = from_toml_str(&no_table, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing; required by orders-csv"), "{err}");
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1.5g"), None);
    }

    #[test]
    fn the_reference_files_processor_examples_parse_uncommented() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml"))
                .unwrap();
        let at = text
            .find("## Examples: your own processors")
            .expect("examples block");
        let examples: String = text[at..]
            .lines()
            .filter_map(|l| l.strip_prefix("# ").or_else(|| (l == "#").then_some("")))
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = from_toml_str(&format!("{text}\n{examples}"), "agent.toml").unwrap();
        let kinds: Vec<String> = c
            .pipelines
            .iter()
            .map(|p| p.processor.to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "orders-csv",
                "container acme/resize:1.4",
                "command /usr/local/bin/checksum"
            ]
        );
    }

    #[test]
    fn files_and_environment_layer_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("agent.toml");
        std::fs::write(&main, GOOD).unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-local.toml"),
            "[queue]\nmax_in_flight = 3\nbogus = 1\n",
        )
        .unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            "OFFLOAD_AGENT_AWS__ENDPOINT_URL".to_string(),
            "http://127.0.0.1:9999".to_string(),
        );
        let err = load(&main, &env).unwrap_err().to_string();
        assert!(err.contains("queue.bogus"), "{err}");
        assert!(err.contains("10-local.toml"), "{err}");
        std::fs::write(
            dir.path().join("conf.d/10-local.toml"),
            "[queue]\nmax_in_flight = 3\n",
        )
        .unwrap();
        let c = load(&main, &env).unwrap();
        assert_eq!(c.queue.max_in_flight, 3);
        assert_eq!(c.aws.endpoint_url.as_deref(), Some("http://127.0.0.1:9999"));
        let missing = load(&dir.path().join("nope.toml"), &env).unwrap_err();
        assert!(missing.to_string().contains("does not exist"));
    }
}
