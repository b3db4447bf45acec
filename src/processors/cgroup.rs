//! The kernel's own limits for command processors: a cgroup of the daemon's own.
//!
//! Under systemd with `Delegate=yes` (the packaged unit), on a cgroup v2 host, the daemon owns the
//! subtree of its service's cgroup. At start it moves itself into `<service>/daemon` (cgroup v2 lets
//! only leaves hold processes once controllers are enabled below) and enables the `memory` and `pids`
//! controllers for its children; each command then runs in a cgroup of its own, `<service>/run-<n>`,
//! with `memory.max` (no swap beyond it, the whole group killed at once by the kernel's OOM killer) and
//! `pids.max`, and that cgroup is killed and removed when the command is done. A process that leaves
//! the command's process group (setsid, a double fork) stays in its cgroup and goes with it.
//!
//! Anywhere else (cgroup v1 or hybrid hosts, no delegation, no systemd, the `process` command) the
//! limits are the per-process ones and the daemon's look at the group's resident memory every 50 ms
//! ([`super::account`]), and the start-up log says why.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where the cgroup v2 hierarchy is mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The daemon's own leaf, beside its commands' cgroups.
const DAEMON_LEAF: &str = "daemon";
/// A command's cgroup is `run-<n>`.
const RUN_PREFIX: &str = "run-";
/// How long a killed command's cgroup may take to empty before it is left for the next start.
const EMPTY_WAIT: Duration = Duration::from_secs(2);
const EMPTY_LOOK: Duration = Duration::from_millis(10);

/// How command processors are held to their limits on this host.
#[derive(Debug)]
pub(crate) enum Confinement {
    /// A delegated cgroup v2 subtree: the kernel enforces memory and process count per command.
    Cgroup(Tree),
    /// Per-process rlimits and the daemon's look at resident memory; why the kernel's cannot be used.
    Polled { why: String },
}

impl Confinement {
    /// For the `process` command and tests: limits as the daemon enforces them without its own cgroup.
    pub(crate) fn polled(why: &str) -> Confinement {
        Confinement::Polled { why: why.into() }
    }

    /// The daemon's confinement: its own cgroup subtree when systemd delegated one, else polled.
    /// Established once per process (the cgroup is the process's, whatever runs in it), and logged.
    pub(crate) fn for_daemon() -> Arc<Confinement> {
        static ONCE: OnceLock<Arc<Confinement>> = OnceLock::new();
        ONCE.get_or_init(|| {
            let c = Arc::new(Confinement::establish_own());
            let limits = match &*c {
                Confinement::Cgroup(_) => "cgroup",
                Confinement::Polled { .. } => "polled",
            };
            tracing::info!(limits, "{}", c.describe());
            c
        })
        .clone()
    }

    fn establish_own() -> Confinement {
        let own = match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(t) => t,
            Err(e) => {
                return Confinement::Polled {
                    why: format!("cannot read /proc/self/cgroup: {e}"),
                }
            }
        };
        // SAFETY: getpid has no preconditions and cannot fail.
        let pid = unsafe { libc::getpid() };
        match establish(Path::new(CGROUP_ROOT), &own, pid) {
            Ok(tree) => Confinement::Cgroup(tree),
            Err(why) => Confinement::Polled { why },
        }
    }

    /// One line for the start-up log.
    pub(crate) fn describe(&self) -> String {
        match self {
            Confinement::Cgroup(t) => format!(
                "each command runs in a cgroup of its own under {} (memory.max, pids.max: the kernel's limits)",
                t.dir.display()
            ),
            Confinement::Polled { why } => format!(
                "commands' memory is looked at every 50 ms and per-process rlimits apply, not the kernel's \
                 cgroup limits: {why}"
            ),
        }
    }
}

/// The daemon's delegated cgroup v2 subtree.
#[derive(Debug)]
pub(crate) struct Tree {
    dir: PathBuf,
    next: AtomicU64,
}

