//! What each subcommand does, and how its outcome maps to an exit code.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, ConfigCommand};
use crate::config::{self, Config, ConfigError};
use crate::error::ProcessError;
use crate::event::parse_s3_url;
use crate::event::ObjectRef;
use crate::processors::container::Owner;
use crate::processors::table::{self, FileError, Plan, ScanLimits};
use crate::spool::Spool;
use crate::telemetry::{self, LogHandle};
use crate::worker::ObjectProcessor;

/// Exit codes (documented in `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    /// `status`: no daemon answers.
    pub const NOT_RUNNING: u8 = 3;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const CONFIG: u8 = 78;
}

/// A failed command: what to print and which code to exit with.
#[derive(Debug)]
pub(crate) enum Failure {
    Config(ConfigError),
    Usage(String),
    Data(String),
    /// Something outside did not answer in time (`register`).
    Unavailable(String),
    /// `status`: no daemon answers.
    NotRunning(String),
    Runtime(anyhow::Error),
}

impl Failure {
    pub(crate) fn code(&self) -> u8 {
        match self {
            Failure::Config(_) => exit::CONFIG,
            Failure::Usage(_) => exit::USAGE,
            Failure::Data(_) => exit::DATA,
            Failure::Unavailable(_) => exit::UNAVAILABLE,
            Failure::NotRunning(_) => exit::NOT_RUNNING,
            Failure::Runtime(_) => exit::FAILURE,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Config(e) => write!(f, "{e}"),
            Failure::Usage(s)
            | Failure::Data(s)
            | Failure::Unavailable(s)
            | Failure::NotRunning(s) => f.write_str(s),
            // `{:#}` prints the whole chain of causes on one line.
            Failure::Runtime(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

pub(crate) fn env_map() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Entry point after argument parsing.
pub fn main(cli: Cli) -> ExitCode {
    let log = telemetry::init(cli.log_format, "info");
    let is_daemon = matches!(cli.command, Command::Run(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("offload-agent: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(dispatch(cli, log));
    // Blocking file readers still running after a failure must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            // The daemon's log may be the journal; a command's user reads stderr.
            if is_daemon {
                // The message itself names the problem: `journalctl -o cat` and `systemctl status`
                // show only the message.
                match &f {
                    Failure::Config(e) => {
                        for p in &e.problems {
                            tracing::error!(problem = %p, "configuration error: {p}");
                        }
                    }
                    other => tracing::error!(error = %other, "{other}"),
                }
                let then = match &f {
                    // RestartPreventExitStatus=: systemd does not restart it.
                    Failure::Config(_) | Failure::Usage(_) => {
                        "not restarted until the configuration is fixed and the service started again"
                    }
                    _ => "systemd restarts it (Restart=on-failure)",
                };
                tracing::error!(
                    exit_status = f.code(),
                    "offload-agent exits with status {}: {then}",
                    f.code()
                );
            } else {
                eprintln!("offload-agent: {f}");
            }
            ExitCode::from(f.code())
        }
    }
}

fn load(path: &Path) -> Result<Config, Failure> {
    config::load(path, &env_map()).map_err(Failure::Config)
}

async fn dispatch(cli: Cli, log: LogHandle) -> Result<(), Failure> {
    match cli.command {
        Command::Config(ConfigCommand::Check(args)) => config_check(&args.config).await,
        Command::Run(args) => run(args, log).await,
        Command::Provision {
            config,
            destroy: false,
            ..
        } => provision(&config.config).await,
        Command::Provision {
            config, yes, force, ..
        } => destroy(&config.config, yes, force).await,
        Command::Register {
            config,
            region,
            cluster,
            activation_id,
            activation_code_file,
            reregister,
            timeout,
            skip_preflight,
            restart_docker,
        } => {
            let args = crate::registration::RegisterArgs {
                region,
                cluster,
                activation_id,
                activation_code: activation_code(activation_code_file.as_deref())?,
                reregister,
                timeout,
                skip_preflight,
                restart_docker,
            };
            crate::registration::register(load(&config.config)?, args)
                .await
                .map_err(registration_failure)
        }
        Command::Deregister { config, keep_ssm } => {
            let cfg = load(&config.config)?;
            crate::registration::deregister(cfg, keep_ssm)
                .await
                .map_err(registration_failure)
        }
        Command::Diagnose {
            config,
            since,
            output,
        } => diagnose(&config.config, since, output).await,
        Command::Status {
            config,
            json,
            listen,
        } => status(&config.config, json, listen).await,
        Command::Preflight { config, json } => preflight(&config.config, json).await,
        Command::IamPolicy { config, account } => {
            let cfg = load(&config.config)?;
            let doc = crate::iam_policy::policy(&cfg, account.as_deref());
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).unwrap_or_else(|e| e.to_string())
            );
            Ok(())
        }
        Command::Process {
            config,
            dry_run,
            pipeline,
            progress,
            target,
        } => {
            if dry_run {
                dry_run_local(&config.config, pipeline.as_deref(), &target, progress)
            } else {
                process_s3(&config.config, &target, progress).await
            }
        }
    }
}

/// `run`: the daemon, until a stop signal.
async fn run(args: crate::cli::ConfigArg, log: LogHandle) -> Result<(), Failure> {
    let cfg = load(&args.config)?;
    check_spool(&cfg, &args.config)?;
    log.set_level(&cfg.agent.log_level);
    let control = crate::daemon::signals()?;
    match crate::daemon::run(args.config.clone(), cfg, env_map(), log, control).await {
        Ok(()) => Ok(()),
        // No region is a configuration problem: exit 78 so that systemd does not restart.
        Err(e) if e.downcast_ref::<crate::aws::AwsSetupError>().is_some() => {
            Err(Failure::Config(ConfigError {
                problems: vec![format!("aws.region (in {}): {e}", args.config.display())],
            }))
        }
        Err(e) => Err(Failure::Runtime(e)),
    }
}

/// `provision`: each resource the configuration names, created or found.
async fn provision(config: &Path) -> Result<(), Failure> {
    let cfg = load(config)?;
    let clients = aws_clients(&cfg).await?;
    let identity = crate::provision::identity(config);
    let done = crate::provision::provision(&cfg, &clients, &identity).await?;
    for s in &done.steps {
        println!("{s}");
    }
    if done.mismatched.is_empty() {
        Ok(())
    } else {
        Err(Failure::Config(ConfigError {
            problems: done.mismatched,
        }))
    }
}

/// `diagnose`: the bundle written, each part that could not be collected named.
async fn diagnose(
    config: &Path,
    since: std::time::Duration,
    output: Option<std::path::PathBuf>,
) -> Result<(), Failure> {
    let w = crate::diagnose::run(config, since, output)
        .await
        .map_err(Failure::Runtime)?;
    let missing: Vec<_> = w
        .parts
        .iter()
        .filter_map(|(n, why)| why.as_ref().map(|w| (n, w)))
        .collect();
    println!(
        "wrote {} ({} parts, {} not collected; secrets redacted)",
        w.path.display(),
        w.parts.len(),
        missing.len()
    );
    for (name, why) in missing {
        println!("  not collected {name}: {why}");
    }
    Ok(())
}

/// `provision --destroy`: the plan, then (with `yes`) its removal; data is refused without `force`.
async fn destroy(config: &Path, yes: bool, force: bool) -> Result<(), Failure> {
    use crate::provision::destroy;
    let cfg = load(config)?;
    let clients = aws_clients(&cfg).await?;
    let plan = destroy::plan(&cfg, &clients).await?;
    if !yes || plan.removals.is_empty() {
        for s in plan.lines() {
            println!("{s}");
        }
    }
    if plan.removals.is_empty() {
        println!("nothing to remove: no resource this configuration names was made by provision");
        return Ok(());
    }
    let refused = plan.needs_force();
    if !yes {
        println!(
            "nothing changed: run again with --yes to remove the above{}",
            if refused.is_empty() || force {
                ""
            } else {
                " (and --force for what holds data)"
            }
        );
        return Ok(());
    }
    if !force && !refused.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "nothing removed: {} still hold(s) data; empty it, or run again with --force to delete every object version and item first",
            refused.join(", ")
        )));
    }
    for s in plan.kept_lines() {
        println!("{s}");
    }
    // Each step printed as it is done, so that a failure part-way shows what is gone already.
    destroy::apply(&plan, &clients, |s| println!("{s}")).await?;
    Ok(())
}

