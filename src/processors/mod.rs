//! File processors behind one interface. A processor gets one spooled object (its file, its S3 reference
//! and a private directory to work in) and returns what to store: output files with their keys, keys an
//! earlier version may have left that are now wrong, and row counts where it has rows. Downloading,
//! storing and settling the SQS message are not its business (`worker::run` and `worker::settle` do them).
//!
//! - `table` (built in): the rows of a CSV or JSON-lines file of a declared schema into DynamoDB, an
//!   output and a rejects report back to S3; `orders-csv` is it with the built-in orders schema;
//! - `container`: the user's image, run by the host's Docker engine once per file, under limits;
//! - `command`: the user's program, run directly (no shell) once per file.
//!
//! Adding a kind: a module implementing `Processor`, a variant of `config::ProcessorKind` with its
//! parser, and one arm in `build`.

pub mod account;
pub mod batch_writer;
pub mod cgroup;
pub mod command;
pub mod container;
pub mod external;
pub mod table;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::aws::Clients;
use crate::config::{Config, Pipeline, ProcessorKind, Schema};
use crate::error::ProcessError;
use crate::event::ObjectRef;
use crate::metrics::Metrics;
use crate::spool::SpoolFiles;

/// One object to process.
pub(crate) struct Job<'a> {
    pub(crate) pipeline: &'a Pipeline,
    pub(crate) object: &'a ObjectRef,
    /// The ETag of the version that was downloaded (`STATUS_KEY` for external processors).
    pub(crate) etag: &'a str,
    /// The downloaded input and the object's private spool directory.
    pub(crate) files: &'a SpoolFiles,
    pub(crate) cancel: &'a CancellationToken,
    /// Input bytes consumed so far, for a progress bar (processors that cannot tell leave it alone).
    pub(crate) progress: Option<Arc<AtomicU64>>,
}

/// A local file to store under `key` in the pipeline's output bucket.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub(crate) path: PathBuf,
    pub(crate) key: String,
    pub(crate) content_type: &'static str,
}

/// What a processor produced.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Stored in this order once the processor is done; the last one marks the file finished.
    pub(crate) outputs: Vec<Output>,
    /// Keys in the output bucket that an earlier version of the object may have produced and this one
    /// does not (deleted, best effort, while the outputs are stored).
    pub(crate) stale: Vec<String>,
    /// Row accounting, for processors that have rows (`orders-csv`, `table`).
    pub(crate) rows: Option<RowCounts>,
    /// The key of the output that lists rejected rows, when one is stored.
    pub(crate) rejects: Option<String>,
    /// One line for the log and `process`'s summary (e.g. "exit 0 after 1.2 s").
    pub(crate) summary: String,
}

/// How the rows of one file ended, for processors that read rows: every row is written or rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RowCounts {
    pub(crate) rows: u64,
    pub(crate) written: u64,
    pub(crate) rejected: u64,
}

pub(crate) type ProcessFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Outcome, ProcessError>> + Send + 'a>>;

/// Turns one spooled object into outputs.
pub(crate) trait Processor: Send + Sync {
    fn process<'a>(&'a self, job: &'a Job<'a>) -> ProcessFuture<'a>;
}

/// What processors share for the life of a daemon (or of one `process` command).
pub(crate) struct Context {
    pub(crate) clients: Clients,
    /// Counters processors update (DynamoDB retries, bytes stored).
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) region: String,
    /// The egress external processors with network access get (proxy variables, the CA bundle).
    pub(crate) egress: crate::egress::Egress,
    /// The CA bundle on the host that children are pointed at, with `network.ca_bundle` set.
    pub(crate) ca_bundle: Option<std::path::PathBuf>,
    /// The Docker engine, connected on first use.
    pub(crate) docker: container::Engine,
    /// How command processors are held to their limits: the daemon's own cgroup, or polled.
    pub(crate) confinement: Arc<cgroup::Confinement>,
    /// The DynamoDB client rows are written with, for the `dynamodb.write_max_attempts` it was built
    /// with: built once, and again only when a reload changes that setting, never per file.
    writer: std::sync::Mutex<Option<(u32, aws_sdk_dynamodb::Client)>>,
}

impl Context {
    pub(crate) fn new(
        clients: Clients,
        cfg: &Config,
        owner: container::Owner,
        metrics: Arc<Metrics>,
    ) -> Context {
        // The CA bundle children get: the combined one the daemon or `register` wrote, else the
        // operator's own file.
        let ca_bundle = cfg.network.ca_bundle.as_ref().map(|own| {
            let combined = cfg.host.ca_bundle();
            if combined.exists() {
                combined
            } else {
                own.clone()
            }
        });
        Context {
            clients,
            metrics,
            egress: cfg.network.clone(),
            ca_bundle,
            region: cfg.aws.region.clone().unwrap_or_default(),
            docker: container::Engine::new(&cfg.ecs_agent.docker_socket, owner, &cfg.spool.dir),
            confinement: Arc::new(cgroup::Confinement::polled(
                "only the daemon takes a cgroup of its own (under systemd, Delegate=yes)",
            )),
            writer: std::sync::Mutex::new(None),
        }
    }

    /// Command processors held to their limits by `confinement` (the daemon's own cgroup).
    pub(crate) fn confined(self, confinement: Arc<cgroup::Confinement>) -> Context {
        Context {
            confinement,
            ..self
        }
    }

    /// The DynamoDB writer client for `max_attempts` (a clone shares its connections).
    pub(crate) fn dynamodb_writer(&self, max_attempts: u32) -> aws_sdk_dynamodb::Client {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match &*w {
            Some((attempts, client)) if *attempts == max_attempts => client.clone(),
            _ => {
                let client = batch_writer::writer_client(
                    &self.clients.dynamodb,
                    max_attempts,
                    self.metrics.clone(),
                );
                *w = Some((max_attempts, client.clone()));
                client
            }
        }
    }
}

/// The processor of `pipeline`, configured from `cfg`.
pub(crate) fn build<'a>(
    pipeline: &'a Pipeline,
    cfg: &'a Config,
    ctx: &'a Context,
) -> Box<dyn Processor + 'a> {
    match &pipeline.processor {
        ProcessorKind::OrdersCsv => {
            Box::new(table::Table::new(pipeline, &Schema::orders(), cfg, ctx))
        }
        ProcessorKind::Table(schema) => Box::new(table::Table::new(pipeline, schema, cfg, ctx)),
        ProcessorKind::Container(spec) => Box::new(container::Container::new(spec, ctx)),
        ProcessorKind::Command(spec) => Box::new(command::Command::new(spec, ctx)),
    }
}
