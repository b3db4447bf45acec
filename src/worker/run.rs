//! Processing one object, for the daemon and for `offload-agent process` alike: wait for a slot of the
//! pipeline, spool the object (pinned to the announced version), run the pipeline's processor, store its
//! outputs. Settling the SQS message is not done here (see `worker`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Pipeline, ProcessorKind};
use crate::error::ProcessError;
use crate::event::ObjectRef;
use crate::limits::S3_MAX_KEY_BYTES;
use crate::processors::{self, Context, Job, Outcome, RowCounts};
use crate::spool::Spool;
use crate::transfer;

/// What processing one object produced.
#[derive(Debug, Clone)]
pub(crate) struct FileReport {
    pub(crate) pipeline: String,
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) etag: String,
    pub(crate) bytes: u64,
    /// Keys stored in the output bucket, in the order they were stored.
    pub(crate) outputs: Vec<String>,
    /// Row accounting, from processors that read rows.
    pub(crate) rows: Option<RowCounts>,
    /// The key of the stored report of rejected rows, if there is one.
    pub(crate) rejects: Option<String>,
    pub(crate) summary: String,
    pub(crate) elapsed: Duration,
}

/// Runs objects through their pipelines; shared by all workers of a daemon.
pub(crate) struct ObjectProcessor {
    pub(crate) ctx: Context,
    pub(crate) spool: Spool,
    limits: PipelineLimits,
    /// Pipelines that cannot run on this host now, with the reason reported (once) for each.
    unavailable: Mutex<HashMap<String, String>>,
}

