//! Reading records from a file, forward only, in one buffer: CSV (its own tokenizer: the delimiter and
//! quote of the schema, line ends `\n`, `\r\n` or a lone `\r` counted alike, quoted line ends as data)
//! or JSON lines. A record longer than `max_line_bytes` (an unbalanced quote makes the rest of a file
//! one record; a binary file may have no line end at all) is reported as [`Next::TooLong`] and reading
//! resumes after the end of the line it starts on, from bytes still in the buffer: memory stays within
//! `max_line_bytes` plus one read, and no byte is read twice.

use super::*;

/// Bytes asked of the file per read (and the buffer's size while records are short).
pub const READ_AHEAD: u64 = 256 * 1024;

/// What [`Records::next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    Row(RowAt),
    /// A record that ran past `max_line_bytes`, starting on this line: skipped to the end of that line.
    TooLong(u64),
    End,
}

/// One record: its bytes, and each field's span in them (quotes removed, `""` unescaped, the
/// delimiters kept between the fields; the bytes of an unquoted line are the line itself). A JSON line
/// is one field.
#[derive(Debug, Default, Clone)]
pub(super) struct Record {
    pub(super) bytes: Vec<u8>,
    spans: Vec<(usize, usize)>,
    /// Where the field being built by the quoting state machine starts.
    field_start: usize,
}

impl Record {
    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(super) fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        self.spans.get(i).map(|&(s, e)| s..e)
    }

    pub(super) fn get(&self, i: usize) -> Option<&[u8]> {
        self.range(i).map(|r| &self.bytes[r])
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.spans.clear();
        self.field_start = 0;
    }

    fn end_field(&mut self) {
        self.spans.push((self.field_start, self.bytes.len()));
        self.field_start = self.bytes.len();
    }

    /// The delimiter after a field the state machine ended is kept between the fields, as a plain
    /// line has it: so no field boundary can fall inside a character (a multi-byte character split by
    /// a delimiter is then invalid UTF-8 in the record, not two valid halves in two fields).
    fn separate(&mut self, delim: u8) {
        self.bytes.push(delim);
        self.field_start = self.bytes.len();
    }
}

/// The file's bytes in one buffer: `buf[start..end]` is held (the record being read starts at
/// `start`), `pos` is where reading goes on.
struct Input<R> {
    src: R,
    buf: Vec<u8>,
    start: usize,
    pos: usize,
    end: usize,
    eof: bool,
    progress: Option<Arc<AtomicU64>>,
}

impl<R: Read> Input<R> {
    fn new(src: R, progress: Option<Arc<AtomicU64>>) -> Input<R> {
        Input {
            src,
            buf: vec![0; READ_AHEAD as usize],
            start: 0,
            pos: 0,
            end: 0,
            eof: false,
            progress,
        }
    }

