//! The built-in `orders-csv` processor: CSV orders into DynamoDB, plus an output CSV and a rejects report.
//!
//! A file is read twice from the spool, never held in memory:
//! 1. a quick pass over the `OrderId` column fills a Bloom filter; ids that *may* repeat become
//!    candidates (an exact set that stays small: true repeats plus ~1% false positives), so duplicate
//!    detection needs memory for the candidates only, not for every id in a multi-gigabyte file;
//! 2. the full pass validates every row. Valid rows go, in batches of 25, through a bounded channel to
//!    asynchronous `BatchWriteItem` calls; their `OrderId,ConfirmationId` lines go to the output file;
//!    invalid rows go to the rejects file with their line number and reason.
//!
//! Nothing is dropped: `written + rejected = data rows`, and both files are uploaded only after every
//! write was acknowledged.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::batch_writer::{writer_client, BatchWriter, WriteError};
use super::{Context, Job, Outcome, Output, ProcessFuture, Processor, RowCounts};
use crate::config::{Config, Pipeline};
use crate::error::ProcessError;
use crate::limits::{
    DYNAMODB_MAX_BATCH_WRITE, DYNAMODB_MAX_ITEM_BYTES, DYNAMODB_MAX_PARTITION_KEY_BYTES,
    S3_MAX_KEY_BYTES,
};

/// The columns an orders file must have, in the order items and reports name them.
pub const COLUMNS: [&str; 13] = [
    "Region",
    "Country",
    "ItemType",
    "SalesChannel",
    "OrderPriority",
    "OrderDate",
    "OrderId",
    "ShipDate",
    "UnitSold",
    "UnitPrice",
    "TotalRevenue",
    "TotalCost",
    "TotalProfit",
];
const ORDER_DATE: usize = 5;
const ORDER_ID: usize = 6;
const SHIP_DATE: usize = 7;
const UNIT_SOLD: usize = 8;
const MONEY: [usize; 4] = [9, 10, 11, 12];

/// DynamoDB numbers: at most 38 significant digits, magnitude from 1E-130 to below 1E+126.
const MAX_NUMBER_DIGITS: usize = 38;
const MAX_INTEGER_DIGITS: usize = 126;
const MAX_FRACTION_LEADING_ZEROS: usize = 129;
/// Rows per `BatchWriteItem`: as many as DynamoDB takes.
pub const BATCH_SIZE: usize = DYNAMODB_MAX_BATCH_WRITE;
/// Namespace of the UUIDv5 `ConfirmationId`s (fixed forever: changing it changes every id).
pub const CONFIRMATION_NAMESPACE: Uuid = Uuid::from_u128(0x8c1f_3e2a_4b7d_5e60_9a1b_6f72_6465_7273);

/// The identity of the object a file came from; it seeds `ConfirmationId`.
#[derive(Debug, Clone)]
pub struct Source {
    pub bucket: String,
    pub key: String,
    pub etag: String,
}

impl Source {
    /// The bytes `to_item` adds to every item beyond the columns: the attribute names and values of
    /// `ConfirmationId`, `SourceBucket` and `SourceKey`.
    pub fn item_overhead(&self) -> usize {
        "ConfirmationId".len()
            + 36
            + "SourceBucket".len()
            + self.bucket.len()
            + "SourceKey".len()
            + self.key.len()
    }

    /// `Uuid::new_v5(CONFIRMATION_NAMESPACE, "bucket\nkey\netag\nOrderId")`.
    pub fn confirmation_id(&self, order_id: &str) -> Uuid {
        ConfirmationIds::new(self).of(order_id)
    }
}

/// [`Source::confirmation_id`] for the rows of one object: the SHA-1 state after the namespace and the
/// object's part of the name is computed once, so that a row hashes only its `OrderId` (one SHA-1
/// block instead of two for a typical bucket, key and ETag).
pub struct ConfirmationIds(sha1_smol::Sha1);

impl ConfirmationIds {
    pub fn new(src: &Source) -> ConfirmationIds {
        let mut h = sha1_smol::Sha1::new();
        h.update(CONFIRMATION_NAMESPACE.as_bytes());
        for part in [&src.bucket, &src.key, &src.etag] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        ConfirmationIds(h)
    }

    pub fn of(&self, order_id: &str) -> Uuid {
        let mut h = self.0.clone();
        h.update(order_id.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&h.digest().bytes()[..16]);
        uuid::Builder::from_sha1_bytes(bytes).into_uuid()
    }
}

/// Where to find each required column in this file's header.
#[derive(Debug, Clone)]
pub struct Header {
    idx: [usize; 13],
    width: usize,
    pub extra: Vec<String>,
    /// Bytes every item of the file adds beyond its columns (ids, source), for the item size check.
    item_overhead: usize,
}

/// A row that passed validation: the 13 columns, dates as ISO `YYYY-MM-DD`, numbers as plain decimals.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub fields: [String; 13],
}

impl Order {
    pub fn order_id(&self) -> &str {
        &self.fields[ORDER_ID]
    }

    /// The DynamoDB item: strings as S, `UnitSold` and money as N, plus ids and the source.
    pub fn to_item(&self, cid: &Uuid, src: &Source) -> HashMap<String, AttributeValue> {
        let mut buf = Uuid::encode_buffer();
        Items::new(src).build(|i| &self.fields[i], cid.hyphenated().encode_lower(&mut buf))
    }
}

/// Where an item's attribute gets its value.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Column(usize),
    ConfirmationId,
    /// `SourceBucket`, `SourceKey`: the same in every item of an object.
    Source,
}

/// The items of one object's rows. Each is a clone of a template holding the attribute names and
/// the object's values, with the row's values set in place: no attribute name is hashed per row
/// (SipHash on 16 keys and their inserts were 3 % of a `process` run's CPU).
#[derive(Clone)]
pub struct Items {
    template: HashMap<String, AttributeValue>,
    /// The template's entries in its iteration order: each one's name and where its value comes from.
    slots: Vec<(&'static str, Slot)>,
}

impl Items {
    pub fn new(src: &Source) -> Items {
        let mut template = HashMap::with_capacity(COLUMNS.len() + 3);
        let mut names: Vec<(&'static str, Slot)> = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, Slot::Column(i)))
            .collect();
        names.push(("ConfirmationId", Slot::ConfirmationId));
        names.push(("SourceBucket", Slot::Source));
        names.push(("SourceKey", Slot::Source));
        for (name, _) in &names {
            template.insert((*name).to_owned(), AttributeValue::S(String::new()));
        }
        template.insert(
            "SourceBucket".to_owned(),
            AttributeValue::S(src.bucket.clone()),
        );
        template.insert("SourceKey".to_owned(), AttributeValue::S(src.key.clone()));
        let slots = template
            .keys()
            .map(|k| {
                *names
                    .iter()
                    .find(|(name, _)| name == k)
                    .expect("every template key is a name")
            })
            .collect();
        Items { template, slots }
    }

    /// The item of a valid row whose field `i` (in [`COLUMNS`] order) is `field(i)`, with its
    /// `ConfirmationId` as text.
    pub fn build<'a>(
        &self,
        field: impl Fn(usize) -> &'a str,
        cid: &str,
    ) -> HashMap<String, AttributeValue> {
        let mut item = self.template.clone();
        // A clone has its template's layout, so it iterates in the same order; each name is checked
        // all the same, and the values set by name should that ever not hold.
        let in_order = item.len() == self.slots.len()
            && item
                .iter_mut()
                .zip(&self.slots)
                .all(|((k, v), (name, slot))| {
                    if k != name {
                        return false;
                    }
                    if let Some(value) = value_of(*slot, &field, cid) {
                        *v = value;
                    }
                    true
                });
        if !in_order {
            for (name, slot) in &self.slots {
                if let Some(value) = value_of(*slot, &field, cid) {
                    item.insert((*name).to_owned(), value);
                }
            }
        }
        item
    }
}

/// The value a slot takes in a row's item (`None`: the template's own).
fn value_of<'a>(
    slot: Slot,
    field: &impl Fn(usize) -> &'a str,
    cid: &str,
) -> Option<AttributeValue> {
    match slot {
        Slot::Column(i) => {
            let v = field(i).to_owned();
            Some(if i == UNIT_SOLD || MONEY.contains(&i) {
                AttributeValue::N(v)
            } else {
                AttributeValue::S(v)
            })
        }
        Slot::ConfirmationId => Some(AttributeValue::S(cid.to_owned())),
        Slot::Source => None,
    }
}

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

