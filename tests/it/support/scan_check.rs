//! The accounting every scan of any input must satisfy; used by the property tests
//! (`tests/properties.rs`) and the `orders_csv` fuzz target (`fuzz/`), so that both check the same.

use offload_agent::config::Schema;
use offload_agent::processors::table::{scan, Items, Plan, ScanLimits, Source};

/// Scan `bytes` as an orders file: no panic; every row is an item of 16 attributes with an OrderId,
/// or a reject with a reason and a line after the header's and within the file (whatever ends its lines:
/// `\n`, `\r\n` or a lone `\r`); written + rejected = rows; a file that is no orders CSV (a quote can
/// join lines into one unreadable record) gets a reason. Panics when one does not hold.
pub fn check_scan(bytes: &[u8], max_line_bytes: u64) {
    check_schema_scan_items(&Schema::orders(), bytes, max_line_bytes, Some(16));
}

/// Scan `bytes` against a declared `schema`: no panic; written + rejected = rows; every valid row has
/// its key and builds an item with every non-omitted attribute; every reject has a reason and a line
/// within the file (after the header, when it has one).
pub fn check_schema_scan(schema: &Schema, bytes: &[u8], max_line_bytes: u64) {
    check_schema_scan_items(schema, bytes, max_line_bytes, None)
}

/// [`check_schema_scan`], and every item has `attributes` attributes when given.
fn check_schema_scan_items(
    schema: &Schema,
    bytes: &[u8],
    max_line_bytes: u64,
    attributes: Option<usize>,
) {
    let line_ends = bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count() as u64;
    let header = matches!(
        schema.format,
        offload_agent::config::Format::Csv { header: true, .. }
    );
    let lines = if header { 2 } else { 1 }..=line_ends + 1;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in");
    std::fs::write(&path, bytes).unwrap();
    let src = Source {
        bucket: "b".into(),
        key: "k".into(),
        etag: "e".into(),
    };
    let plan = Plan::new(schema);
    let limits = ScanLimits {
        max_line_bytes,
        item_overhead: plan.item_overhead(&src),
    };
    let items = Items::new(&plan, &src);
    let key = schema
        .attributes
        .iter()
        .filter(|a| {
            !matches!(
                a.source,
                offload_agent::config::AttrSource::Value(_)
                    | offload_agent::config::AttrSource::Object(_)
            )
        })
        .position(|a| a.name == schema.partition_key)
        .unwrap();
    let (mut written, mut rejected) = (0u64, 0u64);
    let out = scan(
        &path,
        &plan,
        limits,
        None,
        None,
        |line, _, reason| {
            assert!(lines.contains(&line), "line {line} not in {lines:?}");
            assert!(!reason.is_empty());
            rejected += 1;
            Ok(())
        },
        |_, row| {
            assert!(!row.field(key).is_empty(), "a written row has its key");
            let item = items.build(|i| row.present(i).then(|| row.field(i)), "id");
            assert!(item.contains_key(&schema.partition_key));
            if let Some(n) = attributes {
                assert_eq!(item.len(), n);
            }
            written += 1;
            Ok(())
        },
    );
    match out {
        Ok(out) => {
            assert_eq!((out.written, out.rejected), (written, rejected));
            assert_eq!(out.rows, written + rejected);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
