//! `[[pipeline]]`: which objects a pipeline takes, what processes them (orders-csv, a container, a
//! command) and where its outputs go; read and checked one pipeline at a time.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use config::{Value, ValueKind};
use serde::Serialize;

use super::humantime_serde_compat;
use super::reader::Reader;
use super::schema::{read_schema, Schema};

/// What a pipeline does with each file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ProcessorKind {
    /// The built-in loader: CSV orders into DynamoDB, an output and a rejects report back to S3.
    #[serde(rename = "orders-csv")]
    OrdersCsv,
    /// Rows of a declared schema (`[pipeline.schema]`) into DynamoDB: the built-in loader for the
    /// pipeline's own files.
    #[serde(rename = "table")]
    Table(Box<Schema>),
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
            ProcessorKind::Table(_) => f.write_str("table"),
            ProcessorKind::Container(c) => write!(f, "container {}", c.image),
            ProcessorKind::Command(c) => write!(f, "command {}", c.program.display()),
        }
    }
}

impl ProcessorKind {
    /// The schema of a processor that loads rows into a table (orders-csv's built-in one, or the
    /// pipeline's declared one).
    pub fn schema(&self) -> Option<std::borrow::Cow<'_, Schema>> {
        match self {
            ProcessorKind::OrdersCsv => Some(std::borrow::Cow::Owned(Schema::orders())),
            ProcessorKind::Table(s) => Some(std::borrow::Cow::Borrowed(s)),
            _ => None,
        }
    }

    /// Whether this processor writes rows to a DynamoDB table.
    pub fn writes_table(&self) -> bool {
        matches!(self, ProcessorKind::OrdersCsv | ProcessorKind::Table(_))
    }
}

/// Placeholders `args` may contain; replaced by the paths the processor sees.
pub const ARG_PLACEHOLDERS: [&str; 2] = ["{input}", "{output_dir}"];

pub const DEFAULT_PROCESSOR_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_CONTAINER_NETWORK: &str = "none";
pub const DEFAULT_PIDS_LIMIT: u64 = 1024;
/// The account a command processor runs as unless its pipeline names another (the package creates it).
pub const DEFAULT_COMMAND_USER: &str = "offload-proc";
/// A command processor's memory limit unless its pipeline sets one.
pub const DEFAULT_COMMAND_MEMORY: &str = "1g";
/// The smallest memory limit a command may have (a shell and a small program).
const MIN_COMMAND_MEMORY: u64 = 4 << 20;
/// The smallest memory limit Docker accepts.
const MIN_CONTAINER_MEMORY: u64 = 6 << 20;

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
    /// The account the program runs as (a name or a uid; its primary group with it). "root" is
    /// allowed, and is the old behaviour.
    pub user: String,
    /// The memory limit of the program's process group ("512m", "2g").
    pub memory: String,
    /// CPU seconds each of its processes may use (RLIMIT_CPU); absent: the timeout bounds it.
    #[serde(
        with = "humantime_serde_compat::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_time: Option<Duration>,
    /// Processes and threads of its user at once (RLIMIT_NPROC; not enforced for root).
    pub pids_limit: u64,
}

impl CommandSpec {
    pub fn memory_bytes(&self) -> u64 {
        parse_size(&self.memory).unwrap_or(u64::MAX)
    }
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
    /// Whether gzip and zstd objects are decompressed before the processor sees them (the table
    /// processors always read decompressed text).
    pub decompress: bool,
    /// The DynamoDB table (orders-csv and table only).
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
    pub(super) fn would_feed_itself(&self) -> bool {
        self.output_bucket() == self.bucket && self.output_prefix.starts_with(&self.prefix)
    }
}

