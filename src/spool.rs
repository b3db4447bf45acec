//! The spool: local files an object is streamed into, and the reports it produces, until they are
//! uploaded. Names come from a hash of bucket and key plus a sequence number, never from the key itself,
//! so a key like `../../etc/passwd` cannot escape the directory and two deliveries of the same object
//! never share a file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    seq: AtomicU64,
    /// Its file system's free space against `spool.min_free`.
    room: crate::disk::Watermark,
}

/// One object's private directory in the spool (mode 0700): the downloaded input under its own file
/// name, and whatever the processor produces. Removed with everything in it when dropped, whatever
/// happened.
#[derive(Debug)]
pub(crate) struct SpoolFiles {
    pub(crate) dir: PathBuf,
    /// The downloaded object: `<dir>/input/<the key's last segment>`.
    pub(crate) input: PathBuf,
}

impl SpoolFiles {
    /// A path for a processor's own file or directory inside this object's directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for SpoolFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Extension of the per-object directories (`<hash>-<pid>-<seq>.obj`).
const DIR_SUFFIX: &str = "obj";
/// Files earlier versions of the agent spooled directly in the directory.
const OLD_SUFFIXES: [&str; 3] = ["in", "out", "rej"];

/// `dir/x.csv.gz` -> `dir/x.csv` (also `.gzip`, `.zst`, `.zstd`); `None` without such a suffix, or when
/// nothing would be left of the name.
pub(crate) fn without_compression_suffix(path: &std::path::Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    let cut = [".gz", ".gzip", ".zst", ".zstd"]
        .iter()
        .find(|s| lower.ends_with(*s) && lower.len() > s.len())?;
    Some(path.with_file_name(&name[..name.len() - cut.len()]))
}

/// The input's file name inside the object's directory: the key's last segment when it is a plain
/// name of sensible length, else "input". Processors see it (a container at `/input/<name>`).
pub(crate) fn input_name(key: &str) -> String {
    let last = key.rsplit('/').next().unwrap_or("");
    let plain = !last.is_empty()
        && last != "."
        && last != ".."
        && last.len() <= 200
        && !last.chars().any(|c| c.is_control());
    if plain {
        last.to_string()
    } else {
        "input".to_string()
    }
}

/// Directories that are never a spool: the daemon would chmod them 0700 and delete files in them.
const SHARED_DIRS: [&str; 12] = [
    "/", "/tmp", "/var/tmp", "/dev/shm", "/var", "/var/lib", "/etc", "/usr", "/home", "/root",
    "/opt", "/srv",
];

/// Whether `dir` can be the agent's own spool: not a shared system directory, and, if it exists, a
/// directory owned by this user that no one else may write to (world- or group-writable directories,
/// such as `/tmp`, are shared). The reason is returned for a configuration error.
pub(crate) fn check_dir(dir: &Path) -> Result<(), NotOwn> {
    use std::os::unix::fs::MetadataExt;
    if !dir.is_absolute() {
        return Err(NotOwn(format!(
            "\"{}\" must be an absolute path",
            dir.display()
        )));
    }
    let shown = dir.display().to_string();
    let normal = shown.trim_end_matches('/');
    if SHARED_DIRS.contains(&normal) || normal.is_empty() {
        return Err(NotOwn(format!(
            "{shown} is a shared system directory; the spool must be a directory of its own (the daemon \
             makes it private and deletes leftover spool files in it), e.g. /var/lib/offload-agent/spool"
        )));
    }
    let why = match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => format!("{shown} exists and is not a directory"),
        Ok(m) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if m.uid() != me {
                format!(
                    "{shown} belongs to uid {}, not to this daemon (uid {me}): use a directory of its own",
                    m.uid()
                )
            } else if m.mode() & 0o022 != 0 {
                format!(
                    "{shown} is writable by other users (mode {:o}): a shared directory cannot be the spool; \
                     use a directory of its own",
                    m.mode() & 0o7777
                )
            } else {
                return Ok(());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => format!("cannot inspect {shown}: {e}"),
    };
    Err(NotOwn(why))
}

/// Why a directory cannot be the spool (reported as a configuration error of `spool.dir`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotOwn(String);

impl Spool {
    /// Create the directory, mode 0711: spooled files may hold customer data, so no other user may
    /// list it or any file's directory in it; searchable, so that a command processor's account
    /// reaches the one file handed over to it (`processors::account`).
    pub(crate) fn open(dir: &Path) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(0),
            room: crate::disk::Watermark::new(dir.to_path_buf()),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn room(&self) -> &crate::disk::Watermark {
        &self.room
    }

    /// Remove what a crashed or killed predecessor left behind (the daemon alone owns the spool; their
    /// messages come back through SQS). Returns how many entries were removed.
    pub(crate) fn clean_stale(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let kind = entry.file_type()?;
            if ext == DIR_SUFFIX && kind.is_dir() {
                std::fs::remove_dir_all(&path)?;
                n += 1;
            } else if OLD_SUFFIXES.contains(&ext) && kind.is_file() {
                std::fs::remove_file(&path)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A new private directory for one object (never shared: two deliveries of one key get two).
    pub(crate) fn files_for(&self, bucket: &str, key: &str) -> io::Result<SpoolFiles> {
        let mut h = Sha256::new();
        h.update(bucket.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        let digest = hex::encode(&h.finalize()[..12]);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!(
            "{digest}-{}-{seq}.{DIR_SUFFIX}",
            std::process::id()
        ));
        let input_dir = dir.join("input");
        std::fs::create_dir(&dir)?;
        let files = SpoolFiles {
            input: input_dir.join(input_name(key)),
            dir,
        };
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&files.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::create_dir(&input_dir)?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_or_foreign_directories_are_refused_as_spool() {
        assert!(check_dir(Path::new("/tmp"))
            .unwrap_err()
            .to_string()
            .contains("shared"));
        assert!(check_dir(Path::new("/")).is_err());
        assert!(check_dir(Path::new("relative/spool")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("spool");
        check_dir(&own).unwrap(); // absent: the daemon creates it
        std::fs::create_dir(&own).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_dir(&own)
            .unwrap_err()
            .to_string()
            .contains("writable by other users"));
    }

    #[test]
    fn hostile_keys_stay_inside_the_spool_and_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let long = "é/".repeat(600);
        for key in [
            "../../etc/passwd",
            "/abs/path",
            long.as_str(),
            "a\0b",
            "dir/..",
            "x/",
        ] {
            let f = spool.files_for("bucket", key).unwrap();
            assert_eq!(f.dir.parent().unwrap(), spool.dir());
            assert!(f.input.starts_with(&f.dir));
            assert_eq!(f.input.parent().unwrap().file_name().unwrap(), "input");
            assert!(f.dir.file_name().unwrap().len() < 64);
            std::fs::write(&f.input, b"x").unwrap();
            let d = f.dir.clone();
            drop(f);
            assert!(!d.exists());
        }
        assert_eq!(input_name("a/b/report.csv"), "report.csv");
        assert_eq!(input_name("../.."), "input");
        assert_eq!(input_name("a\nb"), "input");
        let a = spool.files_for("b", "k").unwrap();
        let b = spool.files_for("b", "k").unwrap();
        assert_ne!(a.dir, b.dir);
        std::fs::write(&a.input, b"x").unwrap();
        std::fs::write(spool.dir().join("keep.txt"), b"x").unwrap();
        std::fs::write(spool.dir().join("old-1-2.in"), b"x").unwrap();
        std::mem::forget(a);
        drop(b);
        assert_eq!(spool.clean_stale().unwrap(), 2);
        assert!(spool.dir().join("keep.txt").exists());
    }
}
