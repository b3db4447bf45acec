//! Typed configuration: layering (file, `conf.d/*.toml`, environment), complete validation.
//!
//! The configuration is read once into a tree of `config::Value`s (which remember the file each value
//! came from), then walked by a `Reader` that records *every* problem it meets — unknown keys, missing
//! keys, wrong types, bad durations, pipelines that would feed themselves — so that the operator sees all
//! of them at once, each naming the key and the file. `config/agent.toml` documents every key.

mod pipeline;
mod reader;
mod schema;
mod sections;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Value, ValueKind};
use serde::Serialize;

pub use pipeline::*;
use reader::{origin_of, Reader};
pub use schema::*;
pub use sections::*;

/// Where the daemon looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/offload-agent/agent.toml";
/// Prefix of environment variables that override the files (`__` separates levels).
pub const ENV_PREFIX: &str = "OFFLOAD_AGENT";

/// The whole configuration; `Default` is every section's defaults and no pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
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
    pub watchdog: WatchdogConfig,
    pub network: NetworkConfig,
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<Pipeline>,
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
pub(crate) fn load_with(
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
    let config = from_tree(root, &path.display().to_string(), env)?;
    for (setting, source) in &config.network.sources {
        if let crate::egress::Source::Env(_) = source {
            origins.insert(format!("network.{setting}"), source.to_string());
        }
    }
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
    from_tree(root, name, &BTreeMap::new())
}

/// Read the merged tree; `env` fills the `[network]` keys it leaves unset.
fn from_tree(
    root: config::Map<String, Value>,
    origin: &str,
    env: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut top = Reader::new("", root, &mut problems, origin);
    let config = Config {
        agent: top.section("agent", AgentConfig::read),
        aws: top.section("aws", AwsConfig::read),
        queue: top.section("queue", QueueConfig::read),
        spool: top.section("spool", SpoolConfig::read),
        dynamodb: top.section("dynamodb", DynamoDbConfig::read),
        ecs_agent: top.section("ecs_agent", EcsAgentConfig::read),
        host: top.section("host", HostConfig::read),
        ssm: top.section("ssm", SsmConfig::read),
        admin: top.section("admin", AdminConfig::read),
        watchdog: top.section("watchdog", WatchdogConfig::read),
        network: top.section("network", |r| read_network(r, env)),
        pipelines: Vec::new(),
    };
    let pipeline_v = top.take("pipeline");
    top.finish();
    let pipelines = read_pipelines(pipeline_v, &mut problems, origin);
    if problems.is_empty() {
        Ok(Config {
            pipelines,
            ..config
        })
    } else {
        Err(ConfigError { problems })
    }
}

