//! The daemon's one set of numbers: a Prometheus registry (prometheus-client, no global state) that the
//! worker, the receiver and the daemon update, and that the log summary, systemd's `STATUS=` line,
//! `/metrics` and `/status` all read, so that they cannot disagree. Label sets are bounded: pipeline
//! names (from the configuration), fixed outcome words, ECS agent states and exit codes; never object
//! keys or message ids.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// How a file ended, as counted in `offload_files_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FileOutcome {
    /// Processed, every row written (or a processor without rows succeeded).
    Ok,
    /// Processed, some rows rejected (listed in the rejects report).
    Rejected,
    /// Failed for good: error report and dead-letter queue.
    PermanentError,
    /// Failed for now: the message returns to the queue.
    TransientRetry,
    /// Its version was no longer current: acknowledged, the newer upload processes.
    Superseded,
}

impl FileOutcome {
    pub(crate) const ALL: [FileOutcome; 5] = [
        FileOutcome::Ok,
        FileOutcome::Rejected,
        FileOutcome::PermanentError,
        FileOutcome::TransientRetry,
        FileOutcome::Superseded,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FileOutcome::Ok => "ok",
            FileOutcome::Rejected => "rejected",
            FileOutcome::PermanentError => "permanent_error",
            FileOutcome::TransientRetry => "transient_retry",
            FileOutcome::Superseded => "superseded",
        }
    }
}

/// How a message was settled, as counted in `offload_messages_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MessageOutcome {
    Received,
    Deleted,
    DeadLettered,
    Retried,
    Released,
}

impl MessageOutcome {
    pub(crate) const ALL: [MessageOutcome; 5] = [
        MessageOutcome::Received,
        MessageOutcome::Deleted,
        MessageOutcome::DeadLettered,
        MessageOutcome::Retried,
        MessageOutcome::Released,
    ];

    fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Received => "received",
            MessageOutcome::Deleted => "deleted",
            MessageOutcome::DeadLettered => "dead_lettered",
            MessageOutcome::Retried => "retried",
            MessageOutcome::Released => "released",
        }
    }
}

/// A label value spelled as the enum's `as_str`.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

/// Why an event was acknowledged without processing, as counted in `offload_events_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Skipped {
    /// No pipeline matches the object.
    Unmatched,
    /// `s3:TestEvent`, sent when a notification is configured.
    Test,
    /// A notification that announces no created object.
    Other,
}

impl Skipped {
    fn as_str(self) -> &'static str {
        match self {
            Skipped::Unmatched => "unmatched",
            Skipped::Test => "test",
            Skipped::Other => "other",
        }
    }
}

/// What `offload_registered` reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Registered {
    /// An SSM managed instance.
    Ssm,
    /// An ECS container instance.
    Ecs,
}

impl Registered {
    fn as_str(self) -> &'static str {
        match self {
            Registered::Ssm => "ssm",
            Registered::Ecs => "ecs",
        }
    }
}

/// How a configuration reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reload {
    Ok,
    Failed,
}

impl Reload {
    fn as_str(self) -> &'static str {
        match self {
            Reload::Ok => "ok",
            Reload::Failed => "failed",
        }
    }
}

label_value!(FileOutcome, MessageOutcome, Skipped, Registered, Reload);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    pipeline: String,
    outcome: FileOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    outcome: MessageOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkippedLabels {
    kind: Skipped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegisteredLabels {
    kind: Registered,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    outcome: Reload,
}

/// What an earlier run left that the daemon removed at start.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Leftover {
    Spool,
    Container,
}

impl Leftover {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Leftover::Spool => "spool",
            Leftover::Container => "container",
        }
    }
}
label_value!(Leftover);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeftoverLabels {
    kind: Leftover,
}

/// An ECS agent supervisor state, as its `Display` spells it (a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    exit_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    git_sha: String,
}

/// Processing time buckets, in seconds: 10 ms to about 40 minutes.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 2400.0,
    ])
}

/// One failure, for `/status` and `offload-agent status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RecentError {
    pub(crate) time: String,
    pub(crate) pipeline: String,
    pub(crate) file: String,
    pub(crate) reason: String,
}

/// Errors kept for `/status`.
pub(crate) const RECENT_ERRORS: usize = 20;

/// Since when, and why, the queue cannot be found or received from (`None`: it can).
#[derive(Debug, Default)]
pub(crate) struct QueueHealth(Mutex<Option<QueueProblem>>);

