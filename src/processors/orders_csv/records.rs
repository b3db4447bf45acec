//! Reading records from the spool: line ends of any kind, a bound on a record's length, and skipping
//! what is too long to the end of the line it starts on.

use super::*;

/// A file read with every lone carriage return (the line end of classic Mac OS files) turned into a
/// newline, so that lines are counted alike whatever ends them: `\n`, `\r\n` or `\r`. The csv reader
/// counts lines by newlines only: without this, every row of a CR-only file reported line 1. One byte
/// for one byte, so offsets stay file offsets. (A lone `\r` inside a quoted field reads as `\n` too.)
pub(super) struct LineEnds<R> {
    inner: R,
    /// A byte read from `inner` to learn what follows a carriage return that ended a read, not yet
    /// handed out.
    pending: Option<u8>,
}

impl<R: Read> LineEnds<R> {
    pub(super) fn new(inner: R) -> LineEnds<R> {
        LineEnds {
            inner,
            pending: None,
        }
    }
}

impl<R: Read> Read for LineEnds<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        if let Some(b) = self.pending.take() {
            buf[0] = b;
            n = 1;
        }
        if n < buf.len() {
            n += self.inner.read(&mut buf[n..])?;
        }
        let mut from = 0;
        while let Some(j) = memchr::memchr(b'\r', &buf[from..n]) {
            let i = from + j;
            let next = if i + 1 < n {
                Some(buf[i + 1])
            } else {
                // The read ends with a carriage return: read one byte more to learn what follows it.
                let mut one = [0u8];
                let got = loop {
                    match self.inner.read(&mut one) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r?,
                    }
                };
                self.pending = (got == 1).then_some(one[0]);
                self.pending
            };
            if next != Some(b'\n') {
                buf[i] = b'\n';
            }
            from = i + 1;
        }
        Ok(n)
    }
}

/// The csv reader's input: counts bytes for progress and bounds what one record can make the reader
/// buffer. The reader asks for more input only once it has parsed all it holds, so when more than
/// `limit` plus one read has been asked for since the current record began, that record (an
/// unbalanced quote makes the rest of the file one record; a binary file may have no newline at all)
/// is over `limit` bytes: the read fails with [`LineTooLong`] before it is held in memory.
pub(super) struct GuardedReader<R> {
    inner: LineEnds<R>,
    limit: u64,
    progress: Option<Arc<AtomicU64>>,
    /// Bytes handed to the csv reader so far.
    total: u64,
    /// Where the record being read starts (set by [`Records::next`] after each record).
    record_start: std::cell::Cell<u64>,
}

/// The csv reader buffers at most this much beyond the record it is parsing.
pub(super) const READ_AHEAD: u64 = 256 * 1024;

impl<R: Read> Read for GuardedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        // Counted before the check: `Records` moves progress from `total` to where it resumes.
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        if self.total.saturating_sub(self.record_start.get()) > self.limit + READ_AHEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                LineTooLong(self.limit),
            ));
        }
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a line or record is longer than {0} bytes (spool.max_line_bytes)")]
pub(super) struct LineTooLong(u64);

pub(super) fn too_long(e: &csv::Error) -> bool {
    matches!(e.kind(), csv::ErrorKind::Io(io)
        if io.get_ref().is_some_and(|i| i.downcast_ref::<LineTooLong>().is_some()))
}

pub(super) fn csv_error(e: csv::Error) -> FileError {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(io) => FileError::Io(io),
        other => FileError::Invalid(format!(
            "unreadable CSV near line {}: {other:?}",
            line.unwrap_or(0)
        )),
    }
}

/// What [`Records::next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    Row(RowAt),
    /// A record that ran past `max_line_bytes`, starting on this line: skipped to the end of that line.
    TooLong(u64),
    End,
}

/// The records of a file, read through [`GuardedReader`] so that none is buffered beyond
/// `max_line_bytes`. A record that runs past it (an unbalanced quote makes the rest of the file one
/// record; a line without newlines) is not an error for the file: it is reported as [`Next::TooLong`] and
/// reading resumes after the end of the line it started on, in a fresh parser. Each byte is read at
/// most about twice: a resumed parse runs into another over-long record only after a new opening quote.
pub(super) struct Records {
    path: PathBuf,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
    rdr: csv::Reader<GuardedReader<File>>,
    /// Where `rdr` started: its byte offset in the file, and the number of lines before it.
    base_offset: u64,
    base_lines: u64,
    /// The line the next record starts on (or a blank line before it).
    next_line: u64,
    /// The file's length, and whether its last line lacks a newline (line numbers of the last record).
    len: u64,
    unterminated: bool,
    done: bool,
    /// The last field of a `\r\n`-terminated record, without its `\r`.
    scratch: Vec<u8>,
}

pub(super) fn reader_at(
    path: &Path,
    offset: u64,
    limit: u64,
    progress: Option<Arc<AtomicU64>>,
) -> io::Result<csv::Reader<GuardedReader<File>>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    Ok(csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .buffer_capacity(256 * 1024)
        .from_reader(GuardedReader {
            inner: LineEnds::new(file),
            limit,
            progress,
            total: 0,
            record_start: std::cell::Cell::new(0),
        }))
}