/// The cgroup v2 path of this process in `/proc/self/cgroup`'s text (the `0::` line).
fn own_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// Whether systemd delegated `dir` (it marks a delegated cgroup with the `user.delegate` and
/// `trusted.delegate` attributes; only the first is readable without CAP_SYS_ADMIN).
fn delegated(dir: &Path) -> bool {
    ["user.delegate", "trusted.delegate"]
        .iter()
        .any(|name| xattr(dir, name).as_deref() == Some(b"1".as_slice()))
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated; the kernel writes at most buf.len() bytes into buf.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {text:?} to {}: {e}", path.display()))
}

/// Take over the subtree of the cgroup this process is in (`proc_self_cgroup`, under `root`): move
/// `pid` into its own leaf, enable memory and pids for the children, and remove what an earlier run
/// left. The error says why not and what would make it work.
pub(crate) fn establish(root: &Path, proc_self_cgroup: &str, pid: i32) -> Result<Tree, String> {
    let Some(rel) = own_path(proc_self_cgroup) else {
        return Err(
            "this host has no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)".into(),
        );
    };
    let mut dir = root.join(rel.trim_start_matches('/'));
    // Already moved (a daemon that took over before and was re-executed keeps its leaf).
    if dir.file_name().is_some_and(|n| n == DAEMON_LEAF) && delegated(dir.parent().unwrap_or(&dir))
    {
        dir.pop();
    }
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| {
        format!(
            "{} is not a cgroup v2 directory ({e}): a cgroup v1 or hybrid host",
            dir.display()
        )
    })?;
    if !delegated(&dir) {
        return Err(format!(
            "{} is not delegated to the daemon (the unit needs Delegate=yes, as the package's has)",
            dir.display()
        ));
    }
    let have: Vec<&str> = controllers.split_ascii_whitespace().collect();
    for needed in ["memory", "pids"] {
        if !have.contains(&needed) {
            return Err(format!(
                "the {needed} controller is not available in {} (it offers: {})",
                dir.display(),
                controllers.trim()
            ));
        }
    }
    let leaf = dir.join(DAEMON_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "cannot create {}: {e} (the unit needs ReadWritePaths= on its cgroup, as the \
                 package's has)",
                leaf.display()
            ))
        }
    }
    // This process, then whatever else is still in the service's cgroup (a child it started before
    // this, an iptables the supervisor runs): a cgroup with processes cannot enable controllers for
    // its children. Everything there is the service's, so the daemon's.
    write_file(&leaf.join("cgroup.procs"), &pid.to_string())?;
    let mut tries = 0;
    loop {
        let left = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for other in left.split_ascii_whitespace() {
            // One that has ended since it was listed cannot be moved, and need not be.
            let _ = write_file(&leaf.join("cgroup.procs"), other);
        }
        match write_file(&dir.join("cgroup.subtree_control"), "+memory +pids") {
            Ok(()) => break,
            Err(e) if tries >= 20 => {
                return Err(format!(
                    "{e} (processes still in {}: {})",
                    dir.display(),
                    left.split_ascii_whitespace().collect::<Vec<_>>().join(", ")
                ))
            }
            Err(_) => {
                tries += 1;
                std::thread::sleep(EMPTY_LOOK);
            }
        }
    }
    let tree = Tree {
        dir,
        next: AtomicU64::new(1),
    };
    let swept = tree.sweep();
    if swept > 0 {
        tracing::info!(
            removed = swept,
            "removed command cgroups an earlier run left"
        );
    }
    Ok(tree)
}

