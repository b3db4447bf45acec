//! ECS agent updates owned by the supervisor: the image last proven healthy, an update on trial
//! until the new agent is healthy (or `ecs_agent.update_timeout` passes), and a desired image that
//! failed — refused until the configuration asks for something else. Pure bookkeeping: the
//! supervisor loads, starts and rolls back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::EcsAgentConfig;

/// An agent image: what the configuration calls it, and Docker's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub(crate) name: String,
    pub(crate) id: String,
}

impl Image {
    fn short(&self) -> String {
        let id = self.id.trim_start_matches("sha256:");
        format!("{} ({})", self.name, &id[..12.min(id.len())])
    }
}

/// What the configuration asks for: the image, where it comes from, and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Desired {
    image: String,
    tarball: PathBuf,
    sha256: Option<String>,
}

impl Desired {
    pub(crate) fn of(cfg: &EcsAgentConfig) -> Desired {
        Desired {
            image: cfg.image.clone(),
            tarball: cfg.image_tarball.clone(),
            sha256: cfg.image_sha256.clone(),
        }
    }
}

/// An update being proven.
#[derive(Debug, Clone)]
struct Trial {
    from: Image,
    to: Image,
    deadline: Instant,
}

/// The supervisor's memory of agent versions.
#[derive(Debug, Default)]
pub(crate) struct Updates {
    /// The image last seen healthy (kept on the host until a newer one is proven), and whether it was
    /// registered then (an update must be too, to be proven).
    proven: Option<Image>,
    registered: bool,
    trial: Option<Trial>,
    /// A desired image that failed, with why; the proven image runs instead until the
    /// configuration changes.
    refused: Option<(Desired, String)>,
}

impl Updates {
    /// The image to run instead of `desired`, when `desired` was refused.
    pub(crate) fn instead_of(&self, desired: &Desired) -> Option<&Image> {
        match &self.refused {
            Some((d, _)) if d == desired => self.proven.as_ref(),
            _ => None,
        }
    }

    /// Refuse `desired` (its tarball's digest is wrong, or it was rolled back): the proven image
    /// runs instead. `None` when there is no proven image to fall back to.
    pub(crate) fn refuse(&mut self, desired: Desired, why: String) -> Option<&Image> {
        self.proven.as_ref()?;
        self.refused = Some((desired, why));
        self.proven.as_ref()
    }

    /// About to run `image`: an update on trial when a different image was proven.
    pub(crate) fn starting(&mut self, image: Image, now: Instant, timeout: Duration) {
        match &self.proven {
            Some(p) if p.id != image.id => {
                self.trial = Some(Trial {
                    from: p.clone(),
                    to: image,
                    deadline: now + timeout,
                })
            }
            _ => self.trial = None,
        }
    }

    /// Whether an update on trial must be registered to be proven (its predecessor was).
    pub(crate) fn needs_registration(&self) -> bool {
        self.trial.is_some() && self.registered
    }

    /// The running agent of `image` is healthy: proven. A message when that completes an update.
    pub(crate) fn healthy(&mut self, image: Image, registered: bool) -> Option<String> {
        self.registered = registered;
        let done = self.trial.take().map(|t| {
            format!(
                "updated the ECS agent from {} to {}",
                t.from.short(),
                t.to.short()
            )
        });
        if self.refused.is_some() && self.proven.as_ref() != Some(&image) {
            self.refused = None;
        }
        self.proven = Some(image);
        done
    }

    /// The update on trial has not been proven by `now`: why, to roll back.
    pub(crate) fn expired(&self, now: Instant, timeout: Duration) -> Option<String> {
        let t = self.trial.as_ref()?;
        (now >= t.deadline).then(|| {
            format!(
                "{} was not healthy within ecs_agent.update_timeout ({})",
                t.to.short(),
                humantime::format_duration(timeout)
            )
        })
    }

    /// Roll the trial back: `desired` is refused and the proven image runs again. The report.
    pub(crate) fn roll_back(&mut self, desired: Desired, why: &str) -> Option<String> {
        let t = self.trial.take()?;
        let report = format!(
            "rolled back from {} to {}: {why}",
            t.to.short(),
            t.from.short()
        );
        self.refused = Some((desired, report.clone()));
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(name: &str, id: &str) -> Image {
        Image {
            name: name.into(),
            id: id.into(),
        }
    }

    #[test]
    fn an_update_is_proven_or_rolled_back_and_not_retried() {
        let mut cfg = EcsAgentConfig::default();
        let t = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut u = Updates::default();
        // The first healthy agent is proven; nothing was updated.
        u.starting(img("agent:v1", "sha256:1111"), t0, t);
        assert_eq!(u.healthy(img("agent:v1", "sha256:1111"), true), None);
        u.starting(img("agent:v2", "sha256:2222"), t0, t);
        assert!(u.needs_registration());

        cfg.image = "agent:v2".into();
        u.starting(img("agent:v2", "sha256:2222"), t0, t);
        assert_eq!(u.expired(t0 + Duration::from_secs(30), t), None);
        let done = u.healthy(img("agent:v2", "sha256:2222"), true).unwrap();
        assert!(
            done.contains("from agent:v1 (1111) to agent:v2 (2222)"),
            "{done}"
        );

        cfg.image = "agent:v3".into();
        u.starting(img("agent:v3", "sha256:3333"), t0, t);
        let why = u.expired(t0 + t, t).unwrap();
        assert!(
            why.contains("agent:v3 (3333) was not healthy within"),
            "{why}"
        );
        let report = u.roll_back(Desired::of(&cfg), &why).unwrap();
        assert!(
            report.starts_with("rolled back from agent:v3 (3333) to agent:v2 (2222)"),
            "{report}"
        );
        // v3 is not tried again while the configuration asks for it; v2 runs.
        assert_eq!(
            u.instead_of(&Desired::of(&cfg)),
            Some(&img("agent:v2", "sha256:2222"))
        );
        assert_eq!(
            u.refused.as_ref().map(|r| r.1.as_str()),
            Some(report.as_str())
        );
        // Another desired image is tried.
        cfg.image = "agent:v4".into();
        assert_eq!(u.instead_of(&Desired::of(&cfg)), None);
        // Nothing proven yet: nothing to fall back to.
        assert!(Updates::default()
            .refuse(Desired::of(&cfg), "x".into())
            .is_none());
    }
}
