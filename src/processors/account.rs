//! Who a command processor runs as, and within what: the account named by the pipeline (a system user
//! the package creates, by default), the spool files handed over to it and to it alone, what the child
//! does before it executes the program (join its cgroup, take the kernel's per-process limits, become
//! the account), and, without a cgroup ([`super::cgroup`]), the process group's resident memory,
//! looked at from outside while it runs.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// How often a running command's resident memory is looked at.
pub(crate) const MEMORY_LOOK: Duration = Duration::from_millis(50);
/// The hard per-process cap on data (RLIMIT_DATA) is this many times the memory limit, and at least
/// [`DATA_CAP_MARGIN`] above it: it stops a runaway allocation between two looks without failing an
/// allocation the looks would have allowed.
const DATA_CAP_FACTOR: u64 = 4;
const DATA_CAP_MARGIN: u64 = 256 << 20;
/// A process tree larger than this is not walked further (the process limit is far below it).
const MAX_WALKED: usize = 1 << 16;

/// A local account, as `getpwnam` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) name: String,
    pub(crate) uid: u32,
    /// Its primary group: the only group the program gets.
    pub(crate) gid: u32,
}

impl Account {
    /// The account named `user` (a name, or a uid in decimal).
    pub(crate) fn lookup(user: &str) -> Result<Account, String> {
        let by_uid = user.parse::<u32>().ok();
        let name = CString::new(user).map_err(|_| "the name holds a NUL byte".to_string())?;
        let mut buf: Vec<libc::c_char> = vec![0; 1024];
        loop {
            // SAFETY: `passwd` is plain data that getpw*_r fills; `buf` outlives every use of the
            // strings it points into (copied out below before `buf` is touched again).
            let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the length given; the functions write only there.
            let rc = unsafe {
                match by_uid {
                    Some(uid) => {
                        libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found)
                    }
                    None => libc::getpwnam_r(
                        name.as_ptr(),
                        &mut pwd,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut found,
                    ),
                }
            };
            if rc == libc::ERANGE && buf.len() < 1 << 20 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if rc != 0 {
                return Err(format!(
                    "cannot look the account up: {}",
                    io::Error::from_raw_os_error(rc)
                ));
            }
            if found.is_null() {
                return Err("no such account on this host".into());
            }
            // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
            let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }
                .to_string_lossy()
                .into_owned();
            return Ok(Account {
                name,
                uid: pwd.pw_uid,
                gid: pwd.pw_gid,
            });
        }
    }

    /// Whether the program would run as the daemon's own user (nothing to switch or hand over).
    pub(crate) fn is_current(&self) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        self.uid == unsafe { libc::geteuid() }
    }

    /// Whether this account has all of `bits` (4 read, 2 write, 1 search/execute) on a file with
    /// `meta`, by its mode bits (root: always, but execute needs some x bit). Only the primary group
    /// counts: it is the only one the program gets.
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        if self.uid == 0 {
            return bits & 1 == 0 || meta.is_dir() || mode & 0o111 != 0;
        }
        let shift = if meta.uid() == self.uid {
            6
        } else if meta.gid() == self.gid {
            3
        } else {
            0
        };
        (mode >> shift) & bits == bits
    }

    /// The first directory on the way to `path` (its ancestors, `path` itself when it is a
    /// directory) that this account cannot search, with its mode and owner, for the error.
    pub(crate) fn blocked_on(&self, path: &Path) -> Option<String> {
        let mut dirs: Vec<&Path> = path.ancestors().collect();
        dirs.reverse();
        for dir in dirs {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            if meta.is_dir() && !self.may(&meta, 1) {
                return Some(format!(
                    "{} (mode {:o}, owner uid {}) is not searchable by {}",
                    dir.display(),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    self.name
                ));
            }
        }
        None
    }

    /// Why this account cannot execute `program`, if it cannot.
    pub(crate) fn cannot_run(&self, program: &Path) -> Option<String> {
        if let Some(parent) = program.parent() {
            if let Some(why) = self.blocked_on(parent) {
                return Some(why);
            }
        }
        match std::fs::metadata(program) {
            Ok(m) if !m.is_file() => Some("not a regular file".into()),
            Ok(m) if !self.may(&m, 5) => Some(format!(
                "not readable and executable by {} (mode {:o}, owner uid {})",
                self.name,
                m.mode() & 0o7777,
                m.uid()
            )),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Give the account what it works on, and nothing else: the file's directory searchable (not
    /// listable or writable), the input its own and read-only, the output directory its own and
    /// private.
    pub(crate) fn hand_over(
        &self,
        job_dir: &Path,
        input: &Path,
        output_dir: &Path,
    ) -> io::Result<()> {
        let set =
            |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
        set(job_dir, 0o711)?;
        if let Some(input_dir) = input.parent() {
            set(input_dir, 0o711)?;
        }
        std::os::unix::fs::chown(input, Some(self.uid), Some(self.gid))?;
        set(input, 0o400)?;
        std::os::unix::fs::chown(output_dir, Some(self.uid), Some(self.gid))?;
        set(output_dir, 0o700)
    }
}

/// The kernel's per-process limits a command's processes get, set in the child before it becomes the
/// account and executes the program.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildLimits {
    /// RLIMIT_DATA, per process (not in a cgroup: memory.max bounds the group).
    data: Option<u64>,
    /// RLIMIT_CPU in seconds (soft; the hard limit 5 s later kills), per process.
    cpu: Option<u64>,
    /// RLIMIT_NPROC: processes and threads of the account at once (not in a cgroup: pids.max).
    nproc: Option<u64>,
}