pub(super) fn read_pipeline(
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
    let mut processor = read_processor_value(&mut r, i, origin);
    let schema_v = r.take("schema");
    match (&processor, schema_v) {
        (Some(ProcessorKind::Table(_)), Some(v)) => match v.kind {
            ValueKind::Table(t) => {
                let path = format!("pipeline[{i}].schema");
                let shown = if name.is_empty() {
                    format!("pipeline[{i}]")
                } else {
                    name.clone()
                };
                processor = read_schema(&path, t, r.problems, origin, &shown)
                    .map(|s| ProcessorKind::Table(Box::new(s)));
            }
            _ => {
                r.invalid("schema", "expected a table ([pipeline.schema])");
                processor = None;
            }
        },
        (Some(ProcessorKind::Table(_)), None) => {
            r.problem(
                "schema",
                None,
                "missing; processor = \"table\" reads files of a declared [pipeline.schema] (format, attributes, partition_key)",
            );
            processor = None;
        }
        (Some(_), Some(_)) => {
            r.invalid(
                "schema",
                "only processor = \"table\" reads a declared schema (orders-csv has its own); remove it",
            );
        }
        _ => {}
    }
    let decompress_v = r.take("decompress").is_some();
    let decompress = r.boolean("decompress", true);
    if decompress_v && !decompress && processor.as_ref().is_some_and(ProcessorKind::writes_table) {
        r.invalid(
            "decompress",
            "orders-csv and table read text: compressed objects are always decompressed for them; remove it",
        );
    }
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
    check_table(&mut r, processor.as_ref(), table.as_deref());
    let p = Pipeline {
        name,
        bucket,
        prefix,
        suffix,
        processor: processor.clone().unwrap_or(ProcessorKind::OrdersCsv),
        decompress,
        table,
        output_bucket,
        output_prefix,
        max_in_flight,
    };
    if !p.output_prefix.is_empty() && p.would_feed_itself() {
        let msg = format!(
            "\"{}\" lies under the pipeline's own input prefix \"{}\" in bucket {}: every output would \
             trigger the pipeline again (an endless loop); choose an output_prefix outside the input prefix",
            p.output_prefix, p.prefix, p.bucket
        );
        r.invalid("output_prefix", msg);
    }
    r.finish();
    processor.map(|_| p)
}

/// `processor = "orders-csv"` or a table of one external kind.
fn read_processor_value(r: &mut Reader<'_>, i: usize, origin: &str) -> Option<ProcessorKind> {
    let processor_v = r.take("processor");
    match processor_v.as_ref().map(|v| &v.kind) {
        Some(ValueKind::String(s)) if s == "orders-csv" => Some(ProcessorKind::OrdersCsv),
        // The schema is read by the caller (it is a key of the pipeline, not of the processor).
        Some(ValueKind::String(s)) if s == "table" => {
            Some(ProcessorKind::Table(Box::new(Schema::orders())))
        }
        Some(ValueKind::String(s)) => {
            let msg = format!(
                "unknown processor \"{s}\"; write \"orders-csv\", \"table\" (with [pipeline.schema]), {{ container = {{ image = \"...\" }} }} \
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
    }
}

/// `table` is required by orders-csv and table, and only by them.
fn check_table(r: &mut Reader<'_>, processor: Option<&ProcessorKind>, table: Option<&str>) {
    match (processor, table) {
        (Some(p), None) if p.writes_table() => r.problem(
            "table",
            None,
            format!("missing; required by {p} (the DynamoDB table rows are written to)"),
        ),
        (Some(p), Some("")) if p.writes_table() => r.invalid("table", "must not be empty"),
        (Some(ProcessorKind::Container(_) | ProcessorKind::Command(_)), Some(_)) => r.invalid(
            "table",
            "only orders-csv and table write to a table; remove it (container and command processors write files)",
        ),
        _ => {}
    }
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
        "container" => ContainerSpec::read(&mut r, timeout, permanent_exit_codes),
        "command" => CommandSpec::read(&mut r, timeout, permanent_exit_codes),
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
        ProcessorKind::OrdersCsv | ProcessorKind::Table(_) => &[],
    };
    for a in args {
        if let Some(word) = unknown_placeholder(a) {
            r.invalid(
                "args",
                format!("unknown placeholder {word:?} in {a:?}; the placeholders are {{input}} and {{output_dir}}"),
            );
        }
    }
    r.finish();
    (problems.len() == before).then_some(kind)
}

/// The `[[pipeline]]` list: each pipeline read and checked, and their names unique.
pub(super) fn read_pipelines(
    pipeline_v: Option<Value>,
    problems: &mut Vec<String>,
    origin: &str,
) -> Vec<Pipeline> {
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
                let item_origin = super::reader::origin_of(&item, origin);
                let t = match item.kind {
                    ValueKind::Table(t) => t,
                    _ => {
                        problems.push(format!(
                            "pipeline[{i}] (in {item_origin}): expected a table ([[pipeline]])"
                        ));
                        continue;
                    }
                };
                if let Some(p) = read_pipeline(i, t, problems, origin) {
                    pipelines.push(p);
                }
            }
        }
        Some((v, _)) => problems.push(format!(
            "pipeline (in {}): expected an array of tables ([[pipeline]])",
            super::reader::origin_of(&v, origin)
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

    pipelines
}

/// The first `{...}` in `arg` that is not one of [`ARG_PLACEHOLDERS`].
fn unknown_placeholder(arg: &str) -> Option<&str> {
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let tail = &rest[open..];
        let close = tail.find('}').map(|c| c + 1).unwrap_or(tail.len());
        let word = &tail[..close];
        if !ARG_PLACEHOLDERS.contains(&word) {
            return Some(word);
        }
        rest = &tail[close..];
    }
    None
}