impl Records {
    /// Open a file and read its header.
    pub(super) fn open(
        path: &Path,
        limits: ScanLimits,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<(Records, Header), FileError> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut last = [b'\n'];
        if len > 0 {
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
        }
        let mut records = Records {
            len,
            unterminated: last[0] != b'\n' && last[0] != b'\r',
            path: path.to_path_buf(),
            limits,
            rdr: reader_at(path, 0, limits.max_line_bytes, progress.clone())?,
            progress,
            base_offset: 0,
            base_lines: 0,
            next_line: 1,
            done: false,
            scratch: Vec::new(),
        };
        let mut rec = csv::ByteRecord::new();
        match records.next(&mut rec)? {
            Next::Row(_) => {}
            Next::End => {
                return Err(FileError::Invalid(format!(
                    "the file is empty: an orders CSV starts with the header {}",
                    COLUMNS.join(",")
                )))
            }
            Next::TooLong(_) => {
                return Err(FileError::Invalid(format!(
                "the first line is longer than {} bytes (spool.max_line_bytes): not an orders CSV",
                limits.max_line_bytes
            )))
            }
        }
        let mut header = parse_header(&rec).map_err(FileError::Invalid)?;
        header.item_overhead = limits.item_overhead;
        Ok((records, header))
    }

    pub(super) fn next(&mut self, rec: &mut csv::ByteRecord) -> Result<Next, FileError> {
        loop {
            let next = self.next_record(rec)?;
            strip_cr(rec, &mut self.scratch);
            // A blank line (`\r\n` alone) is no row.
            let blank = rec.len() == 1 && rec[0].is_empty();
            if !(blank && matches!(next, Next::Row(_))) {
                return Ok(next);
            }
        }
    }

    pub(super) fn next_record(&mut self, rec: &mut csv::ByteRecord) -> Result<Next, FileError> {
        if self.done {
            return Ok(Next::End);
        }
        let start = self.base_offset + self.rdr.get_ref().record_start.get();
        match self.rdr.read_byte_record(rec) {
            Ok(true) => {
                let pos = self.rdr.position();
                self.rdr.get_ref().record_start.set(pos.byte());
                self.next_line = self.base_lines + pos.line();
                // The csv reader's own record line counts from before the blank lines it skipped: count
                // back from the line after the record instead, over its quoted newlines and terminator.
                let quoted = memchr::memchr_iter(b'\n', rec.as_slice()).count() as u64;
                // A record that reaches the end of the file ended on its last newline only if that
                // newline is not field data (an unclosed quote takes it in).
                let terminated = self.base_offset + pos.byte() < self.len
                    || (!self.unterminated && rec.as_slice().last() != Some(&b'\n'));
                let line = self.next_line - quoted - u64::from(terminated);
                Ok(Next::Row(RowAt { line }))
            }
            Ok(false) => {
                self.done = true;
                Ok(Next::End)
            }
            Err(e) if too_long(&e) => {
                rec.clear();
                let (line, resume) = skip_line(&self.path, start, self.next_line)?;
                // Progress follows the position (where reading resumes, or the end of the file), not
                // the bytes read twice or skipped.
                let read_to = self.base_offset + self.rdr.get_ref().total;
                let to = resume.unwrap_or(self.len);
                if let Some(p) = &self.progress {
                    if read_to > to {
                        p.fetch_sub(read_to - to, Ordering::Relaxed);
                    } else {
                        p.fetch_add(to - read_to, Ordering::Relaxed);
                    }
                }
                match resume {
                    Some(offset) => {
                        self.rdr = reader_at(
                            &self.path,
                            offset,
                            self.limits.max_line_bytes,
                            self.progress.clone(),
                        )?;
                        self.base_offset = offset;
                        self.base_lines = line;
                        self.next_line = line + 1;
                    }
                    None => self.done = true,
                }
                Ok(Next::TooLong(line))
            }
            Err(e) => Err(csv_error(e)),
        }
    }
}

/// Drop the carriage return of a `\r\n` line end, which is the last field's last byte: the csv reader
/// ends records at newlines only, so that it counts every line it ends. `scratch` holds the field
/// meanwhile.
pub(super) fn strip_cr(rec: &mut csv::ByteRecord, scratch: &mut Vec<u8>) {
    // The record's bytes end with its last field's.
    if rec.as_slice().last() != Some(&b'\r') {
        return;
    }
    if let Some(last) = rec.iter().next_back() {
        scratch.clear();
        scratch.extend_from_slice(&last[..last.len() - 1]);
        rec.truncate(rec.len() - 1);
        rec.push_field(scratch);
    }
}

/// From `start` (on line `line`): skip blank lines, then find the end of the line the record starts
/// on. Returns the record's line and the offset after that line's newline (`None`: the file ends first).
pub(super) fn skip_line(path: &Path, start: u64, mut line: u64) -> io::Result<(u64, Option<u64>)> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let mut file = LineEnds::new(file);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = start;
    let mut in_record = false;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((line, None));
        }
        let mut chunk = &buf[..n];
        if !in_record {
            let blank = chunk
                .iter()
                .position(|&b| b != b'\n' && b != b'\r')
                .unwrap_or(n);
            line += memchr::memchr_iter(b'\n', &chunk[..blank]).count() as u64;
            at += blank as u64;
            chunk = &chunk[blank..];
            in_record = blank < n;
        }
        if in_record {
            if let Some(nl) = memchr::memchr(b'\n', chunk) {
                return Ok((line, Some(at + nl as u64 + 1)));
            }
        }
        at += chunk.len() as u64;
    }
}

/// The reject reason of an over-long record.
pub(super) fn too_long_reason(limit: u64) -> String {
    format!(
        "the record is longer than {limit} bytes (spool.max_line_bytes): an unbalanced quote or a line \
         without its newline; skipped to the end of the line it starts on"
    )
}
