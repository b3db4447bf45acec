//! AWS SDK clients, built in one place: region, endpoint override, timeouts and retries.
//!
//! Every call gets an attempt timeout (`aws.call_timeout`): without one, `ReceiveMessage` in the Rust SDK
//! can hang forever on a half-open connection. The receive client's timeout is the long-poll wait plus
//! `call_timeout`, so long polling is not cut short.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::AwsConfig;

/// The clients the worker pool and the CLI use.
#[derive(Clone, Debug)]
pub struct Clients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// SQS client for `ReceiveMessage` only: its attempt timeout covers the long-poll wait.
    pub sqs_receive: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsSetupError {
    #[error(
        "no AWS region: set aws.region in the configuration, or AWS_REGION in the environment"
    )]
    NoRegion,
}

fn timeouts(cfg: &AwsConfig, attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(cfg.connect_timeout)
        .operation_attempt_timeout(attempt)
        .build()
}

async fn sdk_config(cfg: &AwsConfig) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts(cfg, cfg.call_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &cfg.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(profile) = &cfg.profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

/// Build every client. `wait_time` is the SQS long-poll wait.
pub async fn clients(cfg: &AwsConfig, wait_time: Duration) -> Result<Clients, AwsSetupError> {
    let shared = sdk_config(cfg).await;
    let region = shared
        .region()
        .map(|r| r.to_string())
        .ok_or(AwsSetupError::NoRegion)?;

    let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
    if cfg.endpoint_url.is_some() {
        // Emulators and S3-compatible stores want path-style addressing and do not all understand the
        // SDK's default streaming checksums (aws-chunked trailers).
        s3 = s3
            .force_path_style(true)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
    }
    let receive = aws_sdk_sqs::config::Builder::from(&shared)
        .timeout_config(timeouts(cfg, wait_time + cfg.call_timeout))
        .build();
    Ok(Clients {
        s3: aws_sdk_s3::Client::from_conf(s3.build()),
        sqs: aws_sdk_sqs::Client::new(&shared),
        sqs_receive: aws_sdk_sqs::Client::from_conf(receive),
        dynamodb: aws_sdk_dynamodb::Client::new(&shared),
        region,
    })
}
