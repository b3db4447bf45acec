//! Declared table schemas end to end: the daemon against the AWS emulator loads three kinds of the
//! user's own files (a CSV with a composite key, an optional column and a boolean; a semicolon CSV
//! without a header; JSON lines with nested fields), plain and gzip- or zstd-compressed (known by
//! suffix, by `Content-Encoding`, by magic bytes alone), and refuses a decompression bomb.
//! `provision` creates each pipeline's table with its schema's key. Needs moto (`scripts/test`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(90);

const PIPELINES: &str = r#"
[[pipeline]]
name = "invoices"
bucket = "{bucket}"
prefix = "inv/"
processor = "table"
table = "{bucket}-inv"
output_prefix = "inv-out/"
[pipeline.schema]
partition_key = "CustomerId"
sort_key = "InvoiceNo"
id_attribute = "ConfirmationId"
[[pipeline.schema.attribute]]
name = "CustomerId"
column = "customer"
[[pipeline.schema.attribute]]
name = "InvoiceNo"
column = "invoice"
type = "N"
integer = true
[[pipeline.schema.attribute]]
name = "Paid"
column = "paid"
type = "BOOL"
optional = true
[[pipeline.schema.attribute]]
name = "Amount"
column = "amount"
type = "N"
[[pipeline.schema.attribute]]
name = "Issued"
column = "issued"
type = "date"
formats = ["DD.MM.YYYY", "YYYY-MM-DD"]

[[pipeline]]
name = "meters"
bucket = "{bucket}"
prefix = "met/"
processor = "table"
table = "{bucket}-met"
output_prefix = "met-out/"
[pipeline.schema]
delimiter = ";"
header = false
partition_key = "Meter"
sort_key = "At"
output_columns = ["Meter", "At", "Reading"]
[[pipeline.schema.attribute]]
name = "Meter"
position = 1
[[pipeline.schema.attribute]]
name = "At"
position = 2
type = "date"
[[pipeline.schema.attribute]]
name = "Reading"
position = 3
type = "N"
[[pipeline.schema.attribute]]
name = "Site"
value = "plant-7"

[[pipeline]]
name = "trades"
bucket = "{bucket}"
prefix = "trd/"
processor = "table"
table = "{bucket}-trd"
output_prefix = "trd-out/"
[pipeline.schema]
format = "jsonl"
partition_key = "Trade"
id_attribute = "Id"
[[pipeline.schema.attribute]]
name = "Trade"
path = "trade.id"
[[pipeline.schema.attribute]]
name = "Qty"
path = "trade.qty"
type = "N"
[[pipeline.schema.attribute]]
name = "Desk"
path = "desk.name"
optional = true
[[pipeline.schema.attribute]]
name = "Live"
type = "BOOL"
"#;

const INVOICES: &str = "customer,invoice,paid,amount,issued\n\
c1,1,yes,10.50,01.02.2024\n\
c1,2,,3,2024-02-02\n\
c2,1,FALSE,1e2,29.02.2024\n\
c1,01,true,4,01.01.2024\n\
c3,x,true,4,01.01.2024\n\
c3,2,maybe,4,01.01.2024\n\
,2,true,4,01.01.2024\n\
c4,3,true,4,31.02.2024\n\
c5,4,true\n";

const METERS: &str = "m1;2024-01-01;12.5\r\nm1;2024-01-02;13\r\nm2;2024-01-01;x\r\n\r\nm1;2024-01-01;14\r\nm3;2024-13-01;1\r\nm3\r\n";

const TRADES: &str = concat!(
    "{\"trade\":{\"id\":\"t1\",\"qty\":100},\"desk\":{\"name\":\"fx\"},\"Live\":true}\n",
    "{\"trade\":{\"id\":\"t2\",\"qty\":\"7.5\"},\"Live\":\"no\"}\n",
    "{\"trade\":{\"id\":\"t3\",\"qty\":[1]},\"Live\":true}\n",
    "{oops\n",
    "{\"trade\":{\"id\":\"t1\",\"qty\":1},\"Live\":false}\n",
    "{\"trade\":{\"id\":\"t4\",\"qty\":1e400},\"Live\":true}\n",
);

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

