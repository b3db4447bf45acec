//! The `/status` document: one type, written by the daemon's admin endpoint and read back by
//! `offload-agent status`, so that the two ends cannot disagree on a field's name or shape.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::metrics::{PipelineCounts, RecentError};

/// What `GET /status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatusDoc {
    pub(crate) version: String,
    pub(crate) pid: u32,
    pub(crate) uptime_s: u64,
    /// `true`, or why the daemon cannot take work now.
    pub(crate) ready: Readiness,
    pub(crate) registration: Registration,
    /// Absent (null) when the supervisor is off (`ecs_agent.enabled = false`).
    pub(crate) ecs_agent: Option<EcsAgent>,
    pub(crate) worker: WorkerStatus,
    pub(crate) recent_errors: Vec<RecentError>,
    /// AWS's clock minus this host's, from the latest answer's `Date` (absent before the first).
    #[serde(default)]
    pub(crate) clock_skew_seconds: Option<f64>,
}

/// `true` when ready; otherwise the reason, as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Readiness {
    Ready(bool),
    NotReady(String),
}

impl Readiness {
    pub(crate) fn of(r: Result<(), String>) -> Readiness {
        match r {
            Ok(()) => Readiness::Ready(true),
            Err(why) => Readiness::NotReady(why),
        }
    }

