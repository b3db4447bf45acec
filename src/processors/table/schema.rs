//! A declared schema compiled for the hot path ([`Plan`]): the attributes read from each row, the ones
//! every item of an object shares, the key; per file the header that finds the columns ([`Layout`]);
//! the validation that turns one record into a [`Row`], and the items built from rows ([`Items`]),
//! with their deterministic id.

use super::*;
use crate::config::{AttrSource, AttrType, DateFormat, Empty, ObjectPart, Schema, Trim};

/// DynamoDB numbers: at most 38 significant digits, magnitude from 1E-130 to below 1E+126.
pub(super) const MAX_NUMBER_DIGITS: usize = 38;
pub(super) const MAX_INTEGER_DIGITS: usize = 126;
pub(super) const MAX_FRACTION_LEADING_ZEROS: usize = 129;
/// Rows per `BatchWriteItem`: as many as DynamoDB takes.
pub const BATCH_SIZE: usize = DYNAMODB_MAX_BATCH_WRITE;
/// Namespace of the UUIDv5 ids (`ConfirmationId`; fixed forever: changing it changes every id).
pub const CONFIRMATION_NAMESPACE: Uuid = Uuid::from_u128(0x8c1f_3e2a_4b7d_5e60_9a1b_6f72_6465_7273);
/// The bytes of a text UUID.
const UUID_TEXT_BYTES: usize = 36;

/// The identity of the object a file came from; it seeds the ids and fills `object` attributes.
#[derive(Debug, Clone)]
pub struct Source {
    pub bucket: String,
    pub key: String,
    /// The version read: its ETag.
    pub etag: String,
}

impl Source {
    /// `Uuid::new_v5(CONFIRMATION_NAMESPACE, "bucket\nkey\netag\n<key text>")`.
    pub fn confirmation_id(&self, key_text: &str) -> Uuid {
        ConfirmationIds::new(self).of(key_text)
    }
}

/// [`Source::confirmation_id`] for the rows of one object: the SHA-1 state after the namespace and the
/// object's part of the name is computed once, so that a row hashes only its key.
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

    pub fn of(&self, key_text: &str) -> Uuid {
        let mut h = self.0.clone();
        h.update(key_text.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&h.digest().bytes()[..16]);
        uuid::Builder::from_sha1_bytes(bytes).into_uuid()
    }
}

/// The type of a field read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    S,
    N { integer: bool },
    Bool,
    Date,
}

/// An attribute read from each row.
#[derive(Debug, Clone)]
pub(super) struct Field {
    pub(super) name: String,
    pub(super) source: AttrSource,
    pub(super) kind: Kind,
    pub(super) empty: Empty,
    pub(super) dates: Vec<DateFormat>,
    /// "(M/D/YYYY or YYYY-MM-DD)", for the reject reason.
    pub(super) dates_shown: String,
    /// The longest value a key attribute may have (0: no key).
    pub(super) key_max: usize,
}

/// An attribute with the same value in every item of an object.
#[derive(Debug, Clone)]
pub(super) enum Const {
    Text(String),
    Object(ObjectPart),
}

/// A schema ready for the rows of many files.
#[derive(Debug, Clone)]
pub struct Plan {
    pub schema: Schema,
    pub(super) fields: Vec<Field>,
    pub(super) consts: Vec<(String, Const)>,
    /// Indices in `fields` of the partition key and the sort key.
    pub(super) pk: usize,
    pub(super) sk: Option<usize>,
    /// The distinct first keys of the fields' JSON paths.
    pub(super) json_roots: Vec<String>,
}

