//! AWS SDK clients, built in one place: region, endpoints, credentials, timeouts and retries.
//!
//! Every call gets an attempt timeout (`aws.call_timeout`): without one, `ReceiveMessage` in the Rust SDK
//! can hang forever on a half-open connection. The receive client's timeout is the long-poll wait plus
//! `call_timeout`, so long polling is not cut short.
//!
//! Credentials: on an SSM hybrid host (the SSM agent's `identity_config.json` exists) or when
//! `aws.credentials_file` is set, every client shares one [`RotatingCredentials`] that follows the file
//! as the SSM agent rewrites it; otherwise the SDK's default chain.
//!
//! Retries: the SDK's standard mode (3 attempts; DynamoDB writes their own count, see
//! `processors::batch_writer`). Each retry is logged at info by `LogRetries` with the service, the
//! operation, the attempt and what failed the attempt before: the SDK's own retries are otherwise silent.
//! The number is bounded by the standard mode's retry token bucket (500 tokens, 5 per retry, 10 per
//! retried timeout, refilled by successes), so a sustained outage fails calls fast instead of filling
//! the log.

use std::time::Duration;

use aws_config::identity::IdentityCache;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

use crate::config::{AwsConfig, Config, HostConfig};
use crate::credentials::{RotatingCredentials, Source};

/// The clients the daemon and the commands use.
#[derive(Clone, Debug)]
pub struct Clients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// SQS client for `ReceiveMessage` only: its attempt timeout covers the long-poll wait.
    pub sqs_receive: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub ecs: aws_sdk_ecs::Client,
    pub region: String,
    /// The rotating-file provider, when one is in use.
    pub credentials: Option<RotatingCredentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsSetupError {
    #[error(
        "no AWS region: set aws.region in the configuration, or AWS_REGION in the environment"
    )]
    NoRegion,
}

/// Logs every retry of an AWS call, with what failed the attempt before it.
#[derive(Debug)]
struct LogRetries;

/// What failed the latest attempt of a call (kept in the call's config bag for the retry's log line).
#[derive(Debug, Clone)]
struct FailedAttempt(String);

impl Storable for FailedAttempt {
    type Storer = StoreReplace<Self>;
}

impl Intercept for LogRetries {
    fn name(&self) -> &'static str {
        "LogRetries"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(Err(e)) = context.output_or_error() {
            let why = match context.response() {
                Some(r) => format!("HTTP {}", r.status().as_u16()),
                None => crate::error::chain(e),
            };
            cfg.interceptor_state().store_put(FailedAttempt(why));
        }
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let attempt = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        if attempt > 1 {
            let op = cfg.load::<Metadata>();
            tracing::info!(
                service = op.map_or("", |m| m.service()),
                operation = op.map_or("", |m| m.name()),
                attempt,
                after = cfg.load::<FailedAttempt>().map_or("", |f| f.0.as_str()),
                "retrying an AWS call"
            );
        }
        Ok(())
    }
}

fn timeouts(cfg: &AwsConfig, attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(cfg.connect_timeout)
        .operation_attempt_timeout(attempt)
        .build()
}

/// Where credentials come from on this host: the SSM agent's rotating file when its
/// `identity_config.json` exists, else `aws.credentials_file`, else `None` (the SDK's chain).
pub fn credentials_source(aws: &AwsConfig, host: &HostConfig) -> Option<Source> {
    let identity = host.identity_config();
    let profile = aws.profile.clone().unwrap_or_else(|| "default".into());
    if identity.exists() {
        Some(Source {
            identity_config: Some(identity),
            file: aws.credentials_file.clone(),
            profile,
        })
    } else {
        aws.credentials_file.as_ref().map(|f| Source {
            identity_config: None,
            file: Some(f.clone()),
            profile,
        })
    }
}

async fn sdk_config(cfg: &AwsConfig, credentials: Option<&RotatingCredentials>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts(cfg, cfg.call_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &cfg.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    match credentials {
        Some(c) => {
            // The provider caches and re-reads by itself; the SDK's cache would hold rotated-out keys
            // until their (short) expiry.
            loader = loader
                .credentials_provider(c.clone())
                .identity_cache(IdentityCache::no_cache());
        }
        None => {
            if let Some(profile) = &cfg.profile {
                loader = loader.profile_name(profile);
            }
        }
    }
    loader.load().await
}

/// Build every client from the configuration.
pub async fn clients(cfg: &Config) -> Result<Clients, AwsSetupError> {
    let credentials = credentials_source(&cfg.aws, &cfg.host).map(RotatingCredentials::new);
    clients_with(&cfg.aws, cfg.queue.wait_time, credentials).await
}

/// Build every client with explicit credentials (`None`: the SDK's default chain). `wait_time` is the
/// SQS long-poll wait.
pub async fn clients_with(
    cfg: &AwsConfig,
    wait_time: Duration,
    credentials: Option<RotatingCredentials>,
) -> Result<Clients, AwsSetupError> {
    let shared = sdk_config(cfg, credentials.as_ref()).await;
    let region = shared
        .region()
        .map(|r| r.to_string())
        .ok_or(AwsSetupError::NoRegion)?;

    let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(url) = cfg.endpoint_for("s3") {
        // Emulators and S3-compatible stores want path-style addressing and do not all understand the
        // SDK's default streaming checksums (aws-chunked trailers).
        s3 = s3
            .endpoint_url(url)
            .force_path_style(true)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
    }
    let mut sqs = aws_sdk_sqs::config::Builder::from(&shared);
    // A 20 s long poll is silent by design: stalled-stream protection would poll it continuously
    // (about 1.4 % of a core while idle). The attempt timeout guards against half-open connections.
    let mut receive = aws_sdk_sqs::config::Builder::from(&shared)
        .timeout_config(timeouts(cfg, wait_time + cfg.call_timeout))
        .stalled_stream_protection(aws_sdk_sqs::config::StalledStreamProtectionConfig::disabled());
    let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&shared);
    let mut ssm = aws_sdk_ssm::config::Builder::from(&shared);
    let mut ecs = aws_sdk_ecs::config::Builder::from(&shared);
    if let Some(url) = cfg.endpoints.sqs.as_deref() {
        sqs = sqs.endpoint_url(url);
        receive = receive.endpoint_url(url);
    }
    if let Some(url) = cfg.endpoints.dynamodb.as_deref() {
        dynamodb = dynamodb.endpoint_url(url);
    }
    if let Some(url) = cfg.endpoints.ssm.as_deref() {
        ssm = ssm.endpoint_url(url);
    }
    if let Some(url) = cfg.endpoints.ecs.as_deref() {
        ecs = ecs.endpoint_url(url);
    }
    Ok(Clients {
        s3: aws_sdk_s3::Client::from_conf(s3.interceptor(LogRetries).build()),
        sqs: aws_sdk_sqs::Client::from_conf(sqs.interceptor(LogRetries).build()),
        sqs_receive: aws_sdk_sqs::Client::from_conf(receive.interceptor(LogRetries).build()),
        dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.interceptor(LogRetries).build()),
        ssm: aws_sdk_ssm::Client::from_conf(ssm.interceptor(LogRetries).build()),
        ecs: aws_sdk_ecs::Client::from_conf(ecs.interceptor(LogRetries).build()),
        region,
        credentials,
    })
}
