//! Exponential backoff with jitter, shared by every retry loop (receiver, DynamoDB writes, message
//! visibility), so that all of them grow, cap and randomise their waits the same way.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: `base * 2^n`, capped at `max`, with "equal jitter" (a delay is drawn from the
/// upper half of the current step) so that many agents retrying at once spread out.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The step for attempt `n` (0-based) without jitter.
    pub(crate) fn step(base: Duration, max: Duration, n: u32) -> Duration {
        let factor = 1u64.checked_shl(n.min(32)).unwrap_or(u64::MAX);
        let d = base.saturating_mul(factor.min(u32::MAX as u64) as u32);
        d.min(max)
    }

    /// A jittered delay in `[step/2, step]` for attempt `n`.
    pub(crate) fn jittered(base: Duration, max: Duration, n: u32) -> Duration {
        Self::jitter(Self::step(base, max, n))
    }

    /// A delay drawn from `[step/2, step]`.
    pub(crate) fn jitter(step: Duration) -> Duration {
        let half = step / 2;
        let extra = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(extra).min(step - half)
    }

    /// The next delay; each call doubles the step until `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = Self::jittered(self.base, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// How many steps, counting the first (`base`), until a step reaches `max` (at most 64).
    pub(crate) fn steps_to_cap(base: Duration, max: Duration) -> u32 {
        let mut n = 1;
        let mut d = base;
        while d < max && n < 64 {
            d = d.saturating_mul(2);
            n += 1;
        }
        n
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(Backoff::step(base, max, 0), base);
        assert_eq!(Backoff::step(base, max, 3), Duration::from_secs(8));
        assert_eq!(Backoff::step(base, max, 10), max);
        assert_eq!(Backoff::step(base, max, 400), max);
        let mut b = Backoff::new(base, max);
        for n in 0..12 {
            let d = b.next_delay();
            let step = Backoff::step(base, max, n);
            assert!(d >= step / 2 && d <= step, "attempt {n}: {d:?} vs {step:?}");
        }
        b.reset();
        assert!(b.next_delay() <= base);
    }

    #[test]
    fn steps_to_cap_counts_the_doublings_until_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(Backoff::steps_to_cap(s(10), s(10)), 1);
        assert_eq!(Backoff::steps_to_cap(s(10), s(15 * 60)), 8); // 10 s .. 1280 s
        assert_eq!(Backoff::steps_to_cap(s(1), s(1)), 1);
        assert_eq!(Backoff::steps_to_cap(Duration::ZERO, s(1)), 64);
        assert!(Backoff::step(s(10), s(900), 7) >= s(900));
        assert!(Backoff::step(s(10), s(900), 6) < s(900));
    }
}