pub fn parse_header(rec: &csv::ByteRecord) -> Result<Header, String> {
    let mut names = Vec::with_capacity(rec.len());
    for (i, raw) in rec.iter().enumerate() {
        let raw = if i == 0 {
            raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
        } else {
            raw
        };
        let name = std::str::from_utf8(raw).map_err(|_| {
            "the first line is not text, so this is not an orders CSV (a binary file?)".to_string()
        })?;
        names.push(name.trim().to_string());
    }
    let mut idx = [usize::MAX; 13];
    let mut missing = Vec::new();
    for (c, col) in COLUMNS.iter().enumerate() {
        let found: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.as_str() == *col)
            .map(|(i, _)| i)
            .collect();
        match found.len() {
            0 => missing.push(*col),
            1 => idx[c] = found[0],
            _ => return Err(format!("the header names column {col} twice")),
        }
    }
    if !missing.is_empty() {
        let shown: String = names.join(",").chars().take(200).collect();
        return Err(format!(
            "the header lacks column{} {}; an orders CSV starts with {} (found: {shown:?})",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            COLUMNS.join(",")
        ));
    }
    let extra = names
        .iter()
        .filter(|n| !COLUMNS.contains(&n.as_str()))
        .cloned()
        .collect();
    Ok(Header {
        idx,
        width: rec.len(),
        extra,
        item_overhead: 0,
    })
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

fn digits(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn push_padded(out: &mut String, mut n: u32, width: usize) {
    let mut buf = [b'0'; 4];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(buf[..width].iter().map(|&b| b as char));
}

/// `M/D/YYYY` (the classic walkthrough's format) or ISO `YYYY-MM-DD`, appended to `out` as ISO.
pub fn parse_date_into(s: &str, out: &mut String) -> bool {
    let parsed = if let Some((a, rest)) = s.split_once('/') {
        rest.split_once('/')
            .and_then(|(b, c)| Some((digits(c, 4, 4)?, digits(a, 1, 2)?, digits(b, 1, 2)?)))
    } else {
        let mut it = s.splitn(3, '-');
        match (it.next(), it.next(), it.next()) {
            (Some(a), Some(b), Some(c)) => {
                (|| Some((digits(a, 4, 4)?, digits(b, 2, 2)?, digits(c, 2, 2)?)))()
            }
            _ => None,
        }
    };
    let Some((y, m, d)) = parsed else {
        return false;
    };
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return false;
    }
    push_padded(out, y, 4);
    out.push('-');
    push_padded(out, m, 2);
    out.push('-');
    push_padded(out, d, 2);
    true
}

/// [`parse_date_into`] returning a new string.
pub fn parse_date(s: &str) -> Option<String> {
    let mut out = String::with_capacity(10);
    parse_date_into(s, &mut out).then_some(out)
}

/// Why a field is not a number DynamoDB accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberError {
    NotANumber,
    /// More than 38 significant digits.
    TooPrecise,
    /// Outside 1E-130 .. 9.99…E+125 in magnitude.
    OutOfRange,
}

/// A decimal that DynamoDB accepts as a number (at most 38 significant digits, magnitude from 1E-130
/// to below 1E+126), appended to `out`: a plain decimal as it is, with any leading `+` dropped; one in
/// exponent notation (`1.2E+05`, as spreadsheets export large values) as the plain decimal it stands for
/// (`120000`), so that every number in the table is written one way.
pub fn parse_number_into(s: &str, integer: bool, out: &mut String) -> Result<(), NumberError> {
    match parse_plain_into(s, integer, out) {
        Err(NumberError::NotANumber) => match s.bytes().position(|b| b == b'e' || b == b'E') {
            Some(e) => parse_exponent_into(&s[..e], &s[e + 1..], integer, out),
            None => Err(NumberError::NotANumber),
        },
        plain => plain,
    }
}

/// A plain decimal (no exponent), appended to `out` as it is when DynamoDB accepts it.
fn parse_plain_into(s: &str, integer: bool, out: &mut String) -> Result<(), NumberError> {
    let body = s.strip_prefix('+').unwrap_or(s);
    let unsigned = body.strip_prefix('-').unwrap_or(body);
    if integer && unsigned.len() != body.len() {
        return Err(NumberError::NotANumber); // a count of units is never negative
    }
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) if !integer => (i, f),
        Some(_) => return Err(NumberError::NotANumber),
        None => (unsigned, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(NumberError::NotANumber);
    }
    // Significant digits: from the first non-zero digit to the last non-zero one, across the point.
    let total = int.len() + frac.len();
    let leading = int
        .bytes()
        .chain(frac.bytes())
        .take_while(|&b| b == b'0')
        .count();
    let trailing = frac
        .bytes()
        .rev()
        .chain(int.bytes().rev())
        .take_while(|&b| b == b'0')
        .count();
    let nonzero = leading < total;
    if nonzero && total - leading - trailing > MAX_NUMBER_DIGITS {
        return Err(NumberError::TooPrecise);
    }
    let int_digits = int.trim_start_matches('0').len();
    let frac_zeros = frac.bytes().take_while(|&b| b == b'0').count();
    if int_digits > MAX_INTEGER_DIGITS
        || (nonzero && int_digits == 0 && frac_zeros > MAX_FRACTION_LEADING_ZEROS)
    {
        return Err(NumberError::OutOfRange);
    }
    out.push_str(body);
    Ok(())
}

