//! The passes over a file: duplicate candidates through a Bloom filter, then every row validated, with
//! limits that keep one hostile file from exhausting memory.

use super::*;

/// Why a file as a whole cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not an orders CSV (empty, binary, wrong header, absurd line length): a permanent failure.
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
    /// Bytes every item adds beyond its columns ([`Source::item_overhead`]; 0 when unknown).
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

/// A Bloom filter over id hashes: k probes by double hashing the two halves of the 128-bit hash.
pub(super) struct Bloom {
    bits: Vec<u64>,
    m: u64,
}

/// The shortest line a valid row can have: 12 separators, two dates of at least 8 characters, an id, five
/// numbers of at least one digit and a newline.
pub(super) const MIN_ROW_BYTES: u64 = 35;
/// The Bloom filter never takes more than this, whatever the file: files of up to ~13 million rows
/// (1.3 GB of 100-byte rows) keep ~1 % false positives; larger ones more (more candidates in pass 2).
pub const MAX_BLOOM_BYTES: u64 = 16 << 20;

impl Bloom {
    const K: u64 = 7;

    /// About 10 bits (~1% false positives with 7 probes) for every row a file of `len` bytes could
    /// hold, up to [`MAX_BLOOM_BYTES`]. Sized by the file's length alone, so that no first rows (blank
    /// lines, very wide rows) can make it too large or too small.
    pub(super) fn for_file(len: u64) -> Self {
        let rows = (len / MIN_ROW_BYTES).max(1024);
        let words = (rows * 10).div_ceil(64).min(MAX_BLOOM_BYTES / 8);
        Bloom {
            bits: vec![0; words as usize],
            m: words * 64,
        }
    }

    /// Insert; return whether the value may have been present before.
    pub(super) fn check_and_set(&mut self, h: u128) -> bool {
        let (h1, h2) = (h as u64, ((h >> 64) as u64) | 1);
        let mut present = true;
        for i in 0..Self::K {
            // Map the 64-bit probe onto [0, m) without a division (Lemire's multiply-shift).
            let probe = h1.wrapping_add(i.wrapping_mul(h2));
            let bit = ((probe as u128 * self.m as u128) >> 64) as u64;
            let (w, b) = ((bit / 64) as usize, bit % 64);
            if self.bits[w] & (1 << b) == 0 {
                present = false;
                self.bits[w] |= 1 << b;
            }
        }
        present
    }
}

/// Pass 1: the ids that may occur more than once (a superset of the real repeats).
/// Rows between two looks at the cancellation token in the blocking passes.
pub(super) const CANCEL_EVERY: u64 = 1024;

pub(super) fn stopped(cancel: Option<&CancellationToken>, rows: u64) -> bool {
    rows % CANCEL_EVERY == 0 && cancel.is_some_and(|c| c.is_cancelled())
}

pub(super) fn duplicate_candidates(
    path: &Path,
    limits: ScanLimits,
    cancel: Option<&CancellationToken>,
) -> Result<HashSet<u128>, FileError> {
    let mut bloom = Bloom::for_file(std::fs::metadata(path)?.len());
    let mut candidates = HashSet::new();
    let (mut records, header) = Records::open(path, limits, None)?;
    let col = header.idx[ORDER_ID];
    let mut rec = csv::ByteRecord::new();
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
        if let Some(id) = rec.get(col).and_then(normalized_id) {
            let h = id_hash(id);
            if !id.is_empty() && bloom.check_and_set(h) {
                candidates.insert(h);
            }
        }
    }
    Ok(candidates)
}

/// Ids are compared by their 128-bit hash (xxh3): a fixed 16 bytes per remembered id however long the
/// ids are. Two different ids of one file colliding is a chance of about n² / 2¹²⁹ (below 10⁻²² for
/// a hundred million rows).
pub(super) fn id_hash(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Scan a file: validate every row, call `on_reject(line, order_id, reason)` for each invalid one and
/// `on_valid(at, order)` for each valid one, in input order. The first valid occurrence of
/// an `OrderId` wins; later ones are rejected as duplicates.
pub fn scan(
    path: &Path,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
    cancel: Option<&CancellationToken>,
    mut on_reject: impl FnMut(u64, &str, &str) -> Result<(), FileError>,
    mut on_valid: impl FnMut(RowAt, &Order) -> Result<(), FileError>,
) -> Result<ScanOutcome, FileError> {
    let candidates = duplicate_candidates(path, limits, cancel)?;
    let mut first_line: HashMap<u128, u64> = HashMap::new();
    let (mut records, header) = Records::open(path, limits, progress)?;
    let mut out = ScanOutcome {
        extra_columns: header.extra.clone(),
        ..Default::default()
    };
    let mut rec = csv::ByteRecord::new();
    let mut order = Order {
        fields: Default::default(),
    };
    loop {
        // A blank line is no row: the csv reader already skips empty lines.
        let at = match records.next(&mut rec)? {
            Next::End => break,
            Next::Row(at) => at,
            Next::TooLong(line) => {
                out.rows += 1;
                out.rejected += 1;
                on_reject(line, "", &too_long_reason(limits.max_line_bytes))?;
                continue;
            }
        };
        let line = at.line;
        out.rows += 1;
        // Long runs of rejected rows send nothing, so the channel cannot tell the reader to stop.
        if stopped(cancel, out.rows) {
            return Err(FileError::Stopped);
        }
        if let Err(reason) = validate_into(&rec, &header, &mut order) {
            let id = rec
                .get(header.idx[ORDER_ID])
                .map(|b| match normalized_id(b) {
                    Some(id) => id.to_string(),
                    None => String::from_utf8_lossy(b).trim().to_string(),
                })
                .unwrap_or_default();
            out.rejected += 1;
            on_reject(line, &id, &reason)?;
            continue;
        }
        let h = id_hash(order.order_id());
        if candidates.contains(&h) {
            if let Some(first) = first_line.get(&h) {
                out.rejected += 1;
                let reason = format!("duplicate OrderId (first seen on line {first})");
                on_reject(line, order.order_id(), &reason)?;
                continue;
            }
            first_line.insert(h, line);
        }
        out.written += 1;
        on_valid(at, &order)?;
    }
    Ok(out)
}
