//! The built-in `table` processor: the rows of a CSV or JSON-lines file of a declared schema into
//! DynamoDB, plus an output CSV and a rejects report. `orders-csv` is this processor with the built-in
//! orders schema ([`crate::config::Schema::orders`]).
//!
//! A file is read twice from the spool, never held in memory:
//! 1. a quick pass over the key fields fills a Bloom filter; keys that *may* repeat become candidates
//!    (an exact set that stays small: true repeats plus ~1% false positives), so duplicate detection
//!    needs memory for the candidates only, not for every key in a multi-gigabyte file;
//! 2. the full pass validates every row. Valid rows go, in batches of 25, through a bounded channel to
//!    asynchronous `BatchWriteItem` calls; their output columns go to the output file; invalid rows go
//!    to the rejects file with their line number and reason.
//!
//! Nothing is dropped: `written + rejected = data rows`, and both files are uploaded only after every
//! write was acknowledged.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
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
use crate::config::{Config, Format, Pipeline, Schema};
use crate::error::ProcessError;
use crate::limits::{
    DYNAMODB_MAX_BATCH_WRITE, DYNAMODB_MAX_ITEM_BYTES, DYNAMODB_MAX_PARTITION_KEY_BYTES,
    DYNAMODB_MAX_SORT_KEY_BYTES, S3_MAX_KEY_BYTES,
};

mod load;
mod records;
mod scan;
mod schema;
mod values;

pub use load::RowAt;
use load::*;
pub use records::READ_AHEAD;
use records::*;
pub use scan::*;
pub use schema::*;
pub use values::*;

/// The table processor of one pipeline.
pub struct Table {
    writer: BatchWriter,
    write_concurrency: usize,
    max_line_bytes: u64,
    plan: Arc<Plan>,
    name: String,
}

impl Table {
    pub(crate) fn new(pipeline: &Pipeline, schema: &Schema, cfg: &Config, ctx: &Context) -> Table {
        let attempts = cfg.dynamodb.write_max_attempts;
        Table {
            writer: BatchWriter {
                ddb: ctx.dynamodb_writer(attempts),
                metrics: ctx.metrics.clone(),
                table: pipeline.table.clone().unwrap_or_default(),
                max_attempts: attempts,
            },
            write_concurrency: cfg.dynamodb.write_concurrency,
            max_line_bytes: cfg.spool.max_line_bytes,
            plan: Arc::new(Plan::new(schema)),
            name: pipeline.processor.to_string(),
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
                item_overhead: self.plan.item_overhead(&src),
            },
            plan: self.plan.clone(),
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
            tracing::info!(columns = ?rows.extra_columns, processor = %self.name, "{}: ignoring the columns the schema of {} does not use: {}", job.object.url(), self.name, rows.extra_columns.join(", "));
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

impl Processor for Table {
    fn process<'a>(&'a self, job: &'a Job<'a>) -> ProcessFuture<'a> {
        Box::pin(self.run(job))
    }
}

/// Where the rejects report of `output_key` goes.
pub fn rejects_key(output_key: &str) -> String {
    format!("{output_key}.rejects.csv")
}