impl Plan {
    /// Compile a schema (checked by the configuration reader: its keys are attributes read from rows).
    pub fn new(schema: &Schema) -> Plan {
        let mut fields = Vec::new();
        let mut consts = Vec::new();
        for a in &schema.attributes {
            let (kind, dates) = match &a.kind {
                AttrType::S => (Kind::S, Vec::new()),
                AttrType::N { integer } => (Kind::N { integer: *integer }, Vec::new()),
                AttrType::Bool => (Kind::Bool, Vec::new()),
                AttrType::Date { formats } => (Kind::Date, formats.clone()),
            };
            match &a.source {
                AttrSource::Value(v) => consts.push((a.name.clone(), Const::Text(v.clone()))),
                AttrSource::Object(p) => consts.push((a.name.clone(), Const::Object(*p))),
                source => {
                    let key_max = if a.name == schema.partition_key {
                        DYNAMODB_MAX_PARTITION_KEY_BYTES
                    } else if schema.sort_key.as_ref() == Some(&a.name) {
                        DYNAMODB_MAX_SORT_KEY_BYTES
                    } else {
                        0
                    };
                    fields.push(Field {
                        name: a.name.clone(),
                        source: source.clone(),
                        kind,
                        empty: a.empty,
                        dates_shown: format!(
                            "({})",
                            dates
                                .iter()
                                .map(|d| d.text.as_str())
                                .collect::<Vec<_>>()
                                .join(" or ")
                        ),
                        dates,
                        key_max,
                    })
                }
            }
        }
        let find = |name: &str| fields.iter().position(|f| f.name == name);
        let pk = find(&schema.partition_key).unwrap_or(0);
        let sk = schema.sort_key.as_deref().and_then(find);
        let mut json_roots: Vec<String> = Vec::new();
        for f in &fields {
            if let AttrSource::Path(p) = &f.source {
                if !json_roots.contains(&p[0]) {
                    json_roots.push(p[0].clone());
                }
            }
        }
        Plan {
            schema: schema.clone(),
            fields,
            consts,
            pk,
            sk,
            json_roots,
        }
    }

    /// The bytes every item of `src` adds beyond its row's fields: the shared attributes and the id.
    pub fn item_overhead(&self, src: &Source) -> usize {
        let consts: usize = self
            .consts
            .iter()
            .map(|(name, c)| name.len() + const_value(c, src).len())
            .sum();
        let id = self
            .schema
            .id_attribute
            .as_ref()
            .map_or(0, |n| n.len() + UUID_TEXT_BYTES);
        consts + id
    }

    /// The shortest line a valid row can have (it sizes the duplicate filter by the rows a file could
    /// hold): the delimiters and line end, and the fewest bytes of each required field (the orders
    /// schema: 12 delimiters, a newline, an id, two dates of 8 characters, five numbers of one digit: 35).
    pub(super) fn min_row_bytes(&self) -> u64 {
        let required = |f: &Field| -> u64 {
            match (f.empty, f.kind) {
                (Empty::Reject, Kind::Date) => f
                    .dates
                    .iter()
                    .map(|d| {
                        d.parts
                            .iter()
                            .map(|p| match p {
                                crate::config::DatePart::Year => 4,
                                crate::config::DatePart::Month { min }
                                | crate::config::DatePart::Day { min } => *min as u64,
                                crate::config::DatePart::Literal(_) => 1,
                            })
                            .sum::<u64>()
                    })
                    .min()
                    .unwrap_or(1),
                (Empty::Reject, _) => 1,
                _ => 0,
            }
        };
        let values: u64 = self.fields.iter().map(required).sum();
        match self.schema.format {
            crate::config::Format::Jsonl => {
                let names: u64 = self
                    .fields
                    .iter()
                    .filter(|f| f.empty == Empty::Reject)
                    .map(|f| match &f.source {
                        AttrSource::Path(p) => p[0].len() as u64 + 4,
                        _ => 0,
                    })
                    .sum();
                3 + names + values
            }
            _ => self.fields.len() as u64 + values,
        }
    }

    /// How the key is named in messages: `OrderId`, or `key (CustomerId, InvoiceNo)`.
    pub(super) fn key_shown(&self) -> String {
        match self.sk {
            None => self.fields[self.pk].name.clone(),
            Some(sk) => format!(
                "key ({}, {})",
                self.fields[self.pk].name, self.fields[sk].name
            ),
        }
    }

    /// The table's key as the schema declares it: "partition key OrderId (S)".
    pub(super) fn key_schema_shown(&self) -> String {
        let ty = |k: usize| match self.fields[k].kind {
            Kind::N { .. } => "N",
            _ => "S",
        };
        let pk = format!(
            "partition key {} ({})",
            self.fields[self.pk].name,
            ty(self.pk)
        );
        match self.sk {
            Some(sk) => format!("{pk}, sort key {} ({})", self.fields[sk].name, ty(sk)),
            None => pk,
        }
    }

