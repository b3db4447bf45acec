//! Limits of the AWS services the agent talks to, each named once. They are facts about the services,
//! not settings: configuration is checked against them, and requests are clamped to them.

use std::time::Duration;

/// S3 refuses object keys longer than this many bytes (UTF-8).
pub(crate) const S3_MAX_KEY_BYTES: usize = 1024;
/// The longest an SQS message can be kept invisible, counted from its receipt (12 hours): for the
/// visibility timeout and every `ChangeMessageVisibility`.
pub(crate) const SQS_MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// The longest long poll SQS accepts (`WaitTimeSeconds`).
pub(crate) const SQS_MAX_WAIT: Duration = Duration::from_secs(20);
/// The most messages one `ReceiveMessage` may return.
pub(crate) const SQS_MAX_RECEIVE_BATCH: usize = 10;
/// DynamoDB refuses a partition key longer than this many bytes.
pub(crate) const DYNAMODB_MAX_PARTITION_KEY_BYTES: usize = 2048;
/// DynamoDB refuses an item larger than this (attribute names and values together).
/// The longest sort key value DynamoDB takes, in bytes.
pub(crate) const DYNAMODB_MAX_SORT_KEY_BYTES: usize = 1024;
pub(crate) const DYNAMODB_MAX_ITEM_BYTES: usize = 400 * 1024;
/// The most requests one `BatchWriteItem` may carry.
pub(crate) const DYNAMODB_MAX_BATCH_WRITE: usize = 25;

/// `d` in whole seconds, as SQS's visibility calls take it, clamped to [`SQS_MAX_VISIBILITY`].
pub(crate) fn sqs_visibility_secs(d: Duration) -> i32 {
    d.min(SQS_MAX_VISIBILITY).as_secs() as i32
}
