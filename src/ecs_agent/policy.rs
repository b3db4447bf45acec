//! Where the ECS agent's exit code and health are judged: pure functions of what happened, so that
//! every rule is a row in a table test. `next` says what an ended watch of the agent leads to,
//! `after_upgrade` what an exit-42 upgrade leads to, and `Health` when a silent agent counts as
//! unhealthy and when a healthy one has earned a fresh restart backoff. The supervisor
//! ([`super::Supervisor`]) performs what they decide.

use std::time::{Duration, Instant};

use crate::config::EcsAgentConfig;

/// The agent stopped on purpose (`docker stop`).
pub const EXIT_CLEAN: i64 = 0;
/// A terminal error: restarting cannot help until the configuration changes.
pub const EXIT_TERMINAL: i64 = 5;
/// "Load the image named in /var/cache/ecs/desired-image and restart me."
pub const EXIT_UPGRADE: i64 = 42;

/// How one watch of a running agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Exited(i64),
    DockerLost(String),
    Unhealthy(String),
    /// An updated agent was not healthy within `ecs_agent.update_timeout`.
    UpdateFailed(String),
    ConfigChanged,
    Shutdown,
}

/// What the supervisor does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Shutdown: leave (stopping the agent first under `ecs_agent.stop_agent_on_exit`).
    Stop,
    /// The configuration changed: check the container against it at once.
    Recheck,
    /// Docker went away: wait for it, then check the container.
    WaitForDocker(String),
    /// Exit 0, a stop on purpose: as under ecs-init's unit, stay stopped until a reload.
    StayStopped,
    /// Exit 5: keep the agent's last log lines and stay stopped until a reload.
    Terminal,
    /// Exit 42: load the image named in desired-image, then ask [`after_upgrade`].
    Upgrade,
    /// Start the new image at once (no backoff).
    RestartNow,
    /// Stop the agent that no longer answers, then restart it after the restart backoff (an agent
    /// that hangs again at once must not be restarted in a hot loop either).
    RestartUnhealthy(String),
    /// Restart after the restart backoff; the reason is shown in the status.
    RestartAfterBackoff(String),
    /// Stop the updated agent and start the previous image again.
    RollBack(String),
}

/// What the supervisor remembers between watches, for the decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct History {
    /// Exit-42 upgrades since the agent was last healthy for `healthy_reset_after`: a second one
    /// (an agent that keeps asking) waits for the restart backoff instead of looping hot.
    pub(crate) upgrades_since_healthy: u32,
}

/// What an ended watch leads to.
pub(crate) fn next(outcome: Outcome) -> Next {
    match outcome {
        Outcome::Shutdown => Next::Stop,
        Outcome::ConfigChanged => Next::Recheck,
        Outcome::DockerLost(why) => Next::WaitForDocker(why),
        Outcome::Unhealthy(why) => Next::RestartUnhealthy(why),
        Outcome::UpdateFailed(why) => Next::RollBack(why),
        Outcome::Exited(EXIT_CLEAN) => Next::StayStopped,
        Outcome::Exited(EXIT_TERMINAL) => Next::Terminal,
        Outcome::Exited(EXIT_UPGRADE) => Next::Upgrade,
        Outcome::Exited(code) => {
            Next::RestartAfterBackoff(format!("the ECS agent exited with status {code}"))
        }
    }
}

/// After an exit-42 upgrade whose image was `loaded` (or not): restart at once the first time, back
/// off when it could not be loaded or when the agent asks again before it was healthy. Counts the
/// upgrade in `history`.
pub(crate) fn after_upgrade(loaded: bool, history: &mut History) -> Next {
    let again = history.upgrades_since_healthy > 0;
    history.upgrades_since_healthy += 1;
    match (loaded, again) {
        (true, false) => Next::RestartNow,
        (true, true) => Next::RestartAfterBackoff(
            "the ECS agent asked for an upgrade (exit 42) again before it was healthy".into(),
        ),
        (false, _) => Next::RestartAfterBackoff(
            "the ECS agent asked for an upgrade (exit 42) that could not be loaded".into(),
        ),
    }
}

/// The health of one watched agent, from its introspection answers and silences.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    watching_since: Instant,
    last_answer: Option<Instant>,
    healthy_since: Option<Instant>,
    /// The restart backoff is reset once per watch.
    reset_done: bool,
}

/// What a silence means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Silence {
    /// The agent has not answered yet and is within `start_timeout`.
    Starting,
    /// It answered before and is within `unhealthy_after` of its last answer.
    Tolerated,
    /// Restart it, for this reason.
    Unhealthy(String),
}