impl Tree {
    /// Kill and remove every `run-*` cgroup left (a daemon killed while commands ran); how many.
    fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().starts_with(RUN_PREFIX) {
                continue;
            }
            if kill_and_remove(&e.path(), EMPTY_WAIT).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// A new cgroup for one command, with its limits set; the child joins it before it executes.
    pub(crate) fn enter(&self, memory: u64, pids: u64) -> Result<Run, String> {
        let dir = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let dir = self.dir.join(format!("{RUN_PREFIX}{n}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
            }
        };
        // From here on, `run` removes the directory whatever happens.
        let mut run = Run {
            dir,
            procs: None,
            memory,
        };
        let max = |n: u64| {
            if n == u64::MAX {
                "max".to_string()
            } else {
                n.to_string()
            }
        };
        write_file(&run.dir.join("memory.max"), &max(memory))?;
        // Past its limit a command is killed, not swapped; absent where the kernel has no swap support.
        if run.dir.join("memory.swap.max").exists() {
            write_file(&run.dir.join("memory.swap.max"), "0")?;
        }
        write_file(&run.dir.join("memory.oom.group"), "1")?;
        write_file(&run.dir.join("pids.max"), &max(pids))?;
        let procs = run.dir.join("cgroup.procs");
        run.procs = Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| format!("cannot open {}: {e}", procs.display()))?,
        );
        Ok(run)
    }
}

/// One command's cgroup; removed (its processes killed) when closed or dropped.
#[derive(Debug)]
pub(crate) struct Run {
    dir: PathBuf,
    /// Its `cgroup.procs`, open for the child to write itself into between fork and exec.
    procs: Option<std::fs::File>,
    memory: u64,
}

impl Run {
    /// The descriptor the child writes "0" (itself) into.
    pub(crate) fn join_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(|f| f.as_raw_fd())
    }

    /// How many of its processes the kernel's OOM killer ended.
    fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == "oom_kill" || *k == "oom_group_kill")
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// The most memory its processes held together (kernels from 5.19 tell).
    fn peak(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What it was killed for, when the kernel's OOM killer ended it: the exit's wording.
    pub(crate) fn out_of_memory(&self) -> Option<String> {
        if self.oom_kills() == 0 {
            return None;
        }
        let peak = self
            .peak()
            .map(|p| format!(", {} at its peak", super::account::show_bytes(p)))
            .unwrap_or_default();
        Some(format!(
            "its memory limit of {} (the kernel's, cgroup {}{peak})",
            super::account::show_bytes(self.memory),
            self.dir.display()
        ))
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    /// Kill whatever is left in it, wait (bounded) for it to empty, and remove it.
    pub(crate) async fn close(mut self) {
        self.procs = None;
        let _ = write_file(&self.dir.join("cgroup.kill"), "1");
        let deadline = tokio::time::Instant::now() + EMPTY_WAIT;
        while self.populated() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(EMPTY_LOOK).await;
        }
        // Drop removes it.
    }
}

