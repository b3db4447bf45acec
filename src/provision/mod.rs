//! `offload-agent provision`: create what the configuration names, idempotently, tagged as ours;
//! `provision --destroy` ([`destroy`]) removes exactly that again.

pub(crate) mod destroy;
mod owned;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use aws_sdk_s3::types::{
    BucketLocationConstraint, CreateBucketConfiguration, Event, FilterRule, FilterRuleName,
    NotificationConfiguration, NotificationConfigurationFilter, QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::aws::Clients;
use crate::config::Config;
use crate::config::TableKey;
use crate::error::describe;
pub(crate) use owned::identity;
use owned::{ID_PREFIX, TAG_KEY};

/// One line of the report: what was done to what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) action: &'static str,
    pub(crate) what: String,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<9} {}", self.action, self.what)
    }
}

fn step(action: &'static str, what: impl Into<String>) -> Step {
    Step {
        action,
        what: what.into(),
    }
}

/// What `provision` did, and the tables it had to leave alone because their key is not the one their
/// pipeline's schema needs (each message names the table, the key wanted and the key found).
#[derive(Debug, Default)]
pub(crate) struct Provisioned {
    pub(crate) steps: Vec<Step>,
    pub(crate) mismatched: Vec<String>,
}

/// The buckets the configuration names: every pipeline's input and output bucket.
fn buckets(cfg: &Config) -> BTreeSet<String> {
    cfg.pipelines
        .iter()
        .flat_map(|p| [p.bucket.clone(), p.output_bucket().to_string()])
        .collect()
}

/// `identity` is the value of the tag each created resource carries ([`identity`]).
pub(crate) async fn provision(
    cfg: &Config,
    clients: &Clients,
    identity: &str,
) -> Result<Provisioned> {
    let mut steps = Vec::new();

    let buckets = buckets(cfg);
    for b in &buckets {
        steps.push(ensure_bucket(clients, b, identity).await?);
    }

    let dlq_arn = match &cfg.queue.dead_letter_queue {
        Some(name) => {
            let (url, s) = ensure_queue(clients, name, &[], identity).await?;
            steps.push(s);
            Some(queue_arn(clients, &url).await?)
        }
        None => None,
    };

    let (queue_url, s) = ensure_main_queue(cfg, clients, identity).await?;
    steps.push(s);
    let arn = queue_arn(clients, &queue_url).await?;
    steps.push(
        set_queue_policy(cfg, clients, &buckets, &queue_url, &arn, dlq_arn.as_deref()).await?,
    );

    for b in cfg
        .pipelines
        .iter()
        .map(|p| p.bucket.clone())
        .collect::<BTreeSet<_>>()
    {
        steps.push(ensure_notification(cfg, clients, &b, &arn).await?);
    }

    let mut mismatched = Vec::new();
    for (t, (key, pipeline)) in &tables(cfg)? {
        match ensure_table(clients, t, key, identity).await? {
            Ok(s) => steps.push(s),
            Err(found) => {
                steps.push(step("differs", format!("table {t} (left alone)")));
                mismatched.push(key_mismatch(t, pipeline, key, &found));
            }
        }
    }
    Ok(Provisioned { steps, mismatched })
}

/// Each table the configuration writes to, with its key and the (first) pipeline that writes to it;
/// pipelines that share a table must agree on its key.
pub(crate) fn tables(
    cfg: &Config,
) -> Result<std::collections::BTreeMap<String, (Vec<TableKey>, String)>> {
    let mut tables: std::collections::BTreeMap<String, (Vec<TableKey>, String)> =
        Default::default();
    for p in &cfg.pipelines {
        let (Some(t), Some(schema)) = (&p.table, p.processor.schema()) else {
            continue;
        };
        let key = schema.table_key();
        match tables.get(t) {
            Some((other, by)) if *other != key => bail!(
                "pipelines {by} and {} write to DynamoDB table {t} with different keys ({} and {}): give one of them another table",
                p.name,
                shown_key(other),
                shown_key(&key)
            ),
            Some(_) => {}
            None => {
                tables.insert(t.clone(), (key, p.name.clone()));
            }
        }
    }
    Ok(tables)
}

/// "DynamoDB table T has key … but pipeline P's schema needs …: …".
pub(crate) fn key_mismatch(
    table: &str,
    pipeline: &str,
    want: &[TableKey],
    found: &[TableKey],
) -> String {
    format!(
        "DynamoDB table {table} has key {}, but pipeline {pipeline}'s schema needs {}: give the pipeline another table (provision creates it), or change the schema's partition_key/sort_key to the table's",
        shown_key(found),
        shown_key(want)
    )
}

