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
//! Egress: every client is built on the HTTP client of [`crate::egress::Egress`] (proxy, `no_proxy`,
//! the system's roots plus `network.ca_bundle`); an `http://` endpoint gets the client of
//! `network.http_proxy`. A failure that is the egress's doing (407, a proxy that does not answer, an
//! untrusted certificate) is replaced, after the last attempt, by one line naming the endpoint, the
//! proxy (without its password) and the key to set ([`ExplainEgress`]).
//!
//! Instance metadata: unless `aws.imds = true`, the credentials chain is environment → profile files
//! (with SSO, assume-role and credential_process) → web identity → the ECS container endpoint, and the
//! region chain environment → profile: the EC2 metadata service is never asked. Commands call
//! [`Clients::require_credentials`] first, which fails in well under a second saying where it looked.
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
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextMut,
    FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

use std::sync::Arc;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::orchestrator::OrchestratorError;
use aws_smithy_runtime_api::client::result::ConnectorError;

use crate::clock::{Clock, MeasureClock};
use crate::config::{AwsConfig, Config, HostConfig};
use crate::credentials::{RotatingCredentials, Source};
use crate::egress::{Blocker, Egress};

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
    /// The provider every client signs with (the rotating file's, or the chain's).
    pub provider: Option<SharedCredentialsProvider>,
    /// The skew measured against AWS's answers.
    pub clock: Arc<Clock>,
    /// Where the chain looks for credentials, for the message when it finds none.
    pub looked_in: String,
}

/// No credentials anywhere the configuration lets the daemon look.
#[derive(Debug, thiserror::Error)]
#[error("no AWS credentials: looked in {looked_in}; {advice}")]
pub struct NoCredentials {
    pub looked_in: String,
    pub advice: String,
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
                "retrying {} {} (attempt {attempt}) after {}",
                op.map_or("AWS", |m| m.service()),
                op.map_or("call", |m| m.name()),
                cfg.load::<FailedAttempt>()
                    .map_or("a failure", |f| f.0.as_str())
            );
        }
        Ok(())
    }
}

/// A failure on the way to AWS that the egress explains, in one line (see [`Blocker::explain`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EgressFailure(pub String);

/// The URL of a call's latest attempt (in its config bag).
#[derive(Debug, Clone)]
struct RequestUrl(String);

impl Storable for RequestUrl {
    type Storer = StoreReplace<Self>;
}

/// Replaces a call's final error by [`EgressFailure`] when the egress is its cause.
#[derive(Debug, Clone)]
struct ExplainEgress {
    egress: Arc<Egress>,
}

impl Intercept for ExplainEgress {
    fn name(&self) -> &'static str {
        "ExplainEgress"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // The request is gone by the time the call completes: remember where it went.
        cfg.interceptor_state()
            .store_put(RequestUrl(context.request().uri().to_string()));
        Ok(())
    }

    fn modify_before_completion(
        &self,
        context: &mut FinalizerInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(url) = cfg.load::<RequestUrl>().map(|u| u.0.clone()) else {
            return Ok(());
        };
        let status = context.response().map(|r| r.status().as_u16());
        let Some(Err(err)) = context.output_or_error() else {
            return Ok(());
        };
        let chain = crate::error::chain(err);
        let proxy = self.egress.route(&url);
        let Some(blocker) = Blocker::recognise(status, &chain, proxy.is_some()) else {
            return Ok(());
        };
        let endpoint = endpoint_of(&url);
        let line = blocker.explain(&endpoint, &self.egress, proxy);
        if let Some(slot) = context.output_or_error_mut() {
            *slot = Err(OrchestratorError::connector(ConnectorError::other(
                Box::new(EgressFailure(line)),
                None,
            )));
        }
        Ok(())
    }
}

/// `scheme://host[:port]` of a request URL.
pub(crate) fn endpoint_of(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(u) => format!(
            "{}://{}",
            u.scheme_str().unwrap_or("https"),
            u.authority()
                .map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""))
        ),
        Err(_) => url.to_string(),
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

