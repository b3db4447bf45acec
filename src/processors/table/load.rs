//! Loading a scanned file into DynamoDB: rows packed into batches for the write tasks, refused rows
//! re-read and reported, the output and rejects files written.

use super::*;

/// What loading one file needs.
#[derive(Clone)]
pub(crate) struct Loader {
    pub(crate) writer: BatchWriter,
    pub(crate) write_concurrency: usize,
    pub(crate) limits: ScanLimits,
    pub(crate) plan: Arc<Plan>,
}

/// The spool files of one load: the input, and the output and rejects reports it produces.
#[derive(Debug, Clone)]
pub(crate) struct LoadFiles {
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) rejects: PathBuf,
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
pub(super) struct Batch {
    /// Each row's line, and its data row in the output file (1 = the first after the header).
    rows: Vec<(RowAt, u64)>,
    /// Every field of every row, then its id (as written to the output); field `i` of row `r` ends
    /// at `ends[r * width + i]`, and is present (not an omitted optional field) if `present[..]`.
    text: String,
    ends: Vec<usize>,
    present: Vec<bool>,
    width: usize,
}

impl Batch {
    pub(super) fn new(fields: usize) -> Batch {
        let width = fields + 1;
        Batch {
            rows: Vec::with_capacity(BATCH_SIZE),
            text: String::with_capacity(BATCH_SIZE * 128),
            ends: Vec::with_capacity(BATCH_SIZE * width),
            present: Vec::with_capacity(BATCH_SIZE * width),
            width,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn push(&mut self, at: RowAt, output_row: u64, row: &Row, id: &str) {
        for i in 0..row.len() {
            self.text.push_str(row.field(i));
            self.ends.push(self.text.len());
            self.present.push(row.present(i));
        }
        self.text.push_str(id);
        self.ends.push(self.text.len());
        self.present.push(true);
        self.rows.push((at, output_row));
    }

    /// Field `i` of row `r` (`None`: omitted); `i = fields` is the row's id.
    pub(super) fn field(&self, row: usize, i: usize) -> Option<&str> {
        let at = row * self.width + i;
        let start = if at == 0 { 0 } else { self.ends[at - 1] };
        self.present[at].then(|| &self.text[start..self.ends[at]])
    }

    pub(super) fn id(&self, row: usize) -> &str {
        self.field(row, self.width - 1).unwrap_or_default()
    }

    pub(super) fn key(&self, row: usize, plan: &Plan) -> Vec<String> {
        plan.key_fields()
            .map(|k| self.field(row, k).unwrap_or_default().to_string())
            .collect()
    }

    pub(super) fn request(&self, row: usize, items: &Items) -> Result<WriteRequest, ProcessError> {
        put_request(items.build(|i| self.field(row, i), self.id(row)))
    }

    pub(super) fn requests(&self, items: &Items) -> Result<Vec<WriteRequest>, ProcessError> {
        (0..self.len()).map(|r| self.request(r, items)).collect()
    }
}

/// A row DynamoDB refused although it passed validation (a secondary index key it does not take, a
/// limit it counts differently): rejected after the fact.
#[derive(Debug, Clone)]
pub(super) struct Refused {
    at: RowAt,
    output_row: u64,
    key: Vec<String>,
    reason: String,
}

impl Loader {
    /// Validate and write every row of `files.input`; fill `files.output` and `files.rejects`. Returns
    /// once every write was acknowledged (or with the first error that stopped it).
    pub(crate) async fn load(
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
        let plan = self.plan.clone();
        let reader = tokio::task::spawn_blocking(move || {
            write_reports(&files2, &plan, limits, &src2, progress, &stop, |batch| {
                tx.blocking_send(batch).map_err(|_| FileError::Stopped)
            })
        });
        let items = Arc::new(Items::new(&self.plan, src));

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
            first_line = batch.rows.first().map(|r| r.0.line),
            %reason,
            "DynamoDB refused a batch of {} rows from line {} for table {} ({reason}); writing its rows one at a time to find the refused ones",
            batch.len(),
            batch.rows.first().map_or(0, |r| r.0.line),
            self.writer.table
        );
        let mut refused = Vec::new();
        for (r, (at, output_row)) in batch.rows.iter().enumerate() {
            match self
                .writer
                .write(vec![batch.request(r, items)?], cancel)
                .await
            {
                Ok(()) => {}
                Err(WriteError::Failed(e)) => return Err(e),
                Err(WriteError::Refused(reason)) => refused.push(Refused {
                    at: *at,
                    output_row: *output_row,
                    key: batch.key(r, &self.plan),
                    reason: format!("DynamoDB refused the item: {reason}"),
                }),
            }
        }
        if refused.len() > 1 && refused.len() == batch.len() {
            // Not one row's data: the table takes none of these items (its key schema, say).
            return Err(ProcessError::Permanent(format!(
                "DynamoDB table {} refused every item of a batch of {} rows (lines {} to {}): {reason}; check \
                 the table's key schema ({}) and its indexes",
                self.writer.table,
                refused.len(),
                batch.rows[0].0.line,
                batch.rows[batch.len() - 1].0.line,
                self.plan.key_schema_shown(),
            )));
        }
        Ok(refused)
    }
}

pub(super) fn put_request(
    item: HashMap<String, AttributeValue>,
) -> Result<WriteRequest, ProcessError> {
    let put = PutRequest::builder()
        .set_item(Some(item))
        .build()
        .map_err(|e| {
            ProcessError::Transient(format!("cannot build a DynamoDB put request: {e}"))
        })?;
    Ok(WriteRequest::builder().put_request(put).build())
}

/// Move rows DynamoDB refused from the output to the rejects report (appended, with their lines).
pub(super) fn amend_reports(files: &LoadFiles, refused: Vec<Refused>) -> io::Result<()> {
    let gone: HashSet<u64> = refused.iter().map(|r| r.output_row).collect();
    let kept = files.output.with_extension("amended");
    {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(&files.output)
            .map_err(io_err)?;
        let mut w = csv::Writer::from_writer(io::BufWriter::new(File::create(&kept)?));
        let mut rec = csv::ByteRecord::new();
        let mut n = 0u64;
        while rdr.read_byte_record(&mut rec).map_err(io_err)? {
            if !gone.contains(&n) {
                w.write_byte_record(&rec).map_err(io_err)?;
            }
            n += 1;
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
        let line = r.at.line.to_string();
        let fields = std::iter::once(line.as_str())
            .chain(r.key.iter().map(String::as_str))
            .chain([r.reason.as_str()]);
        w.write_record(fields).map_err(io_err)?;
    }
    w.flush()
}

pub(super) fn io_err(e: csv::Error) -> io::Error {
    match io_of(e) {
        FileError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The header of a rejects report: `Line`, the key's attributes, `Reason`.
pub(super) fn rejects_header(plan: &Plan) -> Vec<String> {
    std::iter::once("Line".to_string())
        .chain(plan.key_fields().map(|k| plan.fields[k].name.clone()))
        .chain(["Reason".to_string()])
        .collect()
}

/// One line of a rejects report.
pub(super) fn write_reject(
    w: &mut csv::Writer<impl Write>,
    line: u64,
    key: &[String],
    reason: &str,
) -> Result<(), FileError> {
    let line = line.to_string();
    let fields = std::iter::once(line.as_str())
        .chain(key.iter().map(String::as_str))
        .chain([reason]);
    w.write_record(fields).map_err(io_of)
}

/// Where each output column gets its value: a field of the row, or its id.
pub(super) fn output_slots(plan: &Plan) -> Vec<Option<usize>> {
    plan.schema
        .output_columns
        .iter()
        .map(|c| plan.fields.iter().position(|f| &f.name == c))
        .collect()
}

/// The blocking half of a load: scan the input, write the output and rejects files, and hand batches of
/// write requests to `send`.
pub(super) fn write_reports(
    files: &LoadFiles,
    plan: &Plan,
    limits: ScanLimits,
    src: &Source,
    progress: Option<Arc<AtomicU64>>,
    cancel: &CancellationToken,
    mut send: impl FnMut(Batch) -> Result<(), FileError>,
) -> Result<ScanOutcome, FileError> {
    let mut output = csv::Writer::from_writer(io::BufWriter::new(File::create(&files.output)?));
    output
        .write_record(&plan.schema.output_columns)
        .map_err(io_of)?;
    let mut rejects = csv::Writer::from_writer(io::BufWriter::new(File::create(&files.rejects)?));
    rejects.write_record(rejects_header(plan)).map_err(io_of)?;
    let slots = output_slots(plan);
    let fields = plan.fields.len();
    let mut batch = Batch::new(fields);
    let ids = ConfirmationIds::new(src);
    let with_id = plan.schema.id_attribute.is_some();
    let mut id_text = String::new();
    let mut output_row = 0u64;
    let outcome = scan(
        &files.input,
        plan,
        limits,
        progress,
        Some(cancel),
        |line, key, reason| write_reject(&mut rejects, line, key, reason),
        |at, row| {
            let mut buf = Uuid::encode_buffer();
            let id: &str = if with_id {
                plan.id_text(|i| row.field(i), &mut id_text);
                ids.of(&id_text).hyphenated().encode_lower(&mut buf)
            } else {
                ""
            };
            for s in &slots {
                let v = match s {
                    Some(i) => row.field(*i),
                    None => id,
                };
                output.write_field(v).map_err(io_of)?;
            }
            output.write_record(None::<&[u8]>).map_err(io_of)?;
            output_row += 1;
            batch.push(at, output_row, row, id);
            if batch.len() == BATCH_SIZE {
                send(std::mem::replace(&mut batch, Batch::new(fields)))?;
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

pub(super) fn io_of(e: csv::Error) -> FileError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => FileError::Io(io),
        other => FileError::Io(io::Error::other(format!("{other:?}"))),
    }
}
