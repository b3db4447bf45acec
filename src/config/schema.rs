//! `[pipeline.schema]`: the declared shape of a pipeline's files for the `table` processor — the format
//! (CSV or JSON lines), each attribute of an item (where its value comes from, its DynamoDB type,
//! whether it may be empty), the table's key, the deterministic id and the output file's columns. The
//! built-in `orders-csv` processor is this processor with [`Schema::orders`].
//!
//! The schema is plain data, read and checked here (every mistake is a configuration error naming the
//! pipeline and key); `processors::table` compiles it into the reader and the validator.

use config::{Value, ValueKind};
use serde::Serialize;

use super::reader::Reader;

/// The most attributes one schema may declare (an item has at most a few hundred in practice).
pub const MAX_SCHEMA_ATTRIBUTES: usize = 256;

/// A pipeline's files: how to read them, and what item each row becomes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schema {
    pub format: Format,
    pub attributes: Vec<Attribute>,
    /// The table's partition key: one of `attributes`.
    pub partition_key: String,
    /// The table's sort key, when it has one: one of `attributes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_key: Option<String>,
    /// The one normalisation of every field (keys included, so duplicates are compared as written).
    pub trim: Trim,
    /// An attribute holding a deterministic id per item: UUIDv5 of bucket, key, version and the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_attribute: Option<String>,
    /// The output file's columns (attributes or the id attribute), one line per written item.
    pub output_columns: Vec<String>,
    /// How messages name a file of this schema ("an orders CSV").
    #[serde(skip)]
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CSV: `delimiter` between fields, `quote` around fields that hold either; the first line names
    /// the columns when `header` is set. UTF-8 with or without a byte order mark; lines end with `\n`,
    /// `\r\n` or `\r`.
    Csv {
        delimiter: u8,
        quote: u8,
        header: bool,
    },
    /// One JSON object per line.
    Jsonl,
}

/// One attribute of every item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attribute {
    pub name: String,
    pub source: AttrSource,
    #[serde(rename = "type")]
    pub kind: AttrType,
    pub empty: Empty,
}

/// Where an attribute's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttrSource {
    /// The CSV column with this header name.
    Column(String),
    /// The CSV field at this position (0-based here; 1-based in the file).
    Position(usize),
    /// The JSON value at this path of object keys.
    Path(Vec<String>),
    /// The same text in every item.
    Value(String),
    /// The source object's bucket, key or version (its version id, else its ETag).
    Object(ObjectPart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectPart {
    Bucket,
    Key,
    Version,
}

/// The DynamoDB type of an attribute, and what its text must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum AttrType {
    /// A string, as written (after the trim).
    S,
    /// A number within DynamoDB's range and precision, written as a plain decimal; `integer`: a
    /// whole, non-negative number.
    N { integer: bool },
    /// `true`/`false`, `1`/`0`, `yes`/`no` (any case).
    #[serde(rename = "BOOL")]
    Bool,
    /// A date in one of `formats`, stored as ISO `YYYY-MM-DD` (type S).
    #[serde(rename = "date")]
    Date { formats: Vec<DateFormat> },
}

/// A date format: `YYYY` four digits, `MM`/`DD` two, `M`/`D` one or two, any other character as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct DateFormat {
    pub text: String,
    pub parts: Vec<DatePart>,
}

