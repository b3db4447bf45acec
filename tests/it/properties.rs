//! Property tests (proptest) of the two parsers that take input from outside: the event parser (S3
//! notifications, SNS-wrapped, EventBridge, and garbage) and the orders-csv row validator and mapper.
//! Neither may panic; every event is an event or a reason; every row is written or rejected with a
//! reason, and written + rejected = rows.

use crate::support::scan_check::{check_scan, check_schema_scan};
use offload_agent::config::{
    AttrSource, AttrType, Attribute, DateFormat, Empty, Format, Schema, Trim,
};
use offload_agent::event::{decode_key, parse, Event};
use proptest::prelude::*;
use serde_json::json;

const HEADER: &str = "Region,Country,ItemType,SalesChannel,OrderPriority,OrderDate,OrderId,ShipDate,UnitSold,UnitPrice,TotalRevenue,TotalCost,TotalProfit";

/// A key as S3 would encode it in a notification: form-urlencoded.
fn encode_key(key: &str) -> String {
    percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%20", "+")
}

fn s3_event(bucket: &str, key: &str, etag: &str) -> serde_json::Value {
    json!({"Records": [{
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": encode_key(key), "size": 3, "eTag": etag}}
    }]})
}

fn expect_object(ev: Event, bucket: &str, key: &str) {
    match ev {
        Event::Objects { objects, ignored } => {
            assert_eq!(ignored, 0);
            assert_eq!(objects.len(), 1);
            assert_eq!(objects[0].bucket, bucket);
            assert_eq!(objects[0].key, key);
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Garbage never panics: it is an event or a reason.
    #[test]
    fn any_text_is_an_event_or_a_reason(body in any::<String>()) {
        match parse(&body) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.0.is_empty()),
        }
    }

    /// JSON of any shape never panics either.
    #[test]
    fn any_json_is_an_event_or_a_reason(v in arb_json()) {
        let _ = parse(&v.to_string());
        let _ = parse(&json!({"Type": "Notification", "Message": v.to_string()}).to_string());
        let _ = parse(&json!({"Records": [v.clone()]}).to_string());
        let _ = parse(&json!({"source": "aws.s3", "detail": v}).to_string());
    }

    /// Any key survives the three envelopes exactly (S3's form encoding decoded once).
    #[test]
    fn keys_round_trip_through_every_envelope(key in "\\PC{1,60}", etag in "[0-9a-f]{32}") {
        let direct = s3_event("bucket-1", &key, &etag);
        expect_object(parse(&direct.to_string()).unwrap(), "bucket-1", &key);
        let sns = json!({"Type": "Notification", "Message": direct.to_string()});
        expect_object(parse(&sns.to_string()).unwrap(), "bucket-1", &key);
        let bridge = json!({
            "source": "aws.s3",
            "detail-type": "Object Created",
            "detail": {"bucket": {"name": "bucket-1"}, "object": {"key": encode_key(&key), "size": 3, "etag": etag}}
        });
        expect_object(parse(&bridge.to_string()).unwrap(), "bucket-1", &key);
        prop_assert_eq!(decode_key(&encode_key(&key)).unwrap(), key);
    }

    /// Rows of random fields (some valid, most not): no panic, and every row is either written as an
    /// item with 16 attributes or rejected with a reason and its line.
    #[test]
    fn every_row_is_an_item_or_a_reject(
        rows in prop::collection::vec(prop_oneof![valid_row(), arb_row()], 0..40)
    ) {
        let mut text = format!("{HEADER}\n");
        for r in &rows {
            text.push_str(r);
            text.push('\n');
        }
        check_scan(text.as_bytes(), 64 * 1024);
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// A mutation fuzzer over the checked-in corpus (`tests/corpus/`, also uploaded end to end by
    /// tests/it/worker.rs): bytes overwritten, inserted (quotes, separators, newlines, NUL, invalid UTF-8)
    /// and the file cut short, then scanned with a small `max_line_bytes`.
    #[test]
    fn mutated_corpus_files_never_break_the_accounting(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                Just(b'"'), Just(b','), Just(b'\n'), Just(b'\r'), Just(0u8), Just(0xffu8), any::<u8>()
            ], any::<bool>()),
            0..12,
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let files = corpus();
        let mut bytes = files[pick.index(files.len())].clone();
        for (at, b, insert) in edits {
            let i = at.index(bytes.len() + 1);
            if insert || i == bytes.len() {
                bytes.insert(i, b);
            } else {
                bytes[i] = b;
            }
        }
        bytes.truncate(cut.index(bytes.len() + 1).max(bytes.len() / 2));
        check_scan(&bytes, 4096);
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
        Just(json!("aws:s3")),
        Just(json!("ObjectCreated:Put")),
        Just(json!("Notification")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("Records".to_string()),
                    Just("s3".to_string()),
                    Just("bucket".to_string()),
                    Just("object".to_string()),
                    Just("key".to_string()),
                    Just("name".to_string()),
                    Just("eventSource".to_string()),
                    Just("eventName".to_string()),
                    Just("Message".to_string()),
                    Just("Type".to_string()),
                    Just("detail".to_string()),
                    "[a-zA-Z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A row that is valid unless its id repeats or is blank.
fn valid_row() -> impl Strategy<Value = String> {
    ("[0-9a-z ]{1,6}", 0u32..100_000).prop_map(|(id, n)| {
        format!("Asia,Japan,Cereal,Online,H,3/7/2017,{id},4/1/2017,{n},205.70,20570.00,11770.00,8800.00")
    })
}

/// One CSV line: 13 fields drawn from valid values, edge cases and noise.
fn arb_row() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("Asia".to_string()),
        Just("".to_string()),
        Just(" ".to_string()),
        Just("3/7/2017".to_string()),
        Just("2017-02-30".to_string()),
        Just("2016-02-29".to_string()),
        Just("100".to_string()),
        Just("-0.5".to_string()),
        Just("1e5".to_string()),
        Just(format!("1{}", "0".repeat(130))),
        Just("\"quoted, with comma\"".to_string()),
        Just("\u{a0}42\u{3000}".to_string()),
        "[0-9]{1,12}",
        "\\PC{0,12}".prop_map(|s| s.replace(['"', '\n', '\r'], "")),
    ];
    prop::collection::vec(field, 11..15).prop_map(|f| f.join(","))
}

