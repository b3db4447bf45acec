//! The failure classes the worker pool branches on, and how AWS SDK errors map onto them.

use std::error::Error as StdError;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Why one file could not be processed, sorted by what the worker must do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Retrying later may succeed (throttling, 5xx, timeouts, a missing table being created): the message
    /// goes back to the queue with a growing visibility backoff.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (the object is gone, the file is not orders CSV): an error report is written
    /// and the message goes to the dead-letter queue.
    #[error("{0}")]
    Permanent(String),
    /// The pipeline cannot run on this host until an operator acts (its container image is not loaded,
    /// its program is not installed, Docker is down): retried like a transient failure, but reported
    /// once per pipeline rather than once per file.
    #[error("{0}")]
    Unavailable(String),
    /// Shutdown's grace period ran out: the message is released for another worker at once.
    #[error("stopped by shutdown before the file was finished")]
    Cancelled,
    /// The event announced a version of the object that is no longer the current one: a newer upload
    /// has its own event, so this one is acknowledged without processing.
    #[error("{0}")]
    Superseded(String),
}

/// How an AWS call failed, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Try again later.
    Transient,
    /// This request will never succeed as it is (validation, missing object).
    Permanent,
    /// Nothing works until an operator acts (queue missing, access denied, bad credentials).
    Fatal,
}

const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "TransactionInProgressException",
    "KMS.ThrottlingException",
];

const FATAL_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
    "NoSuchBucket",
    "ResourceNotFoundException",
];

/// Classify an SDK error by its kind, error code and HTTP status.
pub(crate) fn classify<E>(err: &SdkError<E, HttpResponse>) -> ErrorClass
where
    E: ProvideErrorMetadata,
{
    if let SdkError::DispatchFailure(d) = err {
        if d.as_connector_error()
            .and_then(|c| egress_failure(c))
            .is_some()
        {
            // A proxy refusing the credentials or an untrusted certificate: an operator must act.
            return ErrorClass::Fatal;
        }
    }
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ErrorClass::Transient
        }
        SdkError::ConstructionFailure(_) => ErrorClass::Permanent,
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let status = se.raw().status().as_u16();
            if TRANSIENT_CODES.contains(&code) || status >= 500 || status == 429 {
                ErrorClass::Transient
            } else if FATAL_CODES.contains(&code) || status == 401 || status == 403 {
                ErrorClass::Fatal
            } else {
                ErrorClass::Permanent
            }
        }
        _ => ErrorClass::Transient,
    }
}

/// The service's error code, if it sent one.
pub(crate) fn code<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<&str> {
    match err {
        SdkError::ServiceError(se) => se.err().code(),
        _ => None,
    }
}

/// An SDK error on one line: the service's code and message with the HTTP status, or else the chain of
/// causes (the SDK's own `Display` says only "service error", and `DisplayErrorContext` appends a
/// multi-kilobyte `Debug` dump).
pub(crate) fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: StdError + ProvideErrorMetadata + 'static,
{
    if let Some(line) = egress_failure(err) {
        return line.to_string();
    }
    if let SdkError::ServiceError(se) = err {
        if let Some(code) = se.err().code() {
            let message = se.err().message().unwrap_or("no message");
            let hint = if crate::clock::is_signature_time(code, message) {
                "; the request was refused for its signature time: this host's clock is off \
                 (check `timedatectl status` or `chronyc tracking`; `offload-agent preflight` shows \
                 the skew)"
            } else {
                ""
            };
            return format!(
                "{code}: {message} (HTTP {}){hint}",
                se.raw().status().as_u16()
            );
        }
    }
    chain(err)
}

/// The one-line egress explanation the AWS clients put in place of the SDK's error, if any.
pub(crate) fn egress_failure<'a>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a crate::aws::EgressFailure> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<crate::aws::EgressFailure>() {
            return Some(f);
        }
        cur = e.source();
    }
    None
}

/// An error and its sources, each once, joined by ": " (no Debug forms), on one line: a source whose
/// text spans lines (the SDK's "no credentials found in chain. Attempted:" list) has them joined by
/// "; ", so that a journal line stays one line.
pub(crate) fn chain(err: &dyn StdError) -> String {
    let mut text = one_line(&err.to_string());
    let mut source = err.source();
    while let Some(s) = source {
        let next = one_line(&s.to_string());
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// `text`'s lines, trimmed, joined by "; " (by a space after a line ending in ':'); a one-line text
/// unchanged.
fn one_line(text: &str) -> String {
    if !text.contains('\n') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("dispatch failure")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("no credentials found in chain. Attempted:\n  Environment: not set\n  Profile: not enabled\n")]
    struct Inner;

    #[test]
    fn a_chain_is_one_line_even_when_a_source_spans_lines() {
        assert_eq!(
            chain(&Outer(Inner)),
            "dispatch failure: no credentials found in chain. Attempted: Environment: not set; \
             Profile: not enabled"
        );
    }
}
