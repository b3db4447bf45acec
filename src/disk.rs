//! The spool's free space against `spool.min_free`: a low-water mark with hysteresis. Below the mark
//! the daemon stops receiving (and says why); it resumes once the free space is back above the mark
//! plus a tenth of it, so that one file finishing does not flap it. A file whose announced size does
//! not fit above the mark is not downloaded.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// `spool.min_free`: bytes, or a percentage of the spool's file system.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    Percent(f64),
}

/// The default: room for the ECS agent's and Docker's own writes on a small VM disk, and well
/// below a datacenter host's free space.
pub const DEFAULT_MIN_FREE: MinFree = MinFree::Bytes(1 << 30);

impl MinFree {
    /// `"1GiB"`, `"512MiB"`, `"10%"`, `"1000000"` (bytes); units K, M, G, T (powers of 1024, with or
    /// without `iB`/`B`).
    pub fn parse(s: &str) -> Result<MinFree, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if (0.0..100.0).contains(&p) => Ok(MinFree::Percent(p)),
                _ => Err(format!(
                    "{s:?} is no percentage from 0 to 99.9 (for example \"5%\")"
                )),
            };
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(digits);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                    "{s:?} is no size (for example \"1GiB\", \"512MiB\" or \"5%\")"
                ))
            }
        };
        n.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1u64 << shift))
            .map(MinFree::Bytes)
            .ok_or_else(|| format!("{s:?} is no size (for example \"1GiB\", \"512MiB\" or \"5%\")"))
    }

    /// The mark in bytes on a file system of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// As written in the configuration: `"1GiB"`, `"1536MiB"`, `"5%"` (the largest unit that is exact).
impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            MinFree::Bytes(b) => {
                let (n, unit) = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
                    .into_iter()
                    .find(|(shift, _)| b != 0 && b % (1u64 << shift) == 0)
                    .map_or((b, "B"), |(shift, unit)| (b >> shift, unit));
                write!(f, "{n}{unit}")
            }
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl serde::Serialize for MinFree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// "1.5 GiB", "300 MiB", "12 KiB", "80 B".
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Free (for unprivileged writers: what root's reserve does not count) and total bytes of the file
/// system holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Where the spool stands against its mark.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Level {
    Above,
    /// Below the mark since then; stays so until the free space is back above the resume mark.
    Below {
        since: Instant,
    },
}

/// What [`Watermark::check`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Room {
    /// Receiving; `free` bytes free.
    Ok { free: u64 },
    /// Not receiving: the reason, for the log, `STATUS=` and `/readyz`.
    Low { free: u64, reason: String },
    /// The file system could not be asked (the spool directory missing?): not a reason to stop.
    Unknown(String),
}

/// How one check changed the level, for the log lines that say so once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    None,
    WentLow,
    Recovered,
}

/// The spool's low-water mark with hysteresis.
#[derive(Debug)]
pub struct Watermark {
    dir: PathBuf,
    level: Mutex<Level>,
}

/// The mark, and the resume mark above it, in bytes.
fn marks(min_free: MinFree, total: u64) -> (u64, u64) {
    let low = min_free.bytes(total);
    (low, low + (low / 10).max(1 << 20))
}

impl Watermark {
    pub fn new(dir: PathBuf) -> Watermark {
        Watermark {
            dir,
            level: Mutex::new(Level::Above),
        }
    }

    /// Look at the file system now, against `min_free` (the configuration's, which may be reloaded).
    pub fn check(&self, min_free: MinFree) -> (Room, Change) {
        match space(&self.dir) {
            Ok((free, total)) => self.judge(min_free, free, total, Instant::now()),
            Err(e) => (
                Room::Unknown(format!(
                    "cannot read the free space of {}: {e}",
                    self.dir.display()
                )),
                Change::None,
            ),
        }
    }