impl Health {
    pub(crate) fn new(now: Instant) -> Health {
        Health {
            watching_since: now,
            last_answer: None,
            healthy_since: None,
            reset_done: false,
        }
    }

    /// An answer at `now`. True once per watch: when the agent has answered without a silence for
    /// `healthy_reset_after`, so its restart backoff and upgrade count start afresh.
    pub(crate) fn on_answer(&mut self, now: Instant, cfg: &EcsAgentConfig) -> bool {
        self.last_answer = Some(now);
        let since = *self.healthy_since.get_or_insert(now);
        if !self.reset_done && now.duration_since(since) >= cfg.healthy_reset_after {
            self.reset_done = true;
            return true;
        }
        false
    }

    /// No answer at `now`; `why` is what the request met.
    pub(crate) fn on_silence(&mut self, now: Instant, cfg: &EcsAgentConfig, why: &str) -> Silence {
        self.healthy_since = None;
        match self.last_answer {
            Some(last) => {
                let silent: Duration = now.duration_since(last);
                if silent >= cfg.unhealthy_after {
                    Silence::Unhealthy(format!(
                        "introspection has not answered for {silent:?}: {why}"
                    ))
                } else {
                    Silence::Tolerated
                }
            }
            None => {
                let up = now.duration_since(self.watching_since);
                if up >= cfg.start_timeout {
                    Silence::Unhealthy(format!(
                        "introspection has not answered since the agent started {up:?} ago (ecs_agent.start_timeout): {why}"
                    ))
                } else {
                    Silence::Starting
                }
            }
        }
    }
}

/// Whether ECS sees the agent connected, from `DescribeContainerInstances` answers: a restart once
/// it has been reported disconnected for `ecs_agent.disconnected_after`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connection {
    last_asked: Option<Instant>,
    disconnected_since: Option<Instant>,
    /// ECS could not be asked last time.
    failing: bool,
}

impl Connection {
    /// Whether ECS is due to be asked again at `now`.
    pub(crate) fn due(&self, now: Instant, cfg: &EcsAgentConfig) -> bool {
        self.last_asked
            .map_or(true, |t| now.duration_since(t) >= cfg.connectivity_interval)
    }

    /// ECS answered at `now` that the agent is (or is not) connected: the reason to restart it, once
    /// it has been disconnected for `disconnected_after`.
    pub(crate) fn on_answer(
        &mut self,
        now: Instant,
        connected: bool,
        cfg: &EcsAgentConfig,
    ) -> Option<String> {
        self.last_asked = Some(now);
        self.failing = false;
        if connected {
            self.disconnected_since = None;
            return None;
        }
        let since = *self.disconnected_since.get_or_insert(now);
        let for_ = now.duration_since(since);
        (for_ >= cfg.disconnected_after).then(|| {
            format!(
                "ECS has reported the agent disconnected for {for_:?} (ecs_agent.disconnected_after) while its introspection answers"
            )
        })
    }

