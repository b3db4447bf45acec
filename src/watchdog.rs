//! The SSM agent watchdog: after a host was offline, the SSM agent can stop refreshing the rotating
//! credentials file for hours (its backoff is uncapped: amazon-ssm-agent#468, #479, #616), and every AWS
//! call of this host fails once they expire. When `identity_config.json` says the credentials expired,
//! or were retrieved longer ago than `watchdog.ssm_credentials_max_age`, for longer than
//! `watchdog.ssm_stale_grace`, the daemon restarts the SSM agent's unit — at most once per
//! `watchdog.ssm_restart_interval`, each time logged with the reason and counted.

use std::time::{Duration, Instant, SystemTime};

use crate::credentials::IdentityConfig;

/// The watchdog's settings (`[watchdog]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SsmLimits {
    pub(crate) max_age: Duration,
    pub(crate) grace: Duration,
    pub(crate) interval: Duration,
}

/// Where the SSM agent's credentials stand.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Freshness {
    Fresh,
    /// Stale since then (expired, or retrieved too long ago).
    Stale {
        since: Instant,
    },
}

/// What to do after an observation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Fine,
    /// Stale, but within the grace or the restart interval: wait.
    Waiting(String),
    /// Restart the SSM agent now, for this reason.
    Restart(String),
}

/// The SSM agent watchdog's state: freshness and the last restart.
#[derive(Debug)]
pub(crate) struct SsmWatchdog {
    freshness: Freshness,
    last_restart: Option<Instant>,
    restarts: u64,
}

impl Default for SsmWatchdog {
    fn default() -> Self {
        SsmWatchdog {
            freshness: Freshness::Fresh,
            last_restart: None,
            restarts: 0,
        }
    }
}

/// Why the credentials are stale, or `None` when they are not.
fn staleness(id: &IdentityConfig, wall: SystemTime, max_age: Duration) -> Option<String> {
    let parse = |t: &Option<String>| t.as_deref().and_then(crate::credentials::parse_time);
    if let Some(exp) = parse(&id.credentials_expires_at) {
        if exp <= wall {
            return Some(format!(
                "its credentials expired at {}",
                id.credentials_expires_at.as_deref().unwrap_or("")
            ));
        }
    }
    let age = parse(&id.credentials_retrieved_at).and_then(|t| wall.duration_since(t).ok())?;
    (age > max_age).then(|| {
        format!(
            "its credentials were retrieved {} min ago (more than watchdog.ssm_credentials_max_age, {} min)",
            age.as_secs() / 60,
            max_age.as_secs() / 60
        )
    })
}

impl SsmWatchdog {
    /// How many restarts this watchdog asked for.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Look at what `identity_config.json` says now.
    pub(crate) fn observe(
        &mut self,
        limits: SsmLimits,
        id: &IdentityConfig,
        now: Instant,
        wall: SystemTime,
    ) -> Verdict {
        let Some(why) = staleness(id, wall, limits.max_age) else {
            self.freshness = Freshness::Fresh;
            return Verdict::Fine;
        };
        let since = match self.freshness {
            Freshness::Fresh => {
                self.freshness = Freshness::Stale { since: now };
                now
            }
            Freshness::Stale { since } => since,
        };
        let stale_for = now.duration_since(since);
        if stale_for < limits.grace {
            return Verdict::Waiting(format!(
                "the SSM agent is not refreshing credentials: {why}"
            ));
        }
        if let Some(last) = self.last_restart {
            if now.duration_since(last) < limits.interval {
                return Verdict::Waiting(format!(
                    "the SSM agent is not refreshing credentials: {why}; restarted {} s ago, not again within watchdog.ssm_restart_interval",
                    now.duration_since(last).as_secs()
                ));
            }
        }
        self.last_restart = Some(now);
        self.restarts += 1;
        Verdict::Restart(format!(
            "{why}, for {} s (watchdog.ssm_stale_grace is {} s)",
            stale_for.as_secs(),
            limits.grace.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(retrieved_ago: u64, expires_in: i64, wall: SystemTime) -> IdentityConfig {
        let t = |d: SystemTime| Some(humantime::format_rfc3339(d).to_string());
        IdentityConfig {
            credentials_retrieved_at: t(wall - Duration::from_secs(retrieved_ago)),
            credentials_expires_at: t(if expires_in >= 0 {
                wall + Duration::from_secs(expires_in as u64)
            } else {
                wall - Duration::from_secs((-expires_in) as u64)
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_stuck_agent_is_restarted_once_per_interval_after_the_grace() {
        let limits = SsmLimits {
            max_age: Duration::from_secs(45 * 60),
            grace: Duration::from_secs(60),
            interval: Duration::from_secs(3600),
        };
        let wall = SystemTime::now();
        let t0 = Instant::now();
        let mut w = SsmWatchdog::default();
        assert_eq!(
            w.observe(limits, &id(60, 3000, wall), t0, wall),
            Verdict::Fine
        );
        let old = id(50 * 60, 600, wall);
        assert!(matches!(
            w.observe(limits, &old, t0, wall),
            Verdict::Waiting(_)
        ));
        let at = t0 + Duration::from_secs(61);
        let Verdict::Restart(why) = w.observe(limits, &old, at, wall) else {
            panic!("no restart after the grace")
        };
        assert!(why.contains("retrieved 50 min ago"), "{why}");
        // Not again within the interval, however stale.
        let later = at + Duration::from_secs(600);
        let Verdict::Waiting(why) = w.observe(limits, &old, later, wall) else {
            panic!("restarted twice in the interval")
        };
        assert!(why.contains("not again within"), "{why}");
        let Verdict::Restart(_) = w.observe(limits, &old, at + Duration::from_secs(3601), wall)
        else {
            panic!("no restart after the interval")
        };
        assert_eq!(w.restarts(), 2);
        // Expired credentials count as stale whatever their age.
        let mut w = SsmWatchdog::default();
        let expired = id(60, -5, wall);
        assert!(
            matches!(w.observe(limits, &expired, t0, wall), Verdict::Waiting(w) if w.contains("expired"))
        );
        // Fresh again: the grace starts over.
        assert_eq!(
            w.observe(limits, &id(1, 3000, wall), t0, wall),
            Verdict::Fine
        );
        assert!(matches!(
            w.observe(limits, &expired, t0 + Duration::from_secs(61), wall),
            Verdict::Waiting(_)
        ));
    }
}