/// A schema of 1 to 6 attributes of any type and emptiness, read from a CSV (any of four delimiters,
/// with or without a header) or JSON lines; its first attribute the key, an id attribute.
fn arb_schema() -> impl Strategy<Value = Schema> {
    let kind = prop_oneof![
        Just(AttrType::S),
        Just(AttrType::N { integer: false }),
        Just(AttrType::N { integer: true }),
        Just(AttrType::Bool),
        Just(AttrType::Date {
            formats: vec![
                DateFormat::parse("YYYY-MM-DD").unwrap(),
                DateFormat::parse("D/M/YYYY").unwrap()
            ]
        }),
    ];
    let empty = prop_oneof![Just(Empty::Reject), Just(Empty::Omit), Just(Empty::Keep)];
    (
        prop::collection::vec((kind, empty), 1..7),
        prop_oneof![Just(b','), Just(b';'), Just(b'\t'), Just(b'|')],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(attrs, delimiter, header, jsonl)| {
            let attributes = attrs
                .into_iter()
                .enumerate()
                .map(|(i, (kind, empty))| {
                    let name = format!("a{i}");
                    let (kind, empty) = match (i, kind, empty) {
                        // The key: a string or number, required.
                        (0, AttrType::Bool, _) => (AttrType::S, Empty::Reject),
                        (0, k, _) => (k, Empty::Reject),
                        (_, AttrType::S, e) => (AttrType::S, e),
                        (_, k, Empty::Keep) => (k, Empty::Omit),
                        (_, k, e) => (k, e),
                    };
                    let source = if jsonl {
                        AttrSource::Path(vec![name.clone()])
                    } else if header {
                        AttrSource::Column(name.clone())
                    } else {
                        AttrSource::Position(i)
                    };
                    Attribute {
                        name,
                        source,
                        kind,
                        empty,
                    }
                })
                .collect();
            Schema {
                format: if jsonl {
                    Format::Jsonl
                } else {
                    Format::Csv {
                        delimiter,
                        quote: b'"',
                        header,
                    }
                },
                attributes,
                partition_key: "a0".into(),
                sort_key: None,
                trim: Trim::Unicode,
                id_attribute: Some("Id".into()),
                output_columns: vec!["a0".into(), "Id".into()],
                label: "a generated schema's file".into(),
            }
        })
}

/// A line for a schema: a CSV line or a JSON object of plausible and implausible values.
fn arb_line() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just(String::new()),
        "[0-9]{1,4}(\\.[0-9]{1,3})?",
        "(true|false|yes|0|1|maybe)",
        "20[0-9]{2}-[01][0-9]-[0-3][0-9]",
        "[0-9]{1,2}/[0-9]{1,2}/20[0-9]{2}",
        "\\PC{0,8}",
        "\"[a-z,;|\t\r\n]{0,6}\"",
    ];
    prop::collection::vec(value, 0..8)
        .prop_flat_map(|vals| {
            (
                Just(vals),
                any::<bool>(),
                prop_oneof![Just(","), Just(";"), Just("\t"), Just("|")],
            )
        })
        .prop_map(|(vals, json, sep)| {
            if json {
                let fields: Vec<String> = vals
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("\"a{i}\":{}", serde_json::Value::String(v.clone())))
                    .collect();
                format!("{{{}}}", fields.join(","))
            } else {
                vals.join(sep)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any lines (and any bytes) against a generated schema: the accounting holds, no panic, every
    /// reject's line inside the file.
    #[test]
    fn any_file_against_a_generated_schema_is_accounted_for(
        schema in arb_schema(),
        lines in prop::collection::vec(arb_line(), 0..30),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        ends in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
    ) {
        let mut text = String::new();
        if let Format::Csv { header: true, delimiter, .. } = schema.format {
            let names: Vec<&str> = schema.attributes.iter().map(|a| a.name.as_str()).collect();
            text.push_str(&names.join(&(delimiter as char).to_string()));
            text.push_str(ends);
        }
        for l in &lines {
            text.push_str(l);
            text.push_str(ends);
        }
        let mut bytes = text.into_bytes();
        check_schema_scan(&schema, &bytes, 64 * 1024);
        bytes.extend(noise);
        check_schema_scan(&schema, &bytes, 256);
    }
}