impl ObjectProcessor {
    pub(crate) fn new(ctx: Context, spool: Spool) -> ObjectProcessor {
        ObjectProcessor {
            ctx,
            spool,
            limits: PipelineLimits::default(),
            unavailable: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the spool has room to receive more files (against `min_free`, with hysteresis): the
    /// gauge and the reason recorded, the change logged once.
    pub(crate) fn spool_has_room(&self, min_free: crate::disk::MinFree) -> bool {
        use crate::disk::{Change, Room};
        let (room, change) = self.spool.room().check(min_free);
        let metrics = &self.ctx.metrics;
        match room {
            Room::Ok { free } => {
                if change == Change::Recovered {
                    tracing::info!(
                        free_bytes = free,
                        "the spool has room again ({} free): receiving",
                        crate::disk::human(free)
                    );
                }
                metrics.spool(Some(free), None);
                true
            }
            Room::Low { free, reason } => {
                if change == Change::WentLow {
                    tracing::warn!(free_bytes = free, "{reason}");
                }
                metrics.spool(Some(free), Some(reason));
                false
            }
            Room::Unknown(why) => {
                tracing::debug!("{why}");
                metrics.spool(None, None);
                true
            }
        }
    }

    /// Run one object through `pipeline`, configured by `cfg`.
    pub(crate) async fn process(
        &self,
        cfg: &Config,
        pipeline: &Pipeline,
        obj: &ObjectRef,
        cancel: &CancellationToken,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<FileReport, ProcessError> {
        let _slot = self.limits.acquire(pipeline, cancel).await?;
        let started = Instant::now();
        let output = pipeline.output_key(&obj.key);
        if output.len() > S3_MAX_KEY_BYTES {
            return Err(ProcessError::Permanent(format!(
                "the output key for {:?} would be longer than S3's {} bytes; shorten the key or output_prefix",
                obj.key,
                S3_MAX_KEY_BYTES
            )));
        }
        if let Some(size) = obj.size {
            self.spool
                .room()
                .fits(size, cfg.spool.min_free)
                .map_err(ProcessError::Transient)?;
        }
        let mut files = self.spool.files_for(&obj.bucket, &obj.key).map_err(|e| {
            ProcessError::Transient(format!(
                "cannot create a spool directory in {}: {e}",
                self.spool.dir().display()
            ))
        })?;
        let decompress = pipeline.decompress.then(|| cfg.spool.decompression());
        let downloaded = tokio::select! {
            r = transfer::download(&self.ctx.clients.s3, obj, &files.input, decompress) => r?,
            _ = cancel.cancelled() => return Err(ProcessError::Cancelled),
        };
        if downloaded.compressed.is_some() {
            // The processor sees the decompressed file under its name without the suffix.
            if let Some(plain) = crate::spool::without_compression_suffix(&files.input) {
                tokio::fs::rename(&files.input, &plain).await.map_err(|e| {
                    ProcessError::Transient(format!(
                        "cannot rename spool file {}: {e}",
                        files.input.display()
                    ))
                })?;
                files.input = plain;
            }
        }
        tracing::debug!(bytes = downloaded.bytes, compressed = ?downloaded.compressed, etag = %downloaded.etag, peak_rss = crate::telemetry::peak_rss_bytes(), "downloaded to spool");
        let processor = processors::build(pipeline, cfg, &self.ctx);
        let job = Job {
            pipeline,
            object: obj,
            etag: &downloaded.etag,
            files: &files,
            cancel,
            progress,
        };
        let result = processor.process(&job).await;
        self.note(pipeline, &result);
        let outcome = result?;
        tracing::debug!(peak_rss = crate::telemetry::peak_rss_bytes(), summary = %outcome.summary, "processor done");
        let stored = self.store(pipeline, &outcome, cancel).await?;
        Ok(FileReport {
            pipeline: pipeline.name.clone(),
            bucket: obj.bucket.clone(),
            key: obj.key.clone(),
            etag: downloaded.etag,
            bytes: downloaded.bytes,
            outputs: stored,
            rows: outcome.rows,
            rejects: outcome.rejects,
            summary: outcome.summary,
            elapsed: started.elapsed(),
        })
    }

    /// Store the outputs in order and, alongside, delete what an earlier version left and this one
    /// does not replace (never one of this outcome's keys, so the two do not race; off the file's
    /// critical path: a round trip per file, issue 23). Each upload watches `cancel` itself: a
    /// multipart upload cut short is aborted, not dropped.
    async fn store(
        &self,
        pipeline: &Pipeline,
        outcome: &Outcome,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, ProcessError> {
        let bucket = pipeline.output_bucket();
        let s3 = &self.ctx.clients.s3;
        let stale = futures::future::join_all(outcome.stale.iter().map(|key| async move {
            let _ = s3.delete_object().bucket(bucket).key(key).send().await;
        }));
        let uploads = async {
            let mut stored = Vec::with_capacity(outcome.outputs.len());
            for o in &outcome.outputs {
                if cancel.is_cancelled() {
                    return Err(ProcessError::Cancelled);
                }
                transfer::upload(s3, bucket, &o.key, &o.path, o.content_type, cancel).await?;
                let size = std::fs::metadata(&o.path).map_or(0, |m| m.len());
                self.ctx.metrics.uploaded(size);
                stored.push(o.key.clone());
            }
            Ok(stored)
        };
        let (_, stored) = futures::future::join(stale, uploads).await;
        stored
    }

    /// Report a pipeline that became unavailable once (and its recovery), not once per file.
    fn note(&self, pipeline: &Pipeline, result: &Result<Outcome, ProcessError>) {
        let mut map = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(ProcessError::Unavailable(reason)) => {
                if map.get(&pipeline.name) != Some(reason) {
                    tracing::error!(pipeline = %pipeline.name, %reason, "pipeline {} cannot run on this host: {reason}; its files wait in the queue (retried with backoff) until this is fixed", pipeline.name);
                    map.insert(pipeline.name.clone(), reason.clone());
                }
            }
            Err(ProcessError::Cancelled) => {}
            _ => {
                if map.remove(&pipeline.name).is_some() {
                    tracing::info!(pipeline = %pipeline.name, "pipeline {} can run again", pipeline.name);
                }
            }
        }
    }

    /// Pipelines that cannot run now, with their reasons (for the status line).
    pub(crate) fn unavailable(&self) -> Vec<(String, String)> {
        let map = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }

    /// Check, before any file arrives, that every external processor can run here (its image present,
    /// its program installed): problems are reported now, by pipeline, not by the first file.
    pub(crate) async fn preflight(&self, cfg: &Config) {
        for p in &cfg.pipelines {
            let r = match &p.processor {
                ProcessorKind::OrdersCsv | ProcessorKind::Table(_) => continue,
                ProcessorKind::Container(spec) => self.ctx.docker.ensure_image(spec).await,
                ProcessorKind::Command(spec) => {
                    crate::processors::command::resolve(spec, &p.name).map(|_| ())
                }
            };
            if let Err(ProcessError::Transient(why)) = &r {
                tracing::warn!(pipeline = %p.name, reason = %why, "cannot check the processor of pipeline {} now ({why}); its first file checks again", p.name);
                continue;
            }
            self.note(p, &r.map(|_| Outcome::default()));
        }
    }

    /// Write `errors/<key>.json` under the pipeline's output prefix.
    pub(crate) async fn write_error_report(
        &self,
        pipeline: &Pipeline,
        obj: &ObjectRef,
        reason: &str,
        message_id: &str,
    ) -> Result<String, ProcessError> {
        let key = report_key(
            &format!("{}errors/", pipeline.output_prefix),
            &obj.key,
            ".json",
        );
        let failed_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let body = serde_json::json!({
            "bucket": obj.bucket,
            "key": obj.key,
            "etag": obj.etag,
            "pipeline": pipeline.name,
            "processor": pipeline.processor.to_string(),
            "reason": reason,
            "message_id": message_id,
            "failed_at": failed_at,
        });
        let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        transfer::put_small(
            &self.ctx.clients.s3,
            pipeline.output_bucket(),
            &key,
            bytes,
            "application/json",
        )
        .await?;
        Ok(key)
    }
}

/// A key derived from `key` that S3 accepts, for reports: the key itself when it fits, else its hash.
fn report_key(prefix: &str, key: &str, suffix: &str) -> String {
    let direct = format!("{prefix}{key}{suffix}");
    if direct.len() <= S3_MAX_KEY_BYTES {
        return direct;
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{prefix}sha256-{digest}{suffix}")
}

/// Per-pipeline `max_in_flight`: one semaphore per pipeline that sets it. A changed limit takes a new
/// semaphore (files holding the old one finish under it).
#[derive(Default)]
struct PipelineLimits(Mutex<HashMap<String, (usize, Arc<Semaphore>)>>);

impl PipelineLimits {
    async fn acquire(
        &self,
        p: &Pipeline,
        cancel: &CancellationToken,
    ) -> Result<Option<OwnedSemaphorePermit>, ProcessError> {
        let Some(limit) = p.max_in_flight else {
            return Ok(None);
        };
        let sem = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map
                .entry(p.name.clone())
                .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
            if entry.0 != limit {
                *entry = (limit, Arc::new(Semaphore::new(limit)));
            }
            entry.1.clone()
        };
        tokio::select! {
            permit = sem.acquire_owned() => Ok(permit.ok()),
            _ = cancel.cancelled() => Err(ProcessError::Cancelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_keys_fit_s3() {
        assert_eq!(
            report_key("out/errors/", "a b.csv", ".json"),
            "out/errors/a b.csv.json"
        );
        let long = "k".repeat(1020);
        let r = report_key("out/errors/", &long, ".json");
        assert!(r.len() <= S3_MAX_KEY_BYTES);
        assert!(r.starts_with("out/errors/sha256-"));
    }

    #[tokio::test]
    async fn a_pipelines_own_limit_holds_and_follows_a_change() {
        let mut p = crate::config::from_toml_str(
            "[queue]\nname='q'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='t'\noutput_prefix='out/'\nmax_in_flight=2\n",
            "t.toml",
        )
        .unwrap()
        .pipelines
        .remove(0);
        let limits = PipelineLimits::default();
        let cancel = CancellationToken::new();
        let a = limits.acquire(&p, &cancel).await.unwrap();
        let _b = limits.acquire(&p, &cancel).await.unwrap();
        assert!(a.is_some());
        let third = tokio::time::timeout(Duration::from_millis(50), limits.acquire(&p, &cancel));
        assert!(third.await.is_err(), "a third file waits");
        drop(a);
        assert!(limits.acquire(&p, &cancel).await.unwrap().is_some());
        p.max_in_flight = Some(3);
        let held: Vec<_> =
            futures::future::join_all((0..3).map(|_| limits.acquire(&p, &cancel))).await;
        assert_eq!(held.iter().filter(|h| matches!(h, Ok(Some(_)))).count(), 3);
        cancel.cancel();
        assert!(matches!(
            limits.acquire(&p, &cancel).await,
            Err(ProcessError::Cancelled)
        ));
        p.max_in_flight = None;
        assert!(
            limits.acquire(&p, &cancel).await.unwrap().is_none(),
            "no own limit"
        );
    }
}