/// The AWS clients of a command, with credentials resolved first: without any, the command fails at
/// once saying where it looked (exit 78: the host's configuration must change).
async fn aws_clients(cfg: &Config) -> Result<crate::aws::Clients, Failure> {
    let clients = crate::aws::clients(cfg).await.map_err(|e| {
        Failure::Config(ConfigError {
            problems: vec![e.to_string()],
        })
    })?;
    clients.require_credentials().await.map_err(|e| {
        Failure::Config(ConfigError {
            problems: vec![e.to_string()],
        })
    })?;
    Ok(clients)
}

/// `preflight`: every endpoint, step by step; exit 69 when one does not answer.
async fn preflight(path: &Path, json: bool) -> Result<(), Failure> {
    let cfg = load(path)?;
    // With credentials, the ECS agent's poll endpoint is asked for and checked too.
    let clients = match crate::aws::clients(&cfg).await {
        Ok(c) if c.require_credentials().await.is_ok() => Some(c),
        _ => None,
    };
    let report = crate::preflight::run(&cfg, clients.as_ref()).await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_else(|e| e.to_string())
        );
    } else {
        print!("{}", report.render());
    }
    let failed = report.rows.iter().filter(|r| !r.ok).count();
    let mismatched: Vec<String> = report
        .tables
        .iter()
        .filter(|t| !t.ok)
        .filter_map(|t| t.note.clone())
        .collect();
    if failed > 0 {
        Err(Failure::Unavailable(format!(
            "{failed} endpoint(s) did not answer; each failure above says what to fix"
        )))
    } else if !mismatched.is_empty() {
        Err(Failure::Config(ConfigError {
            problems: mismatched,
        }))
    } else {
        Ok(())
    }
}