/// `process --dry-run`: validate a local file against `plan`, print each reject to `out`, write nothing
/// anywhere.
pub fn dry_run(
    path: &Path,
    plan: &Plan,
    limits: ScanLimits,
    progress: Option<Arc<AtomicU64>>,
    out: &mut dyn Write,
) -> Result<ScanOutcome, FileError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(rejects_header(plan)).map_err(io_of)?;
    let outcome = scan(
        path,
        plan,
        limits,
        progress,
        None,
        |line, key, reason| write_reject(&mut w, line, key, reason),
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
    const ORDER_DATE: usize = 5;
    const ORDER_ID: usize = 6;
    const UNIT_SOLD: usize = 8;

    fn orders() -> Plan {
        Plan::new(&Schema::orders())
    }

    fn run(text: &str) -> (Result<ScanOutcome, FileError>, Rejects, Vec<Row>) {
        run_limited(text, 4096)
    }

    fn run_limited(
        text: &str,
        max_line_bytes: u64,
    ) -> (Result<ScanOutcome, FileError>, Rejects, Vec<Row>) {
        run_plan(&orders(), text, max_line_bytes)
    }

    fn run_plan(
        plan: &Plan,
        text: &str,
        max_line_bytes: u64,
    ) -> (Result<ScanOutcome, FileError>, Rejects, Vec<Row>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, text).unwrap();
        let mut rejects = Vec::new();
        let mut valid = Vec::new();
        let r = scan(
            &p,
            plan,
            ScanLimits {
                max_line_bytes,
                item_overhead: 0,
            },
            None,
            None,
            |l, key, r| {
                rejects.push((l, key.join(","), r.to_string()));
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
        assert_eq!(valid[0].field(ORDER_DATE), "2017-03-07");
        assert_eq!(valid[1].field(ORDER_ID), "3");
    }

    #[test]
    fn columns_are_matched_by_name_and_extra_ones_reported() {
        let text = "OrderId,Extra,TotalProfit,TotalCost,TotalRevenue,UnitPrice,UnitSold,ShipDate,OrderDate,OrderPriority,SalesChannel,ItemType,Country,Region\n\
                    9,x,1,2,3,4,5,1/2/2020,1/1/2020,L,Offline,Fruits,France,Europe\n";
        let (r, rejects, valid) = run(text);
        let out = r.unwrap();
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(out.extra_columns, ["Extra"]);
        assert_eq!(valid[0].field(0), "Europe");
        assert_eq!(valid[0].field(UNIT_SOLD), "5");
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
        let ids: Vec<&str> = valid.iter().map(|v| v.field(ORDER_ID)).collect();
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
            &orders(),
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
            assert_eq!(valid[1].field(ORDER_ID), "5");
        }
    }

    /// Records and their lines come out alike whatever the reads: a carriage return ending a read, a
    /// `\r\n` split between two, a quoted line end across a read, one byte at a time.
    #[test]
    fn records_are_read_alike_across_reads() {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let input = b"a,b\rc,d\r\n\r\n\"e\rf\",g\r\"h\"\"i\",j\n\n k,\"l\"x\rlast,";
        let want: Vec<(u64, Vec<&[u8]>)> = vec![
            (1, vec![b"a", b"b"]),
            (2, vec![b"c", b"d"]),
            (4, vec![b"e\rf", b"g"]),
            (6, vec![b"h\"i", b"j"]),
            (8, vec![b" k", b"lx"]),
            (9, vec![b"last", b""]),
        ];
        let csv = Format::Csv {
            delimiter: b',',
            quote: b'"',
            header: false,
        };
        for chunk in 1..=7 {
            let mut r = Records::new(Trickle(input, chunk), csv, 1 << 20, None).unwrap();
            let mut rec = Record::default();
            let mut got = Vec::new();
            loop {
                match r.next(&mut rec).unwrap() {
                    Next::End => break,
                    Next::TooLong(l) => panic!("line {l} too long"),
                    Next::Row(at) => got.push((
                        at.line,
                        (0..rec.len())
                            .map(|i| rec.get(i).unwrap().to_vec())
                            .collect::<Vec<_>>(),
                    )),
                }
            }
            let want: Vec<(u64, Vec<Vec<u8>>)> = want
                .iter()
                .map(|(l, f)| (*l, f.iter().map(|b| b.to_vec()).collect()))
                .collect();
            assert_eq!(got, want, "reads of {chunk} bytes");
        }
    }

    /// A packed batch gives back every row's fields, empty and omitted ones too, and builds the items
    /// the rows themselves make (a refused batch is written again from it).
    #[test]
    fn packed_batches_build_the_rows_items() {
        let src = Source {
            bucket: "b".into(),
            key: "k".into(),
            etag: "e".into(),
        };
        let plan = orders();
        let ids = ConfirmationIds::new(&src);
        let mut rows = Vec::new();
        let mut batch = Batch::new(plan.fields.len());
        for i in 0..BATCH_SIZE {
            let mut row = Row::default();
            for f in 0..plan.fields.len() {
                // Some fields empty, some multi-byte.
                if (i + f) % 5 != 0 {
                    row.text.push_str(&format!("{i}é{f}"));
                }
                row.ends.push(row.text.len());
                row.present.push(true);
            }
            let cid = ids.of(row.field(ORDER_ID)).to_string();
            batch.push(RowAt { line: i as u64 + 2 }, i as u64 + 1, &row, &cid);
            rows.push((row, cid));
        }
        assert_eq!(batch.len(), BATCH_SIZE);
        let items = Items::new(&plan, &src);
        let requests = batch.requests(&items).unwrap();
        let numbers = [
            "UnitSold",
            "UnitPrice",
            "TotalRevenue",
            "TotalCost",
            "TotalProfit",
        ];
        for (r, (row, cid)) in rows.iter().enumerate() {
            for f in 0..row.len() {
                assert_eq!(batch.field(r, f), Some(row.field(f)), "row {r} field {f}");
            }
            assert_eq!(batch.id(r), cid);
            // The item spelled out: S columns, N for UnitSold and money, the ids and the source.
            let mut expect: HashMap<String, AttributeValue> = plan
                .fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let v = row.field(i).to_string();
                    let av = if numbers.contains(&f.name.as_str()) {
                        AttributeValue::N(v)
                    } else {
                        AttributeValue::S(v)
                    };
                    (f.name.clone(), av)
                })
                .collect();
            expect.insert("ConfirmationId".into(), AttributeValue::S(cid.clone()));
            expect.insert("SourceBucket".into(), AttributeValue::S("b".into()));
            expect.insert("SourceKey".into(), AttributeValue::S("k".into()));
            assert_eq!(expect.len(), 16);
            assert_eq!(
                requests[r].put_request().unwrap().item(),
                &expect,
                "row {r}"
            );
            assert_eq!(batch.request(r, &items).unwrap(), requests[r]);
            // Should a clone ever iterate in another order, the values go in by name.
            let mut shuffled = items.clone();
            shuffled.slots.reverse();
            assert_eq!(
                shuffled.build(|i| Some(row.field(i)), cid),
                expect,
                "row {r}"
            );
        }
        // An omitted field is no attribute of the item.
        let mut row = rows[1].0.clone();
        row.present[0] = false;
        let mut one = Batch::new(plan.fields.len());
        one.push(RowAt { line: 2 }, 1, &row, "id");
        let item = one.request(0, &items).unwrap();
        let item = item.put_request().unwrap().item();
        assert!(!item.contains_key("Region") && item.len() == 15, "{item:?}");
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
            &orders(),
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

    /// The schema of a pipeline declared in TOML (`[pipeline.schema]` and its attributes).
    fn declared(schema: &str) -> Plan {
        let text = format!(
            "[queue]\nname='q'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='table'\ntable='t'\noutput_prefix='out/'\n{schema}"
        );
        let cfg =
            crate::config::from_toml_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        Plan::new(&cfg.pipelines[0].processor.schema().unwrap())
    }

    fn field<'a>(plan: &Plan, row: &'a Row, name: &str) -> Option<&'a str> {
        let i = plan.fields.iter().position(|f| f.name == name).unwrap();
        row.present(i).then(|| row.field(i))
    }

    /// A CSV with a composite key, an optional boolean, a number key compared by value and a date of
    /// its own format: every bad row rejected with its line and reason, the good ones typed.
    #[test]
    fn a_declared_csv_with_a_composite_key() {
        let plan = declared(
            r#"[pipeline.schema]
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
formats = ["DD.MM.YYYY"]
[[pipeline.schema.attribute]]
name = "Source"
object = "key"
"#,
        );
        let text = "customer,invoice,paid,amount,issued,extra\n\
                    c1,1,yes,10.50,01.02.2024,x\n\
                    c1,2,,3,02.02.2024,x\n\
                    c2,1,FALSE,1e2,29.02.2024,x\n\
                    c1,01,true,4,01.01.2024,x\n\
                    c3,x,true,4,01.01.2024,x\n\
                    c3,2,maybe,4,01.01.2024,x\n\
                    ,2,true,4,01.01.2024,x\n\
                    c4,3,true,4,31.02.2024,x\n\
                    c5,4,true,4\n";
        let (r, rejects, valid) = run_plan(&plan, text, 4096);
        let r = r.unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (9, 3, 6), "{rejects:?}");
        assert_eq!(r.extra_columns, ["extra"]);
        let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
        assert_eq!(lines, [5, 6, 7, 8, 9, 10]);
        assert!(
            rejects[0]
                .2
                .contains("duplicate key (CustomerId, InvoiceNo) (first seen on line 2)"),
            "{rejects:?}"
        );
        assert_eq!(rejects[0].1, "c1,01", "the duplicate's key as written");
        assert!(rejects[1].2.contains("InvoiceNo \"x\""), "{rejects:?}");
        assert!(
            rejects[2].2.contains("Paid \"maybe\" is not a boolean"),
            "{rejects:?}"
        );
        assert!(rejects[3].2.contains("CustomerId is empty"), "{rejects:?}");
        assert!(rejects[4].2.contains("(DD.MM.YYYY)"), "{rejects:?}");
        assert!(rejects[5].2.contains("expected 6 fields"), "{rejects:?}");
        assert_eq!(field(&plan, &valid[0], "Paid"), Some("true"));
        assert_eq!(
            field(&plan, &valid[1], "Paid"),
            None,
            "an empty optional field is left out"
        );
        assert_eq!(field(&plan, &valid[2], "Amount"), Some("100"));
        assert_eq!(field(&plan, &valid[2], "Issued"), Some("2024-02-29"));
        let src = Source {
            bucket: "b".into(),
            key: "in/x.csv".into(),
            etag: "e".into(),
        };
        let items = Items::new(&plan, &src);
        let item = items.build(|i| valid[1].present(i).then(|| valid[1].field(i)), "id");
        assert_eq!(item.get("InvoiceNo"), Some(&AttributeValue::N("2".into())));
        assert_eq!(
            item.get("Source"),
            Some(&AttributeValue::S("in/x.csv".into()))
        );
        assert!(!item.contains_key("Paid"));
        let item = items.build(|i| valid[0].present(i).then(|| valid[0].field(i)), "id");
        assert_eq!(item.get("Paid"), Some(&AttributeValue::Bool(true)));
        // The id is made of both key fields.
        let mut t = String::new();
        plan.id_text(|i| valid[0].field(i), &mut t);
        assert_eq!(t, "c1\n1");
    }

    /// A semicolon-delimited CSV without a header: fields by position, a BOM skipped, short rows
    /// rejected.
    #[test]
    fn a_declared_headerless_csv_by_position() {
        let plan = declared(
            r#"[pipeline.schema]
delimiter = ";"
header = false
partition_key = "Meter"
[[pipeline.schema.attribute]]
name = "Meter"
position = 2
[[pipeline.schema.attribute]]
name = "Reading"
position = 4
type = "N"
[[pipeline.schema.attribute]]
name = "Note"
position = 3
allow_empty = true
"#,
        );
        let text = "\u{feff}x;m1;;12,5\nx;m2;hello;12.5;more\r\nx;m3\nx;m1;;1\n";
        let (r, rejects, valid) = run_plan(&plan, text, 4096);
        let r = r.unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (4, 2, 2), "{rejects:?}");
        assert_eq!((rejects[0].0, rejects[0].1.as_str()), (1, "m1"));
        assert!(
            rejects[0]
                .2
                .contains("Reading \"12,5\" is not a decimal number"),
            "{rejects:?}"
        );
        assert!(
            rejects[1].2.contains("expected at least 4 fields, found 2"),
            "{rejects:?}"
        );
        assert_eq!(field(&plan, &valid[0], "Note"), Some("hello"));
        assert_eq!(field(&plan, &valid[0], "Meter"), Some("m2"));
        // m1's first row was rejected, so its second is no duplicate; its empty note is written "".
        assert_eq!(field(&plan, &valid[1], "Meter"), Some("m1"));
        assert_eq!(field(&plan, &valid[1], "Note"), Some(""));
    }

    /// A delimiter between the bytes of one character, in a record with a quoted field (the fuzzer's
    /// find): the row is rejected as not UTF-8; no field boundary falls inside a character.
    #[test]
    fn a_character_split_by_a_delimiter_is_a_rejected_row() {
        let plan = declared(
            r#"[pipeline.schema]
delimiter = ";"
header = false
partition_key = "A"
[[pipeline.schema.attribute]]
name = "A"
position = 1
[[pipeline.schema.attribute]]
name = "B"
position = 2
"#,
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, b"\"q\";\xEF;\xBB\xBF\nok;\xC3\xA9\n").unwrap();
        let mut rejects = Vec::new();
        let limits = ScanLimits {
            max_line_bytes: 4096,
            item_overhead: 0,
        };
        let r = scan(
            &p,
            &plan,
            limits,
            None,
            None,
            |l, _, why| {
                rejects.push((l, why.to_string()));
                Ok(())
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (2, 1, 1));
        assert!(rejects[0].1.contains("not UTF-8"), "{rejects:?}");
    }

    /// JSON lines with nested fields: bad lines of every kind rejected with their lines.
    #[test]
    fn declared_json_lines_with_nested_fields() {
        let plan = declared(
            r#"[pipeline.schema]
format = "jsonl"
partition_key = "Trade"
id_attribute = "Id"
output_columns = ["Trade", "Id", "Qty"]
[[pipeline.schema.attribute]]
name = "Trade"
path = "trade.id"
[[pipeline.schema.attribute]]
name = "Qty"
path = "trade.qty"
type = "N"
[[pipeline.schema.attribute]]
name = "Desk"
path = "desk"
optional = true
[[pipeline.schema.attribute]]
name = "Live"
type = "BOOL"
"#,
        );
        let text = concat!(
            "{\"trade\":{\"id\":\"t1\",\"qty\":100000000000000000000000000001},\"desk\":\"fx\",\"Live\":true}\n",
            "\n",
            "{\"trade\":{\"id\":\"t2\",\"qty\":\"7\"},\"Live\":\"no\",\"other\":[1,2]}\r\n",
            "not json\n",
            "{\"trade\":{\"id\":\"t3\",\"qty\":{\"n\":1}},\"Live\":true}\n",
            "{\"trade\":{\"qty\":1},\"Live\":true}\n",
            "[1,2]\n",
            "{\"trade\":{\"id\":\"t1\",\"qty\":1},\"Live\":false}\n",
            "{\"trade\":{\"id\":\"t\\u00e9\",\"qty\":2.50},\"desk\":null,\"Live\":0}"
        );
        let (r, rejects, valid) = run_plan(&plan, text, 4096);
        let r = r.unwrap();
        assert_eq!((r.rows, r.written, r.rejected), (8, 3, 5), "{rejects:?}");
        let lines: Vec<u64> = rejects.iter().map(|r| r.0).collect();
        assert_eq!(lines, [4, 5, 6, 7, 8], "{rejects:?}");
        assert!(rejects[0].2.contains("not a JSON object"), "{rejects:?}");
        assert!(rejects[1].2.contains("Qty is an object"), "{rejects:?}");
        assert!(rejects[2].2.contains("Trade is empty"), "{rejects:?}");
        assert!(rejects[3].2.contains("not a JSON object"), "{rejects:?}");
        assert!(
            rejects[4]
                .2
                .contains("duplicate Trade (first seen on line 1)"),
            "{rejects:?}"
        );
        assert_eq!(
            field(&plan, &valid[0], "Qty"),
            Some("100000000000000000000000000001"),
            "numbers keep every digit"
        );
        assert_eq!(field(&plan, &valid[0], "Desk"), Some("fx"));
        assert_eq!(field(&plan, &valid[1], "Live"), Some("false"));
        assert_eq!(field(&plan, &valid[1], "Desk"), None);
        assert_eq!(field(&plan, &valid[2], "Trade"), Some("té"));
        assert_eq!(field(&plan, &valid[2], "Qty"), Some("2.50"));
    }

    #[test]
    fn numbers_compare_by_value_and_dates_by_format() {
        for (a, b) in [
            ("1", "1"),
            ("-01.50", "-1.5"),
            ("0.0", "0"),
            ("-0", "0"),
            ("+7", "7"),
            ("10", "10"),
            ("1.", "1"),
        ] {
            assert_eq!(canonical_number(a), b, "{a}");
        }
        let f = crate::config::DateFormat::parse("D.M.YYYY").unwrap();
        let mut out = String::new();
        assert!(parse_date_as("9.12.2024", &f, &mut out));
        assert_eq!(out, "2024-12-09");
        assert!(!parse_date_as("9.13.2024", &f, &mut String::new()));
        assert!(!parse_date_as("9.12.24", &f, &mut String::new()));
        for bad in ["YYYY", "MD/YYYY", "YYYY-MM-DDx", "YY-MM-DD", "YYYY-MMM-DD"] {
            assert!(crate::config::DateFormat::parse(bad).is_err(), "{bad}");
        }
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
