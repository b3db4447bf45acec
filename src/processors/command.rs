//! The `command` processor: the user's program, run directly (no shell) once per file, in a process
//! group of its own, with a clean environment (the contract's variables and `PATH`) and a timeout that
//! kills the whole group.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tracing::Instrument;

use super::external::{self, Exit, OutputLog, Stream};
use super::{Context, Job, Outcome, ProcessFuture, Processor};
use crate::config::CommandSpec;
use crate::error::ProcessError;

/// The only inherited-looking variable a command gets besides the contract's.
pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the output pipes are drained after the group is gone.
const DRAIN: Duration = Duration::from_secs(2);

pub(crate) struct Command<'a> {
    spec: &'a CommandSpec,
    region: &'a str,
    ctx: &'a Context,
}

impl<'a> Command<'a> {
    pub(crate) fn new(spec: &'a CommandSpec, ctx: &'a Context) -> Self {
        Command {
            spec,
            region: &ctx.region,
            ctx,
        }
    }

    /// A program on the host has the host's network: it leaves it the way the daemon does.
    fn egress_env(&self) -> Vec<(String, String)> {
        let ca = self.ctx.ca_bundle.as_ref().and_then(|p| p.to_str());
        self.ctx.egress.child_env(ca)
    }

    async fn run(&self, job: &Job<'_>) -> Result<Outcome, ProcessError> {
        let program = &self.spec.program;
        let output_dir = external::make_output_dir(job, false)?;
        let (input, out) = (
            job.files.input.display().to_string(),
            output_dir.display().to_string(),
        );
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(external::substitute(&self.spec.args, &input, &out))
            .env_clear()
            .env("PATH", PATH)
            .envs(self.egress_env())
            .envs(external::contract_env(job, self.region, &input, &out))
            .current_dir(&job.files.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| {
            let text = format!("cannot run {}: {e}", program.display());
            match e.kind() {
                // The pipeline cannot work on this host until an operator installs or fixes the program.
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    ProcessError::Unavailable(format!(
                        "{text} (install it, or fix processor.command.program of pipeline {})",
                        job.pipeline.name
                    ))
                }
                _ => ProcessError::Transient(text),
            }
        })?;
        let group = Group(child.id().map(|p| p as i32));
        tracing::debug!(pid = child.id().unwrap_or(0), program = %program.display(), "processor started");
        let log = Arc::new(Mutex::new(OutputLog::default()));
        let readers = [
            child
                .stdout
                .take()
                .map(|s| pump(s, Stream::Stdout, log.clone())),
            child
                .stderr
                .take()
                .map(|s| pump(s, Stream::Stderr, log.clone())),
        ];
        let exit = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.code(), s.signal()) {
                        (Some(c), _) => Exit::Code(i64::from(c)),
                        (None, Some(sig)) => Exit::Signal(sig),
                        (None, None) => Exit::Code(-1),
                    }
                }
                Err(e) => return Err(ProcessError::Transient(format!("cannot wait for {}: {e}", program.display()))),
            },
            _ = tokio::time::sleep(self.spec.timeout) => Exit::TimedOut(self.spec.timeout),
            _ = job.cancel.cancelled() => {
                drop(group); // kills the group
                return Err(ProcessError::Cancelled);
            }
        };
        // Whatever the program left running in its group goes with it.
        drop(group);
        let _ = child.wait().await;
        for r in readers.into_iter().flatten() {
            if tokio::time::timeout(DRAIN, r).await.is_err() {
                tracing::debug!("processor output still open after its group was killed");
            }
        }
        let what = format!("command {}", program.display());
        external::finish(
            job,
            &what,
            &exit,
            &self.spec.permanent_exit_codes,
            &log,
            &output_dir,
            started.elapsed(),
        )
        .await
    }
}

impl Processor for Command<'_> {
    fn process<'a>(&'a self, job: &'a Job<'a>) -> ProcessFuture<'a> {
        Box::pin(self.run(job))
    }
}

/// The process group of a running command; SIGKILLed when dropped (timeout, shutdown, or done: no
/// process the command started outlives its file).
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: killpg has no memory-safety preconditions; a group that is already gone gives ESRCH.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

/// Copy one output pipe into the log until it closes.
fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut r: R,
    stream: Stream,
    log: Arc<Mutex<OutputLog>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            let mut buf = vec![0u8; 8192];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .feed(stream, &buf[..n]),
                }
            }
        }
        .in_current_span(),
    )
}
