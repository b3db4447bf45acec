//! Keyed edits of the ECS agent's env files (`/etc/ecs/ecs.config`, `/var/lib/ecs/ecs.config`).
//!
//! The ECS Anywhere install script appends with `>>`, so every re-run adds duplicates. Here each key we
//! manage is present exactly once, every other line (the user's keys, comments, blank lines) is kept as
//! it was, and the file is replaced atomically (temporary file + rename) with its mode and owner kept.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::Error;

/// Mode of a file this creates: env files can hold registry credentials (`ECS_ENGINE_AUTH_DATA`).
const NEW_FILE_MODE: u32 = 0o600;

/// The key of a `KEY=VALUE` line (with or without `export `), if it is one.
fn key_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with('#') {
        return None;
    }
    let t = t.strip_prefix("export ").unwrap_or(t).trim_start();
    let (k, _) = t.split_once('=')?;
    Some(k.trim())
}

/// The new text: `set` keys once each (first occurrence replaced in place, the rest dropped, missing
/// ones appended), `remove` keys dropped, every other line unchanged.
pub(crate) fn edit(text: &str, set: &[(&str, &str)], remove: &[&str]) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut done: Vec<&str> = Vec::new();
    for line in text.lines() {
        match key_of(line) {
            Some(k) if remove.contains(&k) => {}
            Some(k) => match set.iter().find(|(sk, _)| *sk == k) {
                Some((sk, v)) => {
                    if !done.contains(sk) {
                        out.push_str(&format!("{sk}={v}\n"));
                        done.push(sk);
                    }
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            },
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, v) in set {
        if !done.contains(k) {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out
}

/// Apply [`edit`] to a file; returns whether it changed. A missing file is created (mode 0600) when
/// there is something to set, and left missing otherwise.
pub(crate) fn apply(path: &Path, set: &[(&str, &str)], remove: &[&str]) -> Result<bool, Error> {
    let (old, meta) = match std::fs::read_to_string(path) {
        Ok(t) => (t, std::fs::metadata(path).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if set.is_empty() {
                return Ok(false);
            }
            (String::new(), None)
        }
        Err(e) => return Err(Error::file("read", path)(e)),
    };
    let new = edit(&old, set, remove);
    if new == old {
        return Ok(false);
    }
    replace(path, new.as_bytes(), meta.as_ref(), NEW_FILE_MODE)?;
    Ok(true)
}

/// Make `path` hold exactly `contents` (created with `mode`, or replaced keeping its mode and owner);
/// returns whether it changed. Atomic: a temporary file beside it, then a rename.
pub(crate) fn put(path: &Path, contents: &[u8], mode: u32) -> Result<bool, Error> {
    let meta = match std::fs::read(path) {
        Ok(old) if old == contents => return Ok(false),
        Ok(_) => std::fs::metadata(path).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::file("read", path)(e)),
    };
    replace(path, contents, meta.as_ref(), mode)?;
    Ok(true)
}

/// Remove `path` if it exists; returns whether it did.
pub(crate) fn remove(path: &Path) -> Result<bool, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::file("remove", path)(e)),
    }
}

fn replace(
    path: &Path,
    contents: &[u8],
    meta: Option<&std::fs::Metadata>,
    new_mode: u32,
) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::file("create", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.offload-agent-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        let mode = meta
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(new_mode);
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(m) = meta {
            // Keep the owner; only root can change it, and only root edits these files for real.
            let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file("write", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_keys_once_user_lines_kept() {
        let text = "# mine\nECS_LOGLEVEL=debug\nECS_CLUSTER=old\n\nexport ECS_CLUSTER=dup\nX=1\n";
        let got = edit(
            text,
            &[("ECS_CLUSTER", "prod"), ("ECS_EXTERNAL", "true")],
            &[],
        );
        assert_eq!(
            got,
            "# mine\nECS_LOGLEVEL=debug\nECS_CLUSTER=prod\n\nX=1\nECS_EXTERNAL=true\n"
        );
        assert_eq!(
            edit(
                &got,
                &[("ECS_CLUSTER", "prod"), ("ECS_EXTERNAL", "true")],
                &[]
            ),
            got
        );
        let removed = edit(&got, &[], &["ECS_CLUSTER", "ECS_EXTERNAL"]);
        assert_eq!(removed, "# mine\nECS_LOGLEVEL=debug\n\nX=1\n");
    }

    #[test]
    fn files_are_replaced_atomically_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ecs.config");
        assert!(
            !apply(&p, &[], &["A"]).unwrap(),
            "nothing to remove from a missing file"
        );
        assert!(!p.exists());
        assert!(apply(&p, &[("A", "1")], &[]).unwrap());
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(!apply(&p, &[("A", "1")], &[]).unwrap());
        assert!(apply(&p, &[("A", "2")], &[]).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "A=2\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