impl ContainerSpec {
    fn read(
        r: &mut Reader<'_>,
        timeout: Duration,
        permanent_exit_codes: Vec<i64>,
    ) -> ProcessorKind {
        let image = r.required_string("image", "the image to run, e.g. \"acme/resize:1.4\"");
        let args = r.take("args").is_some().then(|| r.string_list("args"));
        let memory = r.opt_string("memory");
        if let Some(m) = &memory {
            if parse_size(m).map_or(true, |b| b < MIN_CONTAINER_MEMORY) {
                r.invalid(
                    "memory",
                    format!("\"{m}\" is not a memory size of at least 6m; write e.g. \"512m\" or \"2g\""),
                );
            }
        }
        ProcessorKind::Container(ContainerSpec {
            image,
            args,
            memory,
            cpus: r.float("cpus", 0.01, 1024.0),
            timeout,
            network: r.string("network", DEFAULT_CONTAINER_NETWORK),
            read_only: r.boolean("read_only", false),
            user: r.opt_string("user"),
            pull: r.boolean("pull", false),
            pids_limit: r.uint("pids_limit", DEFAULT_PIDS_LIMIT, 16, 1 << 22),
            permanent_exit_codes,
        })
    }
}

impl CommandSpec {
    fn read(
        r: &mut Reader<'_>,
        timeout: Duration,
        permanent_exit_codes: Vec<i64>,
    ) -> ProcessorKind {
        let program = PathBuf::from(r.required_string(
            "program",
            "the absolute path of the program to run for each file",
        ));
        if !program.as_os_str().is_empty() && !program.is_absolute() {
            let msg = format!(
                "\"{}\" must be an absolute path (no shell or PATH lookup is used)",
                program.display()
            );
            r.invalid("program", msg);
        }
        let memory = r.string("memory", DEFAULT_COMMAND_MEMORY);
        if parse_size(&memory).map_or(true, |b| b < MIN_COMMAND_MEMORY) {
            r.invalid(
                "memory",
                format!("\"{memory}\" is not a memory size of at least 4m; write e.g. \"512m\" or \"2g\""),
            );
        }
        let user = r.string("user", DEFAULT_COMMAND_USER);
        if user.trim().is_empty() || user.contains(':') {
            r.invalid(
                "user",
                format!("\"{user}\" is not an account name or uid; write e.g. \"{DEFAULT_COMMAND_USER}\" (the program runs with that account's primary group)"),
            );
        }
        let cpu_time = r.take("cpu_time").is_some().then(|| {
            r.duration(
                "cpu_time",
                Duration::from_secs(60),
                Duration::from_secs(1),
                Duration::from_secs(7 * 24 * 3600),
            )
        });
        ProcessorKind::Command(CommandSpec {
            program,
            args: r.string_list("args"),
            timeout,
            permanent_exit_codes,
            user,
            memory,
            cpu_time,
            pids_limit: r.uint("pids_limit", DEFAULT_PIDS_LIMIT, 16, 1 << 22),
        })
    }
}
