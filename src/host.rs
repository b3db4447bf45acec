//! The host's service manager, through the configured `systemctl` (`host.systemctl`), run without
//! blocking the async runtime (tests point `host.systemctl` at a stand-in script); and its name.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// This host's name (the kernel's), or `fallback` when it cannot be read.
pub(crate) fn hostname(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}

/// How long one `systemctl` call may take (a stuck unit start must not hang `register`).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A `systemctl` call that failed, with the command line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} did not finish within {CALL_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("`{command}` failed (see `journalctl -xe`)")]
    Failed { command: String },
}

#[derive(Debug, Clone)]
pub(crate) struct Systemctl {
    program: String,
}

impl Systemctl {
    pub(crate) fn new(program: impl Into<String>) -> Self {
        Systemctl {
            program: program.into(),
        }
    }

    /// Run `systemctl ARGS`; Ok(true) when it exited 0. Err when it could not be run at all.
    pub(crate) async fn run(&self, args: &[&str]) -> Result<bool, Error> {
        Ok(self.output(args).await?.0)
    }

    /// Run `systemctl ARGS`: whether it exited 0, and what it printed on stdout.
    async fn output(&self, args: &[&str]) -> Result<(bool, String), Error> {
        let child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(CALL_TIMEOUT, child).await {
            Ok(Ok(out)) => Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )),
            Ok(Err(source)) => Err(Error::Spawn {
                command: self.command(args),
                source,
            }),
            Err(_) => Err(Error::Timeout {
                command: self.command(args),
            }),
        }
    }

    /// Run and require success, naming the command on failure.
    pub(crate) async fn must(&self, args: &[&str]) -> Result<(), Error> {
        match self.run(args).await? {
            true => Ok(()),
            false => Err(Error::Failed {
                command: self.command(args),
            }),
        }
    }

    fn command(&self, args: &[&str]) -> String {
        format!("{} {}", self.program, args.join(" "))
    }

    /// Whether a unit is active. A missing systemctl counts as "not active".
    pub(crate) async fn is_active(&self, unit: &str) -> bool {
        self.run(&["is-active", "--quiet", unit])
            .await
            .unwrap_or(false)
    }

    /// A unit's `ActiveState` (`active`, `activating`, `failed`, …); `None` when systemd cannot say
    /// (no systemd running, no systemctl).
    pub(crate) async fn active_state(&self, unit: &str) -> Option<String> {
        match self
            .output(&["show", "--property=ActiveState", "--value", unit])
            .await
        {
            Ok((true, state)) if !state.is_empty() => Some(state),
            _ => None,
        }
    }

    /// Whether a unit is installed (systemd knows its unit file).
    pub(crate) async fn exists(&self, unit: &str) -> bool {
        // `cat` fails for units that do not exist, and works for every installed one.
        self.run(&["cat", unit]).await.unwrap_or(false)
    }
}
