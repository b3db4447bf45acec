//! The host's clock against AWS's: every answer's `Date` header measures the skew.
//!
//! The SDK (aws-runtime 1.10) corrects skew by itself when signing: it signs at its own clock plus the
//! skew it measured, and retries a request refused for its signature time once. The correction hides
//! the cause, though, and a host whose clock is minutes off breaks other things (the SSM agent, TLS
//! certificate checks, the logs' order). So the skew is exported (`offload_clock_skew_seconds`, `/status`)
//! and a warning naming time synchronisation is logged once per episode above [`WARN_ABOVE`].

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

/// Above this skew a warning is logged (once, until the clock is back within [`BACK_WITHIN`]).
pub const WARN_ABOVE: Duration = Duration::from_secs(60);
/// The episode ends when the skew falls back within this.
pub const BACK_WITHIN: Duration = Duration::from_secs(30);
/// A measurement from an answer that took longer than this is not trusted.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(10);

/// The latest measured skew, shared by every client of a process.
#[derive(Debug, Default)]
pub struct Clock {
    /// AWS's clock minus ours, in milliseconds (positive: the host is behind).
    skew_ms: AtomicI64,
    measured: AtomicBool,
    warned: AtomicBool,
}

impl Clock {
    pub fn new() -> Arc<Clock> {
        Arc::new(Clock::default())
    }

    /// AWS's clock minus this host's, in seconds, once an answer has been measured.
    pub fn skew_seconds(&self) -> Option<f64> {
        self.measured
            .load(Ordering::Relaxed)
            .then(|| self.skew_ms.load(Ordering::Relaxed) as f64 / 1000.0)
    }

    /// Record one measurement: `server` is the answer's `Date`, `local` the midpoint of the request
    /// by this host's clock.
    pub fn record(&self, server: SystemTime, local: SystemTime, host: &str) {
        let skew_ms = skew_ms(server, local);
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
        self.measured.store(true, Ordering::Relaxed);
        let size = Duration::from_millis(skew_ms.unsigned_abs());
        if size > WARN_ABOVE && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                clock_skew_seconds = skew_ms as f64 / 1000.0,
                host,
                "this host's clock is {} {} AWS's ({host}'s Date header): requests may be refused for \
                 their signature time and certificates misjudged; check time synchronisation \
                 (`timedatectl status`, `chronyc tracking`, systemd-timesyncd or chrony)",
                humantime::format_duration(Duration::from_secs(size.as_secs())),
                if skew_ms > 0 { "behind" } else { "ahead of" },
            );
        } else if size <= BACK_WITHIN && self.warned.swap(false, Ordering::Relaxed) {
            tracing::info!(
                clock_skew_seconds = skew_ms as f64 / 1000.0,
                "this host's clock agrees with AWS's again"
            );
        }
    }
}

/// When the current attempt was sent (in the call's config bag).
#[derive(Debug, Clone, Copy)]
struct SentAt(SystemTime);

impl Storable for SentAt {
    type Storer = StoreReplace<Self>;
}

/// Measures every answer's `Date` against the host's clock.
#[derive(Debug, Clone)]
pub struct MeasureClock(pub Arc<Clock>);

impl Intercept for MeasureClock {
    fn name(&self) -> &'static str {
        "MeasureClock"
    }

    fn read_before_transmit(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(SentAt(SystemTime::now()));
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(sent) = cfg.load::<SentAt>().map(|s| s.0) else {
            return Ok(());
        };
        let now = SystemTime::now();
        let Ok(round_trip) = now.duration_since(sent) else {
            return Ok(());
        };
        if round_trip > MAX_ROUND_TRIP {
            return Ok(());
        }
        let Some(date) = context.response().headers().get("date") else {
            return Ok(());
        };
        let Some(server) = http_date(date) else {
            return Ok(());
        };
        // The Date header has whole seconds: compare with the request's midpoint, rounded down.
        let midpoint = sent + round_trip / 2;
        self.0.record(server, midpoint, "AWS");
        Ok(())
    }
}

/// An HTTP `Date` header's time.
pub fn http_date(value: &str) -> Option<SystemTime> {
    let t =
        aws_smithy_types::DateTime::from_str(value, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    SystemTime::try_from(t).ok()
}

/// `server` minus `local`, in milliseconds (positive: the host's clock is behind).
pub fn skew_ms(server: SystemTime, local: SystemTime) -> i64 {
    match server.duration_since(local) {
        Ok(ahead) => ahead.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Whether an AWS error code and message mean the request was refused for its signature time.
pub fn is_signature_time(code: &str, message: &str) -> bool {
    code == "RequestTimeTooSkewed"
        || message.contains("Signature expired")
        || message.contains("Signature not yet current")
        || message.contains("RequestTimeTooSkewed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_signed_and_shown_once_measured() {
        let c = Clock::default();
        assert_eq!(c.skew_seconds(), None);
        let now = SystemTime::now();
        c.record(now + Duration::from_secs(600), now, "test");
        assert_eq!(c.skew_seconds(), Some(600.0));
        assert!(c.warned.load(Ordering::Relaxed));
        c.record(now - Duration::from_secs(90), now, "test");
        assert_eq!(c.skew_seconds(), Some(-90.0));
        assert!(c.warned.load(Ordering::Relaxed), "still one episode");
        c.record(now, now, "test");
        assert!(!c.warned.load(Ordering::Relaxed), "the episode ended");
    }

    #[test]
    fn signature_time_refusals_are_recognised() {
        assert!(is_signature_time("RequestTimeTooSkewed", ""));
        assert!(is_signature_time(
            "InvalidSignatureException",
            "Signature expired: 20261202T010000Z is now earlier than ..."
        ));
        assert!(is_signature_time(
            "InvalidSignatureException",
            "Signature not yet current: ..."
        ));
        assert!(!is_signature_time("AccessDenied", "nope"));
    }
}