impl From<DateFormat> for String {
    fn from(d: DateFormat) -> String {
        d.text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatePart {
    Year,
    /// At least `min` digits, at most two.
    Month {
        min: usize,
    },
    Day {
        min: usize,
    },
    Literal(u8),
}

impl DateFormat {
    /// Parse a format; `Err` says what is wrong with it.
    pub fn parse(text: &str) -> Result<DateFormat, String> {
        let b = text.as_bytes();
        let (mut parts, mut i) = (Vec::new(), 0);
        let (mut years, mut months, mut days) = (0, 0, 0);
        while i < b.len() {
            let run = b[i..].iter().take_while(|&&c| c == b[i]).count();
            match (b[i], run) {
                (b'Y', 4) => {
                    parts.push(DatePart::Year);
                    years += 1;
                }
                (b'M', 1 | 2) => {
                    parts.push(DatePart::Month { min: run });
                    months += 1;
                }
                (b'D', 1 | 2) => {
                    parts.push(DatePart::Day { min: run });
                    days += 1;
                }
                (b'Y' | b'M' | b'D', _) => {
                    return Err(format!(
                        "{:?} in {text:?} is no field (YYYY, MM or M, DD or D)",
                        &text[i..i + run]
                    ))
                }
                (c, _) if c.is_ascii() && !c.is_ascii_alphanumeric() => {
                    parts.extend(std::iter::repeat(DatePart::Literal(c)).take(run));
                }
                _ => {
                    return Err(format!(
                        "{text:?} may hold YYYY, MM, M, DD, D and punctuation only"
                    ))
                }
            }
            i += run;
        }
        if (years, months, days) != (1, 1, 1) {
            return Err(format!(
                "{text:?} must name the year (YYYY), the month (MM or M) and the day (DD or D) once each"
            ));
        }
        // Two adjacent variable-width fields cannot be told apart ("MD").
        for w in parts.windows(2) {
            if !matches!(w[0], DatePart::Literal(_)) && !matches!(w[1], DatePart::Literal(_)) {
                let fixed = |p: &DatePart| {
                    matches!(
                        p,
                        DatePart::Year | DatePart::Month { min: 2 } | DatePart::Day { min: 2 }
                    )
                };
                if !fixed(&w[0]) {
                    return Err(format!(
                        "{text:?}: a one-or-two-digit field must be followed by punctuation"
                    ));
                }
            }
        }
        Ok(DateFormat {
            text: text.to_string(),
            parts,
        })
    }
}

/// What an empty field (after the trim) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Empty {
    /// The row is rejected (`optional = false`, the default).
    Reject,
    /// The attribute is left out of the item (`optional = true`).
    Omit,
    /// An empty string is written (`allow_empty = true`, strings only).
    Keep,
}

/// The one normalisation of every field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trim {
    /// Unicode white space trimmed from both ends (the default).
    Unicode,
    /// ASCII white space only (a no-break space is data).
    Ascii,
    /// Fields as written.
    None,
}

impl Schema {
    /// The built-in `orders-csv` schema: the workshop's 13 columns by header name, `OrderId` the
    /// partition key, `ConfirmationId` the id, the output `OrderId,ConfirmationId`.
    pub fn orders() -> Schema {
        let col = |name: &str, kind: AttrType, empty: Empty| Attribute {
            name: name.to_string(),
            source: AttrSource::Column(name.to_string()),
            kind,
            empty,
        };
        let text = |name: &str| col(name, AttrType::S, Empty::Keep);
        let date = |name: &str| {
            let formats = ["M/D/YYYY", "YYYY-MM-DD"]
                .iter()
                .map(|f| DateFormat::parse(f).expect("built-in formats parse"))
                .collect();
            col(name, AttrType::Date { formats }, Empty::Reject)
        };
        let num = |name: &str, integer| col(name, AttrType::N { integer }, Empty::Reject);
        let mut sources = vec![
            text("Region"),
            text("Country"),
            text("ItemType"),
            text("SalesChannel"),
            text("OrderPriority"),
            date("OrderDate"),
            col("OrderId", AttrType::S, Empty::Reject),
            date("ShipDate"),
            num("UnitSold", true),
        ];
        for m in ["UnitPrice", "TotalRevenue", "TotalCost", "TotalProfit"] {
            sources.push(num(m, false));
        }
        sources.push(Attribute {
            name: "SourceBucket".into(),
            source: AttrSource::Object(ObjectPart::Bucket),
            kind: AttrType::S,
            empty: Empty::Keep,
        });
        sources.push(Attribute {
            name: "SourceKey".into(),
            source: AttrSource::Object(ObjectPart::Key),
            kind: AttrType::S,
            empty: Empty::Keep,
        });
        Schema {
            format: Format::Csv {
                delimiter: b',',
                quote: b'"',
                header: true,
            },
            attributes: sources,
            partition_key: "OrderId".into(),
            sort_key: None,
            trim: Trim::Unicode,
            id_attribute: Some("ConfirmationId".into()),
            output_columns: vec!["OrderId".into(), "ConfirmationId".into()],
            label: "an orders CSV".into(),
        }
    }