    /// The key's fields' indices, partition key first.
    pub(super) fn key_fields(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.pk).chain(self.sk)
    }

    /// Without a header: each field at its position.
    fn layout_by_position(&self) -> Layout {
        let min_width = self
            .fields
            .iter()
            .map(|f| match f.source {
                AttrSource::Position(p) => p + 1,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let cols = self
            .fields
            .iter()
            .map(|f| match f.source {
                AttrSource::Position(p) => Some(p),
                _ => None,
            })
            .collect();
        Layout {
            cols,
            width: None,
            min_width,
            extra: Vec::new(),
        }
    }

    /// Where each field is in this file's records, from its header (or from the schema alone).
    pub(super) fn layout(&self, header: Option<&Record>) -> Result<Layout, String> {
        let Some(rec) = header else {
            return Ok(self.layout_by_position());
        };
        let label = &self.schema.label;
        let mut names = Vec::with_capacity(rec.len());
        for i in 0..rec.len() {
            let raw = rec.get(i).unwrap_or_default();
            let name = std::str::from_utf8(raw).map_err(|_| {
                format!("the first line is not text, so this is not {label} (a binary file?)")
            })?;
            names.push(name.trim().to_string());
        }
        let mut cols = Vec::with_capacity(self.fields.len());
        let mut missing = Vec::new();
        for f in &self.fields {
            let col = match &f.source {
                AttrSource::Column(c) => c.as_str(),
                AttrSource::Position(p) => {
                    cols.push(Some(*p));
                    continue;
                }
                _ => {
                    cols.push(None);
                    continue;
                }
            };
            let found: Vec<usize> = names
                .iter()
                .enumerate()
                .filter(|(_, n)| n.as_str() == col)
                .map(|(i, _)| i)
                .collect();
            match found.len() {
                0 if f.empty == Empty::Omit => cols.push(None),
                0 => {
                    missing.push(col);
                    cols.push(None);
                }
                1 => cols.push(Some(found[0])),
                _ => return Err(format!("the header names column {col} twice")),
            }
        }
        if !missing.is_empty() {
            let shown: String = names.join(",").chars().take(200).collect();
            let wanted: Vec<&str> = self
                .fields
                .iter()
                .filter_map(|f| match &f.source {
                    AttrSource::Column(c) => Some(c.as_str()),
                    _ => None,
                })
                .collect();
            return Err(format!(
                "the header lacks column{} {}; {label} starts with {} (found: {shown:?})",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                wanted.join(",")
            ));
        }
        let used: HashSet<usize> = cols.iter().flatten().copied().collect();
        let extra = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, n)| n.clone())
            .collect();
        Ok(Layout {
            cols,
            width: Some(rec.len()),
            min_width: 0,
            extra,
        })
    }

    /// Validate one record into `row` (whose buffers are reused from row to row).
    pub(super) fn validate(
        &self,
        rec: &Record,
        layout: &Layout,
        item_overhead: usize,
        scratch: &mut Scratch,
        row: &mut Row,
    ) -> Result<(), String> {
        let text = match self.schema.format {
            crate::config::Format::Jsonl => {
                json_fields(self, rec.get(0).unwrap_or_default(), scratch, false)?;
                scratch.text.as_str()
            }
            _ => {
                if let Some(w) = layout.width {
                    if rec.len() != w {
                        return Err(format!(
                            "expected {w} fields as in the header, found {}",
                            rec.len()
                        ));
                    }
                } else if rec.len() < layout.min_width {
                    return Err(format!(
                        "expected at least {} fields, found {}",
                        layout.min_width,
                        rec.len()
                    ));
                }
                if rec.bytes.len() > DYNAMODB_MAX_ITEM_BYTES {
                    return Err(format!(
                        "row is {} bytes, larger than a DynamoDB item may be (400 KB)",
                        rec.bytes.len()
                    ));
                }
                // One UTF-8 check per row (vectorised; the precise error only for a bad row); fields
                // are slices of it (their bounds are ASCII bytes).
                match simdutf8::basic::from_utf8(&rec.bytes) {
                    Ok(all) => all,
                    Err(_) => {
                        let at = std::str::from_utf8(&rec.bytes)
                            .err()
                            .map_or(0, |e| e.valid_up_to());
                        return Err(format!("row is not UTF-8 text (bad byte at offset {at})"));
                    }
                }
            }
        };
        row.text.clear();
        row.ends.clear();
        row.present.clear();
        let mut size = item_overhead;
        let json = self.schema.format == crate::config::Format::Jsonl;
        for (i, f) in self.fields.iter().enumerate() {
            let span = if json {
                scratch.spans[i].clone()
            } else {
                layout.cols[i].and_then(|c| rec.range(c))
            };
            let raw = span.map_or("", |r| &text[r]);
            let v = trim(raw, self.schema.trim);
            let start = row.text.len();
            if v.is_empty() {
                match f.empty {
                    Empty::Omit => {
                        row.ends.push(start);
                        row.present.push(false);
                        continue;
                    }
                    Empty::Keep => {
                        row.ends.push(start);
                        row.present.push(true);
                        size += f.name.len();
                        continue;
                    }
                    Empty::Reject if matches!(f.kind, Kind::S | Kind::Bool) => {
                        return Err(format!("{} is empty", f.name));
                    }
                    Empty::Reject => {}
                }
            }
            let value_size = normalize(f, v, &mut row.text)?;
            size += f.name.len() + value_size;
            row.ends.push(row.text.len());
            row.present.push(true);
        }
        if size > DYNAMODB_MAX_ITEM_BYTES {
            return Err(format!(
                "the item would be {size} bytes, larger than DynamoDB allows ({DYNAMODB_MAX_ITEM_BYTES})"
            ));
        }
        Ok(())
    }

    /// The key's fields of a record that failed validation, as best they can be read, for the
    /// rejects report.
    pub(super) fn raw_key(
        &self,
        rec: &Record,
        layout: &Layout,
        scratch: &mut Scratch,
    ) -> Vec<String> {
        if self.schema.format == crate::config::Format::Jsonl {
            let ok = json_fields(self, rec.get(0).unwrap_or_default(), scratch, true).is_ok();
            return self
                .key_fields()
                .map(|k| match (&scratch.spans.get(k), ok) {
                    (Some(Some(r)), true) => {
                        trim(&scratch.text[r.clone()], self.schema.trim).to_string()
                    }
                    _ => String::new(),
                })
                .collect();
        }
        self.key_fields()
            .map(|k| {
                let b = layout.cols[k].and_then(|c| rec.get(c)).unwrap_or_default();
                match std::str::from_utf8(b) {
                    Ok(s) => trim(s, self.schema.trim).to_string(),
                    Err(_) => String::from_utf8_lossy(b).trim().to_string(),
                }
            })
            .collect()
    }

    /// The key of a record as duplicates are compared, hashed: each key field normalised as
    /// validation does it; `None` when it has no valid key (the row will be rejected).
    pub(super) fn key_hash(
        &self,
        rec: &Record,
        layout: &Layout,
        scratch: &mut Scratch,
    ) -> Option<u128> {
        let json = self.schema.format == crate::config::Format::Jsonl;
        if json && json_fields(self, rec.get(0).unwrap_or_default(), scratch, true).is_err() {
            return None;
        }
        if self.sk.is_none() && !json && self.fields[self.pk].kind == Kind::S {
            // One string key (the orders schema's): hashed as it is, without a copy.
            let raw = layout.cols[self.pk]
                .and_then(|c| rec.get(c))
                .unwrap_or_default();
            let v = simdutf8::basic::from_utf8(raw)
                .map(|s| trim(s, self.schema.trim))
                .ok()?;
            let f = &self.fields[self.pk];
            return (!v.is_empty() && v.len() <= f.key_max)
                .then(|| xxhash_rust::xxh3::xxh3_128(v.as_bytes()));
        }
        let mut norm = std::mem::take(&mut scratch.key);
        let mut bytes = std::mem::take(&mut scratch.key_bytes);
        bytes.clear();
        let mut ok = true;
        for k in self.key_fields() {
            let raw: &[u8] = if json {
                match &scratch.spans[k] {
                    Some(r) => scratch.text[r.clone()].as_bytes(),
                    None => &[],
                }
            } else {
                layout.cols[k].and_then(|c| rec.get(c)).unwrap_or_default()
            };
            let v = simdutf8::basic::from_utf8(raw)
                .map(|s| trim(s, self.schema.trim))
                .unwrap_or("");
            norm.clear();
            if v.is_empty() || normalize(&self.fields[k], v, &mut norm).is_err() {
                ok = false;
                break;
            }
            key_bytes(&mut bytes, self.fields[k].kind, &norm);
        }
        let h = ok.then(|| xxhash_rust::xxh3::xxh3_128(&bytes));
        scratch.key = norm;
        scratch.key_bytes = bytes;
        h
    }

    /// The key hash of a valid row (as [`Plan::key_hash`] computes it from its record).
    pub(super) fn row_key_hash(&self, row: &Row, scratch: &mut Scratch) -> u128 {
        if self.sk.is_none()
            && self.schema.format != crate::config::Format::Jsonl
            && self.fields[self.pk].kind == Kind::S
        {
            return xxhash_rust::xxh3::xxh3_128(row.field(self.pk).as_bytes());
        }
        let bytes = &mut scratch.key_bytes;
        bytes.clear();
        for k in self.key_fields() {
            key_bytes(bytes, self.fields[k].kind, row.field(k));
        }
        xxhash_rust::xxh3::xxh3_128(bytes)
    }

    /// The text the id of a row is made from: its partition key, then `\n` and its sort key.
    pub(super) fn id_text<'a>(&self, field: impl Fn(usize) -> &'a str, out: &mut String) {
        out.clear();
        out.push_str(field(self.pk));
        if let Some(sk) = self.sk {
            out.push('\n');
            out.push_str(field(sk));
        }
    }
}