    /// Read more behind what is held (moved to the front first, the buffer grown when the held record
    /// fills it). `false` at the end of the file.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.pos -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() + READ_AHEAD as usize, 0);
        }
        let n = loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.end += n;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Consume the line end at `pos` (`\n`, `\r\n` or a lone `\r`).
    fn eat_line_end(&mut self) -> io::Result<()> {
        let cr = self.buf[self.pos] == b'\r';
        self.pos += 1;
        if cr && self.pos == self.end {
            self.fill()?;
        }
        if cr && self.pos < self.end && self.buf[self.pos] == b'\n' {
            self.pos += 1;
        }
        Ok(())
    }

    /// From `start`: past the end of the line it is on (or to the end of the file), discarding as it
    /// goes.
    fn skip_line(&mut self) -> io::Result<()> {
        self.pos = self.start;
        loop {
            if let Some(i) = memchr::memchr2(b'\n', b'\r', &self.buf[self.pos..self.end]) {
                self.pos += i;
                return self.eat_line_end();
            }
            self.pos = self.end;
            self.start = self.end;
            if !self.fill()? {
                return Ok(());
            }
        }
    }

    /// Field bytes up to the next `stop` byte or line end, into `rec`: that byte (not consumed), or
    /// `None` when the held bytes ran out first.
    fn take_until(&mut self, stop: u8, rec: &mut Record) -> Option<u8> {
        let hay = &self.buf[self.pos..self.end];
        let found = memchr::memchr3(stop, b'\n', b'\r', hay);
        let n = found.unwrap_or(hay.len());
        rec.bytes.extend_from_slice(&hay[..n]);
        self.pos += n;
        found.map(|_| self.buf[self.pos])
    }

    /// At the very start of the file: skip a UTF-8 byte order mark.
    fn skip_bom(&mut self) -> io::Result<()> {
        while self.end < 3 && self.fill()? {}
        if self.buf[..self.end].starts_with(b"\xEF\xBB\xBF") {
            self.pos = 3;
            self.start = 3;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    AfterQuote,
}

/// The records of one file.
pub(super) struct Records<R> {
    input: Input<R>,
    csv: Option<(u8, u8)>,
    limit: usize,
    /// The line the next byte is on.
    line: u64,
    /// Fields a quote-free line is split into at most (the rest of the line is the last one's): the
    /// duplicate pass needs the fields up to its keys only.
    max_fields: usize,
}

impl<R: Read> Records<R> {
    pub(super) fn new(
        src: R,
        format: Format,
        max_line_bytes: u64,
        progress: Option<Arc<AtomicU64>>,
    ) -> io::Result<Records<R>> {
        let mut input = Input::new(src, progress);
        input.skip_bom()?;
        Ok(Records {
            input,
            csv: match format {
                Format::Csv {
                    delimiter, quote, ..
                } => Some((delimiter, quote)),
                Format::Jsonl => None,
            },
            limit: max_line_bytes.min(usize::MAX as u64) as usize,
            line: 1,
            max_fields: usize::MAX,
        })
    }

    /// Split quote-free lines into at most `n` fields from now on (see `max_fields`).
    pub(super) fn split_at_most(&mut self, n: usize) {
        self.max_fields = n.max(1);
    }

    /// The next record (blank lines are none), into `rec`.
    pub(super) fn next(&mut self, rec: &mut Record) -> Result<Next, FileError> {
        loop {
            rec.clear();
            self.input.start = self.input.pos;
            let line = self.line;
            let read = match self.csv {
                Some((delim, quote)) => self.csv_record(rec, delim, quote)?,
                None => self.json_line(rec)?,
            };
            match read {
                Read1::End => return Ok(Next::End),
                Read1::Blank => {
                    self.line += 1;
                }
                Read1::Record { lines } => {
                    self.line += lines;
                    return Ok(Next::Row(RowAt { line }));
                }
                Read1::TooLong => {
                    rec.clear();
                    self.input.skip_line()?;
                    self.line = line + 1;
                    return Ok(Next::TooLong(line));
                }
            }
        }
    }

    /// One JSON line: its bytes as the one field.
    fn json_line(&mut self, rec: &mut Record) -> io::Result<Read1> {
        let inp = &mut self.input;
        loop {
            if let Some(i) = memchr::memchr2(b'\n', b'\r', &inp.buf[inp.pos..inp.end]) {
                inp.pos += i;
                break;
            }
            inp.pos = inp.end;
            if inp.pos - inp.start > self.limit {
                return Ok(Read1::TooLong);
            }
            if !inp.fill()? {
                break;
            }
        }
        let body = &inp.buf[inp.start..inp.pos];
        if body.len() > self.limit {
            return Ok(Read1::TooLong);
        }
        let blank = body.iter().all(|b| b.is_ascii_whitespace());
        if blank && inp.pos == inp.end && inp.eof {
            return Ok(if inp.pos == inp.start {
                Read1::End
            } else {
                Read1::Blank
            });
        }
        rec.bytes.extend_from_slice(body);
        rec.end_field();
        if inp.pos < inp.end {
            inp.eat_line_end()?;
        }
        Ok(if blank {
            Read1::Blank
        } else {
            Read1::Record { lines: 1 }
        })
    }

    /// One CSV record. Quoting as spreadsheets write it: a field that starts with the quote runs to
    /// the next lone quote (`""` is a quote in it; line ends in it are data); bytes after its closing
    /// quote up to the delimiter are kept as written; a quote inside an unquoted field is data.
    fn csv_record(&mut self, rec: &mut Record, delim: u8, quote: u8) -> io::Result<Read1> {
        if self.fast_line(rec, delim, quote) {
            return self.record_end(true, rec, 0);
        }
        rec.clear();
        self.csv_quoted(rec, delim, quote)
    }

    /// A record that has a quote, or is not whole in the buffer yet: the quoting state machine.
    fn csv_quoted(&mut self, rec: &mut Record, delim: u8, quote: u8) -> io::Result<Read1> {
        let limit = self.limit;
        let inp = &mut self.input;
        let mut st = State::FieldStart;
        let mut inside = 0u64; // line ends inside quoted fields
        let ended = loop {
            if inp.pos == inp.end {
                if inp.pos - inp.start > limit {
                    return Ok(Read1::TooLong);
                }
                if !inp.fill()? {
                    break false;
                }
                continue;
            }
            match st {
                State::FieldStart => {
                    if inp.buf[inp.pos] == quote {
                        inp.pos += 1;
                        st = State::Quoted;
                    } else {
                        st = State::Unquoted;
                    }
                }
                State::Unquoted => match inp.take_until(delim, rec) {
                    None => {}
                    Some(_) => {
                        rec.end_field();
                        if inp.buf[inp.pos] != delim {
                            break true;
                        }
                        rec.separate(delim);
                        inp.pos += 1;
                        st = State::FieldStart;
                    }
                },
                State::Quoted => {
                    match inp.take_until(quote, rec) {
                        None => {}
                        Some(b) => {
                            if b == quote {
                                inp.pos += 1;
                                st = State::AfterQuote;
                            } else if b == b'\r' && inp.pos + 1 == inp.end && !inp.eof {
                                // What follows the carriage return is not read yet.
                                if inp.pos - inp.start > limit {
                                    return Ok(Read1::TooLong);
                                }
                                inp.fill()?;
                            } else {
                                rec.bytes.push(b);
                                inp.pos += 1;
                                if b == b'\r' && inp.pos < inp.end && inp.buf[inp.pos] == b'\n' {
                                    rec.bytes.push(b'\n');
                                    inp.pos += 1;
                                }
                                inside += 1;
                            }
                        }
                    }
                }
                State::AfterQuote => {
                    let b = inp.buf[inp.pos];
                    if b == quote {
                        rec.bytes.push(quote);
                        inp.pos += 1;
                        st = State::Quoted;
                    } else if b == delim {
                        rec.end_field();
                        rec.separate(delim);
                        inp.pos += 1;
                        st = State::FieldStart;
                    } else if b == b'\n' || b == b'\r' {
                        rec.end_field();
                        break true;
                    } else {
                        rec.bytes.push(b);
                        inp.pos += 1;
                        st = State::Unquoted;
                    }
                }
            }
        };
        self.record_end(ended, rec, inside)
    }

    /// After a record's last field: at its line end (`ended`) or at the end of the file; `inside`:
    /// the line ends within its quoted fields.
    #[inline]
    fn record_end(&mut self, ended: bool, rec: &mut Record, inside: u64) -> io::Result<Read1> {
        let inp = &mut self.input;
        if inp.pos - inp.start > self.limit {
            return Ok(Read1::TooLong);
        }
        if !ended {
            // The file ends without a line end.
            if inp.pos == inp.start {
                return Ok(Read1::End);
            }
            // The field in progress ends with the file (after a delimiter: an empty last field).
            rec.end_field();
            return Ok(Read1::Record { lines: 1 + inside });
        }
        let blank = inp.pos == inp.start;
        inp.eat_line_end()?;
        Ok(if blank {
            Read1::Blank
        } else {
            Read1::Record { lines: 1 + inside }
        })
    }
}

impl<R: Read> Records<R> {
    /// Most records: a line without quotes, whole in the buffer. Its end, its quotes and its
    /// delimiters are found with vector searches, and its bytes copied once; `false` (and nothing
    /// consumed) for any other record.
    fn fast_line(&mut self, rec: &mut Record, delim: u8, quote: u8) -> bool {
        let inp = &mut self.input;
        let rest = &inp.buf[inp.pos..inp.end];
        let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
            return false;
        };
        let line = &rest[..end];
        if memchr::memchr(quote, line).is_some() {
            return false;
        }
        split_fields(line, delim, self.max_fields, &mut rec.spans);
        rec.bytes.extend_from_slice(line);
        inp.pos += end;
        true
    }
}