    /// The key attributes' names, partition key first.
    pub fn key_names(&self) -> Vec<&str> {
        std::iter::once(self.partition_key.as_str())
            .chain(self.sort_key.as_deref())
            .collect()
    }

    /// The table's key: the partition key, then the sort key, each a string or a number.
    pub fn table_key(&self) -> Vec<TableKey> {
        self.key_names()
            .into_iter()
            .map(|n| TableKey {
                name: n.to_string(),
                number: matches!(self.attribute(n).map(|a| &a.kind), Some(AttrType::N { .. })),
            })
            .collect()
    }

    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }
}

/// One attribute of a table's key (partition key first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableKey {
    pub name: String,
    /// Type N (else S).
    pub number: bool,
}

/// One character of a CSV format key (`delimiter`, `quote`): a single ASCII character, `\t` for tab.
fn read_char(r: &mut Reader<'_>, k: &str, default: u8) -> u8 {
    let Some(s) = r.opt_string(k) else {
        return default;
    };
    let s = if s == "\\t" { "\t".to_string() } else { s };
    match s.as_bytes() {
        [c] if c.is_ascii() && *c != b'\n' && *c != b'\r' => *c,
        _ => {
            r.invalid(
                k,
                format!(
                    "{s:?} must be one ASCII character (not a line end); write \"\\t\" for a tab"
                ),
            );
            default
        }
    }
}

/// `[pipeline.schema]` of pipeline `path` (e.g. "pipeline[0]"): read and checked; `None` after a
/// problem (each one pushed to `problems`).
pub(super) fn read_schema(
    path: &str,
    t: config::Map<String, Value>,
    problems: &mut Vec<String>,
    origin: &str,
    pipeline: &str,
) -> Option<Schema> {
    let before = problems.len();
    let mut r = Reader::new(path, t, problems, origin);
    let format = match r.string("format", "csv").as_str() {
        "csv" => {
            let delimiter = read_char(&mut r, "delimiter", b',');
            let quote = read_char(&mut r, "quote", b'"');
            if delimiter == quote {
                r.invalid("quote", "must differ from the delimiter");
            }
            Format::Csv {
                delimiter,
                quote,
                header: r.boolean("header", true),
            }
        }
        "jsonl" | "json-lines" => Format::Jsonl,
        other => {
            r.invalid(
                "format",
                format!("unknown format {other:?}; expected \"csv\" or \"jsonl\""),
            );
            Format::Jsonl
        }
    };
    let trim = match r.string("trim", "unicode").as_str() {
        "unicode" => Trim::Unicode,
        "ascii" => Trim::Ascii,
        "none" => Trim::None,
        other => {
            r.invalid(
                "trim",
                format!("unknown trim {other:?}; expected \"unicode\", \"ascii\" or \"none\""),
            );
            Trim::Unicode
        }
    };
    let partition_key = r.required_string("partition_key", "the table's partition key attribute");
    let sort_key = r.opt_string("sort_key");
    let id_attribute = r.opt_string("id_attribute");
    let output_v = r.take("output_columns").is_some();
    let output_columns = r.string_list("output_columns");
    let attributes = read_attributes(&mut r, format);
    let mut s = Schema {
        format,
        attributes,
        output_columns: Vec::new(),
        partition_key,
        sort_key,
        trim,
        id_attribute,
        label: format!("a file of pipeline {pipeline}'s schema"),
    };
    s.output_columns = if output_v {
        output_columns
    } else {
        s.key_names()
            .into_iter()
            .map(str::to_string)
            .chain(s.id_attribute.clone())
            .collect()
    };
    check_schema(&mut r, &s);
    r.finish();
    (problems.len() == before).then_some(s)
}