/// A field's value (trimmed, not empty) as the item holds it, appended to `out`; returns its size as
/// DynamoDB counts it, or the reason it is refused.
pub(super) fn normalize(f: &Field, v: &str, out: &mut String) -> Result<usize, String> {
    let start = out.len();
    Ok(match f.kind {
        Kind::S => {
            if f.key_max > 0 && v.len() > f.key_max {
                return Err(format!(
                    "{} is {} bytes, longer than a DynamoDB key may be ({})",
                    f.name,
                    v.len(),
                    f.key_max
                ));
            }
            out.push_str(v);
            v.len()
        }
        Kind::Date => {
            if !f.dates.iter().any(|d| parse_date_as(v, d, out)) {
                return Err(format!("{} {v:?} is not a date {}", f.name, f.dates_shown));
            }
            out.len() - start
        }
        Kind::N { integer } => parse_number_into(v, integer, out).map_err(|e| match e {
            NumberError::NotANumber if integer => {
                format!("{} {v:?} is not a whole number of units", f.name)
            }
            NumberError::NotANumber => format!("{} {v:?} is not a decimal number", f.name),
            other => number_reason(&f.name, v, other),
        })?,
        Kind::Bool => match parse_bool(v) {
            Some(b) => {
                out.push_str(if b { "true" } else { "false" });
                1
            }
            None => {
                return Err(format!(
                    "{} {v:?} is not a boolean (true/false, 1/0, yes/no)",
                    f.name
                ))
            }
        },
    })
}

