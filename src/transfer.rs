//! Moving bytes between S3 and the spool: streamed downloads, uploads (multipart when large), reports.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::byte_stream::Length;
use tokio::io::AsyncWriteExt;

use tokio_util::sync::CancellationToken;

use crate::compression::{self, DecompressError, Encoding, Stream};
use crate::error::{classify, describe, ErrorClass, ProcessError};
use crate::event::ObjectRef;

/// Objects up to this size are stored with one `PutObject`; larger ones in parts of this size.
pub const MULTIPART_PART_SIZE: u64 = 16 * 1024 * 1024;

/// What a download learnt about the object.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub etag: String,
    /// Bytes in the spool file (decompressed, when the object was compressed).
    pub bytes: u64,
    /// The object's compression and its compressed size, when it was decompressed on the way.
    pub compressed: Option<(Encoding, u64)>,
}

/// Writes a download into its spool file: as it comes, or through a decompression stream.
struct SpoolWriter<'a> {
    file: SpoolFile<'a>,
    stream: Option<Stream>,
}

/// The spool file and the bytes written to it.
struct SpoolFile<'a> {
    file: tokio::fs::File,
    path: &'a Path,
    written: u64,
}

impl SpoolFile<'_> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), ProcessError> {
        self.file.write_all(bytes).await.map_err(|e| {
            ProcessError::Transient(format!(
                "cannot write spool file {} (disk full?): {e}",
                self.path.display()
            ))
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl SpoolWriter<'_> {
    async fn write(&mut self, chunk: &[u8], url: &str) -> Result<(), ProcessError> {
        let Some(stream) = self.stream.as_mut() else {
            return self.file.put(chunk).await;
        };
        stream.feed(chunk).map_err(|e| undecompressable(url, e))?;
        self.drain().await
    }

    /// What the stream has decompressed, into the file (its buffer kept for the next chunk).
    async fn drain(&mut self) -> Result<(), ProcessError> {
        if let Some(stream) = self.stream.as_mut() {
            let out = stream.take();
            self.file.put(out).await?;
            out.clear();
        }
        Ok(())
    }

    async fn finish(&mut self, url: &str) -> Result<(), ProcessError> {
        if let Some(stream) = self.stream.as_mut() {
            stream.finish().map_err(|e| undecompressable(url, e))?;
        }
        self.drain().await?;
        self.file
            .file
            .flush()
            .await
            .map_err(|e| ProcessError::Transient(format!("cannot flush spool file: {e}")))
    }
}

fn undecompressable(url: &str, e: DecompressError) -> ProcessError {
    ProcessError::Permanent(format!("cannot decompress {url}: {e}"))
}

fn class_to_error(class: ErrorClass, text: String) -> ProcessError {
    match class {
        ErrorClass::Permanent => ProcessError::Permanent(text),
        // Access denied or a missing bucket is an operator's problem, not the file's: retry later.
        ErrorClass::Transient | ErrorClass::Fatal => ProcessError::Transient(text),
    }
}

/// Stream exactly the announced version of `obj` into `path`, never holding more than a chunk in
/// memory: its version id when the event has one (a newer current version makes it superseded), else
/// `If-Match` on its ETag (a changed object answers 412: superseded). With `decompress`, a gzip or
/// zstd object is decompressed on the way, within those limits (a bomb is a permanent failure).
pub async fn download(
    s3: &aws_sdk_s3::Client,
    obj: &ObjectRef,
    path: &Path,
    decompress: Option<compression::Limits>,
) -> Result<Downloaded, ProcessError> {
    let (bucket, key) = (obj.bucket.as_str(), obj.key.as_str());
    let mut get = s3.get_object().bucket(bucket).key(key);
    match (&obj.version_id, &obj.etag) {
        (Some(v), _) => {
            if let Ok(head) = s3.head_object().bucket(bucket).key(key).send().await {
                if head.version_id().is_some_and(|current| current != v) {
                    return Err(ProcessError::Superseded(format!(
                        "s3://{bucket}/{key} version {v} is no longer the current version"
                    )));
                }
            }
            get = get.version_id(v);
        }
        (None, Some(etag)) if !etag.is_empty() => {
            get = get.if_match(format!("\"{}\"", etag.trim_matches('"')));
        }
        _ => {}
    }
    let out = match get.send().await {
        Ok(o) => o,
        Err(e) => {
            let gone = e.as_service_error().is_some_and(|se| se.is_no_such_key());
            if gone {
                return Err(ProcessError::Permanent(format!(
                    "s3://{bucket}/{key} no longer exists (deleted before it could be read)"
                )));
            }
            if crate::error::code(&e) == Some("PreconditionFailed")
                || e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
            {
                return Err(ProcessError::Superseded(format!(
                    "s3://{bucket}/{key} changed since the event (ETag {} is no longer current)",
                    obj.etag.as_deref().unwrap_or("")
                )));
            }
            return Err(class_to_error(
                classify(&e),
                format!("cannot read s3://{bucket}/{key}: {}", describe(&e)),
            ));
        }
    };
    let etag = out
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    let content_encoding = out.content_encoding().map(str::to_string);
    spool_body(
        out.body,
        content_encoding.as_deref(),
        obj,
        path,
        decompress,
        etag,
    )
    .await
}

/// The object's body into its spool file, decompressed on the way when it is compressed.
async fn spool_body(
    mut body: ByteStream,
    content_encoding: Option<&str>,
    obj: &ObjectRef,
    path: &Path,
    decompress: Option<compression::Limits>,
    etag: String,
) -> Result<Downloaded, ProcessError> {
    let (bucket, key) = (obj.bucket.as_str(), obj.key.as_str());
    let file = tokio::fs::File::create(path).await.map_err(|e| {
        ProcessError::Transient(format!("cannot create spool file {}: {e}", path.display()))
    })?;
    let url = obj.url();
    let mut spool = SpoolWriter {
        file: SpoolFile {
            file,
            path,
            written: 0,
        },
        stream: None,
    };
    // The first bytes tell the compression; they are held until there are enough of them.
    let mut head: Option<Vec<u8>> = decompress.map(|_| Vec::new());
    let mut bytes = 0u64;
    loop {
        let chunk = match body.try_next().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                return Err(ProcessError::Transient(format!(
                    "download of s3://{bucket}/{key} broke off after {bytes} bytes: {e}"
                )))
            }
        };
        bytes += chunk.len() as u64;
        match head.as_mut() {
            None => spool.write(&chunk, &url).await?,
            Some(h) => {
                h.extend_from_slice(&chunk);
                if h.len() >= compression::MAGIC_BYTES {
                    let h = head.take().unwrap_or_default();
                    start_spool(&mut spool, content_encoding, obj, &h, decompress)?;
                    spool.write(&h, &url).await?;
                }
            }
        }
    }
    if let Some(h) = head.take() {
        start_spool(&mut spool, content_encoding, obj, &h, decompress)?;
        spool.write(&h, &url).await?;
    }
    let compressed = spool.stream.as_ref().map(|s| (s.encoding(), bytes));
    spool.finish(&url).await?;
    if let Some((enc, n)) = compressed {
        tracing::debug!(object = %url, encoding = enc.name(), compressed = n, bytes = spool.file.written, "decompressed");
    }
    Ok(Downloaded {
        etag,
        bytes: spool.file.written,
        compressed,
    })
}