/// Why the queue cannot be used, since when, and what to do about it.
#[derive(Debug, Clone)]
pub(crate) struct QueueProblem {
    since: Instant,
    what: String,
    advice: &'static str,
}

/// What to do about a queue that cannot be found or received from, when the network is not the cause.
pub(crate) const QUEUE_ADVICE: &str =
    "run `offload-agent provision`, or check the region and IAM permissions";
/// What to do when the egress is the cause (the problem itself names the key to set).
pub(crate) const EGRESS_ADVICE: &str = "`offload-agent preflight` checks every endpoint";

impl QueueHealth {
    /// Record a failure; the episode keeps its start.
    pub(crate) fn fail(&self, what: String, advice: &'static str) {
        if let Ok(mut g) = self.0.lock() {
            let since = g.as_ref().map(|p| p.since).unwrap_or_else(Instant::now);
            *g = Some(QueueProblem {
                since,
                what,
                advice,
            });
        }
    }

    pub(crate) fn ok(&self) {
        if let Ok(mut g) = self.0.lock() {
            *g = None;
        }
    }

    /// "queue unreachable for 40 s (what to do)", while there is a problem.
    pub(crate) fn describe(&self) -> Option<String> {
        let g = self.0.lock().ok()?;
        let p = g.as_ref()?;
        Some(format!(
            "{} for {} s ({})",
            p.what,
            p.since.elapsed().as_secs(),
            p.advice
        ))
    }
}

/// Register a metric of the default kind under `name`, and return it.
fn registered<M: Default + Clone + prometheus_client::registry::Metric>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

/// Files and rows, by pipeline: the worker's series.
struct FileSeries {
    files: Family<FileLabels, Counter>,
    rows_written: Family<PipelineLabels, Counter>,
    rows_rejected: Family<PipelineLabels, Counter>,
    seconds: Family<PipelineLabels, Histogram, fn() -> Histogram>,
    bytes_downloaded: Counter,
    bytes_uploaded: Counter,
    in_flight: Gauge,
    free_slots: Gauge,
    spool_free: Gauge,
    leftovers: Family<LeftoverLabels, Counter>,
}

impl FileSeries {
    fn register(r: &mut Registry) -> Self {
        let seconds = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        r.register(
            "file_processing_seconds",
            "Time from the start of a file's download to its last output stored, by pipeline",
            seconds.clone(),
        );
        FileSeries {
            files: registered(r, "files", "Files processed, by pipeline and outcome"),
            rows_written: registered(r, "rows_written", "Rows written to DynamoDB, by pipeline"),
            rows_rejected: registered(
                r,
                "rows_rejected",
                "Rows rejected (in a rejects report), by pipeline",
            ),
            seconds,
            bytes_downloaded: registered(r, "downloaded_bytes", "Bytes of objects downloaded"),
            bytes_uploaded: registered(
                r,
                "uploaded_bytes",
                "Bytes of outputs and reports uploaded",
            ),
            in_flight: registered(r, "files_in_flight", "Files being processed now"),
            free_slots: registered(
                r,
                "worker_slots_free",
                "Worker slots free (queue.max_in_flight minus busy)",
            ),
            spool_free: registered(
                r,
                "spool_free_bytes",
                "Free bytes on the spool's file system (below spool.min_free the daemon stops receiving)",
            ),
            leftovers: {
                let f: Family<LeftoverLabels, Counter> = registered(
                    r,
                    "leftovers_removed",
                    "What earlier runs left that was removed at start: spool entries, processor containers",
                );
                for kind in [Leftover::Spool, Leftover::Container] {
                    let _ = f.get_or_create(&LeftoverLabels { kind });
                }
                f
            },
        }
    }
}

/// Messages and the queue: the receiver's and settlement's series.
struct QueueSeries {
    messages: Family<MessageLabels, Counter>,
    events_skipped: Family<SkippedLabels, Counter>,
    receives: Counter,
    empty_receives: Counter,
    errors: Counter,
    reachable: Gauge,
}

impl QueueSeries {
    fn register(r: &mut Registry) -> Self {
        let q = QueueSeries {
            messages: registered(r, "messages", "SQS messages, by what happened to them"),
            events_skipped: registered(
                r,
                "events_skipped",
                "Events acknowledged without processing: unmatched (no pipeline), test (s3:TestEvent), other (no created object)",
            ),
            receives: registered(r, "sqs_receives", "ReceiveMessage calls that returned messages"),
            empty_receives: registered(
                r,
                "sqs_empty_receives",
                "ReceiveMessage calls that returned none",
            ),
            errors: registered(r, "sqs_errors", "ReceiveMessage calls that failed"),
            reachable: registered(
                r,
                "queue_reachable",
                "Whether the queue was reachable at the last receive",
            ),
        };
        for outcome in MessageOutcome::ALL {
            let _ = q.messages.get_or_create(&MessageLabels { outcome });
        }
        q
    }
}