/// One key value (normalised) as the key hash reads it: numbers by value, as DynamoDB compares them;
/// each value ended by a byte UTF-8 never holds.
fn key_bytes(out: &mut Vec<u8>, kind: Kind, v: &str) {
    match kind {
        Kind::N { .. } => out.extend_from_slice(canonical_number(v).as_bytes()),
        _ => out.extend_from_slice(v.as_bytes()),
    }
    out.push(0xFF);
}

/// The value of a shared attribute for the items of `src`.
pub(super) fn const_value<'a>(c: &'a Const, src: &'a Source) -> &'a str {
    match c {
        Const::Text(t) => t,
        Const::Object(ObjectPart::Bucket) => &src.bucket,
        Const::Object(ObjectPart::Key) => &src.key,
        Const::Object(ObjectPart::Version) => &src.etag,
    }
}

/// Where each field is in one file's records.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Per field: its index in a record (`None`: absent from this file, or a JSON path).
    pub(super) cols: Vec<Option<usize>>,
    /// Fields every row has (from the header).
    pub(super) width: Option<usize>,
    /// Without a header: the fields a row needs at least.
    pub(super) min_width: usize,
    /// Header columns no attribute reads.
    pub extra: Vec<String>,
}

/// Buffers validation reuses from row to row.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    /// Per field: its text in `text` (JSON lines) or in the record (CSV).
    pub(super) spans: Vec<Option<std::ops::Range<usize>>>,
    /// JSON values as text.
    pub(super) text: String,
    /// A key field normalised (the duplicate pass).
    pub(super) key: String,
    /// The bytes a key hash is computed over.
    pub(super) key_bytes: Vec<u8>,
}