/// A table's key as DynamoDB describes it (partition key first, with their types) and its ARN;
/// `None` when the table does not exist.
pub(crate) async fn existing_table(
    clients: &Clients,
    table: &str,
) -> Result<Option<(Vec<TableKey>, String)>> {
    let out = match clients
        .dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_resource_not_found_exception()) =>
        {
            return Ok(None)
        }
        Err(e) => bail!("cannot describe DynamoDB table {table}: {}", describe(&e)),
    };
    let Some(t) = out.table() else {
        return Ok(None);
    };
    let mut elements: Vec<_> = t.key_schema().iter().collect();
    // The hash key first, whatever order the answer lists them in.
    elements.sort_by_key(|k| *k.key_type() != KeyType::Hash);
    let key = elements
        .into_iter()
        .map(|k| TableKey {
            name: k.attribute_name().to_string(),
            number: t
                .attribute_definitions()
                .iter()
                .find(|d| d.attribute_name() == k.attribute_name())
                .is_some_and(|d| *d.attribute_type() == ScalarAttributeType::N),
        })
        .collect();
    Ok(Some((key, t.table_arn().unwrap_or_default().to_string())))
}

/// "OrderId (S)", "CustomerId (S) + InvoiceNo (N)".
pub(crate) fn shown_key(key: &[TableKey]) -> String {
    key.iter()
        .map(|k| format!("{} ({})", k.name, if k.number { "N" } else { "S" }))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The main queue: created by name (with the configured visibility timeout), or checked by URL.
async fn ensure_main_queue(
    cfg: &Config,
    clients: &Clients,
    identity: &str,
) -> Result<(String, Step)> {
    match (&cfg.queue.url, &cfg.queue.name) {
        (Some(url), _) => {
            clients
                .sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("queue.url {url} is not usable ({}); provision creates queues by queue.name only", describe(&e)))?;
            Ok((url.clone(), step("exists", format!("queue {url}"))))
        }
        (None, Some(name)) => {
            let vis = cfg.queue.visibility_timeout.as_secs().to_string();
            let (url, s) = ensure_queue(
                clients,
                name,
                &[(QueueAttributeName::VisibilityTimeout, vis)],
                identity,
            )
            .await?;
            Ok((url, s))
        }
        (None, None) => bail!("queue.name or queue.url is required"),
    }
}

/// The queue's policy (every configured bucket may send events) and, with a dead-letter queue, its
/// redrive policy.
async fn set_queue_policy(
    cfg: &Config,
    clients: &Clients,
    buckets: &BTreeSet<String>,
    queue_url: &str,
    arn: &str,
    dlq_arn: Option<&str>,
) -> Result<Step> {
    // The policy lets every configured bucket send events (statements of others kept); the redrive
    // policy moves a message that keeps failing to the dead-letter queue.
    let statements: Vec<_> = buckets
        .iter()
        .map(|b| {
            serde_json::json!({
                "Sid": format!("{ID_PREFIX}{b}"),
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": {"ArnLike": {"aws:SourceArn": format!("arn:aws:s3:::{b}")}}
            })
        })
        .collect();
    let current = owned::queue_policy(clients, queue_url).await?;
    let policy = owned::merged_policy(queue_url, current.as_deref(), statements)?;
    let mut set = clients
        .sqs
        .set_queue_attributes()
        .queue_url(queue_url)
        .attributes(QueueAttributeName::Policy, policy);
    // Enough receives for a transient failure's retries to reach queue.retry_max (the agent gives up by
    // itself on the last one, with a reason), and never fewer than queue.max_receive_count.
    let max_receives = cfg.queue.redrive_receives();
    if let Some(dlq_arn) = dlq_arn {
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receives.to_string()
        })
        .to_string();
        set = set.attributes(QueueAttributeName::RedrivePolicy, redrive);
    }
    set.send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot set the policy of queue {queue_url}: {}",
            describe(&e)
        )
    })?;
    Ok(step(
        "set",
        format!(
            "queue policy (S3 may send from {}){}",
            buckets.iter().cloned().collect::<Vec<_>>().join(", "),
            if dlq_arn.is_some() {
                format!(
                    " and redrive to the dead-letter queue after {max_receives} receives (enough for retries to reach queue.retry_max)"
                )
            } else {
                String::new()
            }
        ),
    ))
}

