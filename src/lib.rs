//! offload-agent: process S3 file events on your own hosts.
//!
//! The module map, in the order a file travels, then the daemon around it and the host's side.
//! Modules lower in a group use the ones above them, never the other way round.
//!
//! **Leaves** (depend on nothing of the agent's but `error`):
//! - `limits`: the AWS services' limits (12 h visibility, 1,024-byte S3 keys, 2,048-byte DynamoDB
//!   keys, ...), each named once.
//! - `error`: failure classes (transient, permanent, unavailable, cancelled) and AWS error
//!   classification.
//! - `backoff`: exponential backoff with jitter, shared by every retry loop.
//! - `event`: SQS message bodies into the S3 objects they announce.
//! - `spool`: the private local files an object is streamed into.
//! - `transfer`: S3 transfers (streamed downloads, multipart uploads, reports).
//! - `compression`: gzip and zstd objects, recognised and decompressed as a bounded stream.
//! - `disk`: the spool's free space against `spool.min_free`, with hysteresis.
//! - `docker`: the Docker engine (connect with version negotiation, not-found, image tarballs).
//! - `egress`: the way out to AWS (proxies, `no_proxy`, the extra root CA): the one HTTP client
//!   every AWS client is built on, the variables children get, and egress failures in one line.
//! - `clock`: the host's clock against the `Date` of AWS's answers.
//!
//! **The file's path**:
//! - `processors`: the `Processor` interface and the processors (`table`, `container`,
//!   `command`); each gets a spooled object and returns what to store.
//! - `worker`: `receive` (long polls for as many messages as there are free workers) → `run` (one
//!   object through its pipeline: spool, processor, outputs) → `settle` (a pure decision, then
//!   delete, release, retry later or dead-letter).
//!
//! **The daemon**:
//! - `cli` (clap definitions; `--help` documents commands and exit codes) and `app` (what each
//!   subcommand does, and the mapping of outcomes to exit codes).
//! - `config`: typed configuration by section, each with its defaults; layering (file, conf.d,
//!   Parameter Store, environment); complete validation.
//! - `params`: configuration from SSM Parameter Store, as a layer between the files and the
//!   environment.
//! - `aws` (SDK clients with region, endpoints, timeouts and retries, built in one place) and
//!   `credentials` (credentials that follow the SSM agent's in-place rotation of the shared file).
//! - `daemon`: the task tree of `run`: settings and reload, the queues, signals, sd_notify, the
//!   watchdog, two-phase shutdown.
//! - `metrics` (the one registry every report reads), `status` (the `/status` document), `admin`
//!   (the loopback HTTP endpoint: /healthz /readyz /metrics /status) and `telemetry` (journald under
//!   systemd, text or JSON otherwise; run-time level changes).
//! - `pages`: unmapping the pages of this binary that only start-up ran, once the daemon is idle.
//!
//! **The host**:
//! - `ecs_agent`: supervision of the Amazon ECS container agent through Docker; `policy` judges its
//!   exit codes and health, the supervisor acts.
//! - `registration`: `register` / `deregister` with SSM hybrid activation and ECS Anywhere.
//! - `host`: the host's service manager (`systemctl`), called without blocking the runtime.
//! - `preflight`: each endpoint this host needs, step by step (DNS, TCP, proxy, TLS, HTTP).
//! - `watchdog`: restarting an SSM agent that stopped refreshing the credentials.
//! - `diagnose`: one redacted support bundle of journals, Docker, the firewall, configuration and status.
//! - `provision` (idempotent creation of the bucket, queues, notification and table, each tagged as
//!   ours, and `--destroy`, which removes exactly that) and `iam_policy` (the least-privilege IAM policy a configuration needs).
//!
//! What tests, benchmarks and fuzz targets use is `pub`; everything else is `pub(crate)`.

pub(crate) mod backoff;
pub mod error;
pub mod event;
pub(crate) mod limits;

pub mod clock;
pub mod compression;
pub mod disk;
pub(crate) mod docker;
pub mod egress;
pub(crate) mod spool;
pub mod transfer;

pub mod processors;
pub(crate) mod worker;

pub mod admin;
pub mod app;
pub mod aws;
pub mod cli;
pub mod config;
pub mod credentials;
pub(crate) mod daemon;
pub(crate) mod metrics;
pub mod pages;
pub(crate) mod params;
pub(crate) mod status;
pub mod telemetry;

pub(crate) mod diagnose;
pub mod ecs_agent;
pub(crate) mod host;
pub(crate) mod iam_policy;
pub(crate) mod preflight;
pub(crate) mod provision;
pub(crate) mod registration;
pub(crate) mod watchdog;
