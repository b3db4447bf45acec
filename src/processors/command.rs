//! The `command` processor: the user's program, run directly (no shell) once per file, in a process
//! group of its own (and, where the daemon has one, a cgroup of its own: [`super::cgroup`]), with a
//! clean environment (the contract's variables and `PATH`) and a timeout that kills the whole group.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tracing::Instrument;

use super::account::{self, Account, ChildLimits, InChild};
use super::cgroup::{Confinement, Run};
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

    /// The account the program runs as, checked: it exists, the daemon can become it, and it can
    /// reach its files and run the program. `None`: the daemon's own account (nothing to switch).
    fn account(&self, job: &Job<'_>, output_dir: &Path) -> Result<Option<Account>, ProcessError> {
        let account = resolve(self.spec, &job.pipeline.name)?;
        if account.is_current() {
            return Ok(None);
        }
        account
            .hand_over(&job.files.dir, &job.files.input, output_dir)
            .map_err(|e| {
                ProcessError::Transient(format!(
                    "cannot hand {} over to {}: {e}",
                    job.files.dir.display(),
                    account.name
                ))
            })?;
        if let Some(why) = account.blocked_on(output_dir) {
            return Err(ProcessError::Unavailable(format!(
                "{} cannot reach its files in the spool: {why}; make that directory searchable \
                 (chmod o+x), move spool.dir, or set processor.command.user of pipeline {}",
                account.name, job.pipeline.name
            )));
        }
        Ok(Some(account))
    }

    /// The program's process, ready to spawn: its arguments and clean environment, its own process
    /// group and cgroup, the account it runs as and the kernel's limits it runs within.
    fn command(
        &self,
        job: &Job<'_>,
        output_dir: &Path,
        account: Option<&Account>,
        run: Option<&Run>,
    ) -> tokio::process::Command {
        let (input, out) = (
            job.files.input.display().to_string(),
            output_dir.display().to_string(),
        );
        let in_child = InChild {
            join: run.and_then(Run::join_fd),
            limits: match run {
                Some(_) => ChildLimits::in_cgroup(self.spec.cpu_time),
                None => ChildLimits::new(
                    self.spec.memory_bytes(),
                    self.spec.cpu_time,
                    self.spec.pids_limit,
                ),
            },
            account: account.map(|a| (a.uid, a.gid)),
        };
        let mut cmd = tokio::process::Command::new(&self.spec.program);
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
        // Not cmd.uid()/gid(): the child joins its cgroup first, which takes root, and std switches
        // the account before any pre_exec closure runs.
        // SAFETY: the closure makes only async-signal-safe calls (write, setrlimit, setgroups,
        // setgid, setuid) and touches no lock or allocation: `in_child` is a Copy value moved in.
        unsafe {
            cmd.pre_exec(move || in_child.apply());
        }
        cmd
    }

    /// Why the program could not be started: the pipeline cannot work on this host until an operator
    /// installs or fixes the program (missing, not executable), or a transient failure.
    fn cannot_start(
        &self,
        job: &Job<'_>,
        account: Option<&Account>,
        e: std::io::Error,
    ) -> ProcessError {
        let as_whom = account
            .map(|a| format!(" as {}", a.name))
            .unwrap_or_default();
        let text = format!("cannot run {}{as_whom}: {e}", self.spec.program.display());
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                ProcessError::Unavailable(format!(
                    "{text} (install it, or fix processor.command.program of pipeline {})",
                    job.pipeline.name
                ))
            }
            _ => ProcessError::Transient(text),
        }
    }

    async fn run(&self, job: &Job<'_>) -> Result<Outcome, ProcessError> {
        let program = &self.spec.program;
        let output_dir = external::make_output_dir(job, false)?;
        let account = self.account(job, &output_dir)?;
        let memory = self.spec.memory_bytes();
        let run = match &*self.ctx.confinement {
            Confinement::Cgroup(tree) => {
                Some(tree.enter(memory, self.spec.pids_limit).map_err(|e| {
                    ProcessError::Transient(format!("cannot make the command's cgroup: {e}"))
                })?)
            }
            Confinement::Polled { .. } => None,
        };
        let started = Instant::now();
        let mut child = self
            .command(job, &output_dir, account.as_ref(), run.as_ref())
            .spawn()
            .map_err(|e| self.cannot_start(job, account.as_ref(), e))?;
        let leader = child.id().map(|p| p as i32);
        let group = Group(leader);
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
            // In a cgroup the kernel enforces memory.max; otherwise the daemon looks.
            rss = account::exceeds(leader.unwrap_or(0), memory), if leader.is_some() && run.is_none() => {
                Exit::OutOfMemory(Some(format!(
                    "its memory limit of {}: {} resident",
                    account::show_bytes(memory),
                    account::show_bytes(rss)
                )))
            }
            _ = job.cancel.cancelled() => {
                drop(group); // kills the group
                if let Some(run) = run {
                    run.close().await;
                }
                return Err(ProcessError::Cancelled);
            }
        };
        // Killed by the kernel's OOM killer (the whole cgroup at once): reported as a container's
        // out-of-memory, whatever the leader's exit looked like.
        let exit = match (&exit, run.as_ref().and_then(Run::out_of_memory)) {
            (Exit::Code(_) | Exit::Signal(_), Some(why)) => Exit::OutOfMemory(Some(why)),
            _ => exit,
        };
        // Whatever the program left running in its group, or its cgroup, goes with it.
        drop(group);
        if let Some(run) = run {
            run.close().await;
        }
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

/// The account a command pipeline's program runs as, or why it cannot run as that account here.
pub(crate) fn resolve(spec: &CommandSpec, pipeline: &str) -> Result<Account, ProcessError> {
    let account = Account::lookup(&spec.user).map_err(|why| {
        let hint = if spec.user == crate::config::DEFAULT_COMMAND_USER {
            format!(
                "the package creates it; elsewhere: useradd --system --user-group --no-create-home \
                 --shell /usr/sbin/nologin {}",
                spec.user
            )
        } else {
            format!("create it, or fix processor.command.user of pipeline {pipeline}")
        };
        ProcessError::Unavailable(format!(
            "pipeline {pipeline} runs its program as {}: {why} ({hint})",
            spec.user
        ))
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !account.is_current() && me != 0 {
        return Err(ProcessError::Unavailable(format!(
            "pipeline {pipeline} runs its program as {}, but the daemon runs as uid {me}, not root, and \
             cannot switch to it: run the daemon as root, or set processor.command.user to the daemon's own account",
            account.name
        )));
    }
    if let Some(why) = account.cannot_run(&spec.program) {
        return Err(ProcessError::Unavailable(format!(
            "{} cannot run {}: {why} (install it where {} can run it, or fix processor.command.program \
             of pipeline {pipeline})",
            account.name,
            spec.program.display(),
            account.name
        )));
    }
    Ok(account)
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