async fn ensure_bucket(clients: &Clients, bucket: &str, identity: &str) -> Result<Step> {
    if clients.s3.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(step("exists", format!("bucket {bucket}")));
    }
    let mut req = clients.s3.create_bucket().bucket(bucket);
    if clients.region != "us-east-1" {
        req = req.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(clients.region.as_str()))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => {
            tag_bucket(clients, bucket, identity).await?;
            Ok(step("created", format!("bucket {bucket}")))
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_bucket_already_owned_by_you()) =>
        {
            Ok(step("exists", format!("bucket {bucket}")))
        }
        // The way out failed: the bucket's name is not the question.
        Err(e) if crate::error::egress_failure(&e).is_some() => {
            bail!("cannot create bucket {bucket}: {}", describe(&e))
        }
        Err(e) => bail!(
            "cannot create bucket {bucket}: {} (bucket names are global: is it someone else's?)",
            describe(&e)
        ),
    }
}

/// Our tag on a bucket just created (CreateBucket takes no tags).
async fn tag_bucket(clients: &Clients, bucket: &str, identity: &str) -> Result<()> {
    let tagging = aws_sdk_s3::types::Tagging::builder()
        .tag_set(
            aws_sdk_s3::types::Tag::builder()
                .key(TAG_KEY)
                .value(identity)
                .build()?,
        )
        .build()?;
    clients
        .s3
        .put_bucket_tagging()
        .bucket(bucket)
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "created bucket {bucket} but cannot tag it {TAG_KEY}={identity} ({}); without the tag `provision --destroy` leaves it alone: allow s3:PutBucketTagging and tag it by hand",
                describe(&e)
            )
        })?;
    Ok(())
}

async fn ensure_queue(
    clients: &Clients,
    name: &str,
    attrs: &[(QueueAttributeName, String)],
    identity: &str,
) -> Result<(String, Step)> {
    if let Ok(out) = clients.sqs.get_queue_url().queue_name(name).send().await {
        if let Some(url) = out.queue_url() {
            return Ok((url.to_string(), step("exists", format!("queue {name}"))));
        }
    }
    let mut req = clients
        .sqs
        .create_queue()
        .queue_name(name)
        .tags(TAG_KEY, identity);
    for (k, v) in attrs {
        req = req.attributes(k.clone(), v);
    }
    let out = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot create queue {name}: {}", describe(&e)))?;
    let url = out
        .queue_url()
        .context("CreateQueue returned no queue URL")?
        .to_string();
    Ok((url, step("created", format!("queue {name}"))))
}

async fn queue_arn(clients: &Clients, url: &str) -> Result<String> {
    let out = clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the ARN of queue {url}: {}", describe(&e)))?;
    out.attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .with_context(|| format!("queue {url} has no QueueArn attribute"))
}

fn filter_value(qc: &QueueConfiguration, name: FilterRuleName) -> String {
    qc.filter()
        .and_then(|f| f.key())
        .map(|k| k.filter_rules())
        .unwrap_or_default()
        .iter()
        .find(|r| r.name() == Some(&name))
        .and_then(|r| r.value())
        .unwrap_or("")
        .to_string()
}

type NotificationOutput =
    aws_sdk_s3::operation::get_bucket_notification_configuration::GetBucketNotificationConfigurationOutput;

/// The bucket's notification configuration as it is now.
async fn current_notification(clients: &Clients, bucket: &str) -> Result<NotificationOutput> {
    match clients
        .s3
        .get_bucket_notification_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(c) => Ok(c),
        // moto answers an empty configuration with an empty element named after the operation
        // (`<GetBucketNotificationResponse/>`), which the SDK cannot parse; it means "nothing set".
        Err(e) if empty_notification_quirk(&e) => Ok(NotificationOutput::builder().build()),
        Err(e) => bail!(
            "cannot read the notification configuration of bucket {bucket}: {}",
            describe(&e)
        ),
    }
}

/// One of our queue notifications: ObjectCreated events under `prefix` ending in `suffix`.
fn queue_notification(
    id: &str,
    arn: &str,
    prefix: &str,
    suffix: &str,
) -> Result<QueueConfiguration> {
    let mut rules = Vec::new();
    if !prefix.is_empty() {
        rules.push(
            FilterRule::builder()
                .name(FilterRuleName::Prefix)
                .value(prefix)
                .build(),
        );
    }
    if !suffix.is_empty() {
        rules.push(
            FilterRule::builder()
                .name(FilterRuleName::Suffix)
                .value(suffix)
                .build(),
        );
    }
    let mut qc = QueueConfiguration::builder()
        .id(id)
        .queue_arn(arn)
        .events(Event::from("s3:ObjectCreated:*"));
    if !rules.is_empty() {
        qc = qc.filter(
            NotificationConfigurationFilter::builder()
                .key(S3KeyFilter::builder().set_filter_rules(Some(rules)).build())
                .build(),
        );
    }
    qc.build().context("building a queue notification")
}

