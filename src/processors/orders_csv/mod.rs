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

use super::batch_writer::{BatchWriter, WriteError};
use super::{Context, Job, Outcome, Output, ProcessFuture, Processor, RowCounts};
use crate::config::{Config, Pipeline};
use crate::error::ProcessError;
use crate::limits::{
    DYNAMODB_MAX_BATCH_WRITE, DYNAMODB_MAX_ITEM_BYTES, DYNAMODB_MAX_PARTITION_KEY_BYTES,
    S3_MAX_KEY_BYTES,
};

mod load;
mod records;
mod scan;
mod schema;
mod values;

pub use load::RowAt;
use load::*;
use records::*;
pub use scan::*;
pub use schema::*;
pub use values::*;

/// The `orders-csv` processor of one pipeline.
pub struct OrdersCsv {
    writer: BatchWriter,
    write_concurrency: usize,
    max_line_bytes: u64,
}

impl OrdersCsv {
    pub(crate) fn new(pipeline: &Pipeline, cfg: &Config, ctx: &Context) -> OrdersCsv {
        let attempts = cfg.dynamodb.write_max_attempts;
        OrdersCsv {
            writer: BatchWriter {
                ddb: ctx.dynamodb_writer(attempts),
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