impl ChildLimits {
    /// Without a cgroup: the data cap stands in for the kernel's memory limit between two looks, and
    /// the account's process count for pids.max.
    pub(crate) fn new(memory: u64, cpu_time: Option<Duration>, pids: u64) -> ChildLimits {
        ChildLimits {
            data: Some(
                memory
                    .saturating_mul(DATA_CAP_FACTOR)
                    .max(memory.saturating_add(DATA_CAP_MARGIN)),
            ),
            nproc: Some(pids),
            ..ChildLimits::in_cgroup(cpu_time)
        }
    }

    /// In a cgroup of its own, which bounds memory and processes: only CPU time per process.
    pub(crate) fn in_cgroup(cpu_time: Option<Duration>) -> ChildLimits {
        ChildLimits {
            data: None,
            cpu: cpu_time.map(|d| d.as_secs().max(1)),
            nproc: None,
        }
    }

    /// In the child, between fork and exec: only async-signal-safe calls.
    fn apply(&self) -> io::Result<()> {
        if let Some(d) = self.data {
            set_limit(libc::RLIMIT_DATA, d, d)?;
        }
        if let Some(s) = self.cpu {
            set_limit(libc::RLIMIT_CPU, s, s + 5)?;
        }
        if let Some(n) = self.nproc {
            set_limit(libc::RLIMIT_NPROC, n, n)?;
        }
        Ok(())
    }
}

/// What a command's child does between fork and exec, in this order: join its cgroup (which takes
/// root: a cgroup's `cgroup.procs` is root's), take its limits, become the account. Plain `Copy`
/// data, so the closure allocates nothing and takes no lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InChild {
    /// The command's `cgroup.procs`, open in the parent (close-on-exec).
    pub(crate) join: Option<std::os::fd::RawFd>,
    pub(crate) limits: ChildLimits,
    /// (uid, gid) to become, with no supplementary groups; `None`: stay the daemon's account.
    pub(crate) account: Option<(u32, u32)>,
}

impl InChild {
    /// Only async-signal-safe calls (write, setrlimit, setgroups, setgid, setuid).
    pub(crate) fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        if let Some(fd) = self.join {
            // "0" is the writing process itself.
            // SAFETY: writes one byte from a static buffer to a descriptor the parent keeps open.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        self.limits.apply()?;
        if let Some((uid, gid)) = self.account {
            // SAFETY: plain system calls on integers; a null list with length 0 clears the groups.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
        }
        Ok(())
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: `l` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(resource, &l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Resident memory of `leader` and its descendants, in bytes (a process that ends while it is
/// counted is left out). Descendants are found through `/proc/<pid>/task/<tid>/children`.
pub(crate) fn tree_rss(leader: i32) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut stack = vec![leader];
    let mut walked = 0;
    let mut total = 0u64;
    while let Some(pid) = stack.pop() {
        walked += 1;
        if walked > MAX_WALKED {
            break;
        }
        total += rss_pages(pid).unwrap_or(0) * page;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                stack.extend(
                    text.split_ascii_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    total
}

fn rss_pages(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Until the tree under `leader` holds more than `limit` bytes resident; then the amount seen.
pub(crate) async fn exceeds(leader: i32, limit: u64) -> u64 {
    let mut tick = tokio::time::interval(MEMORY_LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rss = tree_rss(leader);
        if rss > limit {
            return rss;
        }
    }
}

/// Bytes as a person reads them: "24 MiB", "1.5 GiB".
pub(crate) fn show_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size {
            let whole = n / size;
            let tenth = (n % size) * 10 / size;
            return if tenth == 0 || whole >= 100 {
                format!("{whole} {unit}")
            } else {
                format!("{whole}.{tenth} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_found_by_name_and_by_uid() {
        let root = Account::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(Account::lookup("0").unwrap().name, "root");
        let e = Account::lookup("no-such-user-offload").unwrap_err();
        assert!(e.contains("no such account"), "{e}");
    }

    #[test]
    fn a_private_directory_blocks_another_account_and_says_which() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(d.path().join("a"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let other = Account {
            name: "someone".into(),
            uid: 4_000_000,
            gid: 4_000_000,
        };
        let why = other.blocked_on(&inner).unwrap();
        assert!(why.contains("/a (mode 700"), "{why}");
        assert!(why.contains("not searchable by someone"), "{why}");
        std::fs::set_permissions(d.path().join("a"), std::fs::Permissions::from_mode(0o711))
            .unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(other.blocked_on(&inner), None);
        // Execute needs read too for a script, and the x bit of its class.
        let prog = inner.join("p.sh");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(other.cannot_run(&prog).unwrap().contains("mode 750"));
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(other.cannot_run(&prog), None);
    }

    #[test]
    fn the_data_cap_leaves_room_above_the_limit() {
        let small = ChildLimits::new(24 << 20, None, 64);
        assert_eq!(small.data, Some((24 << 20) + DATA_CAP_MARGIN));
        assert_eq!(small.nproc, Some(64));
        let big = ChildLimits::new(1 << 30, Some(Duration::from_millis(300)), 64);
        assert_eq!(big.data, Some(4 << 30));
        assert_eq!(big.cpu, Some(1));
        // In a cgroup the kernel bounds memory and processes for the group: only CPU per process.
        let confined = ChildLimits::in_cgroup(Some(Duration::from_secs(90)));
        assert_eq!(
            (confined.data, confined.cpu, confined.nproc),
            (None, Some(90), None)
        );
    }

    #[test]
    fn this_process_has_resident_memory() {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        assert!(tree_rss(me) > 1 << 20);
        assert_eq!(tree_rss(i32::MAX), 0);
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(show_bytes(24 << 20), "24 MiB");
        assert_eq!(show_bytes(3 << 29), "1.5 GiB");
        assert_eq!(show_bytes(512), "512 bytes");
    }
}