async fn ensure_notification(
    cfg: &Config,
    clients: &Clients,
    bucket: &str,
    queue_arn: &str,
) -> Result<Step> {
    let current = current_notification(clients, bucket).await?;
    let existing = current.queue_configurations();
    let ours_now: BTreeSet<(String, String, String, String)> = existing
        .iter()
        .filter(|q| owned::is_ours(q.id()))
        .map(|q| {
            (
                q.id().unwrap_or("").to_string(),
                q.queue_arn().to_string(),
                filter_value(q, FilterRuleName::Prefix),
                filter_value(q, FilterRuleName::Suffix),
            )
        })
        .collect();
    let wanted: BTreeSet<(String, String, String, String)> = cfg
        .pipelines
        .iter()
        .filter(|p| p.bucket == bucket)
        .map(|p| {
            (
                format!("{ID_PREFIX}{}", p.name),
                queue_arn.to_string(),
                p.prefix.clone(),
                p.suffix.clone(),
            )
        })
        .collect();
    let what = format!("notification s3://{bucket} -> {queue_arn}");
    if ours_now == wanted {
        return Ok(step("exists", what));
    }
    let mut queues = others_notifications(&current);
    for (id, arn, prefix, suffix) in &wanted {
        queues.push(queue_notification(id, arn, prefix, suffix)?);
    }
    put_notifications(clients, bucket, &current, queues)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot set the notification of bucket {bucket} (does the queue policy allow S3 to send?): {e}"
            )
        })?;
    Ok(step(
        if ours_now.is_empty() {
            "created"
        } else {
            "updated"
        },
        what,
    ))
}

/// The bucket's queue notifications that are not ours.
fn others_notifications(current: &NotificationOutput) -> Vec<QueueConfiguration> {
    current
        .queue_configurations()
        .iter()
        .filter(|q| !owned::is_ours(q.id()))
        .cloned()
        .collect()
}

/// The bucket's notification configuration with `queues` as its queue entries; its topic, Lambda and
/// EventBridge entries as they are. The error is the service's, described.
async fn put_notifications(
    clients: &Clients,
    bucket: &str,
    current: &NotificationOutput,
    queues: Vec<QueueConfiguration>,
) -> Result<(), String> {
    let conf = NotificationConfiguration::builder()
        .set_queue_configurations(Some(queues))
        .set_topic_configurations(Some(current.topic_configurations().to_vec()))
        .set_lambda_function_configurations(Some(current.lambda_function_configurations().to_vec()))
        .set_event_bridge_configuration(current.event_bridge_configuration().cloned())
        .build();
    clients
        .s3
        .put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(conf)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

fn empty_notification_quirk<E>(
    e: &aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> bool {
    e.raw_response().is_some_and(|r| {
        r.status().is_success()
            && r.body().bytes().is_some_and(|b| {
                String::from_utf8_lossy(b).contains("<GetBucketNotificationResponse")
                    && !String::from_utf8_lossy(b).contains("Configuration>")
            })
    })
}

/// The table, created with `want` as its key unless it exists; `Ok(Err(found))` when it exists with
/// another key (left alone).
async fn ensure_table(
    clients: &Clients,
    table: &str,
    want: &[TableKey],
    identity: &str,
) -> Result<Result<Step, Vec<TableKey>>> {
    let ddb = &clients.dynamodb;
    if let Some((found, _)) = existing_table(clients, table).await? {
        if found != want {
            return Ok(Err(found));
        }
        return Ok(Ok(step("exists", format!("table {table}"))));
    }
    let mut create = ddb
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .tags(
            aws_sdk_dynamodb::types::Tag::builder()
                .key(TAG_KEY)
                .value(identity)
                .build()?,
        );
    for (i, k) in want.iter().enumerate() {
        create = create
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(&k.name)
                    .attribute_type(if k.number {
                        ScalarAttributeType::N
                    } else {
                        ScalarAttributeType::S
                    })
                    .build()?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(&k.name)
                    .key_type(if i == 0 {
                        KeyType::Hash
                    } else {
                        KeyType::Range
                    })
                    .build()?,
            );
    }
    create
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot create DynamoDB table {table}: {}", describe(&e)))?;
    for _ in 0..120 {
        let out = ddb.describe_table().table_name(table).send().await;
        if let Ok(out) = out {
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(Ok(step("created", format!("table {table}"))));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("DynamoDB table {table} was created but did not become ACTIVE within a minute")
}
