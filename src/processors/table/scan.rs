//! The passes over a file: duplicate candidates through a Bloom filter, then every row validated, with
//! limits that keep one hostile file from exhausting memory.

use super::*;

/// Why a file as a whole cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not a file of the schema (empty, binary, wrong header, absurd first line): a permanent failure.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing the spool failed.
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
    /// Whoever consumed the rows went away (a write failed, or shutdown).
    #[error("stopped")]
    Stopped,
}

/// Limits that keep one hostile file from exhausting memory.
#[derive(Debug, Clone, Copy)]
pub struct ScanLimits {
    /// A "line" longer than this (a binary file, a file without newlines) fails the file.
    pub max_line_bytes: u64,
    /// Bytes every item adds beyond its row's fields ([`Plan::item_overhead`]; 0 when unknown).
    pub item_overhead: usize,
}

/// Counts from one pass over a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    pub rows: u64,
    pub written: u64,
    pub rejected: u64,
    pub extra_columns: Vec<String>,
}

/// A blocked Bloom filter over key hashes: each key sets and tests its k bits inside one 512-bit block
/// (one cache line, chosen by the hash's high half; the bits from its low half), so that a probe costs
/// one cache miss instead of k on a filter larger than the caches (a 110 MB file's is 3-4 MB).
pub(super) struct Bloom {
    bits: Vec<u64>,
}

/// The Bloom filter never takes more than this, whatever the file: files of up to ~13 million rows
/// (1.3 GB of 100-byte rows) keep ~1 % false positives; larger ones more (more candidates in pass 2).
pub const MAX_BLOOM_BYTES: u64 = 16 << 20;

impl Bloom {
    const K: u64 = 7;
    const BLOCK_WORDS: u64 = 8;

    /// About 10 bits (~1% false positives with 7 probes) for every row a file of `len` bytes could
    /// hold (rows of at least `min_row_bytes`), up to [`MAX_BLOOM_BYTES`]. Sized by the file's length
    /// alone, so that no first rows (blank lines, very wide rows) can make it too large or too small.
    pub(super) fn for_file(len: u64, min_row_bytes: u64) -> Self {
        let rows = (len / min_row_bytes.max(2)).max(1024);
        let words = (rows * 10)
            .div_ceil(64)
            .min(MAX_BLOOM_BYTES / 8)
            .next_multiple_of(Self::BLOCK_WORDS);
        Bloom {
            bits: vec![0; words as usize],
        }
    }

    /// Insert; return whether the value may have been present before.
    pub(super) fn check_and_set(&mut self, h: u128) -> bool {
        let blocks = self.bits.len() as u64 / Self::BLOCK_WORDS;
        // Map the high half onto [0, blocks) without a division (Lemire's multiply-shift).
        let block = (((h >> 64) as u64 as u128 * u128::from(blocks)) >> 64) as u64;
        let base = (block * Self::BLOCK_WORDS) as usize;
        let mut bits = h as u64;
        let mut present = true;
        for _ in 0..Self::K {
            let bit = bits & 511;
            bits >>= 9;
            let (w, b) = (base + (bit / 64) as usize, bit % 64);
            if self.bits[w] & (1 << b) == 0 {
                present = false;
                self.bits[w] |= 1 << b;
            }
        }
        present
    }
}

/// Rows between two looks at the cancellation token in the blocking passes.
pub(super) const CANCEL_EVERY: u64 = 1024;

pub(super) fn stopped(cancel: Option<&CancellationToken>, rows: u64) -> bool {
    rows % CANCEL_EVERY == 0 && cancel.is_some_and(|c| c.is_cancelled())
}

/// The records of `path` after its header (if the schema has one), and where its fields are.
pub(super) fn open(
    path: &Path,
    plan: &Plan,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
) -> Result<(Records<File>, Layout), FileError> {
    let mut records = Records::new(
        File::open(path)?,
        plan.schema.format,
        limits.max_line_bytes,
        progress,
    )?;
    let label = &plan.schema.label;
    let header = matches!(plan.schema.format, Format::Csv { header: true, .. });
    if !header {
        return Ok((records, plan.layout(None).map_err(FileError::Invalid)?));
    }
    let mut rec = Record::default();
    match records.next(&mut rec)? {
        Next::Row(_) => {}
        Next::End => {
            let cols: Vec<&str> = plan
                .fields
                .iter()
                .filter_map(|f| match &f.source {
                    crate::config::AttrSource::Column(c) => Some(c.as_str()),
                    _ => None,
                })
                .collect();
            return Err(FileError::Invalid(format!(
                "the file is empty: {label} starts with the header {}",
                cols.join(",")
            )));
        }
        Next::TooLong(_) => {
            return Err(FileError::Invalid(format!(
                "the first line is longer than {} bytes (spool.max_line_bytes): not {label}",
                limits.max_line_bytes
            )))
        }
    }
    let layout = plan.layout(Some(&rec)).map_err(FileError::Invalid)?;
    Ok((records, layout))
}