/// `[[pipeline.schema.attribute]]`: each one's name, source, type and emptiness.
fn read_attributes(r: &mut Reader<'_>, format: Format) -> Vec<Attribute> {
    let v = r.take("attribute");
    let items = match v.as_ref().map(|v| &v.kind) {
        Some(ValueKind::Array(items)) => items.clone(),
        Some(_) => {
            r.problem(
                "attribute",
                v.as_ref(),
                "expected [[pipeline.schema.attribute]] tables",
            );
            return Vec::new();
        }
        None => {
            r.problem(
                "attribute",
                None,
                "missing; declare each attribute with [[pipeline.schema.attribute]] (name, column or path, type)",
            );
            return Vec::new();
        }
    };
    if items.len() > MAX_SCHEMA_ATTRIBUTES {
        r.invalid(
            "attribute",
            format!(
                "{} attributes; at most {MAX_SCHEMA_ATTRIBUTES}",
                items.len()
            ),
        );
    }
    let base = r.key("attribute");
    let origin = r.default_origin().to_string();
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let ValueKind::Table(t) = item.kind else {
            r.problem(
                &format!("attribute[{i}]"),
                None,
                "expected a table (name, column, type)",
            );
            continue;
        };
        let mut a = Reader::new(&format!("{base}[{i}]"), t, r.problems, &origin);
        if let Some(attr) = read_attribute(&mut a, format) {
            out.push(attr);
        }
        a.finish();
    }
    out
}

fn read_attribute(a: &mut Reader<'_>, format: Format) -> Option<Attribute> {
    let name = a.required_string("name", "the attribute's name in the item");
    let source = read_source(a, format, &name);
    let kind = read_type(a);
    let optional = a.boolean("optional", false);
    let allow_empty = a.boolean("allow_empty", false);
    if allow_empty && kind != AttrType::S {
        a.invalid(
            "allow_empty",
            "only a string can be written empty; an empty number, boolean or date is no value (use optional = true)",
        );
    }
    if allow_empty && optional {
        a.invalid(
            "allow_empty",
            "optional leaves an empty field out of the item, allow_empty writes it as \"\": choose one",
        );
    }
    let empty = match (optional, allow_empty) {
        (true, _) => Empty::Omit,
        (_, true) => Empty::Keep,
        _ => Empty::Reject,
    };
    Some(Attribute {
        name,
        source,
        kind,
        empty,
    })
}

/// Where an attribute's value comes from: one of column, position, path, value or object (by default
/// the column or path of its own name).
fn read_source(a: &mut Reader<'_>, format: Format, name: &str) -> AttrSource {
    let column = a.opt_string("column");
    let position = a
        .take("position")
        .is_some()
        .then(|| a.uint("position", 1, 1, 100_000) as usize);
    let path = a.opt_string("path");
    let value = a.opt_string("value");
    let object = a.opt_string("object");
    let given = [
        column.is_some(),
        position.is_some(),
        path.is_some(),
        value.is_some(),
        object.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        a.invalid(
            "",
            "give one of column, position, path, value or object, not several",
        );
    }
    let header = matches!(format, Format::Csv { header: true, .. });
    if let Some(c) = column {
        if !header {
            a.invalid(
                "column",
                "the schema's CSV has no header (header = false): name the field by position",
            );
        }
        AttrSource::Column(c)
    } else if let Some(p) = position {
        if format == Format::Jsonl {
            a.invalid("position", "JSON lines fields are named by path");
        }
        AttrSource::Position(p - 1)
    } else if let Some(p) = path {
        if format != Format::Jsonl {
            a.invalid(
                "path",
                "a path addresses JSON lines; a CSV field is named by column or position",
            );
        }
        let parts: Vec<String> = p.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            a.invalid(
                "path",
                format!("{p:?} has an empty part; write object keys joined by dots (a.b.c)"),
            );
        }
        AttrSource::Path(parts)
    } else if let Some(v) = value {
        AttrSource::Value(v)
    } else if let Some(o) = object {
        AttrSource::Object(match o.as_str() {
            "bucket" => ObjectPart::Bucket,
            "key" => ObjectPart::Key,
            "version" => ObjectPart::Version,
            other => {
                a.invalid(
                    "object",
                    format!("unknown part {other:?}; expected \"bucket\", \"key\" or \"version\""),
                );
                ObjectPart::Key
            }
        })
    } else if format == Format::Jsonl {
        AttrSource::Path(vec![name.to_string()])
    } else if header {
        AttrSource::Column(name.to_string())
    } else {
        a.invalid(
            "position",
            "missing; the schema's CSV has no header (header = false), so each field is named by its position (1 = first)",
        );
        AttrSource::Position(0)
    }
}