/// Remove the cgroup `dir`, killing what is still in it and waiting up to `wait` for it to empty.
fn kill_and_remove(dir: &Path, wait: Duration) -> io::Result<()> {
    if std::fs::remove_dir(dir).is_ok() {
        return Ok(());
    }
    let _ = write_file(&dir.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + wait;
    loop {
        match std::fs::remove_dir(dir) {
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(EMPTY_LOOK),
            done => return done,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.procs = None;
        // No wait here (`close` waited, asynchronously): a cgroup still populated is removed by the
        // next start's sweep.
        if let Err(e) = kill_and_remove(&self.dir, Duration::ZERO) {
            tracing::debug!(cgroup = %self.dir.display(), error = %e, "command cgroup left for the next start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_xattr(path: &Path, name: &str, value: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: NUL-terminated strings, value valid for its length.
        unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ) == 0
        }
    }

    /// A directory laid out as a service's cgroup would be, under a fake root.
    fn service(root: &Path, controllers: &str) -> PathBuf {
        let dir = root.join("system.slice/x.service");
        std::fs::create_dir_all(dir.join(DAEMON_LEAF)).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(dir.join(DAEMON_LEAF).join("cgroup.procs"), "").unwrap();
        dir
    }

    const SELF: &str = "0::/system.slice/x.service\n";

    #[test]
    fn a_v1_host_and_an_undelegated_cgroup_say_why() {
        let root = tempfile::tempdir().unwrap();
        let e = establish(root.path(), "1:memory:/x\n", 7).unwrap_err();
        assert!(e.contains("no cgroup v2"), "{e}");
        let e = establish(root.path(), SELF, 7).unwrap_err();
        assert!(e.contains("cgroup v1 or hybrid"), "{e}");
        service(root.path(), "cpu memory pids\n");
        let e = establish(root.path(), SELF, 7).unwrap_err();
        assert!(
            e.contains("not delegated") && e.contains("Delegate=yes"),
            "{e}"
        );
    }

    #[test]
    fn a_delegated_cgroup_is_taken_over_and_leftovers_removed() {
        let root = tempfile::tempdir().unwrap();
        let dir = service(root.path(), "cpu memory\n");
        if !set_xattr(&dir, "user.delegate", b"1") && !set_xattr(&dir, "trusted.delegate", b"1") {
            panic!(
                "cannot set an extended attribute under {} (a file system without user or trusted \
                 xattrs: run the tests with TMPDIR on ext4, xfs or a tmpfs of Linux 6.6 or later)",
                root.path().display()
            );
        }
        let e = establish(root.path(), SELF, 7).unwrap_err();
        assert!(e.contains("pids controller is not available"), "{e}");
        std::fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::create_dir(dir.join("run-3")).unwrap();
        let tree = establish(root.path(), SELF, 4242).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("daemon/cgroup.procs")).unwrap(),
            "4242"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert!(!dir.join("run-3").exists(), "the leftover is removed");
        // Re-established from inside its own leaf: the same service directory.
        let again = establish(root.path(), "0::/system.slice/x.service/daemon\n", 4242).unwrap();
        assert_eq!(again.dir, tree.dir);
        // On cgroupfs a new cgroup comes with its files; here none: the error names the file, and
        // the half-made cgroup is removed.
        let e = tree.enter(64 << 20, 32).unwrap_err();
        assert!(e.contains("run-1/memory.max"), "{e}");
        assert!(!dir.join("run-1").exists());
        // A number in use (another daemon's leftover being swept) is skipped.
        std::fs::create_dir(dir.join("run-2")).unwrap();
        let e = tree.enter(64 << 20, 32).unwrap_err();
        assert!(e.contains("run-3/memory.max"), "{e}");
    }

    #[test]
    fn a_run_reports_the_kernels_oom_kill_with_its_peak() {
        let d = tempfile::tempdir().unwrap();
        let run = Run {
            dir: d.path().join("run-9"),
            procs: None,
            memory: 64 << 20,
        };
        std::fs::create_dir(&run.dir).unwrap();
        std::fs::write(run.dir.join("memory.events"), "low 0\noom 0\noom_kill 0\n").unwrap();
        assert_eq!(run.out_of_memory(), None);
        std::fs::write(
            run.dir.join("memory.events"),
            "low 0\noom 2\noom_kill 1\noom_group_kill 1\n",
        )
        .unwrap();
        std::fs::write(run.dir.join("memory.peak"), "67108864\n").unwrap();
        let why = run.out_of_memory().unwrap();
        assert!(
            why.starts_with("its memory limit of 64 MiB (the kernel's"),
            "{why}"
        );
        assert!(why.contains("64 MiB at its peak"), "{why}");
        let dir = run.dir.clone();
        std::fs::remove_file(dir.join("memory.events")).unwrap();
        std::fs::remove_file(dir.join("memory.peak")).unwrap();
        drop(run);
        assert!(
            !dir.exists(),
            "an empty run's cgroup is removed when dropped"
        );
    }

    #[test]
    fn polled_confinement_says_why() {
        let c = Confinement::polled("only the daemon under systemd has a cgroup of its own");
        assert!(c.describe().contains("only the daemon"));
    }
}
