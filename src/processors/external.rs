//! The contract shared by the `container` and `command` processors: what they are given (an input
//! file, an empty output directory, a fixed environment), how their output is logged, how their exit
//! is judged, and how the files they leave are collected safely.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::{Job, Output};
use crate::error::ProcessError;
use crate::limits::S3_MAX_KEY_BYTES;

/// Lines of a processor's output kept for the log and the error report when it fails.
pub(crate) const TAIL_LINES: usize = 20;
/// Lines of one file's processor output copied into the daemon's log; the rest is counted only.
pub(crate) const MAX_LOGGED_LINES: u64 = 1000;
/// A longer line is cut (the rest of it is skipped), so a processor cannot make the daemon buffer
/// without bound.
pub(crate) const MAX_LINE_BYTES: usize = 4096;
/// Files a processor may leave in its output directory (each one is an upload).
pub(crate) const MAX_OUTPUT_FILES: usize = 10_000;
const MAX_DEPTH: usize = 32;

/// The environment every external processor gets (plus `PATH` for commands).
pub(crate) fn contract_env(
    job: &Job<'_>,
    region: &str,
    input: &str,
    output_dir: &str,
) -> Vec<(String, String)> {
    vec![
        ("S3_BUCKET_NAME".into(), job.object.bucket.clone()),
        ("S3_KEY".into(), job.object.key.clone()),
        ("STATUS_KEY".into(), job.etag.to_string()),
        ("AWS_REGION".into(), region.to_string()),
        ("OFFLOAD_PIPELINE".into(), job.pipeline.name.clone()),
        ("OFFLOAD_INPUT".into(), input.to_string()),
        ("OFFLOAD_OUTPUT_DIR".into(), output_dir.to_string()),
    ]
}

/// `args` with `{input}` and `{output_dir}` replaced.
pub(crate) fn substitute(args: &[String], input: &str, output_dir: &str) -> Vec<String> {
    args.iter()
        .map(|a| {
            a.replace("{input}", input)
                .replace("{output_dir}", output_dir)
        })
        .collect()
}

