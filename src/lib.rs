//! offload-agent: process S3 file events on your own hosts.
//!
//! Module map:
//! - [`cli`]: command-line definitions (clap); `--help` documents commands and exit codes.
//! - [`app`]: what each subcommand does, and the mapping of outcomes to exit codes.
//! - [`config`]: typed configuration, layering (file, conf.d, environment), complete validation.
//! - [`telemetry`]: logging to journald under systemd, text or JSON otherwise; run-time level changes.
//! - [`daemon`]: the task tree of `run`: signals, sd_notify, two-phase shutdown, reload.
//! - [`aws`]: SDK clients with region, endpoints, timeouts and retries, built in one place.
//! - [`credentials`]: credentials that follow the SSM agent's in-place rotation of the shared file.
//! - [`params`]: configuration from SSM Parameter Store, as a layer between the files and the environment.
//! - [`error`]: failure classes (transient, permanent, cancelled) and AWS error classification.
//! - [`backoff`]: exponential backoff with jitter, shared by every retry loop.
//! - [`worker`]: receiver, worker pool, event parsing, routing, spool, message settlement.
//! - [`processors`]: file processors (`orders-csv`).
//! - [`ecs_agent`]: supervision of the Amazon ECS container agent through Docker (bollard).
//! - [`provision`]: idempotent creation of the bucket, queues, notification and table.
//! - [`iam_policy`]: the least-privilege IAM policy a configuration needs.
//! - [`pages`]: unmapping the pages of this binary that only start-up ran, once the daemon is idle;
//!   memory figures from `/proc`.
//! - [`host`]: the host's service manager (`systemctl`), called without blocking the runtime.
//! - [`registration`]: `register` / `deregister` with SSM hybrid activation and ECS Anywhere.

pub mod admin;
pub mod app;
pub mod aws;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod docker;
pub mod ecs_agent;
pub mod error;
pub mod event;
pub mod host;
pub mod iam_policy;
pub mod limits;
pub mod metrics;
pub mod pages;
pub mod params;
pub mod processors;
pub mod provision;
pub mod registration;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod transfer;
pub mod worker;