    /// ECS could not be asked (no permission, not reachable): try again at the next interval. True
    /// for the first failure in a row (to be logged).
    pub(crate) fn on_failure(&mut self, now: Instant) -> bool {
        self.last_asked = Some(now);
        !std::mem::replace(&mut self.failing, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnection_restarts_only_after_its_limit() {
        let cfg = EcsAgentConfig {
            connectivity_interval: Duration::from_secs(60),
            disconnected_after: Duration::from_secs(300),
            ..EcsAgentConfig::default()
        };
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut c = Connection::default();
        assert!(c.due(t0, &cfg));
        assert_eq!(c.on_answer(t0, false, &cfg), None);
        assert!(!c.due(at(30), &cfg));
        assert!(c.due(at(60), &cfg));
        assert_eq!(c.on_answer(at(200), true, &cfg), None);
        // Connected in between: the disconnection starts over.
        assert_eq!(c.on_answer(at(260), false, &cfg), None);
        assert_eq!(c.on_answer(at(500), false, &cfg), None);
        let why = c.on_answer(at(560), false, &cfg).unwrap();
        assert!(why.contains("disconnected for 300s"), "{why}");
        assert!(c.on_failure(at(600)));
        assert!(!c.on_failure(at(660)));
        assert!(!c.due(at(690), &cfg));
    }

    #[test]
    fn exit_codes_and_watch_ends_decide_the_next_step() {
        let cases = [
            (Outcome::Shutdown, Next::Stop),
            (Outcome::ConfigChanged, Next::Recheck),
            (
                Outcome::DockerLost("gone".into()),
                Next::WaitForDocker("gone".into()),
            ),
            (
                Outcome::Unhealthy("silent".into()),
                Next::RestartUnhealthy("silent".into()),
            ),
            (Outcome::Exited(0), Next::StayStopped),
            (Outcome::Exited(5), Next::Terminal),
            (Outcome::Exited(42), Next::Upgrade),
            (
                Outcome::Exited(1),
                Next::RestartAfterBackoff("the ECS agent exited with status 1".into()),
            ),
            (
                Outcome::Exited(137),
                Next::RestartAfterBackoff("the ECS agent exited with status 137".into()),
            ),
            (
                Outcome::Exited(-1),
                Next::RestartAfterBackoff("the ECS agent exited with status -1".into()),
            ),
        ];
        for (outcome, want) in cases {
            assert_eq!(next(outcome.clone()), want, "{outcome:?}");
        }
    }

    #[test]
    fn an_upgrade_restarts_at_once_only_the_first_time_and_only_when_loaded() {
        let mut h = History::default();
        assert_eq!(after_upgrade(true, &mut h), Next::RestartNow);
        assert!(
            matches!(after_upgrade(true, &mut h), Next::RestartAfterBackoff(r) if r.contains("again before it was healthy"))
        );
        let mut h = History::default();
        assert!(
            matches!(after_upgrade(false, &mut h), Next::RestartAfterBackoff(r) if r.contains("could not be loaded"))
        );
        assert_eq!(h.upgrades_since_healthy, 1);
        assert!(matches!(
            after_upgrade(true, &mut h),
            Next::RestartAfterBackoff(_)
        ));
        assert_eq!(h.upgrades_since_healthy, 2);
    }

    fn cfg() -> EcsAgentConfig {
        EcsAgentConfig {
            start_timeout: Duration::from_secs(300),
            unhealthy_after: Duration::from_secs(90),
            healthy_reset_after: Duration::from_secs(300),
            ..EcsAgentConfig::default()
        }
    }

    /// A timeline of answers (true) and silences (false) at offsets in seconds, with what each means.
    #[test]
    fn silence_is_tolerated_until_its_limits_and_answers_earn_a_reset() {
        #[derive(Debug, PartialEq)]
        enum Saw {
            Reset(bool),
            Silence(Silence),
        }
        let t0 = Instant::now();
        let cfg = cfg();
        let unhealthy = |s: &str| Saw::Silence(Silence::Unhealthy(s.into()));
        type Timeline = Vec<(u64, bool)>;
        let cases: Vec<(&str, Timeline, Saw)> = vec![
            ("silent from the start, within start_timeout", vec![(10, false)], Saw::Silence(Silence::Starting)),
            ("silent just before start_timeout", vec![(299, false)], Saw::Silence(Silence::Starting)),
            (
                "silent at start_timeout",
                vec![(300, false)],
                unhealthy("introspection has not answered since the agent started 300s ago (ecs_agent.start_timeout): refused"),
            ),
            ("answered, then silent briefly", vec![(10, true), (99, false)], Saw::Silence(Silence::Tolerated)),
            (
                "answered, then silent for unhealthy_after",
                vec![(10, true), (60, false), (100, false)],
                unhealthy("introspection has not answered for 90s: refused"),
            ),
            ("first answer", vec![(10, true)], Saw::Reset(false)),
            ("answering for healthy_reset_after", vec![(10, true), (200, true), (310, true)], Saw::Reset(true)),
            ("the reset comes once", vec![(0, true), (300, true), (600, true)], Saw::Reset(false)),
            (
                "a silence restarts the healthy period",
                vec![(0, true), (200, false), (210, true), (400, true)],
                Saw::Reset(false),
            ),
            (
                "a silence restarts the healthy period, which then completes",
                vec![(0, true), (200, false), (210, true), (510, true)],
                Saw::Reset(true),
            ),
        ];
        for (name, timeline, want) in cases {
            let mut h = Health::new(t0);
            let mut last = None;
            for (at, answered) in timeline {
                let now = t0 + Duration::from_secs(at);
                last = Some(if answered {
                    Saw::Reset(h.on_answer(now, &cfg))
                } else {
                    Saw::Silence(h.on_silence(now, &cfg, "refused"))
                });
            }
            assert_eq!(last.unwrap(), want, "{name}");
        }
    }
}