/// Decide from the object's first bytes whether it is decompressed on its way to the spool.
fn start_spool(
    spool: &mut SpoolWriter<'_>,
    content_encoding: Option<&str>,
    obj: &ObjectRef,
    head: &[u8],
    decompress: Option<compression::Limits>,
) -> Result<(), ProcessError> {
    let Some(limits) = decompress else {
        return Ok(());
    };
    let url = obj.url();
    if let Some(enc) = compression::detect(content_encoding, &obj.key, head)
        .map_err(|e| undecompressable(&url, e))?
    {
        spool.stream = Some(Stream::new(enc, limits).map_err(|e| {
            ProcessError::Transient(format!("cannot start {} decompression: {e}", enc.name()))
        })?);
    }
    Ok(())
}

fn upload_error<E>(
    e: aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
    what: &str,
) -> ProcessError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    class_to_error(classify(&e), format!("{what}: {}", describe(&e)))
}

/// Store a spooled file as `s3://bucket/key`, in parts when it is large. The object appears only when
/// complete (S3 never shows a half-finished multipart upload). Cancelled mid-way, a multipart upload is
/// aborted rather than left to linger (and be billed) in the bucket.
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    content_type: &str,
    cancel: &CancellationToken,
) -> Result<(), ProcessError> {
    let what = format!("cannot store s3://{bucket}/{key}");
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| ProcessError::Transient(format!("{what}: spool file: {e}")))?
        .len();
    let target = Target {
        s3,
        bucket,
        key,
        path,
        what: &what,
    };
    if size <= MULTIPART_PART_SIZE {
        let put = s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(target.body(0, size).await?)
            .send();
        // Dropping a single PUT leaves nothing behind.
        tokio::select! {
            r = put => r.map_err(|e| upload_error(e, &what))?,
            _ = cancel.cancelled() => return Err(ProcessError::Cancelled),
        };
        return Ok(());
    }
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .send()
        .await
        .map_err(|e| upload_error(e, &what))?;
    let upload_id = created.upload_id().unwrap_or_default().to_string();
    let completed = match target.parts(&upload_id, size, cancel).await {
        Ok(parts) => s3
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| upload_error(e, &what)),
        Err(e) => Err(e),
    };
    if completed.is_err() {
        abort(s3, bucket, key, &upload_id).await;
    }
    completed.map(|_| ())
}

