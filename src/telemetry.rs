//! Logging: the journal (with structured fields) under systemd, human or JSON text on stderr otherwise.
//! The level can be changed at run time (SIGHUP re-reads `agent.log_level`); `RUST_LOG`, when set, wins.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The level in force, so that only a change is applied and logged.
    level: Arc<Mutex<String>>,
}

impl LogHandle {
    /// Apply `agent.log_level` unless `RUST_LOG` overrides it; a change is logged, the level in
    /// force again is not.
    pub(crate) fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        let mut current = self.level.lock().unwrap_or_else(|p| p.into_inner());
        if *current == level {
            return;
        }
        if let (Some(h), Ok(f)) = (&self.handle, EnvFilter::try_new(guarded(level))) {
            if h.reload(f).is_ok() {
                let old = std::mem::replace(&mut *current, level.to_string());
                drop(current);
                tracing::info!(
                    level,
                    old_level = %old,
                    "log level changed from {old} to {level} (agent.log_level)"
                );
            }
        }
    }
}

/// Dependencies whose debug output holds secrets: the Docker client logs every request body (the ECS
/// agent's environment: proxy passwords, ECS_ENGINE_AUTH_DATA). Kept at info unless the level names
/// them itself.
const SECRET_BEARING: [&str; 1] = ["bollard"];

/// Dependencies whose warnings repeat what a line of ours says better: the SDK's credentials chain
/// warns at every call whose provider fails ("provider failed to provide credentials"), where the
/// daemon says once, at start, every place it looked and the provider's own reason
/// (`aws::NoCredentials`), and each failing call's line carries the cause. Held at error unless the
/// level names them itself.
const SAID_BY_US: [&str; 1] = ["aws_config::meta::credentials"];

/// `level` with [`SECRET_BEARING`] targets held at info and [`SAID_BY_US`] ones at error.
fn guarded(level: &str) -> String {
    let mut out = level.to_string();
    for (targets, at) in [(&SECRET_BEARING[..], "info"), (&SAID_BY_US[..], "error")] {
        for target in targets {
            if !level.contains(target) {
                out.push_str(&format!(",{target}={at}"));
            }
        }
    }
    out
}

/// A problem that repeats while it lasts (a missing queue, an unreachable endpoint, a failing
/// Docker): its first occurrence is logged, the repeats are only counted, and its end is logged once
/// with the count — so that a day of retries is two lines in the journal, not thousands.
#[derive(Debug, Default)]
pub(crate) struct Episode {
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    key: String,
    since: Instant,
    occurrences: u64,
}

/// An episode that ended: what it was, how often it happened and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    pub key: String,
    pub occurrences: u64,
    pub lasted: Duration,
}

impl Ended {
    /// How long it lasted, to the second (`2m 10s`).
    pub(crate) fn lasted_text(&self) -> humantime::FormattedDuration {
        humantime::format_duration(Duration::from_secs(self.lasted.as_secs()))
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lasted = self.lasted_text();
        match self.occurrences {
            1 => write!(f, "once, over {lasted}"),
            n => write!(f, "{n} times over {lasted}"),
        }
    }
}

impl Episode {
    /// One occurrence of the problem `key` (the words that identify it, without what changes each
    /// time such as a retry delay). True when it is to be logged: the first of an episode, or a
    /// different problem than the one going on (which starts a new episode).
    pub(crate) fn occurred(&mut self, key: &str) -> bool {
        match &mut self.open {
            Some(o) if o.key == key => {
                o.occurrences += 1;
                false
            }
            _ => {
                self.open = Some(Open {
                    key: key.to_string(),
                    since: Instant::now(),
                    occurrences: 1,
                });
                true
            }
        }
    }

    /// The problem is over: what it was, when one was going on.
    pub(crate) fn ended(&mut self) -> Option<Ended> {
        self.open.take().map(|o| Ended {
            key: o.key,
            occurrences: o.occurrences,
            lasted: o.since.elapsed(),
        })
    }

    /// Whether a problem is going on.
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }
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
        level: Arc::new(Mutex::new(level.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_is_logged_once_and_its_end_counts_the_repeats() {
        let mut e = Episode::default();
        assert!(e.ended().is_none(), "nothing going on");
        assert!(e.occurred("queue q not found"));
        assert!(!e.occurred("queue q not found"));
        assert!(!e.occurred("queue q not found"));
        assert!(e.is_open());
        // A different problem is news: logged, and counted on its own.
        assert!(e.occurred("access denied"));
        assert!(!e.occurred("access denied"));
        let ended = e.ended().expect("an episode");
        assert_eq!(ended.key, "access denied");
        assert_eq!(ended.occurrences, 2);
        assert_eq!(ended.to_string(), "2 times over 0s");
        assert!(!e.is_open());
        assert!(e.occurred("access denied"), "a new episode after the end");
        assert_eq!(e.ended().unwrap().to_string(), "once, over 0s");
    }

    #[test]
    fn secret_bearing_and_repeating_targets_are_held_unless_named() {
        assert_eq!(
            guarded("info"),
            "info,bollard=info,aws_config::meta::credentials=error"
        );
        let named = guarded("debug,bollard=debug,aws_config::meta::credentials=debug");
        assert_eq!(
            named,
            "debug,bollard=debug,aws_config::meta::credentials=debug"
        );
    }
}