/// Pass 1: the keys that may occur more than once (a superset of the real repeats), by hash.
pub(super) fn duplicate_candidates(
    path: &Path,
    plan: &Plan,
    limits: ScanLimits,
    cancel: Option<&CancellationToken>,
) -> Result<KeySet, FileError> {
    let mut bloom = Bloom::for_file(std::fs::metadata(path)?.len(), plan.min_row_bytes());
    let mut candidates = KeySet::default();
    let (mut records, layout) = open(path, plan, limits, None)?;
    // Only the key fields are read here.
    let last_key = plan.key_fields().filter_map(|k| layout.cols[k]).max();
    if let (Some(last), false) = (last_key, plan.schema.format == Format::Jsonl) {
        records.split_at_most(last + 1);
    }
    let mut rec = Record::default();
    let mut scratch = Scratch::default();
    let mut rows = 0u64;
    loop {
        match records.next(&mut rec)? {
            Next::End => break,
            Next::TooLong(_) => continue,
            Next::Row(_) => {}
        }
        rows += 1;
        if stopped(cancel, rows) {
            return Err(FileError::Stopped);
        }
        if let Some(h) = plan.key_hash(&rec, &layout, &mut scratch) {
            if bloom.check_and_set(h) {
                candidates.insert(h);
            }
        }
    }
    Ok(candidates)
}

/// A set of 128-bit key hashes: they are hashes already, so the set uses their low bits as they are.
pub(super) type KeySet = HashSet<u128, std::hash::BuildHasherDefault<HashBits>>;
type KeyLines = HashMap<u128, u64, std::hash::BuildHasherDefault<HashBits>>;

/// A hasher for values that are uniform hashes already.
#[derive(Default)]
pub(super) struct HashBits(u64);

impl std::hash::Hasher for HashBits {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64;
    }
}

/// Scan a file: validate every row against `plan`, call `on_reject(line, key, reason)` for each
/// invalid one (`key`: its key fields as far as they can be read) and `on_valid(at, row)` for each
/// valid one, in input order. The first valid occurrence of a key wins; later ones are rejected as
/// duplicates.
pub fn scan(
    path: &Path,
    plan: &Plan,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
    cancel: Option<&CancellationToken>,
    mut on_reject: impl FnMut(u64, &[String], &str) -> Result<(), FileError>,
    mut on_valid: impl FnMut(RowAt, &Row) -> Result<(), FileError>,
) -> Result<ScanOutcome, FileError> {
    let candidates = duplicate_candidates(path, plan, limits, cancel)?;
    let mut first_line = KeyLines::default();
    let (mut records, layout) = open(path, plan, limits, progress)?;
    let mut out = ScanOutcome {
        extra_columns: layout.extra.clone(),
        ..Default::default()
    };
    let mut rec = Record::default();
    let mut row = Row::default();
    let mut scratch = Scratch::default();
    let no_key = vec![String::new(); plan.key_fields().count()];
    loop {
        let at = match records.next(&mut rec)? {
            Next::End => break,
            Next::Row(at) => at,
            Next::TooLong(line) => {
                out.rows += 1;
                out.rejected += 1;
                on_reject(line, &no_key, &too_long_reason(limits.max_line_bytes))?;
                continue;
            }
        };
        let line = at.line;
        out.rows += 1;
        // Long runs of rejected rows send nothing, so the channel cannot tell the reader to stop.
        if stopped(cancel, out.rows) {
            return Err(FileError::Stopped);
        }
        if let Err(reason) =
            plan.validate(&rec, &layout, limits.item_overhead, &mut scratch, &mut row)
        {
            let key = plan.raw_key(&rec, &layout, &mut scratch);
            out.rejected += 1;
            on_reject(line, &key, &reason)?;
            continue;
        }
        let h = plan.row_key_hash(&row, &mut scratch);
        if candidates.contains(&h) {
            if let Some(first) = first_line.get(&h) {
                out.rejected += 1;
                let reason = format!(
                    "duplicate {} (first seen on line {first})",
                    plan.key_shown()
                );
                let key: Vec<String> = plan
                    .key_fields()
                    .map(|k| row.field(k).to_string())
                    .collect();
                on_reject(line, &key, &reason)?;
                continue;
            }
            first_line.insert(h, line);
        }
        out.written += 1;
        on_valid(at, &row)?;
    }
    Ok(out)
}