    /// The reason the daemon is not ready, if it is not.
    pub(crate) fn problem(&self) -> Option<&str> {
        match self {
            Readiness::Ready(true) => None,
            Readiness::Ready(false) => Some("unknown reason"),
            Readiness::NotReady(why) => Some(why),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub(crate) managed_instance_id: Option<String>,
    pub(crate) cluster: Option<String>,
    pub(crate) container_instance_arn: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EcsAgent {
    pub(crate) state: String,
    pub(crate) reason: String,
    pub(crate) version: Option<String>,
    pub(crate) restarts: u64,
    pub(crate) adoptions: u64,
    pub(crate) last_exit_code: Option<i64>,
    /// The image the agent runs, the one the configuration asks for, and the last update's outcome
    /// (absent from a daemon older than the fields).
    #[serde(default)]
    pub(crate) image: Option<String>,
    #[serde(default)]
    pub(crate) desired_image: Option<String>,
    #[serde(default)]
    pub(crate) last_update: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerStatus {
    pub(crate) in_flight: u64,
    pub(crate) free_slots: u64,
    pub(crate) files_done: u64,
    pub(crate) files_failed: u64,
    pub(crate) rows_per_second_1m: f64,
    pub(crate) queue_problem: Option<String>,
    /// Free bytes on the spool's file system (absent from a daemon older than the field).
    #[serde(default)]
    pub(crate) spool_free_bytes: Option<u64>,
    /// Why nothing is received: the spool is below `spool.min_free`.
    #[serde(default)]
    pub(crate) spool_problem: Option<String>,
    pub(crate) pipelines: Vec<PipelineCounts>,
    pub(crate) unavailable_pipelines: Vec<Unavailable>,
}

/// A pipeline that cannot run on this host now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Unavailable {
    pub(crate) pipeline: String,
    pub(crate) reason: String,
}

fn or_dash<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

impl StatusDoc {
    /// The human summary `offload-agent status` prints.
    /// The host's clock against AWS's, once measured.
    fn clock_line(&self) -> Option<String> {
        let skew = self.clock_skew_seconds?;
        let warn = if skew.abs() > crate::clock::WARN_ABOVE.as_secs_f64() {
            " (check time synchronisation: timedatectl status, chronyc tracking)"
        } else {
            ""
        };
        Some(format!("clock:        {skew:+.0} s against AWS{warn}"))
    }

    pub(crate) fn render(&self) -> String {
        let mut o = String::new();
        let ready = match self.ready.problem() {
            None => "ready".to_string(),
            Some(why) => format!("NOT READY: {why}"),
        };
        let _ = writeln!(
            o,
            "offload-agent {} (pid {}), up {} s, {ready}",
            self.version, self.pid, self.uptime_s
        );
        if let Some(line) = self.clock_line() {
            let _ = writeln!(o, "{line}");
        }
        let r = &self.registration;
        let _ = writeln!(
            o,
            "registration: managed instance {}, cluster {}, container instance {}",
            or_dash(&r.managed_instance_id),
            or_dash(&r.cluster),
            or_dash(&r.container_instance_arn)
        );
        match &self.ecs_agent {
            None => {
                let _ = writeln!(
                    o,
                    "ECS agent:    not supervised (ecs_agent.enabled = false)"
                );
            }
            Some(e) => {
                let reason = if e.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", e.reason)
                };
                let _ = writeln!(
                    o,
                    "ECS agent:    {} (version {}), {} restarts, last exit code {}{reason}",
                    e.state,
                    or_dash(&e.version),
                    e.restarts,
                    or_dash(&e.last_exit_code),
                );
                if e.image.is_some() || e.desired_image.is_some() {
                    let _ = writeln!(
                        o,
                        "  image {} (desired {}){}",
                        or_dash(&e.image),
                        or_dash(&e.desired_image),
                        e.last_update
                            .as_ref()
                            .map(|u| format!("; last update: {u}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        let w = &self.worker;
        let _ = writeln!(
            o,
            "worker:       {} in flight, {} free slots, {} files done, {} failed, {} rows/s over the last minute",
            w.in_flight, w.free_slots, w.files_done, w.files_failed, serde_json::json!(w.rows_per_second_1m)
        );
        if let Some(p) = &w.queue_problem {
            let _ = writeln!(o, "queue:        {p}");
        }
        match (&w.spool_problem, w.spool_free_bytes) {
            (Some(p), _) => {
                let _ = writeln!(o, "spool:        {p}");
            }
            (None, Some(free)) => {
                let _ = writeln!(o, "spool:        {} free", crate::disk::human(free));
            }
            (None, None) => {}
        }
        for p in &w.pipelines {
            let _ = writeln!(
                o,
                "  pipeline {}: {} ok, {} with rejected rows, {} failed for good, {} retried, {} superseded; rows {} written, {} rejected",
                p.pipeline,
                p.ok,
                p.rejected,
                p.permanent_error,
                p.transient_retry,
                p.superseded,
                p.rows_written,
                p.rows_rejected
            );
        }
        for p in &w.unavailable_pipelines {
            let _ = writeln!(o, "  pipeline {} UNAVAILABLE: {}", p.pipeline, p.reason);
        }
        let errors = &self.recent_errors;
        if errors.is_empty() {
            let _ = writeln!(o, "last errors:  none");
        } else {
            let _ = writeln!(o, "last errors ({}, newest last):", errors.len());
            for e in errors.iter().skip(errors.len().saturating_sub(5)) {
                let first = e.reason.lines().next().unwrap_or("");
                let _ = writeln!(o, "  {} {} [{}]: {first}", e.time, e.file, e.pipeline);
            }
        }
        o
    }
}

/// A document with every part filled in, for tests.
#[cfg(test)]
pub(crate) fn example() -> StatusDoc {
    tests::doc()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn doc() -> StatusDoc {
        StatusDoc {
            version: "1.2.3".into(),
            pid: 42,
            uptime_s: 7,
            ready: Readiness::of(Err("the queue has not been reached yet".into())),
            registration: Registration {
                managed_instance_id: Some("mi-0123".into()),
                ..Default::default()
            },
            ecs_agent: None,
            worker: WorkerStatus {
                in_flight: 1,
                free_slots: 7,
                files_done: 3,
                files_failed: 0,
                rows_per_second_1m: 12.5,
                queue_problem: None,
                spool_free_bytes: Some(3 << 30),
                spool_problem: None,
                pipelines: vec![],
                unavailable_pipelines: vec![Unavailable {
                    pipeline: "thumbs".into(),
                    reason: "image x is not present".into(),
                }],
            },
            recent_errors: (0..7)
                .map(|i| RecentError {
                    time: format!("t{i}"),
                    pipeline: "p".into(),
                    file: format!("s3://b/{i}"),
                    reason: format!("reason {i}\nmore"),
                })
                .collect(),
            clock_skew_seconds: Some(-2.0),
        }
    }

    #[test]
    fn the_document_reads_back_as_written_and_keeps_its_json_shape() {
        let d = doc();
        let text = serde_json::to_string(&d).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ready"], "the queue has not been reached yet");
        assert!(v["ecs_agent"].is_null());
        assert!(v["registration"]["cluster"].is_null());
        assert_eq!(
            v["worker"]["unavailable_pipelines"][0]["pipeline"],
            "thumbs"
        );
        assert_eq!(serde_json::from_str::<StatusDoc>(&text).unwrap(), d);
        let ready = StatusDoc {
            ready: Readiness::of(Ok(())),
            ..d
        };
        let v = serde_json::to_value(&ready).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(
            serde_json::from_value::<StatusDoc>(v)
                .unwrap()
                .ready
                .problem(),
            None
        );
    }

    #[test]
    fn the_summary_names_what_is_wrong_and_the_newest_errors() {
        let text = doc().render();
        assert!(text.starts_with(
            "offload-agent 1.2.3 (pid 42), up 7 s, NOT READY: the queue has not been reached yet\n"
        ));
        assert!(text.contains("managed instance mi-0123, cluster -, container instance -"));
        assert!(text.contains("not supervised"));
        assert!(text.contains("12.5 rows/s"));
        assert!(text.contains("pipeline thumbs UNAVAILABLE: image x is not present"));
        assert!(text.contains("last errors (7, newest last):"));
        assert!(!text.contains("s3://b/1 "), "only the newest five");
        assert!(text.contains("  t6 s3://b/6 [p]: reason 6\n"));
    }
}