async fn sdk_config(
    cfg: &AwsConfig,
    egress: &Egress,
    http: &SharedHttpClient,
    credentials: Option<&RotatingCredentials>,
) -> SdkConfig {
    use aws_config::meta::region::RegionProviderChain;
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http.clone())
        .timeout_config(timeouts(cfg, cfg.call_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if egress.use_fips {
        loader = loader.use_fips(true);
    }
    if egress.use_dual_stack {
        loader = loader.use_dual_stack(true);
    }
    let profile = cfg.profile.clone();
    let region = match &cfg.region {
        Some(region) => Some(Region::new(region.clone())),
        None if cfg.imds => None,
        None => {
            let mut from_profile = aws_config::profile::ProfileFileRegionProvider::builder();
            if let Some(p) = &profile {
                from_profile = from_profile.profile_name(p);
            }
            RegionProviderChain::first_try(
                aws_config::environment::EnvironmentVariableRegionProvider::new(),
            )
            .or_else(from_profile.build())
            .region()
            .await
        }
    };
    if let Some(region) = &region {
        loader = loader.region(region.clone());
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
            if let Some(profile) = &profile {
                loader = loader.profile_name(profile);
            }
            if !cfg.imds {
                loader = loader.credentials_provider(chain_without_imds(http, region, profile));
            }
        }
    }
    loader.load().await
}

/// The SDK's default credentials chain without its last link, the EC2 instance metadata service.
fn chain_without_imds(
    http: &SharedHttpClient,
    region: Option<Region>,
    profile: Option<String>,
) -> aws_config::meta::credentials::CredentialsProviderChain {
    use aws_config::meta::credentials::CredentialsProviderChain;
    let pc = aws_config::provider_config::ProviderConfig::default()
        .with_http_client(http.clone())
        .with_region(region);
    let mut from_profile =
        aws_config::profile::ProfileFileCredentialsProvider::builder().configure(&pc);
    if let Some(p) = profile {
        from_profile = from_profile.profile_name(p);
    }
    CredentialsProviderChain::first_try(
        "Environment",
        aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else("Profile", from_profile.build())
    .or_else(
        "WebIdentityToken",
        aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
            .configure(&pc)
            .build(),
    )
    .or_else(
        "EcsContainer",
        aws_config::ecs::EcsCredentialsProvider::builder()
            .configure(&pc)
            .build(),
    )
}

/// Where credentials are looked for, in order, for the message when none are found.
fn looked_in(cfg: &AwsConfig, host: &HostConfig, imds: bool) -> String {
    let profile = cfg.profile.as_deref().unwrap_or("default");
    let mut places = vec![format!(
        "the SSM agent's {} (absent: the host is not registered)",
        host.identity_config().display()
    )];
    if let Some(f) = &cfg.credentials_file {
        places.push(format!(
            "aws.credentials_file {} (profile {profile})",
            f.display()
        ));
    }
    places.push("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment".into());
    places.push(format!(
        "profile {profile} of ~/.aws/credentials and ~/.aws/config (AWS_SHARED_CREDENTIALS_FILE, \
         AWS_CONFIG_FILE)"
    ));
    places.push("a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)".into());
    places.push("the container endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI)".into());
    places.push(if imds {
        "the EC2 instance metadata service".into()
    } else {
        "not the EC2 instance metadata service (aws.imds = false)".into()
    });
    places.join(", ")
}

/// Build every client from the configuration.
pub async fn clients(cfg: &Config) -> Result<Clients, AwsSetupError> {
    let credentials = credentials_source(&cfg.aws, &cfg.host).map(RotatingCredentials::new);
    let mut clients =
        clients_with(&cfg.aws, &cfg.network, cfg.queue.wait_time, credentials).await?;
    clients.looked_in = looked_in(&cfg.aws, &cfg.host, cfg.aws.imds);
    Ok(clients)
}

impl Clients {
    /// Resolve credentials once, so that a command without any fails at once with where it looked,
    /// rather than at its first call with the SDK's chain of causes.
    pub async fn require_credentials(&self) -> Result<(), NoCredentials> {
        let Some(provider) = &self.provider else {
            return Ok(());
        };
        let advice = "on a hybrid host run `offload-agent register`; elsewhere set \
                      aws.credentials_file, or the AWS_* variables (aws.imds = true on EC2)";
        match tokio::time::timeout(Duration::from_secs(5), provider.provide_credentials()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                use aws_credential_types::provider::error::CredentialsError;
                match e {
                    // A source that exists but fails says so itself (an expired SSO session, a
                    // profile's bad role): show its reason.
                    CredentialsError::CredentialsNotLoaded(_) => Err(NoCredentials {
                        looked_in: self.looked_in.clone(),
                        advice: advice.into(),
                    }),
                    other => Err(NoCredentials {
                        looked_in: self.looked_in.clone(),
                        advice: format!("{}; {advice}", crate::error::chain(&other)),
                    }),
                }
            }
            Err(_) => Err(NoCredentials {
                looked_in: self.looked_in.clone(),
                advice: format!("the credentials provider did not answer within 5 s; {advice}"),
            }),
        }
    }
}