/// The empty output directory of one object. It lies inside the object's 0700 spool directory, so only
/// the daemon's user reaches it by path; a container running as another user reaches it (and the input
/// file) through its bind mounts, so for one `open_to_all` makes the directory writable and the input
/// readable by any user.
pub(crate) fn make_output_dir(job: &Job<'_>, open_to_all: bool) -> Result<PathBuf, ProcessError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = job.files.path("output");
    let io = |e: std::io::Error| {
        ProcessError::Transient(format!(
            "cannot prepare the output directory {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir(&dir).map_err(io)?;
    let (dir_mode, input_mode) = if open_to_all {
        (0o777, 0o644)
    } else {
        (0o700, 0o600)
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(dir_mode)).map_err(io)?;
    std::fs::set_permissions(
        &job.files.input,
        std::fs::Permissions::from_mode(input_mode),
    )
    .map_err(io)?;
    Ok(dir)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A processor's output: split into lines, each copied into the log (within the current span, so with
/// the file's fields) up to [`MAX_LOGGED_LINES`], the last [`TAIL_LINES`] kept for the failure report.
/// Memory is bounded by the line and tail limits, whatever the processor prints.
#[derive(Debug, Default)]
pub(crate) struct OutputLog {
    partial: [Vec<u8>; 2],
    cut: [bool; 2],
    tail: VecDeque<String>,
    lines: u64,
}

impl OutputLog {
    pub(crate) fn feed(&mut self, stream: Stream, mut bytes: &[u8]) {
        let i = stream as usize;
        while !bytes.is_empty() {
            match memchr::memchr(b'\n', bytes) {
                Some(n) => {
                    self.push_bytes(i, &bytes[..n]);
                    self.end_line(stream);
                    bytes = &bytes[n + 1..];
                }
                None => {
                    self.push_bytes(i, bytes);
                    bytes = &[];
                }
            }
        }
    }

    fn push_bytes(&mut self, i: usize, b: &[u8]) {
        let room = MAX_LINE_BYTES.saturating_sub(self.partial[i].len());
        if b.len() > room {
            self.cut[i] = true;
        }
        self.partial[i].extend_from_slice(&b[..b.len().min(room)]);
    }

    fn end_line(&mut self, stream: Stream) {
        let i = stream as usize;
        let mut line = String::from_utf8_lossy(&self.partial[i])
            .trim_end_matches('\r')
            .to_string();
        if self.cut[i] {
            line.push_str(" [line cut]");
        }
        self.partial[i].clear();
        self.cut[i] = false;
        self.lines += 1;
        if self.lines <= MAX_LOGGED_LINES {
            tracing::info!(target: "offload_agent::processor", stream = stream.name(), "processor {}: {line}", stream.name());
        } else if self.lines == MAX_LOGGED_LINES + 1 {
            tracing::info!(
                "the processor printed more than {MAX_LOGGED_LINES} lines; the rest of its output for this file is not logged"
            );
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(format!("{}: {line}", stream.name()));
    }

    /// Flush lines without a final newline.
    pub(crate) fn finish(&mut self) {
        for s in [Stream::Stdout, Stream::Stderr] {
            if !self.partial[s as usize].is_empty() || self.cut[s as usize] {
                self.end_line(s);
            }
        }
    }

    /// The last lines, for an error report ("(no output)" when there was none).
    pub(crate) fn tail(&self) -> String {
        if self.tail.is_empty() {
            "(no output)".to_string()
        } else {
            self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

/// How an external processor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i64),
    /// Killed by a signal (commands).
    Signal(i32),
    /// Killed for exceeding its memory limit: by the kernel (containers), or by the daemon, which
    /// watches a command's resident memory (with what it saw).
    OutOfMemory(Option<String>),
    /// Ran past its timeout and was killed.
    TimedOut(std::time::Duration),
}

/// The failure class of a non-successful exit: codes in `permanent` fail the file for good, everything
/// else is retried like any transient failure. `Ok(())` for exit 0.
pub(crate) fn judge(
    exit: &Exit,
    permanent: &[i64],
    what: &str,
    log: &OutputLog,
) -> Result<(), ProcessError> {
    let text = match exit {
        Exit::Code(0) => return Ok(()),
        Exit::Code(c) => format!("{what} exited with code {c}"),
        Exit::Signal(s) => format!("{what} was killed by signal {s}{}", signal_note(*s)),
        Exit::OutOfMemory(None) => {
            format!("{what} was killed for exceeding its memory limit (out of memory)")
        }
        Exit::OutOfMemory(Some(seen)) => {
            format!("{what} was killed for exceeding {seen} (out of memory)")
        }
        Exit::TimedOut(t) => format!(
            "{what} ran longer than its timeout of {} and was killed",
            humantime::format_duration(*t)
        ),
    };
    let code = match exit {
        Exit::Code(c) => Some(*c),
        Exit::OutOfMemory(_) => Some(137),
        Exit::Signal(s) => Some(128 + i64::from(*s)),
        Exit::TimedOut(_) => None,
    };
    let reason = format!("{text}; last output:\n{}", log.tail());
    if code.is_some_and(|c| permanent.contains(&c)) {
        Err(ProcessError::Permanent(reason))
    } else {
        Err(ProcessError::Transient(reason))
    }
}

/// What a signal that ended a command usually means.
fn signal_note(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV: a crash)",
        libc::SIGABRT => " (SIGABRT: it aborted)",
        libc::SIGXCPU => " (SIGXCPU: past its cpu_time limit)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// The end of an external processor's run, the same for both kinds: judge the exit with the output's
/// tail (the processor is gone by now), then collect what it left in `output_dir`.
pub(crate) async fn finish(
    job: &Job<'_>,
    what: &str,
    exit: &Exit,
    permanent: &[i64],
    log: &std::sync::Mutex<OutputLog>,
    output_dir: &Path,
    elapsed: std::time::Duration,
) -> Result<super::Outcome, ProcessError> {
    let mut log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    log.finish();
    judge(exit, permanent, what, &log)?;
    // A directory walk: off the runtime's worker threads.
    let (dir, prefix) = (output_dir.to_path_buf(), output_key_prefix(job));
    let outputs = tokio::task::spawn_blocking(move || collect_outputs(&dir, &prefix))
        .await
        .map_err(|e| ProcessError::Transient(format!("collecting the outputs failed: {e}")))??;
    Ok(super::Outcome {
        summary: format!(
            "{what} exited 0 after {:.2} s, {} output file{}",
            elapsed.as_secs_f64(),
            outputs.len(),
            if outputs.len() == 1 { "" } else { "s" }
        ),
        outputs,
        ..super::Outcome::default()
    })
}

/// Every regular file under `dir`, as outputs under `key_prefix` + its path relative to `dir`, sorted.
/// Refused (a permanent failure, nothing stored): symbolic links, hard links (a file also reachable
/// elsewhere), devices, sockets and pipes, names that are not UTF-8, keys longer than S3 allows, and
/// more than [`MAX_OUTPUT_FILES`] files. Runs after the processor is gone, so nothing changes under it.
pub(crate) fn collect_outputs(dir: &Path, key_prefix: &str) -> Result<Vec<Output>, ProcessError> {
    let mut found = Vec::new();
    let mut refused = Vec::new();
    walk(dir, "", 0, &mut found, &mut refused).map_err(|e| {
        ProcessError::Transient(format!(
            "cannot read the output directory {}: {e}",
            dir.display()
        ))
    })?;
    if found.len() > MAX_OUTPUT_FILES {
        refused.push(format!(
            "{} files (at most {MAX_OUTPUT_FILES} are stored per input)",
            found.len()
        ));
    }
    let mut outputs = Vec::with_capacity(found.len());
    for (path, rel) in found {
        let key = format!("{key_prefix}{rel}");
        if key.len() > S3_MAX_KEY_BYTES {
            refused.push(format!(
                "{rel}: its key would be longer than S3's {S3_MAX_KEY_BYTES} bytes"
            ));
            continue;
        }
        outputs.push(Output {
            content_type: content_type(&rel),
            path,
            key,
        });
    }
    if !refused.is_empty() {
        refused.truncate(20);
        return Err(ProcessError::Permanent(format!(
            "the processor's output was refused, nothing was stored: {}",
            refused.join("; ")
        )));
    }
    outputs.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(outputs)
}

fn walk(
    dir: &Path,
    rel: &str,
    depth: usize,
    found: &mut Vec<(PathBuf, String)>,
    refused: &mut Vec<String>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            refused.push(format!(
                "{rel}{}: the name is not UTF-8",
                entry.file_name().to_string_lossy()
            ));
            continue;
        };
        let shown = format!("{rel}{name}");
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            refused.push(format!(
                "{shown} is a symbolic link (to {target}); write regular files"
            ));
        } else if ft.is_dir() {
            if depth >= MAX_DEPTH {
                refused.push(format!(
                    "{shown}: directories nested deeper than {MAX_DEPTH}"
                ));
            } else {
                walk(&path, &format!("{shown}/"), depth + 1, found, refused)?;
            }
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                refused.push(format!(
                    "{shown} is a hard link ({} names): a file also reachable outside the output directory",
                    meta.nlink()
                ));
            } else {
                found.push((path, shown));
            }
        } else {
            let kind = if ft.is_fifo() {
                "a named pipe"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            refused.push(format!("{shown} is {kind}; write regular files"));
        }
        if refused.len() > 100 {
            break;
        }
    }
    Ok(())
}

fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("txt" | "log") => "text/plain",
        Some("html" | "htm") => "text/html",
        Some("xml") => "application/xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("gz") => "application/gzip",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}

/// Where a processor's files go: `<output_prefix><key without the pipeline prefix>/`.
pub(crate) fn output_key_prefix(job: &Job<'_>) -> String {
    format!("{}/", job.pipeline.output_key(&job.object.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_are_bounded_and_the_tail_is_kept() {
        let mut log = OutputLog::default();
        log.feed(Stream::Stdout, b"one\ntw");
        log.feed(Stream::Stderr, b"err\n");
        log.feed(Stream::Stdout, b"o\n");
        let long = vec![b'x'; MAX_LINE_BYTES * 3];
        log.feed(Stream::Stdout, &long);
        log.feed(Stream::Stdout, b"\n");
        for i in 0..50 {
            log.feed(Stream::Stderr, format!("line {i}\n").as_bytes());
        }
        log.feed(Stream::Stdout, b"no newline");
        log.finish();
        let tail = log.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.ends_with("stdout: no newline"), "{tail}");
        assert!(tail.contains("stderr: line 49"));
        assert!(log
            .partial
            .iter()
            .all(|p| p.capacity() <= MAX_LINE_BYTES * 2));
        let mut short = OutputLog::default();
        short.feed(Stream::Stdout, b"a\ntw");
        short.feed(Stream::Stdout, &long);
        short.finish();
        assert!(short.tail().contains("[line cut]"));
        assert!(short.tail().starts_with("stdout: a\nstdout: tw"));
    }

    #[test]
    fn exits_are_judged_by_the_permanent_list() {
        let log = OutputLog::default();
        assert!(judge(&Exit::Code(0), &[], "p", &log).is_ok());
        assert!(matches!(
            judge(&Exit::Code(3), &[], "p", &log),
            Err(ProcessError::Transient(_))
        ));
        assert!(matches!(
            judge(&Exit::Code(3), &[3], "p", &log),
            Err(ProcessError::Permanent(_))
        ));
        match judge(&Exit::OutOfMemory(None), &[], "p", &log) {
            Err(ProcessError::Transient(r)) => assert!(r.contains("out of memory"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            judge(
                &Exit::TimedOut(std::time::Duration::from_secs(2)),
                &[137],
                "p",
                &log
            ),
            Err(ProcessError::Transient(_))
        ));
    }

    #[test]
    fn outputs_refuse_links_and_keep_nested_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        std::fs::write(d.path().join("a.csv"), b"1").unwrap();
        std::fs::write(d.path().join("sub/deeper/b.png"), b"2").unwrap();
        let ok = collect_outputs(d.path(), "out/x.csv/").unwrap();
        let keys: Vec<_> = ok
            .iter()
            .map(|o| (o.key.as_str(), o.content_type))
            .collect();
        assert_eq!(
            keys,
            [
                ("out/x.csv/a.csv", "text/csv"),
                ("out/x.csv/sub/deeper/b.png", "image/png")
            ]
        );
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("sub/passwd")).unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("secret"), b"s").unwrap();
        std::fs::hard_link(other.path().join("secret"), d.path().join("secret")).unwrap();
        match collect_outputs(d.path(), "out/") {
            Err(ProcessError::Permanent(r)) => {
                assert!(
                    r.contains("sub/passwd is a symbolic link (to /etc/passwd)"),
                    "{r}"
                );
                assert!(r.contains("secret is a hard link"), "{r}");
            }
            other => panic!("{other:?}"),
        }
        let long = "k".repeat(S3_MAX_KEY_BYTES);
        assert!(collect_outputs(d.path(), &long).is_err());
    }
}