async fn put_encoded(w: &World, key: &str, body: Vec<u8>, encoding: &str) {
    w.clients
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(key)
        .content_encoding(encoding)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap();
}

async fn scan(w: &World, table: &str) -> Vec<HashMap<String, AttributeValue>> {
    let out = w
        .clients
        .dynamodb
        .scan()
        .table_name(table)
        .send()
        .await
        .unwrap();
    out.items().to_vec()
}

/// The rejects report's lines and reasons (each a line of its own; the key columns between).
fn rejects(text: &[u8]) -> Vec<(u64, String)> {
    let mut rdr = csv::Reader::from_reader(text);
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].parse().unwrap(), r[r.len() - 1].to_string())
        })
        .collect()
}

/// Items by their key, without the attributes that differ per object (the id, the source).
fn typed(
    items: Vec<HashMap<String, AttributeValue>>,
    key: &[&str],
) -> BTreeMap<String, BTreeMap<String, String>> {
    items
        .into_iter()
        .map(|item| {
            let k: Vec<String> = key.iter().map(|k| format!("{:?}", item[*k])).collect();
            let rest = item
                .into_iter()
                .filter(|(n, _)| n != "ConfirmationId" && n != "Id")
                .map(|(n, v)| (n, format!("{v:?}")))
                .collect();
            (k.join("|"), rest)
        })
        .collect()
}

/// Three declared schemas, each file plain and compressed four ways: the same rejects at the same
/// lines for every variant, the tables holding exactly the good items with the declared types, the
/// outputs listing them.
#[tokio::test(flavor = "multi_thread")]
async fn declared_schemas_load_plain_and_compressed_files_alike() {
    let w = World::with(
        "tables",
        Options {
            extra: PIPELINES.to_string(),
            ..Options::default()
        },
    )
    .await;
    let files = [("inv", INVOICES), ("met", METERS), ("trd", TRADES)];
    for (p, text) in files {
        let body = text.as_bytes();
        w.put(&format!("{p}/plain.txt"), body.to_vec()).await;
        w.put(&format!("{p}/suffix.txt.gz"), gzip(body)).await;
        put_encoded(&w, &format!("{p}/header.txt"), gzip(body), "gzip").await;
        w.put(&format!("{p}/magic.txt"), zstd(body)).await;
        w.put(&format!("{p}/suffix.txt.zst"), zstd(body)).await;
    }
    let agent = w.start();
    let expected_rejects: HashMap<&str, Vec<u64>> = [
        ("inv", vec![5, 6, 7, 8, 9, 10]),
        ("met", vec![3, 5, 6, 7]),
        ("trd", vec![3, 4, 5, 6]),
    ]
    .into();
    let good: HashMap<&str, usize> = [("inv", 3), ("met", 2), ("trd", 2)].into();
    for (p, _) in files {
        let mut seen: Option<Vec<(u64, String)>> = None;
        for name in [
            "plain.txt",
            "suffix.txt.gz",
            "header.txt",
            "magic.txt",
            "suffix.txt.zst",
        ] {
            let out = w.wait_for(&format!("{p}-out/{name}"), WAIT, &agent).await;
            let out = String::from_utf8(out).unwrap();
            assert_eq!(
                out.lines().count(),
                good[p] + 1,
                "{p}/{name} output:\n{out}"
            );
            let r = w
                .get(&format!("{p}-out/{name}.rejects.csv"))
                .await
                .unwrap_or_else(|| panic!("{p}/{name}: no rejects report"));
            let r = rejects(&r);
            let lines: Vec<u64> = r.iter().map(|r| r.0).collect();
            assert_eq!(lines, expected_rejects[p], "{p}/{name}: {r:?}");
            match &seen {
                None => seen = Some(r),
                Some(first) => assert_eq!(&r, first, "{p}/{name} rejects differ from plain"),
            }
        }
    }
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());

    let s = |v: &str| format!("{:?}", AttributeValue::S(v.into()));
    let n = |v: &str| format!("{:?}", AttributeValue::N(v.into()));
    let b = |v: bool| format!("{:?}", AttributeValue::Bool(v));
    let inv = typed(
        scan(&w, &format!("{}-inv", w.bucket)).await,
        &["CustomerId", "InvoiceNo"],
    );
    assert_eq!(inv.len(), 3, "{inv:#?}");
    let c1 = &inv[&format!("{}|{}", s("c1"), n("1"))];
    assert_eq!(c1["Paid"], b(true));
    assert_eq!(c1["Amount"], n("10.50"));
    assert_eq!(c1["Issued"], s("2024-02-01"));
    let c1b = &inv[&format!("{}|{}", s("c1"), n("2"))];
    assert!(
        !c1b.contains_key("Paid"),
        "an empty optional field is no attribute: {c1b:?}"
    );
    assert_eq!(inv[&format!("{}|{}", s("c2"), n("1"))]["Amount"], n("100"));

    let met = typed(
        scan(&w, &format!("{}-met", w.bucket)).await,
        &["Meter", "At"],
    );
    assert_eq!(met.len(), 2, "{met:#?}");
    let m1 = &met[&format!("{}|{}", s("m1"), s("2024-01-01"))];
    assert_eq!(m1["Reading"], n("12.5"));
    assert_eq!(m1["Site"], s("plant-7"));
    let out = w.get("met-out/plain.txt").await.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap().replace("\r\n", "\n"),
        "Meter,At,Reading\nm1,2024-01-01,12.5\nm1,2024-01-02,13\n"
    );

    let trd = typed(scan(&w, &format!("{}-trd", w.bucket)).await, &["Trade"]);
    assert_eq!(trd.len(), 2, "{trd:#?}");
    assert_eq!(trd[&s("t1")]["Desk"], s("fx"));
    assert_eq!(trd[&s("t1")]["Qty"], n("100"));
    assert_eq!(trd[&s("t2")]["Live"], b(false));
    assert!(!trd[&s("t2")].contains_key("Desk"));
}