/// Where one upload goes, and from which spool file.
struct Target<'a> {
    s3: &'a aws_sdk_s3::Client,
    bucket: &'a str,
    key: &'a str,
    path: &'a Path,
    /// "cannot store s3://bucket/key", the start of every error.
    what: &'a str,
}

impl Target<'_> {
    /// `len` bytes of the spool file from `offset`, streamed.
    async fn body(&self, offset: u64, len: u64) -> Result<ByteStream, ProcessError> {
        ByteStream::read_from()
            .path(self.path)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| ProcessError::Transient(format!("cannot read spool file: {e}")))
    }

    /// Upload every part of a multipart upload, in order; cancelled, the caller aborts it like any
    /// failed part.
    async fn parts(
        &self,
        upload_id: &str,
        size: u64,
        cancel: &CancellationToken,
    ) -> Result<Vec<CompletedPart>, ProcessError> {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < size {
            let len = MULTIPART_PART_SIZE.min(size - offset);
            let part = self
                .s3
                .upload_part()
                .bucket(self.bucket)
                .key(self.key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(self.body(offset, len).await?)
                .send();
            let out = tokio::select! {
                r = part => r.map_err(|e| upload_error(e, self.what))?,
                _ = cancel.cancelled() => return Err(ProcessError::Cancelled),
            };
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(String::from))
                    .build(),
            );
            offset += len;
            number += 1;
        }
        Ok(parts)
    }
}

/// Best effort: an unfinished upload costs storage until a lifecycle rule removes it.
async fn abort(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) {
    if let Err(e) = s3
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        tracing::warn!(bucket, key, error = %describe(&e), "could not abort a multipart upload; a bucket lifecycle rule should clean it up");
    }
}

/// Store a small in-memory object (error reports).
pub async fn put_small(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    content_type: &str,
) -> Result<(), ProcessError> {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| upload_error(e, &format!("cannot store s3://{bucket}/{key}")))?;
    Ok(())
}