    fn judge(&self, min_free: MinFree, free: u64, total: u64, now: Instant) -> (Room, Change) {
        let (low, resume) = marks(min_free, total);
        let mut level = self.level.lock().unwrap_or_else(|p| p.into_inner());
        let (next, change) = match *level {
            Level::Above if free < low => (Level::Below { since: now }, Change::WentLow),
            Level::Below { .. } if free >= resume => (Level::Above, Change::Recovered),
            l => (l, Change::None),
        };
        *level = next;
        let room = match next {
            Level::Above => Room::Ok { free },
            Level::Below { since } => Room::Low {
                free,
                reason: format!(
                    "spool {} has {} free, below spool.min_free ({}), for {} s: not receiving until {} are free (free disk space, or lower spool.min_free)",
                    self.dir.display(),
                    human(free),
                    human(low),
                    now.duration_since(since).as_secs(),
                    human(resume)
                ),
            },
        };
        (room, change)
    }

    /// Whether a file of `size` bytes fits above the mark now; the reason when not.
    pub fn fits(&self, size: u64, min_free: MinFree) -> Result<(), String> {
        let Ok((free, total)) = space(&self.dir) else {
            return Ok(()); // unknown: let the download find out
        };
        let (low, _) = marks(min_free, total);
        if free.saturating_sub(low) >= size {
            Ok(())
        } else {
            Err(format!(
                "the object is {} but the spool {} has {} free above spool.min_free ({}): not downloaded; it is retried later",
                human(size),
                self.dir.display(),
                human(free.saturating_sub(low)),
                human(low)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages_parse() {
        assert_eq!(MinFree::parse("1GiB"), Ok(MinFree::Bytes(1 << 30)));
        assert_eq!(MinFree::parse("512 MiB"), Ok(MinFree::Bytes(512 << 20)));
        assert_eq!(MinFree::parse("2g"), Ok(MinFree::Bytes(2 << 30)));
        assert_eq!(MinFree::parse("1000"), Ok(MinFree::Bytes(1000)));
        assert_eq!(MinFree::parse("5%"), Ok(MinFree::Percent(5.0)));
        assert_eq!(MinFree::parse("0.5 %"), Ok(MinFree::Percent(0.5)));
        for bad in ["", "x", "5 pb", "100%", "-1%", "1.5GiB", "99999999999T"] {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
        for m in ["1GiB", "1536MiB", "1000B", "5%", "0.5%"] {
            assert_eq!(MinFree::parse(m).unwrap().to_string(), m);
        }
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(80), "80 B");
    }

    #[test]
    fn the_mark_has_hysteresis() {
        let w = Watermark::new(PathBuf::from("/"));
        let m = MinFree::Bytes(100 << 20);
        let t = Instant::now();
        let (room, c) = w.judge(m, 200 << 20, 1 << 40, t);
        assert_eq!((room, c), (Room::Ok { free: 200 << 20 }, Change::None));
        let (room, c) = w.judge(m, 99 << 20, 1 << 40, t);
        assert_eq!(c, Change::WentLow);
        let Room::Low { reason, .. } = room else {
            panic!("{room:?}")
        };
        assert!(
            reason.contains("below spool.min_free (100 MiB)") && reason.contains("110 MiB"),
            "{reason}"
        );
        // Back above the mark, but not above the resume mark: still low.
        let (room, c) = w.judge(m, 105 << 20, 1 << 40, t);
        assert!(matches!(room, Room::Low { .. }) && c == Change::None);
        let (room, c) = w.judge(m, 111 << 20, 1 << 40, t);
        assert_eq!((room, c), (Room::Ok { free: 111 << 20 }, Change::Recovered));
    }

    #[test]
    fn the_spool_file_system_answers() {
        let (free, total) = space(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total);
        let w = Watermark::new(PathBuf::from("/"));
        assert!(w.fits(1, MinFree::Bytes(0)).is_ok());
        assert!(w
            .fits(u64::MAX, MinFree::Bytes(0))
            .unwrap_err()
            .contains("not downloaded"));
        assert!(matches!(
            Watermark::new(PathBuf::from("/nonexistent/x"))
                .check(MinFree::Bytes(0))
                .0,
            Room::Unknown(_)
        ));
    }
}