/// Serialize `Duration`s as humantime strings ("1m 30s") in `config check`.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// The same for an optional duration (with `skip_serializing_if = "Option::is_none"`).
    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every `key = value` line of `config/agent.toml` outside the pipelines, commented lines
    /// included, names a key that exists and shows its code default; a key without a default shows
    /// a value it accepts; and every key with a default has such a line.
    #[test]
    fn every_line_of_the_reference_file_shows_the_code_default() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml"))
                .unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let minimal = "[queue]\nname='q'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='t'\noutput_prefix='out/'\n";
        let same = |a: &toml::Value, b: &toml::Value| match (a.as_str(), b.as_str()) {
            (Some(x), Some(y)) => {
                match (humantime::parse_duration(x), humantime::parse_duration(y)) {
                    (Ok(dx), Ok(dy)) => dx == dy,
                    _ => x == y,
                }
            }
            _ => a == b,
        };
        let mut section = String::new();
        let mut shown = BTreeSet::new();
        let mut optional: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, String>,
        > = Default::default();
        for (n, line) in text.lines().enumerate() {
            let l = line.trim_start_matches('#').trim();
            if l.starts_with('[') && l.ends_with(']') {
                section = l.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            let Some((key, value)) = l.split_once(" = ") else {
                continue;
            };
            if section.starts_with("pipeline")
                || !key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            {
                continue;
            }
            let at = format!("config/agent.toml:{}: {section}.{key}", n + 1);
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .unwrap_or_else(|e| panic!("{at}: not a TOML value: {e}"))["v"]
                .clone();
            let default = section
                .split('.')
                .try_fold(&defaults, |t, part| t.get(part))
                .and_then(|t| t.get(key));
            match default {
                Some(d) => assert!(same(d, &value), "{at} shows {value}, the default is {d}"),
                None => {
                    // No default (an optional key): the value shown must be one the key accepts,
                    // with the optional keys shown before it in its section (a key that needs
                    // another, as image_url needs image_sha256, is shown after it).
                    let shown_here = optional.entry(section.clone()).or_default();
                    shown_here.insert(key.to_string(), value.to_string());
                    let lines: String = shown_here
                        .iter()
                        .map(|(k, v)| format!("{k} = {v}\n"))
                        .collect();
                    let snippet = format!("[{section}]\n{lines}");
                    let mut doc: toml::Table = toml::from_str(minimal).unwrap();
                    let extra: toml::Table = toml::from_str(&snippet).unwrap();
                    for (k, v) in extra {
                        match (doc.get_mut(&k), v) {
                            (Some(toml::Value::Table(t)), toml::Value::Table(add)) => t.extend(add),
                            (_, v) => {
                                doc.insert(k, v);
                            }
                        }
                    }
                    let doc_text = toml::to_string(&doc).unwrap();
                    from_toml_str(&doc_text, &at).unwrap_or_else(|e| panic!("{at}: {e}"));
                }
            }
            shown.insert(format!("{section}.{key}"));
        }
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match v {
                        toml::Value::Table(_) => keys(&key, v, out),
                        _ => out.push(key),
                    }
                }
            }
        }
        let mut with_default = Vec::new();
        keys("", &defaults, &mut with_default);
        for key in with_default.iter().filter(|k| !k.starts_with("pipeline")) {
            assert!(
                shown.contains(key),
                "config/agent.toml does not show {key} with its default"
            );
        }
        assert!(with_default.len() > 40, "{with_default:?}");
    }

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

    #[test]
    fn min_free_is_a_size_or_a_percentage() {
        let with = |v: &str| {
            GOOD.replace(
                "dir = \"/tmp/spool\"",
                &format!("dir = \"/tmp/spool\"\nmin_free = {v}"),
            )
        };
        let cfg = from_toml_str(&with("\"5%\""), "agent.toml").unwrap();
        assert_eq!(cfg.spool.min_free, crate::disk::MinFree::Percent(5.0));
        let cfg = from_toml_str(&with("1048576"), "agent.toml").unwrap();
        assert_eq!(cfg.spool.min_free, crate::disk::MinFree::Bytes(1 << 20));
        let err = from_toml_str(&with("\"lots\""), "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spool.min_free (in ") && err.contains("\"lots\" is no size"),
            "{err}"
        );
    }

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
    fn an_agent_tarball_from_s3_needs_a_url_and_its_digest() {
        let with = |ecs: &str| format!("{GOOD}\n[ecs_agent]\n{ecs}\n");
        let err = from_toml_str(&with("image_url = \"s3://fleet/agent.tar\""), "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s3://fleet/agent.tar is fetched over the network, so its SHA-256 must be given too"),
            "{err}"
        );
        let err = from_toml_str(&with("image_url = \"/var/cache/agent.tar\""), "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be an s3://bucket/key URL"), "{err}");
        let ok = with(&format!(
            "image_url = \"s3://fleet/agent.tar\"\nimage_sha256 = \"{}\"",
            "A".repeat(64)
        ));
        let cfg = from_toml_str(&ok, "agent.toml").unwrap();
        assert_eq!(
            cfg.ecs_agent.image_url.as_deref(),
            Some("s3://fleet/agent.tar")
        );
        assert_eq!(cfg.ecs_agent.image_sha256, Some("a".repeat(64)));
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
        // Not as root unless asked: the package's account, bounded memory, processes.
        assert_eq!(cmd.user, DEFAULT_COMMAND_USER);
        assert_eq!(cmd.memory_bytes(), 1 << 30);
        assert_eq!(cmd.cpu_time, None);
        assert_eq!(cmd.pids_limit, DEFAULT_PIDS_LIMIT);
        let limited = good.replace(
            "timeout = \"2m\" }",
            "timeout = \"2m\", user = \"nobody\", memory = \"64m\", cpu_time = \"30s\", pids_limit = 32 }",
        );
        let c2 = from_toml_str(&limited, "agent.toml").unwrap();
        let ProcessorKind::Command(cmd2) = &c2.pipelines[1].processor else {
            panic!()
        };
        assert_eq!(
            (
                cmd2.user.as_str(),
                cmd2.memory_bytes(),
                cmd2.cpu_time,
                cmd2.pids_limit
            ),
            ("nobody", 64 << 20, Some(Duration::from_secs(30)), 32)
        );
        let again = from_toml_str(&c2.to_toml(&Default::default()), "rendered").unwrap();
        assert_eq!(again.pipelines, c2.pipelines);
        let wrong = good.replace(
            "timeout = \"2m\" }",
            "timeout = \"2m\", user = \"a:b\", memory = \"1k\", cpu_time = \"soon\" }",
        );
        let err = from_toml_str(&wrong, "agent.toml").unwrap_err().to_string();
        for needle in [
            "pipeline[1].processor.command.user",
            "pipeline[1].processor.command.memory",
            "pipeline[1].processor.command.cpu_time",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
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
        assert!(
            err.contains("only orders-csv and table write to a table"),
            "{err}"
        );
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

    /// Every mistake in a declared schema is a configuration error naming the pipeline and the key,
    /// all of them at once.
    #[test]
    fn schema_mistakes_are_named_by_pipeline_and_key() {
        let text = r#"
[queue]
name = "q"
[[pipeline]]
name = "invoices"
bucket = "b"
prefix = "in/"
processor = "table"
table = "t"
output_prefix = "out/"
[pipeline.schema]
delimiter = ";;"
partition_key = "Customer"
sort_key = "Paid"
output_columns = ["Nope"]
[[pipeline.schema.attribute]]
name = "Amount"
type = "N"
[[pipeline.schema.attribute]]
name = "Amount"
type = "S"
[[pipeline.schema.attribute]]
name = "Issued"
type = "date"
formats = ["DD/MM/YY"]
[[pipeline.schema.attribute]]
name = "Paid"
type = "BOOL"
path = "a.b"
"#;
        let err = from_toml_str(text, "agent.toml").unwrap_err().to_string();
        for (key, msg) in [
            (
                "pipeline[0].schema.delimiter",
                "must be one ASCII character",
            ),
            (
                "pipeline[0].schema.attribute",
                "attribute \"Amount\" is declared twice",
            ),
            (
                "pipeline[0].schema.partition_key",
                "\"Customer\" is not a declared attribute",
            ),
            ("pipeline[0].schema.sort_key", "\"Paid\" is a BOOL"),
            (
                "pipeline[0].schema.attribute[2].formats",
                "\"YY\" in \"DD/MM/YY\" is no field",
            ),
            (
                "pipeline[0].schema.attribute[3].path",
                "a path addresses JSON lines",
            ),
            ("pipeline[0].schema.output_columns", "\"Nope\" is neither"),
        ] {
            let line = err
                .lines()
                .find(|l| l.contains(&format!("{key} (in ")) && l.contains(msg));
            assert!(
                line.is_some_and(|l| l.contains("agent.toml")),
                "{key}: {msg}:\n{err}"
            );
        }
        let missing = GOOD.replace("\"orders-csv\"", "\"table\"");
        let err = from_toml_str(&missing, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pipeline[0].schema (in agent.toml): missing;"),
            "{err}"
        );
        let orders = GOOD.replace("table = \"Order\"", "table = \"Order\"\ndecompress = false");
        let err = from_toml_str(&orders, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pipeline[0].decompress"), "{err}");
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
                "table",
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