/// A row that passed validation: its fields' values one after another (dates as ISO `YYYY-MM-DD`,
/// numbers as plain decimals, booleans as `true`/`false`), an omitted optional field empty and not
/// present.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub(super) text: String,
    pub(super) ends: Vec<usize>,
    pub(super) present: Vec<bool>,
}

impl Row {
    pub fn field(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    pub fn present(&self, i: usize) -> bool {
        self.present[i]
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// The one normalisation of a field.
pub(super) fn trim(s: &str, how: Trim) -> &str {
    let b = s.as_bytes();
    // Most fields need none: their first and last bytes are visible ASCII.
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) if f > b' ' && f < 0x80 && l > b' ' && l < 0x80 => return s,
        (None, _) => return s,
        _ => {}
    }
    match how {
        Trim::Unicode => s.trim(),
        Trim::Ascii => s.trim_matches(|c: char| c.is_ascii_whitespace()),
        Trim::None => s,
    }
}

/// The JSON values of a line's fields, as text into `scratch`.
/// With `keys_only`, the other fields are left empty (the duplicate pass, a reject's key).
fn json_fields(
    plan: &Plan,
    line: &[u8],
    scratch: &mut Scratch,
    keys_only: bool,
) -> Result<(), String> {
    scratch.text.clear();
    scratch.spans.clear();
    let line = simdutf8::basic::from_utf8(line).map_err(|_| {
        let at = std::str::from_utf8(line)
            .err()
            .map_or(0, |e| e.valid_up_to());
        format!("line is not UTF-8 text (bad byte at offset {at})")
    })?;
    if line.len() > DYNAMODB_MAX_ITEM_BYTES {
        return Err(format!(
            "line is {} bytes, larger than a DynamoDB item may be (400 KB)",
            line.len()
        ));
    }
    let names = &plan.json_roots;
    let top = pick(line, names).map_err(|e| {
        let e = e.to_string();
        let e = e.split(" at line").next().unwrap_or(&e).to_string();
        format!("line is not a JSON object: {e}")
    })?;
    for (i, f) in plan.fields.iter().enumerate() {
        let AttrSource::Path(path) = &f.source else {
            scratch.spans.push(None);
            continue;
        };
        if keys_only && i != plan.pk && Some(i) != plan.sk {
            scratch.spans.push(None);
            continue;
        }
        let root = names.iter().position(|n| *n == path[0]);
        let mut raw = root.and_then(|i| top[i]);
        for part in &path[1..] {
            let Some(r) = raw else { break };
            raw = match r.get().as_bytes().first() {
                Some(b'{') => pick(r.get(), std::slice::from_ref(part))
                    .map_err(|e| format!("{}: {e}", f.name))?[0],
                _ => None,
            };
        }
        let Some(raw) = raw else {
            scratch.spans.push(None);
            continue;
        };
        let start = scratch.text.len();
        let t = raw.get();
        match t.as_bytes().first() {
            // A string without escapes is its text between the quotes.
            Some(b'"') if !t.contains('\\') => scratch.text.push_str(&t[1..t.len() - 1]),
            Some(b'"') => {
                let s: String = serde_json::from_str(t).map_err(|e| format!("{}: {e}", f.name))?;
                scratch.text.push_str(&s);
            }
            Some(b'n') => {
                scratch.spans.push(None);
                continue;
            }
            Some(b'{') => return Err(format!("{} is an object, not a value", f.name)),
            Some(b'[') => return Err(format!("{} is an array, not a value", f.name)),
            _ => scratch.text.push_str(t),
        }
        scratch.spans.push(Some(start..scratch.text.len()));
    }
    Ok(())
}

/// The values of the keys `names` of the JSON object `text` (`None`: absent), every other value
/// skipped unparsed.
fn pick<'a>(
    text: &'a str,
    names: &[String],
) -> Result<Vec<Option<&'a serde_json::value::RawValue>>, serde_json::Error> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Key<'a>(std::borrow::Cow<'a, str>);
    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(std::borrow::Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(std::borrow::Cow::Owned(v.to_string())))
                }
            }
            d.deserialize_str(V)
        }
    }
    struct Pick<'n>(&'n [String]);
    impl<'de> Visitor<'de> for Pick<'_> {
        type Value = Vec<Option<&'de serde_json::value::RawValue>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = vec![None; self.0.len()];
            while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                match self.0.iter().position(|n| *n == k) {
                    Some(i) => out[i] = Some(map.next_value()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let out = de.deserialize_map(Pick(names))?;
    de.end()?;
    Ok(out)
}

/// Where an item's attribute gets its value.
#[derive(Debug, Clone, Copy)]
pub(super) enum Slot {
    Field(usize),
    Id,
    /// The same in every item of an object (set in the template).
    Const,
}

/// The items of one object's rows. Each is a clone of a template holding the attribute names and
/// the object's values, with the row's values set in place: no attribute name is hashed per row.
#[derive(Clone)]
pub struct Items {
    template: HashMap<String, AttributeValue>,
    /// The template's entries in its iteration order: each one's name and where its value comes from.
    pub(super) slots: Vec<(String, Slot)>,
    kinds: Vec<Kind>,
}

impl Items {
    pub fn new(plan: &Plan, src: &Source) -> Items {
        let mut names: Vec<(String, Slot)> = plan
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), Slot::Field(i)))
            .collect();
        if let Some(id) = &plan.schema.id_attribute {
            names.push((id.clone(), Slot::Id));
        }
        let mut template = HashMap::with_capacity(names.len() + plan.consts.len());
        for (name, _) in &names {
            template.insert(name.clone(), AttributeValue::S(String::new()));
        }
        for (name, c) in &plan.consts {
            template.insert(
                name.clone(),
                AttributeValue::S(const_value(c, src).to_string()),
            );
            names.push((name.clone(), Slot::Const));
        }
        let slots = template
            .keys()
            .map(|k| {
                names
                    .iter()
                    .find(|(name, _)| name == k)
                    .expect("every template key is a name")
                    .clone()
            })
            .collect();
        Items {
            template,
            slots,
            kinds: plan.fields.iter().map(|f| f.kind).collect(),
        }
    }

    /// The item of a valid row whose field `i` is `field(i)` (`None`: omitted), with its id as text.
    pub fn build<'a>(
        &self,
        field: impl Fn(usize) -> Option<&'a str>,
        id: &str,
    ) -> HashMap<String, AttributeValue> {
        let mut item = self.template.clone();
        let mut omitted = false;
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
                    match self.value_of(*slot, &field, id) {
                        Some(Some(value)) => *v = value,
                        Some(None) => omitted = true,
                        None => {}
                    }
                    true
                });
        if !in_order {
            for (name, slot) in &self.slots {
                match self.value_of(*slot, &field, id) {
                    Some(Some(value)) => {
                        item.insert(name.clone(), value);
                    }
                    Some(None) => omitted = true,
                    None => {}
                }
            }
        }
        if omitted {
            for (name, slot) in &self.slots {
                if let Slot::Field(i) = slot {
                    if field(*i).is_none() {
                        item.remove(name);
                    }
                }
            }
        }
        item
    }

    /// The value a slot takes in a row's item: `None` the template's own, `Some(None)` omitted.
    fn value_of<'a>(
        &self,
        slot: Slot,
        field: &impl Fn(usize) -> Option<&'a str>,
        id: &str,
    ) -> Option<Option<AttributeValue>> {
        match slot {
            Slot::Field(i) => Some(field(i).map(|v| match self.kinds[i] {
                Kind::N { .. } => AttributeValue::N(v.to_owned()),
                Kind::Bool => AttributeValue::Bool(v == "true"),
                Kind::S | Kind::Date => AttributeValue::S(v.to_owned()),
            })),
            Slot::Id => Some(Some(AttributeValue::S(id.to_owned()))),
            Slot::Const => None,
        }
    }
}

pub(super) fn number_reason(col: &str, text: &str, e: NumberError) -> String {
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
