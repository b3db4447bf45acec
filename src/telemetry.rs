//! Logging: the journal (with structured fields) under systemd, human or JSON text on stderr otherwise.
//! The level can be changed at run time (SIGHUP re-reads `agent.log_level`); `RUST_LOG`, when set, wins.

use std::io::IsTerminal;

use tracing_journald::{Priority, PriorityMappings};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when started by systemd (JOURNAL_STREAM is set), else human text.
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// The systemd journal, with span fields as journal fields.
    Journald,
}

type Base = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub(crate) struct LogHandle {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    env_override: bool,
}

impl LogHandle {
    /// Apply `agent.log_level` unless `RUST_LOG` overrides it.
    pub(crate) fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        if let (Some(h), Ok(f)) = (&self.handle, EnvFilter::try_new(guarded(level))) {
            if h.reload(f).is_ok() {
                tracing::info!(level, "log level set");
            }
        }
    }
}

/// Dependencies whose debug output holds secrets: the Docker client logs every request body (the ECS
/// agent's environment: proxy passwords, ECS_ENGINE_AUTH_DATA). Kept at info unless the level names
/// them itself.
const SECRET_BEARING: [&str; 1] = ["bollard"];

/// `level` with [`SECRET_BEARING`] targets held at info.
fn guarded(level: &str) -> String {
    let mut out = level.to_string();
    for target in SECRET_BEARING {
        if !level.contains(target) {
            out.push_str(&format!(",{target}=info"));
        }
    }
    out
}

/// Install the global subscriber. Call once, early.
pub(crate) fn init(format: LogFormat, level: &str) -> LogHandle {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = EnvFilter::try_new(guarded(env.as_deref().unwrap_or(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let format = match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let output: Box<dyn Layer<Base> + Send + Sync> = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            // No field prefix: the fields are the documented journal fields (KEY, BUCKET, ...), so
            // `journalctl -u offload-agent KEY=input/x.csv` finds a file's story.
            // Syslog's meaning of the levels (tracing-journald's default makes info "notice").
            Ok(l) => Box::new(
                l.with_syslog_identifier("offload-agent".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(PriorityMappings {
                        info: Priority::Informational,
                        debug: Priority::Debug,
                        trace: Priority::Debug,
                        ..PriorityMappings::new()
                    }),
            ),
            Err(e) => {
                eprintln!("offload-agent: cannot reach the journal ({e}); logging to stderr");
                Box::new(text_layer())
            }
        },
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr),
        ),
        _ => Box::new(text_layer()),
    };
    // The filter is the innermost layer, so reloading it changes what every output sees.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init();
    LogHandle {
        handle: Some(handle),
        env_override: env.is_some(),
    }
}

fn text_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
}

/// This process's peak resident set size in bytes (Linux `VmHWM`), for summaries and benchmarks.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    crate::pages::status_kb(None, "VmHWM:").map(|kb| kb * 1024)
}