/// DynamoDB writes.
struct DynamoDbSeries {
    throttles: Counter,
    unprocessed_retries: Counter,
}

impl DynamoDbSeries {
    fn register(r: &mut Registry) -> Self {
        DynamoDbSeries {
            throttles: registered(
                r,
                "dynamodb_throttles",
                "BatchWriteItem calls throttled (retried)",
            ),
            unprocessed_retries: registered(
                r,
                "dynamodb_unprocessed_retries",
                "BatchWriteItem calls retried for UnprocessedItems",
            ),
        }
    }
}

/// The host: the ECS agent, registration, configuration and credentials.
struct HostSeries {
    ecs_agent_state: Family<StateLabels, Gauge>,
    ecs_agent_restarts: Family<ExitLabels, Counter>,
    ecs_agent_updates: Family<UpdateLabels, Counter>,
    registered: Family<RegisteredLabels, Gauge>,
    config_reloads: Family<ReloadLabels, Counter>,
    credentials_reloads: Counter,
    ssm_agent_restarts: Counter,
    ecs_agent_connected: Gauge,
    clock_skew: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl HostSeries {
    fn register(r: &mut Registry) -> Self {
        let h = HostSeries {
            ecs_agent_state: registered(
                r,
                "ecs_agent_state",
                "The ECS agent supervisor's state (1 for the current one)",
            ),
            ecs_agent_updates: {
                let f: Family<UpdateLabels, Counter> = registered(
                    r,
                    "ecs_agent_updates",
                    "ECS agent image changes, by outcome: updated (proven healthy), rolled_back, refused (digest mismatch)",
                );
                for outcome in ["updated", "rolled_back", "refused"] {
                    let _ = f.get_or_create(&UpdateLabels { outcome });
                }
                f
            },
            ecs_agent_restarts: registered(
                r,
                "ecs_agent_restarts",
                "ECS agent restarts by the supervisor, by the exit code before them",
            ),
            registered: registered(
                r,
                "registered",
                "Whether this host is registered: kind ssm (managed instance) or ecs (container instance)",
            ),
            config_reloads: registered(
                r,
                "config_reloads",
                "Configuration reloads (SIGHUP, Parameter Store), by outcome",
            ),
            credentials_reloads: registered(
                r,
                "credentials_reloads",
                "Times rotated credentials were read again",
            ),
            ecs_agent_connected: {
                let g: Gauge = registered(
                    r,
                    "ecs_agent_connected",
                    "Whether ECS reports the ECS agent connected: 1 yes, 0 no, -1 not known (not registered, or DescribeContainerInstances not allowed)",
                );
                g.set(-1);
                g
            },
            ssm_agent_restarts: registered(
                r,
                "ssm_agent_restarts",
                "Restarts of the SSM agent by the watchdog (it had stopped refreshing the credentials)",
            ),
            clock_skew: registered(
                r,
                "clock_skew_seconds",
                "AWS's clock minus this host's, from the Date of the latest answer (positive: the host is behind)",
            ),
        };
        for outcome in [Reload::Ok, Reload::Failed] {
            let _ = h.config_reloads.get_or_create(&ReloadLabels { outcome });
        }
        r.register(
            "build",
            "Build of the running daemon",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                git_sha: option_env!("OFFLOAD_GIT_SHA")
                    .unwrap_or("unknown")
                    .to_string(),
            }),
        );
        h
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    worker: FileSeries,
    sqs: QueueSeries,
    dynamodb: DynamoDbSeries,
    host: HostSeries,
    /// Whether the queue can be reached, with the reason when not (for the status line and `/readyz`).
    pub(crate) queue: QueueHealth,
    /// Why the daemon is not receiving because the spool is short of space (`None`: it is not).
    spool_low: Mutex<Option<String>>,
    pipelines: Mutex<BTreeSet<String>>,
    recent: Mutex<VecDeque<RecentError>>,
    credentials_seen: AtomicU64,
    queue_seen: std::sync::atomic::AtomicBool,
    /// (when, rows written so far), a minute of them, for the rate in `/status`.
    rows_window: Mutex<VecDeque<(Instant, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("offload");
        Metrics {
            worker: FileSeries::register(&mut registry),
            sqs: QueueSeries::register(&mut registry),
            dynamodb: DynamoDbSeries::register(&mut registry),
            host: HostSeries::register(&mut registry),
            registry,
            queue: QueueHealth::default(),
            spool_low: Mutex::new(None),
            pipelines: Mutex::new(BTreeSet::new()),
            recent: Mutex::new(VecDeque::new()),
            credentials_seen: AtomicU64::new(0),
            queue_seen: std::sync::atomic::AtomicBool::new(false),
            rows_window: Mutex::new(VecDeque::new()),
        }
    }

