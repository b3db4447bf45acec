//! Handing back the pages of this binary that only start-up ran.
//!
//! Start-up (configuration, clap, the SDK's credential chain and endpoint resolution, root
//! certificates, the first requests) runs code spread across the whole text segment, and the
//! kernel maps 64 KiB around every page it faults in (fault-around): a daemon a few seconds old has
//! about 12 MB of its 17 MB text mapped, while its idle loop (long polls, timers, the admin
//! endpoint) runs about half of that. `release_startup_pages` unmaps the binary's never-written
//! pages with `madvise(MADV_DONTNEED)`; the code that runs next faults back in from the page cache
//! without I/O. The released pages stay in the page cache as clean, unmapped pages, which the
//! kernel can reclaim without touching any page table (the classic LRU also gives mapped,
//! referenced executable pages an extra round on the active list).
//!
//! Only mappings of this executable with no private (written) page are released: dropping a
//! written page of a private mapping would throw the change away (the relocated pointers of RELRO,
//! a debugger's breakpoint). For a mapping with no written page, `MADV_DONTNEED` cannot change
//! what the process reads: every page comes back from the file it came from.

use std::os::unix::fs::MetadataExt;

/// One mapping of `/proc/self/smaps` that may be released.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    rss_kb: u64,
}

/// What a release did.
#[derive(Debug, Default)]
pub(crate) struct Released {
    /// Mappings of the executable released.
    pub(crate) mappings: usize,
    /// Their resident size before the release.
    pub(crate) kib: u64,
}

/// Unmap the resident, never-written pages of this executable (see the module doc). Errors name
/// the file or call that failed; none of them is harmful (the pages simply stay mapped).
pub(crate) fn release_startup_pages() -> std::io::Result<Released> {
    let exe = std::fs::metadata("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut done = Released::default();
    for m in releasable(&smaps, exe.dev(), exe.ino()) {
        // SAFETY: the range is a whole mapping of this executable, mapped private and not
        // writable, with no private page: MADV_DONTNEED only drops page-table entries, and every
        // later access reads the same bytes back from the file.
        let r = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("madvise(MADV_DONTNEED) of {:#x}-{:#x}: {e}", m.start, m.end),
            ));
        }
        done.mappings += 1;
        done.kib += m.rss_kb;
    }
    Ok(done)
}

/// The mappings in `smaps` of the file (`dev`, `ino`) that are private, not writable, resident and
/// hold no private page. A mapping whose `Anonymous:` line is missing is kept: no count, no release.
fn releasable(smaps: &str, dev: u64, ino: u64) -> Vec<Mapping> {
    // The mapping being read while it is a candidate, with its `Anonymous:` count once seen.
    let mut cur: Option<(Mapping, Option<u64>)> = None;
    let mut out = Vec::new();
    let mut keep = |cur: Option<(Mapping, Option<u64>)>| {
        if let Some((m, Some(0))) = cur {
            if m.rss_kb > 0 {
                out.push(m);
            }
        }
    };
    for line in smaps.lines() {
        if let Some((range, perms, dev_s, ino_s)) = mapping_header(line) {
            keep(cur.take());
            // Readable, not writable, private: "r--p" or "r-xp".
            let p = perms.as_bytes();
            let candidate = p.len() == 4
                && p[0] == b'r'
                && p[1] == b'-'
                && p[3] == b'p'
                && ino_s.parse::<u64>().ok() == Some(ino)
                && parse_dev(dev_s) == Some(dev);
            let (a, b) = range.split_once('-').unwrap_or(("", ""));
            let (start, end) = (
                usize::from_str_radix(a, 16).unwrap_or(0),
                usize::from_str_radix(b, 16).unwrap_or(0),
            );
            if candidate && start < end {
                let m = Mapping {
                    start,
                    end,
                    rss_kb: 0,
                };
                cur = Some((m, None));
            }
        } else if let Some((m, anonymous)) = cur.as_mut() {
            if let Some(v) = field_kb(line, "Rss:") {
                m.rss_kb = v;
            } else if let Some(v) = field_kb(line, "Anonymous:") {
                *anonymous = Some(v);
            }
        }
    }
    keep(cur.take());
    out
}

