//! Any file against declared schemas (the first byte picks one: a CSV with a header and a composite
//! key, a semicolon CSV without a header, JSON lines with nested paths), scanned with a 4 KiB record
//! limit: the accounting of `tests/it/support/scan_check.rs` holds.
#![no_main]

// Each target uses one of its checks.
#[allow(dead_code)]
#[path = "../../tests/it/support/scan_check.rs"]
mod scan_check;

use libfuzzer_sys::fuzz_target;
use offload_agent::config::{
    AttrSource, AttrType, Attribute, DateFormat, Empty, Format, Schema, Trim,
};

fn attr(name: &str, source: AttrSource, kind: AttrType, empty: Empty) -> Attribute {
    Attribute {
        name: name.into(),
        source,
        kind,
        empty,
    }
}

fn schema(pick: u8) -> Schema {
    let date = || AttrType::Date {
        formats: vec![
            DateFormat::parse("DD.MM.YYYY").unwrap(),
            DateFormat::parse("YYYY-MM-DD").unwrap(),
        ],
    };
    let (format, attributes, sort_key) = match pick % 3 {
        0 => (
            Format::Csv {
                delimiter: b',',
                quote: b'"',
                header: true,
            },
            vec![
                attr(
                    "c",
                    AttrSource::Column("c".into()),
                    AttrType::S,
                    Empty::Reject,
                ),
                attr(
                    "n",
                    AttrSource::Column("n".into()),
                    AttrType::N { integer: true },
                    Empty::Reject,
                ),
                attr(
                    "p",
                    AttrSource::Column("p".into()),
                    AttrType::Bool,
                    Empty::Omit,
                ),
                attr("d", AttrSource::Column("d".into()), date(), Empty::Omit),
            ],
            Some("n".to_string()),
        ),
        1 => (
            Format::Csv {
                delimiter: b';',
                quote: b'"',
                header: false,
            },
            vec![
                attr("m", AttrSource::Position(0), AttrType::S, Empty::Reject),
                attr(
                    "v",
                    AttrSource::Position(2),
                    AttrType::N { integer: false },
                    Empty::Reject,
                ),
                attr("t", AttrSource::Position(1), AttrType::S, Empty::Keep),
            ],
            None,
        ),
        _ => (
            Format::Jsonl,
            vec![
                attr(
                    "id",
                    AttrSource::Path(vec!["a".into(), "id".into()]),
                    AttrType::N { integer: false },
                    Empty::Reject,
                ),
                attr(
                    "q",
                    AttrSource::Path(vec!["q".into()]),
                    AttrType::S,
                    Empty::Omit,
                ),
                attr(
                    "b",
                    AttrSource::Path(vec!["b".into()]),
                    AttrType::Bool,
                    Empty::Omit,
                ),
            ],
            None,
        ),
    };
    let partition_key = attributes[0].name.clone();
    Schema {
        format,
        attributes,
        output_columns: vec![partition_key.clone()],
        partition_key,
        sort_key,
        trim: Trim::Unicode,
        id_attribute: Some("Id".into()),
        label: "a fuzzed file".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, file)) = data.split_first() else {
        return;
    };
    scan_check::check_schema_scan(&schema(pick), file, 4096)
});