    /// Announce a pipeline so that its series exist (at zero) before its first file.
    pub(crate) fn pipeline(&self, name: &str) {
        let mut p = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if p.insert(name.to_string()) {
            for o in FileOutcome::ALL {
                let _ = self.worker.files.get_or_create(&FileLabels {
                    pipeline: name.into(),
                    outcome: o,
                });
            }
            let l = PipelineLabels {
                pipeline: name.into(),
            };
            let _ = self.worker.rows_written.get_or_create(&l);
            let _ = self.worker.rows_rejected.get_or_create(&l);
        }
    }

    pub(crate) fn file(&self, pipeline: &str, outcome: FileOutcome) {
        self.pipeline(pipeline);
        self.worker
            .files
            .get_or_create(&FileLabels {
                pipeline: pipeline.into(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn file_done(
        &self,
        pipeline: &str,
        seconds: f64,
        written: u64,
        rejected: u64,
        bytes: u64,
    ) {
        let l = PipelineLabels {
            pipeline: pipeline.into(),
        };
        self.worker.seconds.get_or_create(&l).observe(seconds);
        self.worker.rows_written.get_or_create(&l).inc_by(written);
        self.worker.rows_rejected.get_or_create(&l).inc_by(rejected);
        self.worker.bytes_downloaded.inc_by(bytes);
        self.file(
            pipeline,
            if rejected > 0 {
                FileOutcome::Rejected
            } else {
                FileOutcome::Ok
            },
        );
    }

    pub(crate) fn uploaded(&self, bytes: u64) {
        self.worker.bytes_uploaded.inc_by(bytes);
    }

    pub(crate) fn message(&self, outcome: MessageOutcome) {
        self.sqs
            .messages
            .get_or_create(&MessageLabels { outcome })
            .inc();
    }

    pub(crate) fn event_skipped(&self, kind: Skipped) {
        self.sqs
            .events_skipped
            .get_or_create(&SkippedLabels { kind })
            .inc();
    }

    /// The queue was found (its URL resolved or configured).
    pub(crate) fn queue_found(&self) {
        self.queue_seen.store(true, Ordering::Relaxed);
        self.sqs.reachable.set(1);
        self.queue.ok();
    }

    /// Whether the queue was ever found or received from.
    pub(crate) fn queue_seen(&self) -> bool {
        self.queue_seen.load(Ordering::Relaxed)
    }

    /// The pipelines seen so far (configured or processed).
    fn pipeline_names(&self) -> Vec<String> {
        let p = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().cloned().collect()
    }

    fn file_count(&self, pipeline: &str, outcome: FileOutcome) -> u64 {
        self.worker
            .files
            .get(&FileLabels {
                pipeline: pipeline.into(),
                outcome,
            })
            .map_or(0, |c| c.get())
    }

    fn row_count(family: &Family<PipelineLabels, Counter>, pipeline: &str) -> u64 {
        family
            .get(&PipelineLabels {
                pipeline: pipeline.into(),
            })
            .map_or(0, |c| c.get())
    }

    fn rows_written_total(&self) -> u64 {
        self.pipeline_names()
            .iter()
            .map(|p| Self::row_count(&self.worker.rows_written, p))
            .sum()
    }

    /// Remember the rows written so far (the daemon calls it every few seconds).
    pub(crate) fn sample_rows(&self) {
        let now = Instant::now();
        let total = self.rows_written_total();
        let mut w = self.rows_window.lock().unwrap_or_else(|e| e.into_inner());
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).as_secs() > 60)
        {
            w.pop_front();
        }
        w.push_back((now, total));
    }

    /// Rows written per second over the last minute (or since start, if shorter).
    pub(crate) fn rows_per_second(&self) -> f64 {
        self.sample_rows();
        let w = self.rows_window.lock().unwrap_or_else(|e| e.into_inner());
        match (w.front(), w.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                let secs = t1.duration_since(*t0).as_secs_f64();
                ((n1 - n0) as f64 / secs * 10.0).round() / 10.0
            }
            _ => 0.0,
        }
    }

    pub(crate) fn receive(&self, messages: usize) {
        if messages == 0 {
            self.sqs.empty_receives.inc();
        } else {
            self.sqs.receives.inc();
        }
        self.queue_found();
    }

    pub(crate) fn receive_failed(&self, what: String, advice: &'static str) {
        self.sqs.errors.inc();
        self.sqs.reachable.set(0);
        self.queue.fail(what, advice);
    }

    /// The queue cannot be resolved (before any receive).
    pub(crate) fn queue_missing(&self, what: String, advice: &'static str) {
        self.sqs.reachable.set(0);
        self.queue.fail(what, advice);
    }

    pub(crate) fn dynamodb_throttled(&self) {
        self.dynamodb.throttles.inc();
    }

    pub(crate) fn dynamodb_unprocessed(&self) {
        self.dynamodb.unprocessed_retries.inc();
    }

    pub(crate) fn slots(&self, in_flight: usize, free: usize) {
        self.worker.in_flight.set(in_flight as i64);
        self.worker.free_slots.set(free as i64);
    }

    /// The spool's free space as last measured, and why receiving stopped (`None`: it did not).
    pub(crate) fn spool(&self, free: Option<u64>, low: Option<String>) {
        if let Some(free) = free {
            self.worker.spool_free.set(free.min(i64::MAX as u64) as i64);
        }
        *self.spool_low.lock().unwrap_or_else(|e| e.into_inner()) = low;
    }

    pub(crate) fn leftovers_removed(&self, kind: Leftover, n: usize) {
        self.worker
            .leftovers
            .get_or_create(&LeftoverLabels { kind })
            .inc_by(n as u64);
    }

    pub(crate) fn spool_problem(&self) -> Option<String> {
        self.spool_low
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn spool_free_bytes(&self) -> u64 {
        self.worker.spool_free.get().max(0) as u64
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.worker.in_flight.get().max(0) as u64
    }

    pub(crate) fn free_slots(&self) -> u64 {
        self.worker.free_slots.get().max(0) as u64
    }

    pub(crate) fn config_reload(&self, ok: bool) {
        let outcome = if ok { Reload::Ok } else { Reload::Failed };
        self.host
            .config_reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
    }

    /// Bring the credentials counter up to `total` reads (the provider counts them itself).
    pub(crate) fn credentials_reloaded_total(&self, total: u64) {
        let seen = self.credentials_seen.swap(total, Ordering::Relaxed);
        if total > seen {
            self.host.credentials_reloads.inc_by(total - seen);
        }
    }

    /// The host's clock against AWS's, as last measured.
    pub(crate) fn ecs_agent_connected(&self, connected: Option<bool>) {
        self.host
            .ecs_agent_connected
            .set(connected.map_or(-1, i64::from));
    }

    pub(crate) fn ssm_agent_restarted(&self) {
        self.host.ssm_agent_restarts.inc();
    }

    pub(crate) fn clock_skew(&self, seconds: f64) {
        self.host.clock_skew.set(seconds);
    }

    /// The supervisor's state now (one gauge per state, 1 for the current one).
    pub(crate) fn ecs_agent(&self, state: &str, all: &[String]) {
        for s in all {
            self.host
                .ecs_agent_state
                .get_or_create(&StateLabels { state: s.clone() })
                .set(i64::from(s == state));
        }
    }

    pub(crate) fn ecs_agent_restarted(&self, by: u64, exit_code: Option<i64>) {
        let code = exit_code.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.host
            .ecs_agent_restarts
            .get_or_create(&ExitLabels { exit_code: code })
            .inc_by(by);
    }

    /// ECS agent updates since the last call: proven, rolled back, refused.
    pub(crate) fn ecs_agent_updates(&self, updated: u64, rolled_back: u64, refused: u64) {
        for (outcome, n) in [
            ("updated", updated),
            ("rolled_back", rolled_back),
            ("refused", refused),
        ] {
            if n > 0 {
                self.host
                    .ecs_agent_updates
                    .get_or_create(&UpdateLabels { outcome })
                    .inc_by(n);
            }
        }
    }

    pub(crate) fn registered(&self, kind: Registered, yes: bool) {
        self.host
            .registered
            .get_or_create(&RegisteredLabels { kind })
            .set(i64::from(yes));
    }

    /// Files of `outcomes`, summed over pipelines.
    pub(crate) fn files_total(&self, outcomes: &[FileOutcome]) -> u64 {
        self.pipeline_names()
            .iter()
            .flat_map(|p| outcomes.iter().map(move |o| self.file_count(p, *o)))
            .sum()
    }

    /// Per pipeline: outcome -> count, rows written, rows rejected.
    pub(crate) fn by_pipeline(&self) -> Vec<PipelineCounts> {
        self.pipeline_names()
            .into_iter()
            .map(|p| PipelineCounts {
                ok: self.file_count(&p, FileOutcome::Ok),
                rejected: self.file_count(&p, FileOutcome::Rejected),
                permanent_error: self.file_count(&p, FileOutcome::PermanentError),
                transient_retry: self.file_count(&p, FileOutcome::TransientRetry),
                superseded: self.file_count(&p, FileOutcome::Superseded),
                rows_written: Self::row_count(&self.worker.rows_written, &p),
                rows_rejected: Self::row_count(&self.worker.rows_rejected, &p),
                pipeline: p,
            })
            .collect()
    }

    pub(crate) fn messages_total(&self, outcome: MessageOutcome) -> u64 {
        self.sqs
            .messages
            .get(&MessageLabels { outcome })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn error(&self, pipeline: &str, file: &str, reason: &str) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == RECENT_ERRORS {
            r.pop_front();
        }
        r.push_back(RecentError {
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            pipeline: pipeline.into(),
            file: file.into(),
            reason: reason.chars().take(2000).collect(),
        });
    }

    pub(crate) fn recent_errors(&self) -> Vec<RecentError> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The OpenMetrics text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A one-line summary for the log.
    pub(crate) fn summary(&self) -> String {
        use MessageOutcome::*;
        format!(
            "messages received={} deleted={} dead-lettered={} retried={} released={}; files processed={} failed={}",
            self.messages_total(Received),
            self.messages_total(Deleted),
            self.messages_total(DeadLettered),
            self.messages_total(Retried),
            self.messages_total(Released),
            self.files_total(&[FileOutcome::Ok, FileOutcome::Rejected]),
            self.files_total(&[FileOutcome::PermanentError, FileOutcome::TransientRetry]),
        )
    }
}

/// One pipeline's counts, for `/status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PipelineCounts {
    pub(crate) pipeline: String,
    pub(crate) ok: u64,
    pub(crate) rejected: u64,
    pub(crate) permanent_error: u64,
    pub(crate) transient_retry: u64,
    pub(crate) superseded: u64,
    pub(crate) rows_written: u64,
    pub(crate) rows_rejected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_the_exposition_with_bounded_labels() {
        let m = Metrics::new();
        m.pipeline("orders");
        m.file_done("orders", 0.2, 10, 2, 1000);
        m.file("orders", FileOutcome::TransientRetry);
        m.message(MessageOutcome::Received);
        m.receive(0);
        m.credentials_reloaded_total(3);
        m.credentials_reloaded_total(3);
        m.ecs_agent("registered", &["running".into(), "registered".into()]);
        let text = m.encode();
        for line in [
            "offload_files_total{pipeline=\"orders\",outcome=\"rejected\"} 1",
            "offload_files_total{pipeline=\"orders\",outcome=\"ok\"} 0",
            "offload_rows_written_total{pipeline=\"orders\"} 10",
            "offload_rows_rejected_total{pipeline=\"orders\"} 2",
            "offload_file_processing_seconds_count{pipeline=\"orders\"} 1",
            "offload_downloaded_bytes_total 1000",
            "offload_messages_total{outcome=\"received\"} 1",
            "offload_messages_total{outcome=\"deleted\"} 0",
            "offload_sqs_empty_receives_total 1",
            "offload_credentials_reloads_total 3",
            "offload_ecs_agent_state{state=\"registered\"} 1",
            "offload_ecs_agent_state{state=\"running\"} 0",
            "offload_build_info{version=",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        assert_eq!(m.files_total(&[FileOutcome::Ok, FileOutcome::Rejected]), 1);
        assert!(m.summary().contains("files processed=1 failed=1"));
        for i in 0..30 {
            m.error("orders", &format!("s3://b/k{i}"), "boom");
        }
        let errs = m.recent_errors();
        assert_eq!(errs.len(), RECENT_ERRORS);
        assert_eq!(errs.last().unwrap().file, "s3://b/k29");
    }
}
