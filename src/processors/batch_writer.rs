//! DynamoDB `BatchWriteItem` without a copy of the batch.
//!
//! Throttling, 5xx answers, timeouts and dropped connections are retried by the SDK itself, from the
//! request it already serialized (standard retry mode, `dynamodb.write_max_attempts` attempts, 50 ms
//! doubling to 5 s, with jitter), so the writer never needs the items again. What DynamoDB returns
//! unprocessed comes back as owned items in its answer and is sent again from there. An answer that
//! refuses the data itself (`ValidationException`) is reported as `WriteError::Refused`: the caller
//! builds that batch's items again from its packed rows and writes them one at a time to find which row
//! it was.

use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError;
use aws_sdk_dynamodb::types::WriteRequest;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef;
use aws_smithy_types::config_bag::ConfigBag;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::{classify, describe, ErrorClass, ProcessError};
use crate::metrics::Metrics;

/// The error codes with which DynamoDB says it is throttling.
const THROTTLING: [&str; 3] = [
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
];

/// Counts every throttled attempt, including those the SDK retries by itself.
struct CountThrottles(Arc<Metrics>);

impl std::fmt::Debug for CountThrottles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountThrottles")
    }
}

impl Intercept for CountThrottles {
    fn name(&self) -> &'static str {
        "CountThrottles"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let code = match context.output_or_error() {
            Some(Err(e)) => e
                .as_operation_error()
                .and_then(|e| e.downcast_ref::<BatchWriteItemError>())
                .and_then(|e| e.code()),
            _ => None,
        };
        if code.is_some_and(|c| THROTTLING.contains(&c)) {
            self.0.dynamodb_throttled();
        }
        Ok(())
    }
}

/// The client rows are written with: `base` (same connections, credentials and endpoint) with the
/// write retry policy and the throttle counter.
pub(crate) fn writer_client(
    base: &aws_sdk_dynamodb::Client,
    max_attempts: u32,
    metrics: Arc<Metrics>,
) -> aws_sdk_dynamodb::Client {
    let conf = base
        .config()
        .to_builder()
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts.max(1))
                .with_initial_backoff(Duration::from_millis(50))
                .with_max_backoff(Duration::from_secs(5)),
        )
        .interceptor(CountThrottles(metrics))
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

/// Why a batch was not written.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// DynamoDB refused the batch's data (`ValidationException`): some item in it is not acceptable.
    Refused(String),
    /// Anything else: the file fails with this (transient or permanent) error.
    Failed(ProcessError),
}

/// Writes batches to one table.
#[derive(Clone)]
pub(crate) struct BatchWriter {
    pub(crate) ddb: aws_sdk_dynamodb::Client,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) table: String,
    /// Rounds of `UnprocessedItems` before the file is given up for now (`dynamodb.write_max_attempts`).
    pub(crate) max_attempts: u32,
}

impl BatchWriter {
    /// Write every request, sending again what DynamoDB returns unprocessed (which the SDK does not
    /// retry) with exponential backoff and jitter.
    pub(crate) async fn write(
        &self,
        mut pending: Vec<WriteRequest>,
        cancel: &CancellationToken,
    ) -> Result<(), WriteError> {
        let total = pending.len();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let res = self
                .ddb
                .batch_write_item()
                .request_items(&self.table, pending)
                .send()
                .await;
            let out = match res {
                Ok(out) => out,
                Err(e) => {
                    let text = format!(
                        "BatchWriteItem to table {} failed: {}",
                        self.table,
                        describe(&e)
                    );
                    if crate::error::code(&e) == Some("ValidationException") {
                        return Err(WriteError::Refused(describe(&e)));
                    }
                    return Err(WriteError::Failed(match classify(&e) {
                        // Transient: the SDK already retried it write_max_attempts times. Fatal: a
                        // table that does not exist yet, or a policy being fixed. Either way the whole
                        // file is retried later rather than condemned.
                        ErrorClass::Transient | ErrorClass::Fatal => ProcessError::Transient(text),
                        ErrorClass::Permanent => ProcessError::Permanent(text),
                    }));
                }
            };
            pending = out
                .unprocessed_items
                .and_then(|mut m| m.remove(&self.table))
                .unwrap_or_default();
            if pending.is_empty() {
                return Ok(());
            }
            self.metrics.dynamodb_unprocessed();
            tracing::debug!(table = %self.table, unprocessed = pending.len(), "DynamoDB returned unprocessed items; retrying them");
            if backoff.attempts() + 1 >= self.max_attempts {
                return Err(WriteError::Failed(ProcessError::Transient(format!(
                    "DynamoDB table {} kept {} of {} items unprocessed after {} attempts (dynamodb.write_max_attempts)",
                    self.table,
                    pending.len(),
                    total,
                    self.max_attempts
                ))));
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => return Err(WriteError::Failed(ProcessError::Cancelled)),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
