//! The orders file's shape: its columns, the header that finds them, and the validation that turns
//! one record into an [`Order`] and then into a DynamoDB item ([`Items`]), with its `ConfirmationId`.

use super::*;

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
pub(super) const ORDER_DATE: usize = 5;
pub(super) const ORDER_ID: usize = 6;
pub(super) const SHIP_DATE: usize = 7;
pub(super) const UNIT_SOLD: usize = 8;
pub(super) const MONEY: [usize; 4] = [9, 10, 11, 12];

/// DynamoDB numbers: at most 38 significant digits, magnitude from 1E-130 to below 1E+126.
pub(super) const MAX_NUMBER_DIGITS: usize = 38;
pub(super) const MAX_INTEGER_DIGITS: usize = 126;
pub(super) const MAX_FRACTION_LEADING_ZEROS: usize = 129;
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
    pub(super) idx: [usize; 13],
    pub(super) width: usize,
    pub extra: Vec<String>,
    /// Bytes every item of the file adds beyond its columns (ids, source), for the item size check.
    pub(super) item_overhead: usize,
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
pub(super) enum Slot {
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
    pub(super) slots: Vec<(&'static str, Slot)>,
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
pub(super) fn value_of<'a>(
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

/// The one normalisation of an `OrderId`, used for duplicate detection, the item and the output: the
/// field as UTF-8 with Unicode white space trimmed. `None` when it is not UTF-8.
pub fn normalized_id(raw: &[u8]) -> Option<&str> {
    std::str::from_utf8(raw).ok().map(str::trim)
}

/// The item's size as DynamoDB counts it: every attribute's name plus its value (strings as UTF-8
/// bytes, numbers by their digits), including the `extra` bytes every item of the file adds.
pub(super) fn item_size(order: &Order, extra: usize) -> usize {
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