/// The activation code from its file, or else from `OFFLOAD_AGENT_ACTIVATION_CODE`; trimmed.
fn activation_code(file: Option<&Path>) -> Result<String, Failure> {
    let code = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Failure::Usage(format!(
                "cannot read the activation code from {}: {e}",
                path.display()
            ))
        })?,
        None => std::env::var("OFFLOAD_AGENT_ACTIVATION_CODE").unwrap_or_default(),
    };
    Ok(code.trim().to_string())
}

/// The spool must be the daemon's own directory: refuse a shared one as a configuration error.
fn check_spool(cfg: &Config, path: &Path) -> Result<(), Failure> {
    crate::spool::check_dir(&cfg.spool.dir).map_err(|reason| {
        Failure::Config(ConfigError {
            problems: vec![format!("spool.dir (in {}): {reason}", path.display())],
        })
    })
}

fn registration_failure(e: crate::registration::Error) -> Failure {
    use crate::registration::Error;
    match e {
        Error::Input(s) => Failure::Config(ConfigError { problems: vec![s] }),
        Error::Unavailable(s) => Failure::Unavailable(s),
        Error::Failed(s) => Failure::Runtime(anyhow::anyhow!(s)),
        e
        @ (Error::Host(_) | Error::File { .. } | Error::Malformed { .. } | Error::Firewall(_)) => {
            Failure::Runtime(anyhow::Error::new(e))
        }
    }
}

/// `config check`: validate every layer (Parameter Store too, when configured and reachable), print
/// the effective configuration and where each value that is not a default came from.
async fn config_check(path: &Path) -> Result<(), Failure> {
    print!("{}", effective_config(path).await?.text);
    Ok(())
}

/// What `config check` prints, and the values of the SecureString parameters it read (masked in
/// its text; `diagnose` masks them everywhere else too).
pub(crate) struct Effective {
    pub(crate) text: String,
    pub(crate) secure_values: Vec<String>,
}