/// A small object that decompresses far past the ratio limit is a permanent failure with the reason
/// (error report, dead-letter queue), and the daemon's memory stays bounded while it refuses it;
/// an object that claims gzip but is not is refused the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_decompression_bomb_fails_its_file_and_nothing_else() {
    let w = World::with(
        "bomb",
        Options {
            extra: "[[pipeline]]\nname = \"zipped\"\nbucket = \"{bucket}\"\nprefix = \"gz/\"\n\
                    processor = \"orders-csv\"\ntable = \"{bucket}-gz\"\noutput_prefix = \"gz-out/\"\n"
                .to_string(),
            ..Options::default()
        },
    )
    .await;
    let zeros = vec![b'0'; 256 << 20];
    let bomb = gzip(&zeros);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    w.put("gz/bomb.csv.gz", bomb).await;
    w.put("gz/liar.csv.gz", orders_csv(0, 3)).await;
    w.put("gz/fine.csv.gz", gzip(orders_csv(0, 30).as_bytes()))
        .await;
    let agent = w.start();
    let out = w.wait_for("gz-out/fine.csv.gz", WAIT, &agent).await;
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 31);
    let report = w
        .wait_for("gz-out/errors/gz/bomb.csv.gz.json", WAIT, &agent)
        .await;
    let report = String::from_utf8(report).unwrap();
    assert!(
        report.contains("max_compression_ratio") && report.contains("decompression bomb"),
        "{report}"
    );
    let report = w
        .wait_for("gz-out/errors/gz/liar.csv.gz.json", WAIT, &agent)
        .await;
    let report = String::from_utf8(report).unwrap();
    assert!(report.contains("suffix says gzip"), "{report}");
    w.wait_queue_empty(WAIT, &agent).await;
    let dead = w.drain_dlq().await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    // The bound: what the daemon takes anyway, plus the ratio's grace (16 MiB) and a chunk times the
    // ratio; far below the bomb's 256 MiB.
    assert!(hwm < 160 * 1024, "peak RSS {hwm} kB");
    assert!(w.get("gz-out/bomb.csv.gz").await.is_none());
}