/// `mantissa`E`exponent` written out as the plain decimal it stands for, then judged as one.
fn parse_exponent_into(
    mantissa: &str,
    exponent: &str,
    integer: bool,
    out: &mut String,
) -> Result<(), NumberError> {
    let mantissa = mantissa.strip_prefix('+').unwrap_or(mantissa);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = || int.bytes().chain(frac.bytes());
    let exp_digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if (int.is_empty() && frac.is_empty())
        || !digits().all(|b| b.is_ascii_digit())
        || exp_digits.is_empty()
        || !exp_digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(NumberError::NotANumber);
    }
    let total = int.len() + frac.len();
    let leading = digits().take_while(|&b| b == b'0').count();
    if leading == total {
        // Zero, whatever its exponent, written unsigned (a count of units still may not be negative).
        let zero = if integer && !sign.is_empty() {
            "-0"
        } else {
            "0"
        };
        return parse_plain_into(zero, integer, out);
    }
    let trailing = digits().rev().take_while(|&b| b == b'0').count();
    let significant = total - leading - trailing;
    if significant > MAX_NUMBER_DIGITS {
        return Err(NumberError::TooPrecise);
    }
    // Bounded before it is written out: a longer exponent is out of range whatever the mantissa.
    let exp: i64 = match exp_digits.trim_start_matches('0') {
        e if e.len() > 9 => return Err(NumberError::OutOfRange),
        e => e.parse().unwrap_or(0),
    };
    let exp = if exponent.starts_with('-') { -exp } else { exp };
    // Digits of the significant part before the point (negative: zeros after the point first).
    let before = int.len() as i64 - leading as i64 + exp;
    if before > MAX_INTEGER_DIGITS as i64 || -before > MAX_FRACTION_LEADING_ZEROS as i64 {
        return Err(NumberError::OutOfRange);
    }
    let mut plain = String::with_capacity(significant + before.unsigned_abs() as usize + 3);
    plain.push_str(sign);
    let mut sig = digits().skip(leading).take(significant).map(char::from);
    if before <= 0 {
        plain.push_str("0.");
        plain.extend(std::iter::repeat('0').take((-before) as usize));
        plain.extend(sig);
    } else {
        plain.extend(sig.by_ref().take(before as usize));
        plain.extend(std::iter::repeat('0').take((before as usize).saturating_sub(significant)));
        if before < significant as i64 {
            plain.push('.');
            plain.extend(sig);
        }
    }
    parse_plain_into(&plain, integer, out)
}

/// [`parse_number_into`] returning a new string.
pub fn parse_number(s: &str, integer: bool) -> Option<String> {
    let mut out = String::new();
    parse_number_into(s, integer, &mut out).ok().map(|_| out)
}

/// The one normalisation of an `OrderId`, used for duplicate detection, the item and the output: the
/// field as UTF-8 with Unicode white space trimmed. `None` when it is not UTF-8.
pub fn normalized_id(raw: &[u8]) -> Option<&str> {
    std::str::from_utf8(raw).ok().map(str::trim)
}

/// DynamoDB's size of a number: about one byte per two significant digits, plus one.
fn number_size(n: &str) -> usize {
    let digits = n
        .bytes()
        .filter(u8::is_ascii_digit)
        .skip_while(|&b| b == b'0')
        .count();
    digits.div_ceil(2) + 1
}

/// The item's size as DynamoDB counts it: every attribute's name plus its value (strings as UTF-8
/// bytes, numbers by their digits), including the `extra` bytes every item of the file adds.
fn item_size(order: &Order, extra: usize) -> usize {
    let mut size = extra;
    for (i, name) in COLUMNS.iter().enumerate() {
        let v = &order.fields[i];
        size += name.len()
            + if i == UNIT_SOLD || MONEY.contains(&i) {
                number_size(v)
            } else {
                v.len()
            };
    }
    size
}

fn number_reason(col: &str, text: &str, e: NumberError) -> String {
    let shown: String = text.chars().take(48).collect();
    let more = if shown.len() < text.len() { "…" } else { "" };
    match e {
        NumberError::TooPrecise => format!(
            "{col} {shown:?}{more} has more than {MAX_NUMBER_DIGITS} significant digits (DynamoDB's precision)"
        ),
        _ => format!(
            "{col} {shown:?}{more} is outside DynamoDB's number range (1E-130 to 9.9E+125 in magnitude)"
        ),
    }
}

/// Validate one data row into `order` (whose strings are reused from row to row).
pub fn validate_into(rec: &csv::ByteRecord, h: &Header, order: &mut Order) -> Result<(), String> {
    if rec.len() != h.width {
        return Err(format!(
            "expected {} fields as in the header, found {}",
            h.width,
            rec.len()
        ));
    }
    if rec.as_slice().len() > DYNAMODB_MAX_ITEM_BYTES {
        return Err(format!(
            "row is {} bytes, larger than a DynamoDB item may be (400 KB)",
            rec.as_slice().len()
        ));
    }
    // One UTF-8 check per row; fields are slices of it (their bounds are ASCII separators).
    let all = std::str::from_utf8(rec.as_slice()).map_err(|e| {
        format!(
            "row is not UTF-8 text (bad byte at offset {})",
            e.valid_up_to()
        )
    })?;
    for (c, col) in COLUMNS.iter().enumerate() {
        let range = rec.range(h.idx[c]).unwrap_or(0..0);
        let raw = all.get(range).unwrap_or("");
        let text = if c == ORDER_ID {
            normalized_id(raw.as_bytes()).unwrap_or("")
        } else {
            raw.trim()
        };
        let field = &mut order.fields[c];
        field.clear();
        let parsed = match c {
            ORDER_ID if text.is_empty() => return Err("OrderId is empty".into()),
            ORDER_ID if text.len() > DYNAMODB_MAX_PARTITION_KEY_BYTES => {
                return Err(format!(
                    "OrderId is {} bytes, longer than a DynamoDB key may be ({DYNAMODB_MAX_PARTITION_KEY_BYTES})",
                    text.len()
                ))
            }
            ORDER_DATE | SHIP_DATE => {
                if parse_date_into(text, field) {
                    Ok(())
                } else {
                    Err(format!(
                        "{col} {text:?} is not a date (M/D/YYYY or YYYY-MM-DD)"
                    ))
                }
            }
            UNIT_SOLD => parse_number_into(text, true, field).map_err(|e| match e {
                NumberError::NotANumber => format!("{col} {text:?} is not a whole number of units"),
                other => number_reason(col, text, other),
            }),
            c if MONEY.contains(&c) => parse_number_into(text, false, field).map_err(|e| match e {
                NumberError::NotANumber => format!("{col} {text:?} is not a decimal number"),
                other => number_reason(col, text, other),
            }),
            _ => {
                field.push_str(text);
                Ok(())
            }
        };
        parsed?;
    }
    let size = item_size(order, h.item_overhead);
    if size > DYNAMODB_MAX_ITEM_BYTES {
        return Err(format!(
            "the item would be {size} bytes, larger than DynamoDB allows ({DYNAMODB_MAX_ITEM_BYTES})"
        ));
    }
    Ok(())
}

/// A file read with every lone carriage return (the line end of classic Mac OS files) turned into a
/// newline, so that lines are counted alike whatever ends them: `\n`, `\r\n` or `\r`. The csv reader
/// counts lines by newlines only: without this, every row of a CR-only file reported line 1. One byte
/// for one byte, so offsets stay file offsets. (A lone `\r` inside a quoted field reads as `\n` too.)
struct LineEnds<R> {
    inner: R,
    /// A byte read from `inner` to learn what follows a carriage return that ended a read, not yet
    /// handed out.
    pending: Option<u8>,
}

