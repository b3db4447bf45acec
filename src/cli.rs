//! Command-line interface (clap). `offload-agent --help` is the reference; exit codes are listed there.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use crate::telemetry::LogFormat;

const AFTER_HELP: &str = "\
CONFIGURATION:
    TOML, read from --config (default /etc/offload-agent/agent.toml), then every
    conf.d/*.toml beside it in name order, then environment variables
    OFFLOAD_AGENT_<SECTION>__<KEY> (for example OFFLOAD_AGENT_AWS__ENDPOINT_URL=http://127.0.0.1:5000).
    With ssm.parameters_path set, Parameter Store sits between the files and the environment.
    /etc/offload-agent/agent.toml as installed (config/agent.toml in the source tree) documents
    every key with its default. AWS credentials:
    on an SSM hybrid host, the SSM agent's rotating credentials file (followed as it is rewritten);
    with aws.credentials_file, that file; otherwise the SDK's default chain without the EC2 instance
    metadata service (aws.imds = true adds it). Egress: [network] https_proxy, http_proxy, no_proxy and
    ca_bundle, each falling back to HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY and AWS_CA_BUNDLE.

SIGNALS (run):
    SIGTERM, SIGINT  stop receiving, finish in-flight files within agent.shutdown_grace, release the
                     messages of unfinished ones (visible again at once), exit 0
    SIGHUP           reload the configuration: pipelines and agent.log_level change live; other
                     changes are logged as needing a restart

EXIT STATUS:
    0   success
    1   runtime failure (AWS unreachable, a transient processing failure, I/O error); status: the
        daemon answers but is not ready; provision --destroy --yes: a bucket or table that holds
        data, without --force (nothing is removed)
    3   status: no daemon answers at admin.listen
    64  bad command-line usage
    65  process: the file is not valid orders CSV, or --dry-run found rejected rows
    69  register: an AWS side, the SSM agent or the ECS agent did not answer in time; preflight (and
        register before it changes anything): an endpoint does not answer
    78  configuration error (also: no AWS credentials anywhere they are looked for) (every problem is listed, naming the key and the file);
        provision and preflight: a pipeline's table exists with another key than its schema's

EXAMPLES:
    offload-agent config check --config ./config/demo.toml
    offload-agent preflight --config ./config/demo.toml
    offload-agent provision --config ./config/demo.toml
    offload-agent provision --destroy --config ./config/demo.toml     # then with --yes
    offload-agent run --config ./config/demo.toml
    offload-agent process --config ./config/demo.toml s3://offload-file-drop/input/orders.csv
    offload-agent process --dry-run ./orders.csv
    offload-agent register --region eu-west-1 --cluster onprem --activation-id ID \\
        --activation-code-file /root/activation-code
    offload-agent iam-policy --account 123456789012
    offload-agent status
    offload-agent diagnose --since 6h -o /tmp/ticket-1234.tar.gz
    curl -s http://127.0.0.1:9464/metrics

DOCUMENTATION:
    /usr/share/doc/offload-agent/: README.md, then one page per concern: install.md (the unit,
    journald), configuration.md, operations.md (commands, exit codes, endpoint, metrics, status),
    files.md (what happens to a file), processors.md (bring your own), hybrid.md (register,
    rotating credentials, Parameter Store), ecs-agent.md (the supervisor), egress.md (proxies, a
    private CA, private endpoints, preflight).";

/// offload-agent: process S3 file events on your own hosts.
///
/// Consumes S3 ObjectCreated notifications from an SQS queue with a bounded pool of workers, runs
/// each file through its pipeline (built in: orders-csv, which loads CSV orders into DynamoDB and
/// writes an output file back to S3), and deletes a message only after everything it caused is
/// stored. Bad rows go to a rejects report, bad files to an error report and the dead-letter queue;
/// nothing is dropped silently.
#[derive(Debug, Parser)]
#[command(name = "offload-agent", version, after_long_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ConfigArg {
    /// Configuration file; conf.d/*.toml beside it is read too.
    #[arg(long, short = 'c', value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub(crate) config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the daemon: receive events from the queue and process files until SIGTERM or SIGINT.
    ///
    /// Tells systemd when it is ready (Type=notify) and when it stops. Stale spool files from an
    /// earlier run are removed at start; their messages come back through SQS.
    Run(ConfigArg),

    /// Create what the configuration names, idempotently, and say what existed already; with
    /// --destroy, remove it again.
    ///
    /// The bucket(s), the queue and its dead-letter queue (redrive after queue.max_receive_count
    /// receives), a queue policy that lets the bucket send to it, the bucket notification (every
    /// ObjectCreated event, each pipeline's prefix and suffix), and each pipeline's DynamoDB table
    /// (on-demand, with its schema's key: OrderId of type S for orders-csv). Works against AWS and an
    /// emulator alike. What it creates is tagged offload-agent:provisioned-by=HOST:CONFIG; the
    /// notification entries and queue-policy statements it adds have ids starting with
    /// "offload-agent-", and everyone else's entries and statements are kept. A table that exists with
    /// another key than its pipeline's schema needs is reported (table, key wanted, key found), left
    /// alone, and provision exits 78 after doing everything else.
    ///
    /// --destroy shows what would be removed: the buckets, queues and tables the configuration
    /// names that carry the tag, and the entries and statements of ours on those that do not (which
    /// stay). Nothing changes without --yes. A bucket that holds objects or a table that holds items
    /// is refused (and then nothing is removed, exit 1) unless --force, which deletes every object
    /// version first. A second run says there is nothing left.
    Provision {
        #[command(flatten)]
        config: ConfigArg,
        /// Remove what provision made (only shown, unless --yes).
        #[arg(long)]
        destroy: bool,
        /// With --destroy: carry the removal out.
        #[arg(long, requires = "destroy")]
        yes: bool,
        /// With --destroy: empty buckets and tables that still hold data, then remove them.
        #[arg(long, requires = "destroy")]
        force: bool,
    },

    /// Process one file now, without SQS, and print a summary.
    ///
    /// With s3://BUCKET/KEY the object goes through its pipeline's processor exactly as the daemon
    /// would do it (orders-csv: DynamoDB writes, output and rejects report; a container or command
    /// processor: run once, its output files stored). With --dry-run and a local path, the file
    /// (gzip or zstd compressed, or not) is only validated against a schema: the orders schema, or
    /// with --pipeline NAME that pipeline's (orders-csv or table); rejected rows are printed as CSV
    /// (Line, the key's attributes, Reason) on stdout and nothing is written anywhere; without
    /// --pipeline no configuration is needed.
    Process {
        #[command(flatten)]
        config: ConfigArg,
        /// Validate a local file only; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: validate against this pipeline's schema (default: the orders schema).
        #[arg(long, value_name = "NAME", requires = "dry_run")]
        pipeline: Option<String>,
        /// Show a progress bar even when stderr is not a terminal (it is shown on terminals anyway).
        #[arg(long)]
        progress: bool,
        /// s3://BUCKET/KEY, or with --dry-run a local file path.
        #[arg(value_name = "FILE")]
        target: String,
    },

    /// Register this host with SSM (hybrid activation) and ECS Anywhere; idempotent.
    ///
    /// Steps, each printed with its outcome: check every endpoint as `preflight` does (stop, exit 69,
    /// if one does not answer, unless --skip-preflight); write the egress of [network] (a proxy, an extra root CA)
    /// for the SSM agent and Docker as systemd drop-ins (offload-agent-egress.conf) and for the ECS
    /// agent in /var/lib/ecs/ecs.config (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, SSL_CERT_FILE), restarting
    /// the SSM agent if it runs; keep the host's managed instance id if the SSM agent
    /// registered it before (unless --reregister), else stop the SSM agent, run `amazon-ssm-agent
    /// -register`, enable and start it; wait until its rotating credentials are published and Systems
    /// Manager reports the instance online; make sure Docker answers (starting docker.service when it
    /// is installed but stopped); write ECS_CLUSTER to /etc/ecs/ecs.config and AWS_DEFAULT_REGION,
    /// ECS_EXTERNAL=true (and ECS_BACKEND_HOST with an ECS endpoint override) to
    /// /var/lib/ecs/ecs.config, each key exactly once and every other line kept; start the ECS agent
    /// (through the running daemon, or here) and wait for its container instance ARN; confirm it is
    /// ACTIVE with its agent connected. Exit 0 registered (or already was), 69 an AWS side or agent did
    /// not answer in time, 78 bad input. The activation code is never printed or logged.
    Register {
        #[command(flatten)]
        config: ConfigArg,
        /// AWS region of the activation and the cluster (default: aws.region).
        #[arg(long)]
        region: Option<String>,
        /// The ECS cluster to join.
        #[arg(long)]
        cluster: String,
        /// The SSM hybrid activation id.
        #[arg(long, value_name = "ID")]
        activation_id: String,
        /// A file holding the activation code (or set OFFLOAD_AGENT_ACTIVATION_CODE). Not accepted as
        /// an argument: arguments are visible to every user of the host.
        #[arg(long, value_name = "PATH")]
        activation_code_file: Option<PathBuf>,
        /// Register with SSM again even though the host already has a managed instance id.
        #[arg(long)]
        reregister: bool,
        /// Bound on each wait (credentials, online, agent registered, ACTIVE).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Do not check the endpoints first (see `preflight`).
        #[arg(long)]
        skip_preflight: bool,
        /// Restart docker.service when its egress drop-in changed (this stops every container unless
        /// Docker's live-restore is on); without it, register says that a restart is needed.
        #[arg(long)]
        restart_docker: bool,
    },

    /// Take this host out of ECS and SSM again, undoing what register and the supervisor did.
    ///
    /// Deregisters the container instance (forced), stops and removes the agent container, removes the
    /// task IAM role network rules, deregisters the managed instance with the host's own credentials
    /// (unless --keep-ssm) and disables the SSM agent, removes exactly the keys register wrote from the
    /// ECS config files (other lines stay), its egress drop-ins and CA bundle, and clears the agent's
    /// saved state so that a later register starts clean. Idempotent: running it twice is not an error.
    Deregister {
        #[command(flatten)]
        config: ConfigArg,
        /// Leave the SSM registration in place.
        #[arg(long)]
        keep_ssm: bool,
    },

    /// Check every endpoint this host needs, through the configured proxy and trust store.
    ///
    /// For the region and endpoints of the configuration: the daemon's (sqs, s3, dynamodb, ssm), the
    /// SSM agent's (ssmmessages, ec2messages) and the ECS agent's (ecs, and its ACS poll endpoint when
    /// the credentials allow ecs:DiscoverPollEndpoint). Each is checked step by step: DNS (of the
    /// proxy when one is used), TCP, the proxy's CONNECT, TLS with the certificate's issuer (a
    /// TLS-inspecting proxy shows as the company's CA), the HTTP answer, the time taken and the clock
    /// skew from the answer's Date. Prints a table, then what to fix for each failure; --json prints
    /// the same as JSON. With credentials, each pipeline's DynamoDB table is described too: the key
    /// its schema needs against the key the table has. Exit 0 when every endpoint answers and every
    /// existing table has its key, 69 when an endpoint does not answer, 78 when a table has another
    /// key. `register` runs the same endpoint checks before it changes anything.
    Preflight {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },

    /// Print the least-privilege IAM policy (JSON) the host's role needs for this configuration.
    ///
    /// Covers the queue and dead-letter queue, each pipeline's input prefix, output prefix and table,
    /// the Parameter Store path, and ECS Anywhere's agent actions. Resources are scoped to the region
    /// and, with --account, the account.
    IamPolicy {
        #[command(flatten)]
        config: ConfigArg,
        /// The AWS account id for resource ARNs (default: any account, "*").
        #[arg(long, value_name = "ID")]
        account: Option<String>,
    },

    /// Show what the running daemon is doing, from its admin endpoint.
    ///
    /// Reads /status from admin.listen (from the configuration; --listen overrides it) and prints
    /// the registration (managed instance id, cluster, container instance ARN), the ECS agent (state,
    /// version, restarts), the worker (in flight, files done and failed, rows per second over the
    /// last minute, each pipeline) and the last errors. Exit 0 when the daemon answers and is ready,
    /// 1 when it answers but is not ready (the reason is printed), 3 when no daemon answers.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the /status JSON document unchanged, for scripts.
        #[arg(long)]
        json: bool,
        /// The endpoint's address (default: admin.listen of the configuration, else 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },

    /// Collect one .tar.gz for a support ticket, with every secret redacted.
    ///
    /// For the last --since (24h): the journals of offload-agent, ecs, amazon-ssm-agent and docker;
    /// docker info, version and the containers; the ECS agent's container log and introspection
    /// metadata; iptables-save (filter and nat) and route_localnet; `config check`'s output; the
    /// daemon's /status; the credentials files' paths, modification times and expiry (never their
    /// contents); the ECS agent's env files; a `preflight` table. Access keys, secret keys, session
    /// tokens, activation codes, proxy passwords and SecureString values are replaced by <redacted>
    /// in every file: those known on this host wherever they appear, and anything that looks like
    /// one. Works without a running daemon and with a broken configuration; MANIFEST.txt in the
    /// bundle lists each part, and what could not be collected with why. Run as root to read the
    /// journals and the firewall. Exit 0 once the bundle is written, 1 when it cannot be.
    Diagnose {
        #[command(flatten)]
        config: ConfigArg,
        /// How far back the journals and logs go.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Where to write the bundle (default: ./offload-agent-diagnose-HOST-TIME.tar.gz).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },

    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate the configuration and print the effective result (files, Parameter Store when
    /// ssm.parameters_path is set, environment; defaults filled in; SecureString values redacted) and
    /// where each value came from. Exits 78 listing every problem if it is invalid.
    Check(ConfigArg),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