/// The effective configuration (files, Parameter Store, environment) as `config check` shows it.
pub(crate) async fn effective_config(path: &Path) -> Result<Effective, Failure> {
    use std::fmt::Write;
    let env = env_map();
    let base = load(path)?;
    let mut params = None;
    let mut notes = Vec::new();
    if let Some(ppath) = &base.ssm.parameters_path {
        let clients = aws_clients(&base).await?;
        match tokio::time::timeout(
            base.aws.call_timeout,
            crate::params::fetch(&clients.ssm, ppath),
        )
        .await
        {
            Ok(Ok(layer)) => {
                notes.push(format!(
                    "{} parameter(s) read from Parameter Store under {ppath}",
                    layer.parameters.len()
                ));
                params = Some(layer);
            }
            Ok(Err(e)) => notes.push(format!("{e}; shown without the Parameter Store layer")),
            Err(_) => notes.push(
                "Parameter Store did not answer within aws.call_timeout; shown without its layer"
                    .to_string(),
            ),
        }
    }
    let loaded = config::load_with(path, params.as_ref(), &env).map_err(Failure::Config)?;
    let secret = params.as_ref().map(|p| p.secure_keys()).unwrap_or_default();
    let secure_values = params
        .iter()
        .flat_map(|p| &p.parameters)
        .filter(|p| p.secure)
        .map(|p| p.value.clone())
        .collect();
    let files: Vec<String> = config::layer_files(path)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# configuration is valid; read from: {}",
        files.join(", ")
    );
    let longest = loaded.config.agent.shutdown_grace + crate::daemon::SHUTDOWN_OVERHEAD;
    if longest > crate::daemon::UNIT_TIMEOUT_STOP {
        notes.push(format!(
            "WARNING: agent.shutdown_grace ({}) plus up to {} to release messages and stop the ECS agent's \
             supervisor exceeds the unit's TimeoutStopSec={}: systemd would kill the daemon mid-shutdown; \
             lower shutdown_grace or raise TimeoutStopSec in a drop-in",
            humantime::format_duration(loaded.config.agent.shutdown_grace),
            humantime::format_duration(crate::daemon::SHUTDOWN_OVERHEAD),
            humantime::format_duration(crate::daemon::UNIT_TIMEOUT_STOP),
        ));
    }
    for n in &notes {
        let _ = writeln!(o, "# {n}");
    }
    o.push_str(&loaded.config.to_toml(&secret));
    let _ = writeln!(
        o,
        "\n# Where each value came from (every other key: its built-in default):"
    );
    for (key, origin) in &loaded.origins {
        let _ = writeln!(o, "#   {key}: {origin}");
    }
    Ok(Effective {
        text: o,
        secure_values,
    })
}

/// A progress bar on stderr (terminals, or when asked), fed by a byte counter that the processor
/// advances and a thread that redraws it.
struct Progress {
    counter: Arc<AtomicU64>,
    bar: indicatif::ProgressBar,
    ticker: std::thread::JoinHandle<()>,
}