/// The spans of the fields of a quote-free line (at most `max`, the last one running to the line's
/// end), appended to `spans`. On x86_64, sixteen bytes at a time with SSE2 (part of every x86_64): one
/// compare and one mask per sixteen bytes, then one step per delimiter; elsewhere eight at a time in
/// a word.
#[cfg(target_arch = "x86_64")]
fn split_fields(line: &[u8], delim: u8, max: usize, spans: &mut Vec<(usize, usize)>) {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    let mut field = 0;
    let mut base = 0;
    // Each delimiter of the block at `base` whose bits are in `mask`: a field ends there.
    let mut take = |mut mask: u32, base: usize, spans: &mut Vec<(usize, usize)>| -> bool {
        while mask != 0 {
            let at = base + mask.trailing_zeros() as usize;
            spans.push((field, at));
            if spans.len() == max {
                return true;
            }
            field = at + 1;
            mask &= mask - 1;
        }
        false
    };
    // SAFETY: SSE2 is in the x86_64 baseline; every load reads 16 bytes inside `line` or `tail`
    // (unaligned loads).
    unsafe {
        let pattern = _mm_set1_epi8(delim as i8);
        while base + 16 <= line.len() {
            let v = _mm_loadu_si128(line.as_ptr().add(base).cast::<__m128i>());
            let mask = _mm_movemask_epi8(_mm_cmpeq_epi8(v, pattern)) as u32;
            if take(mask, base, spans) {
                return;
            }
            base += 16;
        }
        let rest = &line[base..];
        if !rest.is_empty() {
            let mut tail = [0u8; 16];
            tail[..rest.len()].copy_from_slice(rest);
            let v = _mm_loadu_si128(tail.as_ptr().cast::<__m128i>());
            let mask =
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, pattern)) as u32 & ((1 << rest.len()) - 1);
            if take(mask, base, spans) {
                return;
            }
        }
    }
    spans.push((field, line.len()));
}

