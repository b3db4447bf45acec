//! The daemon's configuration in force, and how it changes: SIGHUP and Parameter Store refreshes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{self, Config};
use crate::params::ParameterLayer;
use crate::telemetry::LogHandle;

/// The configuration's layers and the running configuration. SIGHUP and Parameter Store refreshes go
/// through [`Settings::reload`]: live settings are applied and logged old -> new; the rest are logged as
/// taking effect after a restart; an invalid result leaves the running configuration in force.
pub(super) struct Settings {
    pub(super) path: PathBuf,
    pub(super) env: BTreeMap<String, String>,
    /// The last Parameter Store layer read successfully (`None` without `ssm.parameters_path`, or before
    /// the first successful read).
    pub(super) params: Option<ParameterLayer>,
    /// Whether the last attempt to read Parameter Store failed (retried sooner than the interval).
    pub(super) params_failing: bool,
    pub(super) current: Config,
    pub(super) tx: watch::Sender<Arc<Config>>,
    pub(super) log: LogHandle,
}

/// After a failed Parameter Store read, the next attempt comes this soon (or at the interval, if shorter).
const PARAMS_RETRY: Duration = Duration::from_secs(30);

impl Settings {
    /// The settings a daemon starts with: Parameter Store sits between the files and the
    /// environment, so it is read before anything starts, and settings only a restart changes come
    /// from it too. Returns whether the AWS or host settings changed (the clients must be rebuilt).
    pub(super) async fn start(&mut self, ssm: &aws_sdk_ssm::Client) -> bool {
        if self.current.ssm.parameters_path.is_none() {
            return false;
        }
        let before = self.current.clone();
        self.fetch_params(ssm).await;
        if self.params.is_some() {
            match config::load_with(&self.path, self.params.as_ref(), &self.env) {
                Ok(l) => {
                    self.current = l.config;
                    self.log.set_level(&self.current.agent.log_level);
                    let _ = self.tx.send(Arc::new(self.current.clone()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the configuration from Parameter Store is not valid ({e}); starting with the files and environment alone")
                }
            }
        }
        self.current.aws != before.aws || self.current.host != before.host
    }

    /// Read Parameter Store into the layer. An outage keeps the last layer and never stops the daemon.
    pub(super) async fn fetch_params(&mut self, ssm: &aws_sdk_ssm::Client) {
        let Some(path) = self.current.ssm.parameters_path.clone() else {
            self.params = None;
            return;
        };
        match crate::params::fetch(ssm, &path).await {
            Ok(layer) => {
                if self.params_failing {
                    tracing::info!(path = %path, "configuration from Parameter Store ({path}) is readable again");
                }
                tracing::debug!(path = %path, parameters = layer.parameters.len(), "read Parameter Store");
                self.params_failing = false;
                self.params = Some(layer);
            }
            Err(e) => {
                if self.params_failing {
                    tracing::debug!(path = %path, error = %e, "still cannot read configuration from Parameter Store");
                } else {
                    tracing::warn!(path = %path, error = %e, "cannot read configuration from Parameter Store ({path}: {e}); keeping the configuration in force and retrying (logged again when it works)");
                }
                self.params_failing = true;
            }
        }
    }

    /// When Parameter Store is due again.
    pub(super) fn params_delay(&self) -> Option<Duration> {
        self.current.ssm.parameters_path.as_ref()?;
        let every = self.current.ssm.refresh_interval;
        Some(if self.params_failing {
            every.min(PARAMS_RETRY)
        } else {
            every
        })
    }

    /// Load every layer and apply what changed. `why` names the trigger in the log.
    pub(super) fn reload(&mut self, why: &str) -> bool {
        let new = match config::load_with(&self.path, self.params.as_ref(), &self.env) {
            Ok(l) => l.config,
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "configuration reload failed ({why}): {e}; keeping the running configuration");
                return false;
            }
        };
        let changes = self.current.changes(&new);
        if changes.is_empty() {
            tracing::debug!(trigger = why, "configuration unchanged");
            return true;
        }
        for c in &changes {
            if c.live {
                tracing::info!(trigger = why, setting = %c.key, old = %c.old, new = %c.new, "configuration change applied: {} {} -> {}", c.key, c.old, c.new);
            } else {
                tracing::warn!(trigger = why, setting = %c.key, old = %c.old, new = %c.new, "configuration change takes effect after a restart: {} {} -> {}", c.key, c.old, c.new);
            }
        }
        self.log.set_level(&new.agent.log_level);
        self.current = new.clone();
        let _ = self.tx.send(Arc::new(new));
        true
    }
}