/// `start-end perms offset dev inode [path]` -> (range, perms, dev, inode); None for field lines.
fn mapping_header(line: &str) -> Option<(&str, &str, &str, &str)> {
    let mut f = line.split_ascii_whitespace();
    let range = f.next()?;
    if !range.contains('-') || !range.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()) {
        return None;
    }
    let perms = f.next()?;
    let _offset = f.next()?;
    let dev = f.next()?;
    let ino = f.next()?;
    Some((range, perms, dev, ino))
}

/// `fd:01` (hex major:minor) as the `st_dev` number of the same device.
fn parse_dev(s: &str) -> Option<u64> {
    let (ma, mi) = s.split_once(':')?;
    let (ma, mi) = (
        u32::from_str_radix(ma, 16).ok()?,
        u32::from_str_radix(mi, 16).ok()?,
    );
    Some(libc::makedev(ma, mi))
}

/// `NAME:   123 kB` (a line of `/proc/PID/status` or `smaps`) -> 123, for `name` = "NAME:".
fn field_kb(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?;
    rest.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// A `kB` field of `/proc/PID/status` (`pid` None: this process), e.g. `"VmHWM:"` or `"RssFile:"`.
pub fn status_kb(pid: Option<u32>, name: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| field_kb(l, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0880000 r--p 00000000 fd:01 4242                       /usr/bin/offload-agent
Size:               8704 kB
Rss:                3700 kB
Anonymous:             0 kB
55d0a0882000-55d0a18a8000 r-xp 00881000 fd:01 4242                       /usr/bin/offload-agent
Size:              16536 kB
Rss:               12400 kB
Anonymous:             0 kB
55d0a18a9000-55d0a1992000 r--p 018a7000 fd:01 4242                       /usr/bin/offload-agent
Size:                932 kB
Rss:                 932 kB
Anonymous:           900 kB
55d0a1992000-55d0a19c9000 rw-p 0198f000 fd:01 4242                       /usr/bin/offload-agent
Size:                220 kB
Rss:                 220 kB
Anonymous:           220 kB
55d0a19c9000-55d0a19ca000 r--p 01990000 fd:01 4242                       /usr/bin/offload-agent
Size:                  4 kB
Rss:                   0 kB
Anonymous:             0 kB
7f0000000000-7f0000028000 r--p 00000000 fd:01 777                        /usr/lib/x86_64-linux-gnu/libc.so.6
Size:                160 kB
Rss:                 160 kB
Anonymous:             0 kB
7f0000028000-7f000019d000 r-xp 00028000 fd:02 4242                       /other/fs/same-inode
Size:               1492 kB
Rss:                 900 kB
Anonymous:             0 kB
55d0a19ca000-55d0a19cb000 r--p 01991000 fd:01 4242                       /usr/bin/offload-agent
Size:                  4 kB
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                 128 kB
Anonymous:           128 kB
";

    #[test]
    fn releases_only_resident_never_written_mappings_of_the_executable() {
        let dev = libc::makedev(0xfd, 0x01);
        let got = releasable(SMAPS, dev, 4242);
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x55d0a0000000,
                    end: 0x55d0a0880000,
                    rss_kb: 3700
                },
                Mapping {
                    start: 0x55d0a0882000,
                    end: 0x55d0a18a8000,
                    rss_kb: 12400
                },
            ],
            "RELRO (written), rw-p, non-resident, without an Anonymous count, other files and other \
             devices are left alone"
        );
        assert!(releasable(SMAPS, dev, 1).is_empty());
    }

    /// On this test binary: the release succeeds, drops resident pages of the executable, and the
    /// code keeps running (this test's own code is among the pages released).
    #[test]
    fn releases_this_binary_and_keeps_running() {
        let rss_file_kb = || status_kb(None, "RssFile:").expect("RssFile in /proc/self/status");
        let before = rss_file_kb();
        let r = release_startup_pages().unwrap();
        assert!(r.mappings >= 1, "{r:?}");
        assert!(r.kib > 0, "{r:?}");
        let after = rss_file_kb();
        assert!(
            after < before,
            "RssFile {before} kB before, {after} kB after releasing {r:?}"
        );
        // Code and read-only data come back from the file.
        let text = format!("{}", 6 * 7);
        assert_eq!(text, "42");
    }
}