#[cfg(not(target_arch = "x86_64"))]
fn split_fields(line: &[u8], delim: u8, max: usize, spans: &mut Vec<(usize, usize)>) {
    split_fields_by_word(line, delim, max, spans)
}

/// [`split_fields`] eight bytes at a time (a byte equal to the delimiter is a zero byte of the word
/// XOR the delimiter repeated; the mask marks exactly those bytes' high bits).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn split_fields_by_word(line: &[u8], delim: u8, max: usize, spans: &mut Vec<(usize, usize)>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let pattern = ONES * u64::from(delim);
    let mut field = 0;
    let mut chunks = line.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or_default()) ^ pattern;
        let mut zeros = !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7);
        while zeros != 0 {
            let at = base + (zeros.trailing_zeros() / 8) as usize;
            spans.push((field, at));
            if spans.len() == max {
                return;
            }
            field = at + 1;
            zeros &= zeros - 1;
        }
        base += 8;
    }
    for (j, &b) in chunks.remainder().iter().enumerate() {
        if b == delim {
            spans.push((field, base + j));
            if spans.len() == max {
                return;
            }
            field = base + j + 1;
        }
    }
    spans.push((field, line.len()));
}

/// What one read of a record found.
enum Read1 {
    Record { lines: u64 },
    Blank,
    TooLong,
    End,
}

/// The reject reason of an over-long record.
pub(super) fn too_long_reason(limit: u64) -> String {
    format!(
        "the record is longer than {limit} bytes (spool.max_line_bytes): an unbalanced quote or a line \
         without its newline; skipped to the end of the line it starts on"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of splitting agree on lines of every length around the block sizes, with delimiters
    /// anywhere (first, last, doubled) and every field limit.
    #[test]
    fn the_block_and_the_word_splitters_agree() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in 0..80 {
            for _ in 0..20 {
                let line: Vec<u8> = (0..len)
                    .map(|_| {
                        if next() % 4 == 0 {
                            b','
                        } else {
                            b'a' + (next() % 26) as u8
                        }
                    })
                    .collect();
                for max in [1, 2, 3, 7, 13, usize::MAX] {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    split_fields(&line, b',', max, &mut a);
                    split_fields_by_word(&line, b',', max, &mut b);
                    assert_eq!(a, b, "{:?} max {max}", String::from_utf8_lossy(&line));
                    assert!(a.len() <= max);
                }
            }
        }
        let mut spans = Vec::new();
        split_fields(b"a,,b,", b',', usize::MAX, &mut spans);
        assert_eq!(spans, [(0, 1), (2, 2), (3, 4), (5, 5)]);
    }
}