impl Progress {
    fn start(total: u64, forced: bool) -> Option<Progress> {
        if !(forced || std::io::stderr().is_terminal()) {
            return None;
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let counter = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (counter, bar) = (counter.clone(), bar.clone());
            std::thread::spawn(move || {
                while !bar.is_finished() {
                    bar.set_position(counter.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Some(Progress {
            counter,
            bar,
            ticker,
        })
    }

    fn finish(self) {
        self.bar.finish_and_clear();
        let _ = self.ticker.join();
    }
}

fn counter_of(p: &Option<Progress>) -> Option<Arc<AtomicU64>> {
    p.as_ref().map(|p| p.counter.clone())
}

/// The schema `--dry-run` validates against: the named pipeline's, else the orders schema.
fn dry_run_schema(
    config_path: &Path,
    pipeline: Option<&str>,
    cfg: Option<&config::Config>,
) -> Result<crate::config::Schema, Failure> {
    let (Some(name), Some(cfg)) = (pipeline, cfg) else {
        return Ok(crate::config::Schema::orders());
    };
    let p = cfg
        .pipelines
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = cfg.pipelines.iter().map(|p| p.name.as_str()).collect();
            Failure::Usage(format!(
                "no pipeline {name:?} in {}; its pipelines are {}",
                config_path.display(),
                names.join(", ")
            ))
        })?;
    p.processor.schema().map(|s| s.into_owned()).ok_or_else(|| {
        Failure::Usage(format!(
            "pipeline {name} runs {}, which has no schema to validate against; --dry-run checks orders-csv and table pipelines",
            p.processor
        ))
    })
}

fn dry_run_local(
    config_path: &Path,
    pipeline: Option<&str>,
    target: &str,
    force_progress: bool,
) -> Result<(), Failure> {
    let path = Path::new(target);
    std::fs::metadata(path).map_err(|e| Failure::Usage(format!("cannot read {target}: {e}")))?;
    // The configuration is optional here (unless a pipeline is named); when it exists its limits apply.
    let cfg = if pipeline.is_some() || config_path.exists() {
        Some(load(config_path)?)
    } else {
        None
    };
    let schema = dry_run_schema(config_path, pipeline, cfg.as_ref())?;
    let plan = Plan::new(&schema);
    let limits = ScanLimits {
        max_line_bytes: cfg
            .as_ref()
            .map_or(config::DEFAULT_MAX_LINE_BYTES, |c| c.spool.max_line_bytes),
        item_overhead: 0,
    };
    let spool_limits = cfg
        .as_ref()
        .map_or_else(crate::compression::Limits::default, |c| {
            c.spool.decompression()
        });
    // A compressed file is validated from a decompressed copy in a private temporary directory.
    let tmp = tempfile::tempdir().map_err(|e| {
        Failure::Runtime(anyhow::anyhow!("cannot create a temporary directory: {e}"))
    })?;
    let plain = crate::compression::decompress_local(path, &tmp.path().join("input"), spool_limits)
        .map_err(|e| Failure::Data(format!("{target}: {e}")))?;
    let path = plain.as_deref().unwrap_or(path);
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let started = Instant::now();
    let progress = Progress::start(meta.len(), force_progress);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = table::dry_run(path, &plan, limits, counter_of(&progress), &mut out);
    let _ = out.flush();
    if let Some(p) = progress {
        p.finish();
    }
    let elapsed = started.elapsed();
    match result {
        Ok(o) => {
            eprintln!(
                "{target}: {} rows: {} valid, {} rejected; {} bytes in {:.2}s ({:.0} rows/s){}",
                o.rows,
                o.written,
                o.rejected,
                meta.len(),
                elapsed.as_secs_f64(),
                o.rows as f64 / elapsed.as_secs_f64().max(1e-9),
                if o.extra_columns.is_empty() {
                    String::new()
                } else {
                    format!("; ignored columns: {}", o.extra_columns.join(", "))
                }
            );
            if o.rejected > 0 {
                Err(Failure::Data(format!(
                    "{target}: {} of {} rows would be rejected (listed on stdout)",
                    o.rejected, o.rows
                )))
            } else {
                Ok(())
            }
        }
        Err(FileError::Invalid(reason)) => Err(Failure::Data(format!(
            "{target} is not a valid {}: {reason}",
            schema
                .label
                .trim_start_matches("an ")
                .trim_start_matches("a ")
        ))),
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!("{target}: {e}"))),
    }
}

async fn process_s3(config_path: &Path, target: &str, force_progress: bool) -> Result<(), Failure> {
    let Some((bucket, key)) = parse_s3_url(target) else {
        return Err(Failure::Usage(format!(
            "{target:?} is not s3://BUCKET/KEY (use --dry-run to validate a local file)"
        )));
    };
    let cfg = load(config_path)?;
    check_spool(&cfg, config_path)?;
    let Some(pipeline) = cfg.route(&bucket, &key).cloned() else {
        return Err(Failure::Usage(format!(
            "no pipeline matches s3://{bucket}/{key}: check the pipelines' bucket, prefix and suffix in {}",
            config_path.display()
        )));
    };
    let clients = aws_clients(&cfg).await?;
    // `process` may run beside the daemon: it shares no spool files with it (unique names) and never
    // cleans the spool.
    let spool = Spool::open(&cfg.spool.dir).map_err(|e| {
        Failure::Runtime(anyhow::anyhow!(
            "cannot use spool.dir {}: {e}",
            cfg.spool.dir.display()
        ))
    })?;
    let objects = ObjectProcessor::new(
        crate::processors::Context::new(
            clients,
            &cfg,
            Owner::Process,
            Arc::new(crate::metrics::Metrics::new()),
        ),
        spool,
    );
    let obj = ObjectRef {
        bucket: bucket.clone(),
        key: key.clone(),
        size: None,
        etag: None,
        version_id: None,
    };
    let size = object_size(&objects.ctx.clients.s3, &bucket, &key).await;
    let progress = Progress::start(size, force_progress);
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let result = objects
        .process(&cfg, &pipeline, &obj, &cancel, counter_of(&progress))
        .await;
    ctrl_c.abort();
    if let Some(p) = progress {
        p.finish();
    }
    match result {
        Ok(r) => {
            print_report(&pipeline, &r);
            Ok(())
        }
        Err(e) => Err(process_failure(&pipeline, &obj.url(), e)),
    }
}

/// The object's size, for the progress bar (0 when it cannot be learnt).
async fn object_size(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> u64 {
    s3.head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .ok()
        .and_then(|h| h.content_length())
        .unwrap_or(0)
        .max(0) as u64
}

/// What `process` prints about a file it processed.
fn print_report(pipeline: &crate::config::Pipeline, r: &crate::worker::FileReport) {
    let out_bucket = pipeline.output_bucket();
    println!("pipeline:  {}", r.pipeline);
    println!(
        "input:     s3://{}/{} (etag {}, {} bytes)",
        r.bucket, r.key, r.etag, r.bytes
    );
    println!("processor: {}", pipeline.processor);
    println!("result:    {}", r.summary);
    for key in &r.outputs {
        println!("output:    s3://{out_bucket}/{key}");
    }
    println!("elapsed:   {:.2}s", r.elapsed.as_secs_f64());
    if let Some(peak) = crate::telemetry::peak_rss_bytes() {
        println!("peak RSS:  {peak} bytes");
    }
}

/// `process`'s failure, by what the operator can do about it.
fn process_failure(pipeline: &crate::config::Pipeline, url: &str, e: ProcessError) -> Failure {
    match e {
        ProcessError::Permanent(reason) => {
            Failure::Data(format!("{url} cannot be processed: {reason}"))
        }
        ProcessError::Transient(reason) => Failure::Runtime(anyhow::anyhow!(
            "{url} failed (retrying may help): {reason}"
        )),
        ProcessError::Unavailable(reason) => Failure::Unavailable(format!(
            "pipeline {} cannot run on this host: {reason}",
            pipeline.name
        )),
        ProcessError::Superseded(reason) => Failure::Runtime(anyhow::anyhow!(
            "{reason}; run again to process the current version"
        )),
        ProcessError::Cancelled => Failure::Runtime(anyhow::anyhow!(
            "interrupted; rows written so far are rewritten identically by the next run"
        )),
    }
}

/// `offload-agent status`.
async fn status(
    config_path: &Path,
    json: bool,
    listen: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    let addr = match listen {
        Some(a) => a,
        None => match crate::config::load(config_path, &Default::default()) {
            Ok(cfg) => cfg.admin.addr(),
            Err(e) => {
                eprintln!(
                    "note: cannot read {} ({}); asking {}",
                    config_path.display(),
                    e.problems.first().map(String::as_str).unwrap_or(""),
                    crate::config::DEFAULT_ADMIN_LISTEN
                );
                crate::config::DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("a valid default")
            }
        },
    };
    let (code, body) = crate::admin::get(addr, "/status", std::time::Duration::from_secs(5))
        .await
        .map_err(|e| {
            Failure::NotRunning(format!(
                "offload-agent is not running (nothing answers at {addr}: {e}); see `systemctl status offload-agent`"
            ))
        })?;
    let doc: crate::status::StatusDoc = serde_json::from_str(&body).map_err(|e| {
        Failure::Runtime(anyhow::anyhow!(
            "{addr} answered {code} with something that is not offload-agent's status: {e}"
        ))
    })?;
    if json {
        println!("{body}");
    } else {
        print!("{}", doc.render());
    }
    match doc.ready.problem() {
        None => Ok(()),
        Some(why) => Err(Failure::Runtime(anyhow::anyhow!(
            "the daemon is not ready: {why}"
        ))),
    }
}