impl<R: Read> LineEnds<R> {
    fn new(inner: R) -> LineEnds<R> {
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
struct GuardedReader<R> {
    inner: LineEnds<R>,
    limit: u64,
    progress: Option<Arc<AtomicU64>>,
    /// Bytes handed to the csv reader so far.
    total: u64,
    /// Where the record being read starts (set by [`Records::next`] after each record).
    record_start: std::cell::Cell<u64>,
}

/// The csv reader buffers at most this much beyond the record it is parsing.
const READ_AHEAD: u64 = 256 * 1024;

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
struct LineTooLong(u64);

fn too_long(e: &csv::Error) -> bool {
    matches!(e.kind(), csv::ErrorKind::Io(io)
        if io.get_ref().is_some_and(|i| i.downcast_ref::<LineTooLong>().is_some()))
}

fn csv_error(e: csv::Error) -> FileError {
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
enum Next {
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
struct Records {
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

fn reader_at(
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
    fn open(
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

    fn next(&mut self, rec: &mut csv::ByteRecord) -> Result<Next, FileError> {
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

    fn next_record(&mut self, rec: &mut csv::ByteRecord) -> Result<Next, FileError> {
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
fn strip_cr(rec: &mut csv::ByteRecord, scratch: &mut Vec<u8>) {
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
fn skip_line(path: &Path, start: u64, mut line: u64) -> io::Result<(u64, Option<u64>)> {
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
fn too_long_reason(limit: u64) -> String {
    format!(
        "the record is longer than {limit} bytes (spool.max_line_bytes): an unbalanced quote or a line \
         without its newline; skipped to the end of the line it starts on"
    )
}

/// A Bloom filter over id hashes: k probes by double hashing the two halves of the 128-bit hash.
struct Bloom {
    bits: Vec<u64>,
    m: u64,
}

/// The shortest line a valid row can have: 12 separators, two dates of at least 8 characters, an id, five
/// numbers of at least one digit and a newline.
const MIN_ROW_BYTES: u64 = 35;
/// The Bloom filter never takes more than this, whatever the file: files of up to ~13 million rows
/// (1.3 GB of 100-byte rows) keep ~1 % false positives; larger ones more (more candidates in pass 2).
pub const MAX_BLOOM_BYTES: u64 = 16 << 20;

impl Bloom {
    const K: u64 = 7;

    /// About 10 bits (~1% false positives with 7 probes) for every row a file of `len` bytes could
    /// hold, up to [`MAX_BLOOM_BYTES`]. Sized by the file's length alone, so that no first rows (blank
    /// lines, very wide rows) can make it too large or too small.
    fn for_file(len: u64) -> Self {
        let rows = (len / MIN_ROW_BYTES).max(1024);
        let words = (rows * 10).div_ceil(64).min(MAX_BLOOM_BYTES / 8);
        Bloom {
            bits: vec![0; words as usize],
            m: words * 64,
        }
    }

    /// Insert; return whether the value may have been present before.
    fn check_and_set(&mut self, h: u128) -> bool {
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
const CANCEL_EVERY: u64 = 1024;

fn stopped(cancel: Option<&CancellationToken>, rows: u64) -> bool {
    rows % CANCEL_EVERY == 0 && cancel.is_some_and(|c| c.is_cancelled())
}

fn duplicate_candidates(
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
fn id_hash(id: &str) -> u128 {
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

/// What loading one file needs.
#[derive(Clone)]
pub struct Loader {
    pub writer: BatchWriter,
    pub write_concurrency: usize,
    pub limits: ScanLimits,
}

/// The spool files of one load: the input, and the output and rejects reports it produces.
#[derive(Debug, Clone)]
pub struct LoadFiles {
    pub input: PathBuf,
    pub output: PathBuf,
    pub rejects: PathBuf,
}

/// Where a row is in the input: its line, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAt {
    pub line: u64,
}

/// Up to 25 valid rows on their way from the reader to a write task, packed: their fields one after
/// another in one string. The write task builds the items from it, so that the ~33 allocations of an
/// item are made on the thread that frees them (the SDK drops a request where it serializes it; made
/// on the reader and freed on a worker, they cost twice as much), and builds them again from it if
/// DynamoDB refuses the batch (the items themselves are moved into the request).
struct Batch {
    rows: Vec<RowAt>,
    /// Every field of every row, then its `ConfirmationId` (as written to the output); field `i` of
    /// row `r` ends at `ends[r * PACKED + i]`.
    text: String,
    ends: Vec<usize>,
}

/// The fields packed per row: the columns and the `ConfirmationId`.
const PACKED: usize = COLUMNS.len() + 1;

impl Batch {
    fn new() -> Batch {
        Batch {
            rows: Vec::with_capacity(BATCH_SIZE),
            text: String::with_capacity(BATCH_SIZE * 128),
            ends: Vec::with_capacity(BATCH_SIZE * PACKED),
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn push(&mut self, at: RowAt, order: &Order, cid: &str) {
        for f in order.fields.iter().map(String::as_str).chain([cid]) {
            self.text.push_str(f);
            self.ends.push(self.text.len());
        }
        self.rows.push(at);
    }

    fn field(&self, row: usize, i: usize) -> &str {
        let at = row * PACKED + i;
        let start = if at == 0 { 0 } else { self.ends[at - 1] };
        &self.text[start..self.ends[at]]
    }

    fn order_id(&self, row: usize) -> &str {
        self.field(row, ORDER_ID)
    }

    fn request(&self, row: usize, items: &Items) -> Result<WriteRequest, ProcessError> {
        put_request(items.build(|i| self.field(row, i), self.field(row, COLUMNS.len())))
    }

    fn requests(&self, items: &Items) -> Result<Vec<WriteRequest>, ProcessError> {
        (0..self.len()).map(|r| self.request(r, items)).collect()
    }
}

/// A row DynamoDB refused although it passed validation (a secondary index key it does not take, a
/// limit it counts differently): rejected after the fact.
#[derive(Debug, Clone)]
struct Refused {
    at: RowAt,
    id: String,
    reason: String,
}

impl Loader {
    /// Validate and write every row of `files.input`; fill `files.output` and `files.rejects`. Returns
    /// once every write was acknowledged (or with the first error that stopped it).
    pub async fn load(
        &self,
        files: &LoadFiles,
        src: &Source,
        cancel: &CancellationToken,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<ScanOutcome, ProcessError> {
        let (tx, mut rx) = mpsc::channel::<Batch>(self.write_concurrency * 2);
        let files2 = files.clone();
        let src2 = src.clone();
        let limits = self.limits;
        let stop = cancel.clone();
        let reader = tokio::task::spawn_blocking(move || {
            write_reports(&files2, limits, &src2, progress, &stop, |batch| {
                tx.blocking_send(batch).map_err(|_| FileError::Stopped)
            })
        });
        let items = Arc::new(Items::new(src));

        let mut writes: JoinSet<Result<Vec<Refused>, ProcessError>> = JoinSet::new();
        let mut refused = Vec::new();
        let mut failure: Option<ProcessError> = None;
        let mut channel_open = true;
        while channel_open || !writes.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => { failure = Some(ProcessError::Cancelled); break; }
                batch = rx.recv(), if channel_open && writes.len() < self.write_concurrency => {
                    match batch {
                        Some(batch) => {
                            let this = self.clone();
                            let cancel = cancel.clone();
                            let items = items.clone();
                            writes.spawn(async move { this.write_batch(batch, &items, &cancel).await });
                        }
                        None => channel_open = false,
                    }
                }
                Some(done) = writes.join_next(), if !writes.is_empty() => {
                    match done {
                        Ok(Ok(rows)) => refused.extend(rows),
                        Ok(Err(e)) => { failure = Some(e); break; }
                        Err(join) => {
                            failure = Some(ProcessError::Transient(format!("a write task failed: {join}")));
                            break;
                        }
                    }
                }
            }
        }
        writes.abort_all();
        drop(rx); // unblocks the reader if it is waiting to send
        let scanned = reader
            .await
            .map_err(|e| ProcessError::Transient(format!("the reader task failed: {e}")))?;
        if let Some(f) = failure {
            return Err(f);
        }
        let mut outcome = match scanned {
            Ok(outcome) => outcome,
            Err(FileError::Invalid(reason)) => return Err(ProcessError::Permanent(reason)),
            Err(FileError::Io(e)) => {
                return Err(ProcessError::Transient(format!("spool I/O failed: {e}")))
            }
            Err(FileError::Stopped) => {
                return Err(ProcessError::Transient(
                    "row writing stopped unexpectedly".into(),
                ))
            }
        };
        if !refused.is_empty() {
            let n = refused.len() as u64;
            let files = files.clone();
            tokio::task::spawn_blocking(move || amend_reports(&files, refused))
                .await
                .map_err(|e| ProcessError::Transient(format!("the report task failed: {e}")))?
                .map_err(|e| ProcessError::Transient(format!("spool I/O failed: {e}")))?;
            outcome.written -= n;
            outcome.rejected += n;
        }
        Ok(outcome)
    }

    /// One batch. If DynamoDB refuses its data, its rows are written one at a time: the ones it
    /// refuses again are returned, to be rejected; the rest are written.
    async fn write_batch(
        &self,
        batch: Batch,
        items: &Items,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refused>, ProcessError> {
        let reason = match self.writer.write(batch.requests(items)?, cancel).await {
            Ok(()) => return Ok(Vec::new()),
            Err(WriteError::Failed(e)) => return Err(e),
            Err(WriteError::Refused(reason)) => reason,
        };
        tracing::info!(
            table = %self.writer.table,
            rows = batch.len(),
            first_line = batch.rows.first().map(|r| r.line),
            %reason,
            "DynamoDB refused a batch; writing its rows one at a time to find the refused ones"
        );
        let mut refused = Vec::new();
        for (r, at) in batch.rows.iter().enumerate() {
            match self
                .writer
                .write(vec![batch.request(r, items)?], cancel)
                .await
            {
                Ok(()) => {}
                Err(WriteError::Failed(e)) => return Err(e),
                Err(WriteError::Refused(reason)) => refused.push(Refused {
                    at: *at,
                    id: batch.order_id(r).to_owned(),
                    reason: format!("DynamoDB refused the item: {reason}"),
                }),
            }
        }
        if refused.len() > 1 && refused.len() == batch.len() {
            // Not one row's data: the table takes none of these items (its key schema, say).
            return Err(ProcessError::Permanent(format!(
                "DynamoDB table {} refused every item of a batch of {} rows (lines {} to {}): {reason}; check \
                 the table's key schema (partition key OrderId, a string) and its indexes",
                self.writer.table,
                refused.len(),
                batch.rows[0].line,
                batch.rows[batch.len() - 1].line,
            )));
        }
        Ok(refused)
    }
}

fn put_request(item: HashMap<String, AttributeValue>) -> Result<WriteRequest, ProcessError> {
    let put = PutRequest::builder()
        .set_item(Some(item))
        .build()
        .map_err(|e| {
            ProcessError::Transient(format!("cannot build a DynamoDB put request: {e}"))
        })?;
    Ok(WriteRequest::builder().put_request(put).build())
}

/// Move rows DynamoDB refused from the output to the rejects report (appended, with their lines).
fn amend_reports(files: &LoadFiles, refused: Vec<Refused>) -> io::Result<()> {
    let gone: HashSet<&str> = refused.iter().map(|r| r.id.as_str()).collect();
    let kept = files.output.with_extension("amended");
    {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(&files.output)
            .map_err(io_err)?;
        let mut w = csv::Writer::from_writer(io::BufWriter::new(File::create(&kept)?));
        let mut rec = csv::StringRecord::new();
        let mut first = true;
        while rdr.read_record(&mut rec).map_err(io_err)? {
            if first || !gone.contains(&rec[0]) {
                w.write_record(&rec).map_err(io_err)?;
            }
            first = false;
        }
        w.flush()?;
    }
    std::fs::rename(&kept, &files.output)?;
    let mut w = csv::Writer::from_writer(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&files.rejects)?,
    );
    for r in &refused {
        w.write_record([r.at.line.to_string().as_str(), &r.id, &r.reason])
            .map_err(io_err)?;
    }
    w.flush()
}

fn io_err(e: csv::Error) -> io::Error {
    match io_of(e) {
        FileError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The blocking half of a load: scan the input, write the output and rejects files, and hand batches of
/// write requests to `send`.
fn write_reports(
    files: &LoadFiles,
    limits: ScanLimits,
    src: &Source,
    progress: Option<Arc<AtomicU64>>,
    cancel: &CancellationToken,
    mut send: impl FnMut(Batch) -> Result<(), FileError>,
) -> Result<ScanOutcome, FileError> {
    let mut output = csv::Writer::from_writer(io::BufWriter::new(File::create(&files.output)?));
    output
        .write_record(["OrderId", "ConfirmationId"])
        .map_err(io_of)?;
    let mut rejects = csv::Writer::from_writer(io::BufWriter::new(File::create(&files.rejects)?));
    rejects
        .write_record(["Line", "OrderId", "Reason"])
        .map_err(io_of)?;
    let mut batch = Batch::new();
    let ids = ConfirmationIds::new(src);
    let outcome = scan(
        &files.input,
        limits,
        progress,
        Some(cancel),
        |line, id, reason| {
            rejects
                .write_record([line.to_string().as_str(), id, reason])
                .map_err(io_of)
        },
        |at, order| {
            let mut buf = Uuid::encode_buffer();
            let cid = ids.of(order.order_id()).hyphenated().encode_lower(&mut buf);
            output
                .write_record([order.order_id(), cid])
                .map_err(io_of)?;
            batch.push(at, order, cid);
            if batch.len() == BATCH_SIZE {
                send(std::mem::replace(&mut batch, Batch::new()))?;
            }
            Ok(())
        },
    )?;
    if batch.len() > 0 {
        send(batch)?;
    }
    output.flush()?;
    rejects.flush()?;
    Ok(outcome)
}

fn io_of(e: csv::Error) -> FileError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => FileError::Io(io),
        other => FileError::Io(io::Error::other(format!("{other:?}"))),
    }
}

/// The `orders-csv` processor of one pipeline.
pub struct OrdersCsv {
    writer: BatchWriter,
    write_concurrency: usize,
    max_line_bytes: u64,
}

impl OrdersCsv {
    pub fn new(pipeline: &Pipeline, cfg: &Config, ctx: &Context) -> OrdersCsv {
        let attempts = cfg.dynamodb.write_max_attempts;
        OrdersCsv {
            writer: BatchWriter {
                ddb: writer_client(&ctx.clients.dynamodb, attempts, ctx.metrics.clone()),
                metrics: ctx.metrics.clone(),
                table: pipeline.table.clone().unwrap_or_default(),
                max_attempts: attempts,
            },
            write_concurrency: cfg.dynamodb.write_concurrency,
            max_line_bytes: cfg.spool.max_line_bytes,
        }
    }

    async fn run(&self, job: &Job<'_>) -> Result<Outcome, ProcessError> {
        let output = job.pipeline.output_key(&job.object.key);
        let rkey = rejects_key(&output);
        if rkey.len() > S3_MAX_KEY_BYTES {
            return Err(ProcessError::Permanent(format!(
                "the output key for {:?} would be longer than S3's {S3_MAX_KEY_BYTES} bytes; shorten the key or output_prefix",
                job.object.key
            )));
        }
        let src = Source {
            bucket: job.object.bucket.clone(),
            key: job.object.key.clone(),
            etag: job.etag.to_string(),
        };
        let loader = Loader {
            writer: self.writer.clone(),
            write_concurrency: self.write_concurrency,
            limits: ScanLimits {
                max_line_bytes: self.max_line_bytes,
                item_overhead: src.item_overhead(),
            },
        };
        let files = LoadFiles {
            input: job.files.input.clone(),
            output: job.files.path("output.csv"),
            rejects: job.files.path("rejects.csv"),
        };
        let rows = loader
            .load(&files, &src, job.cancel, job.progress.clone())
            .await?;
        if !rows.extra_columns.is_empty() {
            tracing::warn!(columns = ?rows.extra_columns, "ignoring columns that orders-csv does not use");
        }
        let mut outcome = Outcome {
            summary: format!(
                "{} rows: {} written to table {}, {} rejected",
                rows.rows, rows.written, self.writer.table, rows.rejected
            ),
            ..Outcome::default()
        };
        if rows.rejected > 0 {
            outcome.rejects = Some(rkey.clone());
            outcome.outputs.push(Output {
                path: files.rejects,
                key: rkey,
                content_type: "text/csv",
            });
        } else {
            // A report from an earlier version of this object would now be wrong.
            outcome.stale.push(rkey);
        }
        // The output last: its appearance tells watchers the file is done.
        outcome.outputs.push(Output {
            path: files.output,
            key: output,
            content_type: "text/csv",
        });
        outcome.rows = Some(RowCounts {
            rows: rows.rows,
            written: rows.written,
            rejected: rows.rejected,
        });
        Ok(outcome)
    }
}

impl Processor for OrdersCsv {
    fn process<'a>(&'a self, job: &'a Job<'a>) -> ProcessFuture<'a> {
        Box::pin(self.run(job))
    }
}

/// Where the rejects report of `output_key` goes.
pub fn rejects_key(output_key: &str) -> String {
    format!("{output_key}.rejects.csv")
}

/// `process --dry-run`: validate a local file, print each reject to `out`, write nothing anywhere.
pub fn dry_run(
    path: &Path,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
    out: &mut dyn Write,
) -> Result<ScanOutcome, FileError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["Line", "OrderId", "Reason"])
        .map_err(io_of)?;
    let outcome = scan(
        path,
        limits,
        progress,
        None,
        |line, id, reason| {
            w.write_record([line.to_string().as_str(), id, reason])
                .map_err(io_of)
        },
        |_, _| Ok(()),
    )?;
    w.flush()?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Region,Country,ItemType,SalesChannel,OrderPriority,OrderDate,OrderId,ShipDate,UnitSold,UnitPrice,TotalRevenue,TotalCost,TotalProfit";

    fn row(id: &str) -> String {
        format!("Asia,Japan,Cereal,Online,H,3/7/2017,{id},4/1/2017,100,205.70,20570.00,11770.00,8800.00")
    }

    type Rejects = Vec<(u64, String, String)>;

    fn run(text: &str) -> (Result<ScanOutcome, FileError>, Rejects, Vec<Order>) {
        run_limited(text, 4096)
    }

    fn run_limited(
        text: &str,
        max_line_bytes: u64,
    ) -> (Result<ScanOutcome, FileError>, Rejects, Vec<Order>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, text).unwrap();
        let mut rejects = Vec::new();
        let mut valid = Vec::new();
        let r = scan(
            &p,
            ScanLimits {
                max_line_bytes,
                item_overhead: 0,
            },
            None,
            None,
            |l, id, r| {
                rejects.push((l, id.to_string(), r.to_string()));
                Ok(())
            },
            |_, o| {
                valid.push(o.clone());
                Ok(())
            },
        );
        (r, rejects, valid)
    }

    #[test]
    fn dates_and_numbers_are_normalised_or_rejected() {
        assert_eq!(parse_date("3/7/2017").unwrap(), "2017-03-07");
        assert_eq!(parse_date("2017-03-07").unwrap(), "2017-03-07");
        assert_eq!(parse_date("2/29/2016").unwrap(), "2016-02-29");
        assert!(parse_date("2/29/2017").is_none());
        assert!(parse_date("13/1/2017").is_none());
        assert!(parse_date("1/1/17").is_none());
        assert!(parse_date("yesterday").is_none());
        assert_eq!(parse_number("205.70", false).unwrap(), "205.70");
        assert_eq!(parse_number("-3.5", false).unwrap(), "-3.5");
        assert_eq!(parse_number("+7", true).unwrap(), "7");
        // Exponent notation becomes the plain decimal it stands for, under the same limits.
        for (e, plain) in [
            ("1e5", "100000"),
            ("1.2E+05", "120000"),
            ("-2.50e-3", "-0.0025"),
            ("+12.5e1", "125"),
            ("0.0e7", "0"),
            (".5e1", "5"),
            ("123.456E1", "1234.56"),
            ("1e125", &format!("1{}", "0".repeat(125))),
            ("1e-130", &format!("0.{}1", "0".repeat(129))),
        ] {
            assert_eq!(parse_number(e, false).as_deref(), Some(plain), "{e}");
        }
        assert_eq!(parse_number("1.5e3", true).as_deref(), Some("1500"));
        assert_eq!(parse_number("0e-9", true).as_deref(), Some("0"));
        for bad in [
            "e5", "1e", "1e+", "1.2.3e4", "1ee4", "1e4.5", "--1e2", "1e--2",
        ] {
            assert_eq!(
                parse_number_into(bad, false, &mut String::new()),
                Err(NumberError::NotANumber),
                "{bad}"
            );
        }
        assert_eq!(
            parse_number_into("1e126", false, &mut String::new()),
            Err(NumberError::OutOfRange)
        );
        assert_eq!(
            parse_number_into("1e-131", false, &mut String::new()),
            Err(NumberError::OutOfRange)
        );
        assert_eq!(
            parse_number_into("1e9999999999999", false, &mut String::new()),
            Err(NumberError::OutOfRange)
        );
        assert_eq!(
            parse_number_into(&format!("{}e2", "1".repeat(39)), false, &mut String::new()),
            Err(NumberError::TooPrecise)
        );
        assert!(
            parse_number("1.25e1", true).is_none(),
            "a fraction of a unit"
        );
        assert!(parse_number("-1e2", true).is_none(), "negative units");
        assert!(parse_number("-4", true).is_none());
        assert!(parse_number("4.0", true).is_none());
        assert!(parse_number("", false).is_none());
        assert!(parse_number(".", false).is_none());
        assert!(parse_number(&"9".repeat(39), false).is_none());
    }

    #[test]
    fn every_row_is_written_or_rejected_with_its_line() {
        let text = format!(
            "{HEADER}\n{}\n{}\nAsia,Japan,Cereal,Online,H,3/7/2017,,4/1/2017,1,1,1,1,1\n{}\nshort,row\n{}",
            row("1"),
            row("2").replace("100", "many"),
            row("3"),
            row("1") // duplicate, no final newline
        );
        let (r, rejects, valid) = run(&text);
        let out = r.unwrap();
        assert_eq!(out.rows, 6);
        assert_eq!(out.written, 2);
        assert_eq!(out.rejected, 4);
        let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
        assert_eq!(lines, [3, 4, 6, 7]);
        assert!(rejects[0].2.contains("UnitSold"));
        assert!(rejects[1].2.contains("OrderId is empty"));
        assert!(rejects[2].2.contains("expected 13 fields"));
        assert!(rejects[3].2.contains("first seen on line 2"));
        assert_eq!(valid[0].fields[ORDER_DATE], "2017-03-07");
        assert_eq!(valid[1].order_id(), "3");
    }

    #[test]
    fn columns_are_matched_by_name_and_extra_ones_reported() {
        let text = "OrderId,Extra,TotalProfit,TotalCost,TotalRevenue,UnitPrice,UnitSold,ShipDate,OrderDate,OrderPriority,SalesChannel,ItemType,Country,Region\n\
                    9,x,1,2,3,4,5,1/2/2020,1/1/2020,L,Offline,Fruits,France,Europe\n";
        let (r, rejects, valid) = run(text);
        let out = r.unwrap();
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(out.extra_columns, ["Extra"]);
        assert_eq!(valid[0].fields[0], "Europe");
        assert_eq!(valid[0].fields[UNIT_SOLD], "5");
    }

    #[test]
    fn files_that_are_not_orders_csv_fail_as_a_whole() {
        let (r, _, _) = run("");
        assert!(r.unwrap_err().to_string().contains("empty"));
        let (r, _, _) = run("a,b,c\n1,2,3\n");
        assert!(r.unwrap_err().to_string().contains("lacks columns"));
        let (r, _, _) = run(&"\u{1}\u{2}binary".repeat(2000));
        assert!(matches!(r.unwrap_err(), FileError::Invalid(_)));
        let (r, rejects, valid) = run(&format!("{HEADER}\n"));
        assert_eq!(r.unwrap().rows, 0);
        assert!(rejects.is_empty() && valid.is_empty());
    }

    #[test]
    fn confirmation_ids_are_deterministic_per_object_version() {
        let a = Source {
            bucket: "b".into(),
            key: "k".into(),
            etag: "e1".into(),
        };
        let b = Source {
            etag: "e2".into(),
            ..a.clone()
        };
        assert_eq!(a.confirmation_id("1"), a.confirmation_id("1"));
        // Pinned: a change here would give every reprocessed row a new id.
        assert_eq!(
            a.confirmation_id("1").to_string(),
            Uuid::new_v5(&CONFIRMATION_NAMESPACE, b"b\nk\ne1\n1").to_string()
        );
        assert_ne!(a.confirmation_id("1"), a.confirmation_id("2"));
        assert_ne!(a.confirmation_id("1"), b.confirmation_id("1"));
        // The state carried over from the object's part of the name, whatever its length against
        // SHA-1's 64-byte blocks, gives the one-shot UUID.
        for n in [0, 1, 20, 40, 41, 42, 60, 64, 100, 200] {
            let src = Source {
                bucket: "b".repeat(n),
                key: "é".repeat(n / 2),
                etag: "\"0123456789abcdef\"".into(),
            };
            let ids = ConfirmationIds::new(&src);
            for id in ["", "1", &"9".repeat(n)] {
                let name = format!("{}\n{}\n{}\n{id}", src.bucket, src.key, src.etag);
                assert_eq!(
                    ids.of(id),
                    Uuid::new_v5(&CONFIRMATION_NAMESPACE, name.as_bytes()),
                    "{n} {id}"
                );
            }
        }
    }

    /// Every value DynamoDB would refuse is a rejected row with its reason, never a failed batch.
    #[test]
    fn values_dynamodb_refuses_are_rejected_rows() {
        let h = HEADER;
        let big_int = format!("1{}", "0".repeat(126)); // 1E+126: one digit too many
        let max_int = format!("9{}", "0".repeat(125)); // 9E+125: fits
        let tiny = format!("0.{}1", "0".repeat(130)); // 1E-131
        let smallest = format!("0.{}1", "0".repeat(129)); // 1E-130: fits
        let long_id = "x".repeat(DYNAMODB_MAX_PARTITION_KEY_BYTES + 1);
        let wide = "w".repeat(DYNAMODB_MAX_ITEM_BYTES - 100); // the row fits, its item does not
        let text = format!(
            "{h}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            row("1").replace("205.70", &big_int),
            row("2").replace("205.70", &max_int),
            row("3").replace("205.70", &tiny),
            row("4").replace("205.70", &smallest),
            row(&long_id),
            row("6").replacen("Asia", &wide, 1),
            row(" 7"),
            row("\u{a0}7\u{a0}"),
        );
        let (r, rejects, valid) = run_limited(&text, 1 << 20);
        let o = r.unwrap();
        assert_eq!(o.rows, 8);
        assert_eq!(o.written + o.rejected, o.rows);
        let ids: Vec<&str> = valid.iter().map(|v| v.order_id()).collect();
        assert_eq!(ids, ["2", "4", "7"]);
        let reason = |line: u64| {
            rejects
                .iter()
                .find(|r| r.0 == line)
                .map(|r| r.2.clone())
                .unwrap_or_default()
        };
        assert!(reason(2).contains("number range"), "{rejects:?}");
        assert!(reason(4).contains("number range"), "{rejects:?}");
        assert!(
            reason(6).contains("longer than a DynamoDB key"),
            "{rejects:?}"
        );
        assert!(
            reason(7).contains("larger than DynamoDB allows"),
            "{rejects:?}"
        );
        // Ids equal after the one normalisation (Unicode white space trimmed) are duplicates.
        assert!(
            reason(9).contains("duplicate OrderId (first seen on line 8)"),
            "{rejects:?}"
        );
        assert!(parse_number(&format!("1.{}", "2".repeat(38)), false).is_none());
    }

    /// An unbalanced quote early in a large file makes the rest of it one record: the file fails as not
    /// orders CSV once the record passes max_line_bytes, long before the whole file is buffered.
    #[test]
    fn over_long_records_are_rejected_rows_and_reading_resumes() {
        let limit = 64 * 1024;
        let rows = |from: usize, n: usize| -> String {
            (from..from + n)
                .map(|i| format!("{}\n", row(&i.to_string())))
                .collect()
        };
        // An unbalanced quote early in a large file: that line is rejected, every later row read.
        let text = format!(
            "{HEADER}\n{}\n{}",
            row("1").replacen("Asia", "\"Asia", 1),
            rows(2, 20_000)
        );
        let (r, rejects, valid) = run_limited(&text, limit);
        let r = r.unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (20_001, 20_000, 1));
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].0, 2);
        assert!(rejects[0].2.contains("unbalanced quote"), "{rejects:?}");
        assert_eq!(valid.len(), 20_000);

        // One huge line in the middle (after blank lines), and one without a newline at the end. (The
        // guard sees the bytes the csv reader asks for, in 256 KiB reads: a record is refused somewhere
        // between the limit and the limit plus one read.)
        let huge = "x".repeat((limit + 2 * READ_AHEAD) as usize);
        let text = format!("{HEADER}\n{}\n\n\n{huge}\n{}{huge}", row("1"), rows(2, 3));
        let (r, rejects, valid) = run_limited(&text, limit);
        let r = r.unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (6, 4, 2), "{rejects:?}");
        let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
        assert_eq!(lines, [5, 9]);
        assert_eq!(valid.len(), 4);
        // Progress follows the position through the skips: it ends at the file's length.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, &text).unwrap();
        let progress = Arc::new(AtomicU64::new(0));
        let limits = ScanLimits {
            max_line_bytes: limit,
            item_overhead: 0,
        };
        scan(
            &p,
            limits,
            Some(progress.clone()),
            None,
            |_, _, _| Ok(()),
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), text.len() as u64);

        // A header that long is no orders CSV.
        let (r, _, _) = run_limited(&format!("{huge}\n{}\n", row("1")), limit);
        assert!(matches!(r, Err(FileError::Invalid(m)) if m.contains("first line")));
    }

    /// Lines are counted alike whatever ends them: `\n`, `\r\n`, a lone `\r` (classic Mac OS), or a mix;
    /// a quoted line end inside a field is data and the line count goes on after it.
    #[test]
    fn lines_end_with_newline_crlf_or_lone_carriage_return() {
        let bad = row("2").replace("100", "many");
        let quoted = row("3").replacen("Asia", "\"As\r\nia\"", 1);
        for end in ["\n", "\r\n", "\r"] {
            let text = format!(
                "{HEADER}{end}{}{end}{end}{bad}{end}{quoted}{end}{}{end}{bad}",
                row("1"),
                row("4")
            );
            let (r, rejects, valid) = run(&text);
            let r = r.unwrap();
            assert_eq!(
                (r.rows, r.written, r.rejected),
                (5, 3, 2),
                "{end:?} {rejects:?}"
            );
            let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
            assert_eq!(lines, [4, 8], "line ends {end:?}");
            assert_eq!(valid.len(), 3);
        }
        // Mixed line ends, a carriage return as the last byte of the file, and a long line.
        for boundary in ["\r", "\r\n"] {
            let prefix = format!("{HEADER}\r{}\r\n{bad}\n", row("1"));
            let width = 65_535 - prefix.len() - row("5").len() + "Japan".len();
            let pad = row("5").replace("Japan", &"J".repeat(width));
            let text = format!("{prefix}{pad}{boundary}{bad}\r");
            let (r, rejects, valid) = run_limited(&text, 1 << 20);
            let r = r.unwrap();
            assert_eq!((r.rows, r.rejected), (4, 2), "{rejects:?}");
            let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
            assert_eq!(lines, [3, 5], "{boundary:?}");
            assert_eq!(valid[1].order_id(), "5");
        }
    }

    /// Lone carriage returns become newlines and `\r\n` stays, whatever the reads: a carriage return
    /// ending a read, a `\r\n` split between two, a buffer of one byte.
    #[test]
    fn line_ends_are_translated_across_reads() {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let input = b"a\rb\r\nc\r\r\n\"d\re\"\r";
        let want = b"a\nb\r\nc\n\r\n\"d\ne\"\n";
        for chunk in 1..=5 {
            for len in [1, 2, 3, 64] {
                let mut r = LineEnds::new(Trickle(input, chunk));
                let (mut got, mut buf) = (Vec::new(), vec![0u8; len]);
                loop {
                    let n = r.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got, want, "reads of {chunk} bytes into a buffer of {len}");
            }
        }
    }

    /// A packed batch gives back every row's fields, empty ones too, and builds the very items
    /// `to_item` builds from the rows themselves (a refused batch is written again from it).
    #[test]
    fn packed_batches_build_the_rows_items() {
        let src = Source {
            bucket: "b".into(),
            key: "k".into(),
            etag: "e".into(),
        };
        let mut orders = Vec::new();
        for i in 0..BATCH_SIZE {
            let mut fields: [String; 13] = Default::default();
            for (f, field) in fields.iter_mut().enumerate() {
                // Some fields empty, some multi-byte.
                *field = if (i + f) % 5 == 0 {
                    String::new()
                } else {
                    format!("{i}é{f}")
                };
            }
            orders.push(Order { fields });
        }
        let mut batch = Batch::new();
        for (i, o) in orders.iter().enumerate() {
            let cid = src.confirmation_id(o.order_id()).to_string();
            batch.push(RowAt { line: i as u64 + 2 }, o, &cid);
        }
        assert_eq!(batch.len(), BATCH_SIZE);
        let items = Items::new(&src);
        let requests = batch.requests(&items).unwrap();
        for (r, o) in orders.iter().enumerate() {
            for (f, field) in o.fields.iter().enumerate() {
                assert_eq!(batch.field(r, f), field, "row {r} field {f}");
            }
            assert_eq!(batch.order_id(r), o.order_id());
            // The item spelled out: S columns, N for UnitSold and money, the ids and the source.
            let cid = src.confirmation_id(o.order_id());
            let mut expect: HashMap<String, AttributeValue> = COLUMNS
                .iter()
                .zip(&o.fields)
                .map(|(name, v)| {
                    let n = [
                        "UnitSold",
                        "UnitPrice",
                        "TotalRevenue",
                        "TotalCost",
                        "TotalProfit",
                    ];
                    let av = if n.contains(name) {
                        AttributeValue::N(v.clone())
                    } else {
                        AttributeValue::S(v.clone())
                    };
                    (name.to_string(), av)
                })
                .collect();
            expect.insert("ConfirmationId".into(), AttributeValue::S(cid.to_string()));
            expect.insert("SourceBucket".into(), AttributeValue::S("b".into()));
            expect.insert("SourceKey".into(), AttributeValue::S("k".into()));
            assert_eq!(expect.len(), 16);
            assert_eq!(
                requests[r].put_request().unwrap().item(),
                &expect,
                "row {r}"
            );
            assert_eq!(batch.request(r, &items).unwrap(), requests[r]);
            assert_eq!(o.to_item(&cid, &src), expect);
            // Should a clone ever iterate in another order, the values go in by name.
            let mut shuffled = items.clone();
            shuffled.slots.reverse();
            assert_eq!(
                shuffled.build(|i| &o.fields[i], &cid.to_string()),
                expect,
                "row {r}"
            );
        }
    }

    /// A long run of rejected rows (nothing is sent, so the writer channel cannot stop the reader)
    /// still stops at cancellation, in the first pass and in the second.
    #[test]
    fn cancellation_stops_both_passes() {
        let mut text = format!("{HEADER}\n");
        for _ in 0..10_000 {
            text.push_str("not,a,row\n");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, &text).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let limits = ScanLimits {
            max_line_bytes: 4096,
            item_overhead: 0,
        };
        let mut rejected = 0;
        let r = scan(
            &p,
            limits,
            None,
            Some(&cancel),
            |_, _, _| {
                rejected += 1;
                Ok(())
            },
            |_, _| Ok(()),
        );
        assert!(matches!(r, Err(FileError::Stopped)), "{r:?}");
        assert!(rejected < CANCEL_EVERY as usize, "{rejected}");
    }

    #[test]
    fn many_repeats_are_all_caught() {
        let mut text = format!("{HEADER}\n");
        for i in 0..5000 {
            text.push_str(&row(&(i % 1000).to_string()));
            text.push('\n');
        }
        let (r, rejects, valid) = run(&text);
        let out = r.unwrap();
        assert_eq!(out.written, 1000);
        assert_eq!(out.rejected, 4000);
        assert_eq!(rejects.len(), 4000);
        assert_eq!(valid.len(), 1000);
    }
}