/// An attribute's type, with `integer` (numbers) and `formats` (dates).
fn read_type(a: &mut Reader<'_>) -> AttrType {
    let type_v = a.string("type", "S");
    let integer = a
        .take("integer")
        .is_some()
        .then(|| a.boolean("integer", false));
    let formats_v = a.take("formats").is_some();
    let formats = a.string_list("formats");
    let kind = match type_v.as_str() {
        "S" => AttrType::S,
        "N" => AttrType::N {
            integer: integer.unwrap_or(false),
        },
        "BOOL" => AttrType::Bool,
        "date" => {
            let texts = if formats_v {
                formats
            } else {
                vec!["YYYY-MM-DD".to_string()]
            };
            if texts.is_empty() {
                a.invalid("formats", "empty; list at least one date format");
            }
            let mut parsed = Vec::new();
            for f in &texts {
                match DateFormat::parse(f) {
                    Ok(d) => parsed.push(d),
                    Err(e) => a.invalid("formats", e),
                }
            }
            AttrType::Date { formats: parsed }
        }
        other => {
            a.invalid(
                "type",
                format!("unknown type {other:?}; expected \"S\", \"N\", \"BOOL\" or \"date\""),
            );
            AttrType::S
        }
    };
    if integer.is_some() && !matches!(kind, AttrType::N { .. }) {
        a.invalid("integer", "only a number (type = \"N\") can be an integer");
    }
    if formats_v && !matches!(kind, AttrType::Date { .. }) {
        a.invalid("formats", "only a date (type = \"date\") has formats");
    }
    kind
}

/// The checks across attributes: names unique, keys declared and of key types, the id and output
/// columns known.
fn check_schema(r: &mut Reader<'_>, s: &Schema) {
    let mut seen = std::collections::BTreeSet::new();
    for a in &s.attributes {
        if !seen.insert(a.name.as_str()) {
            r.invalid(
                "attribute",
                format!(
                    "attribute {:?} is declared twice; each attribute once, with one type",
                    a.name
                ),
            );
        }
    }
    if !s.attributes.iter().any(|a| {
        matches!(
            a.source,
            AttrSource::Column(_) | AttrSource::Position(_) | AttrSource::Path(_)
        )
    }) && !s.attributes.is_empty()
    {
        r.invalid(
            "attribute",
            "no attribute comes from the file (column, position or path)",
        );
    }
    for (k, name) in [
        ("partition_key", Some(&s.partition_key)),
        ("sort_key", s.sort_key.as_ref()),
    ] {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            continue;
        };
        match s.attribute(name) {
            None => r.invalid(
                k,
                format!("{name:?} is not a declared attribute; declare it with [[pipeline.schema.attribute]]"),
            ),
            Some(a) => {
                if !matches!(
                    a.source,
                    AttrSource::Column(_) | AttrSource::Position(_) | AttrSource::Path(_)
                ) {
                    r.invalid(
                        k,
                        format!("{name:?} does not come from the file; a key attribute is a column, position or path"),
                    );
                }
                if !matches!(a.kind, AttrType::S | AttrType::N { .. } | AttrType::Date { .. }) {
                    r.invalid(k, format!("{name:?} is a BOOL; a key is a string or a number"));
                }
                if a.empty != Empty::Reject {
                    r.invalid(
                        k,
                        format!("{name:?} is optional or allow_empty; a key attribute is required in every row"),
                    );
                }
            }
        }
    }
    if s.sort_key.as_deref() == Some(s.partition_key.as_str()) {
        r.invalid("sort_key", "is the partition key; name another attribute");
    }
    if let Some(id) = &s.id_attribute {
        if id.is_empty() {
            r.invalid("id_attribute", "must not be empty (remove it for no id)");
        } else if s.attribute(id).is_some() {
            r.invalid(
                "id_attribute",
                format!("{id:?} is also a declared attribute; the id attribute is filled in by the processor"),
            );
        }
    }
    if s.output_columns.is_empty() {
        r.invalid("output_columns", "empty; list at least one attribute");
    }
    for c in &s.output_columns {
        if s.attribute(c).is_none() && s.id_attribute.as_ref() != Some(c) {
            r.invalid(
                "output_columns",
                format!("{c:?} is neither a declared attribute nor the id_attribute"),
            );
        }
    }
}