/// Build every client with explicit credentials (`None`: the SDK's default chain). `wait_time` is the
/// SQS long-poll wait.
pub async fn clients_with(
    cfg: &AwsConfig,
    egress: &Egress,
    wait_time: Duration,
    credentials: Option<RotatingCredentials>,
) -> Result<Clients, AwsSetupError> {
    let https = egress.http_client("https");
    // Plain-HTTP endpoints (emulators, some private endpoints) go through `network.http_proxy`.
    let http = egress.http_client("http");
    let client_for = |url: Option<&str>| match url {
        Some(u) if u.starts_with("http://") => http.clone(),
        _ => https.clone(),
    };
    let shared = sdk_config(
        cfg,
        egress,
        &client_for(cfg.endpoint_url.as_deref()),
        credentials.as_ref(),
    )
    .await;
    let provider = shared.credentials_provider();
    let clock = Clock::new();
    let explain = ExplainEgress {
        egress: Arc::new(egress.clone()),
    };
    let region = shared
        .region()
        .map(|r| r.to_string())
        .ok_or(AwsSetupError::NoRegion)?;

    // Each service: its HTTP client (by its endpoint's scheme) and its own endpoint override.
    macro_rules! builder {
        ($sdk:ident, $service:literal) => {{
            let b = $sdk::config::Builder::from(&shared)
                .http_client(client_for(cfg.endpoint_for($service)));
            match cfg.endpoints.get($service) {
                Some(url) => b.endpoint_url(url),
                None => b,
            }
        }};
    }
    let mut s3 = builder!(aws_sdk_s3, "s3");
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
    // A 20 s long poll is silent by design: stalled-stream protection would poll it continuously
    // (about 1.4 % of a core while idle). The attempt timeout guards against half-open connections.
    let receive = builder!(aws_sdk_sqs, "sqs")
        .timeout_config(timeouts(cfg, wait_time + cfg.call_timeout))
        .stalled_stream_protection(aws_sdk_sqs::config::StalledStreamProtectionConfig::disabled());
    let measure = MeasureClock(clock.clone());
    macro_rules! client {
        ($sdk:ident, $builder:expr) => {
            $sdk::Client::from_conf(
                $builder
                    .interceptor(LogRetries)
                    .interceptor(measure.clone())
                    .interceptor(explain.clone())
                    .build(),
            )
        };
    }
    Ok(Clients {
        s3: client!(aws_sdk_s3, s3),
        sqs: client!(aws_sdk_sqs, builder!(aws_sdk_sqs, "sqs")),
        sqs_receive: client!(aws_sdk_sqs, receive),
        dynamodb: client!(aws_sdk_dynamodb, builder!(aws_sdk_dynamodb, "dynamodb")),
        ssm: client!(aws_sdk_ssm, builder!(aws_sdk_ssm, "ssm")),
        ecs: client!(aws_sdk_ecs, builder!(aws_sdk_ecs, "ecs")),
        region,
        credentials,
        provider,
        clock,
        looked_in: String::new(),
    })
}
