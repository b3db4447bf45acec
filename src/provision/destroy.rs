//! `offload-agent provision --destroy`: remove what `provision` made for this configuration — the
//! buckets, queues and tables that carry its tag, its notification entries and queue-policy statements
//! on resources that existed before it — and nothing else. The plan is made and shown first; nothing
//! changes without `--yes`, and a bucket or table that still holds data is refused (everything is)
//! unless `--force`.

use std::time::Duration;

use anyhow::{bail, Result};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_sqs::types::QueueAttributeName;

use super::owned::{self, TAG_KEY};
use super::{step, Step};
use crate::aws::Clients;
use crate::config::Config;
use crate::error::describe;

/// One removal, in the order they are carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Our entries in the notification configuration of a bucket that stays.
    Notifications { bucket: String, ids: Vec<String> },
    /// On a queue that stays: our policy statements (`sids`), and with `redrive` its redrive policy,
    /// which points at a dead-letter queue that goes. `policy` is what its policy becomes (`None`:
    /// removed).
    QueueSettings {
        queue: String,
        sids: Vec<String>,
        redrive: bool,
        policy: Option<String>,
    },
    Table {
        name: String,
        made_by: String,
        holds_items: bool,
    },
    Bucket {
        name: String,
        made_by: String,
        holds_objects: bool,
    },
    Queue {
        name: String,
        url: String,
        made_by: String,
    },
}

impl Removal {
    /// Still holds data, so removing it needs `--force`.
    fn holds_data(&self) -> bool {
        matches!(
            self,
            Removal::Table {
                holds_items: true,
                ..
            } | Removal::Bucket {
                holds_objects: true,
                ..
            }
        )
    }

    /// The resource or entries alone ("bucket out"), for the line that says it is gone.
    fn what(&self) -> String {
        match self {
            Removal::Table { name, .. } => format!("table {name}"),
            Removal::Bucket { name, .. } => format!("bucket {name}"),
            Removal::Queue { name, .. } => format!("queue {name}"),
            other => other.describe(),
        }
    }

    /// The resource with what the plan found about it.
    fn describe(&self) -> String {
        match self {
            Removal::Notifications { bucket, ids } => {
                format!("notification entries {} of bucket {bucket}", ids.join(", "))
            }
            Removal::QueueSettings {
                queue,
                sids,
                redrive,
                ..
            } => {
                let mut parts = Vec::new();
                if !sids.is_empty() {
                    parts.push(format!("policy statements {}", sids.join(", ")));
                }
                if *redrive {
                    parts.push("the redrive policy (its dead-letter queue goes)".to_string());
                }
                format!("{} of queue {queue}", parts.join(" and "))
            }
            Removal::Table {
                name,
                made_by,
                holds_items,
            } => format!(
                "table {name} (made by {made_by}{})",
                if *holds_items {
                    "; holds items: needs --force"
                } else {
                    "; empty"
                }
            ),
            Removal::Bucket {
                name,
                made_by,
                holds_objects,
            } => format!(
                "bucket {name} (made by {made_by}{})",
                if *holds_objects {
                    "; holds objects: needs --force, which deletes every object and version"
                } else {
                    "; empty"
                }
            ),
            Removal::Queue { name, made_by, .. } => format!("queue {name} (made by {made_by})"),
        }
    }
}

/// What `--destroy` would remove, and what it leaves (with why).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) removals: Vec<Removal>,
    pub(crate) kept: Vec<String>,
}

impl Plan {
    /// The plan's lines: each removal ("remove"), then each resource left ("keep").
    pub(crate) fn lines(&self) -> Vec<Step> {
        self.removals
            .iter()
            .map(|r| step("remove", r.describe()))
            .chain(self.kept_lines())
            .collect()
    }

    /// What stays, and why.
    pub(crate) fn kept_lines(&self) -> Vec<Step> {
        self.kept.iter().map(|k| step("keep", k.clone())).collect()
    }

    /// The removals refused without `--force`, described.
    pub(crate) fn needs_force(&self) -> Vec<String> {
        self.removals
            .iter()
            .filter(|r| r.holds_data())
            .map(Removal::what)
            .collect()
    }
}

fn not_ours(what: &str) -> String {
    format!("{what}: not made by provision (no {TAG_KEY} tag)")
}

/// Look at every resource the configuration names; change nothing.
pub(crate) async fn plan(cfg: &Config, clients: &Clients) -> Result<Plan> {
    let mut plan = Plan::default();
    let buckets = super::buckets(cfg);

    // Buckets: ours go (with their notifications); others keep everything but our entries.
    let mut bucket_removals = Vec::new();
    for b in &buckets {
        if !bucket_exists(clients, b).await? {
            continue;
        }
        match owned::bucket_tag(clients, b).await? {
            Some(made_by) => bucket_removals.push(Removal::Bucket {
                name: b.clone(),
                made_by,
                holds_objects: bucket_holds_objects(clients, b).await?,
            }),
            None => {
                let current = super::current_notification(clients, b).await?;
                let ids: Vec<String> = current
                    .queue_configurations()
                    .iter()
                    .filter(|q| owned::is_ours(q.id()))
                    .filter_map(|q| q.id().map(str::to_string))
                    .collect();
                if !ids.is_empty() {
                    plan.removals.push(Removal::Notifications {
                        bucket: b.clone(),
                        ids,
                    });
                }
                plan.kept.push(not_ours(&format!("bucket {b}")));
            }
        }
    }

    // Queues: the dead-letter queue first, so that the main queue knows whether its redrive goes.
    let dlq = match &cfg.queue.dead_letter_queue {
        Some(name) => match queue_url(clients, name).await? {
            Some(url) => Some((
                name.clone(),
                url.clone(),
                owned::queue_tag(clients, &url).await?,
            )),
            None => None,
        },
        None => None,
    };
    let main = match (&cfg.queue.url, &cfg.queue.name) {
        (Some(url), _) => queue_exists(clients, url)
            .await?
            .then(|| (url.clone(), url.clone())),
        (None, Some(name)) => queue_url(clients, name).await?.map(|u| (name.clone(), u)),
        (None, None) => None,
    };
    let mut queue_removals = Vec::new();
    if let Some((name, url)) = main {
        match owned::queue_tag(clients, &url).await? {
            Some(made_by) => queue_removals.push(Removal::Queue { name, url, made_by }),
            None => {
                let current = owned::queue_policy(clients, &url).await?;
                let (sids, policy) = match &current {
                    Some(p) => owned::policy_without_ours(&name, p)?,
                    None => (Vec::new(), None),
                };
                let redrive = match &dlq {
                    Some((_, dlq_url, Some(_))) => redrives_to(clients, &url, dlq_url).await?,
                    _ => false,
                };
                if !sids.is_empty() || redrive {
                    plan.removals.push(Removal::QueueSettings {
                        queue: url.clone(),
                        policy: if sids.is_empty() { current } else { policy },
                        sids,
                        redrive,
                    });
                }
                plan.kept.push(not_ours(&format!("queue {name}")));
            }
        }
    }
    if let Some((name, url, tag)) = dlq {
        match tag {
            Some(made_by) => queue_removals.push(Removal::Queue { name, url, made_by }),
            None => plan.kept.push(not_ours(&format!("queue {name}"))),
        }
    }

    for t in super::tables(cfg)?.keys() {
        let Some((_, arn)) = super::existing_table(clients, t).await? else {
            continue;
        };
        match owned::table_tag(clients, t, &arn).await? {
            Some(made_by) => plan.removals.push(Removal::Table {
                name: t.clone(),
                made_by,
                holds_items: table_holds_items(clients, t).await?,
            }),
            None => plan.kept.push(not_ours(&format!("table {t}"))),
        }
    }
    plan.removals.extend(bucket_removals);
    plan.removals.extend(queue_removals);
    Ok(plan)
}

/// Carry the plan out, in its order; each step as it is done. A bucket is emptied first (every
/// version and delete marker) when it holds objects; the caller refuses that without `--force`.
pub(crate) async fn apply(
    plan: &Plan,
    clients: &Clients,
    mut done: impl FnMut(Step),
) -> Result<()> {
    for r in &plan.removals {
        match r {
            Removal::Notifications { bucket, .. } => {
                let current = super::current_notification(clients, bucket).await?;
                let others = super::others_notifications(&current);
                super::put_notifications(clients, bucket, &current, others)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot remove our notification entries from bucket {bucket}: {e}"
                        )
                    })?;
            }
            Removal::QueueSettings {
                queue,
                redrive,
                policy,
                ..
            } => {
                // The policy is always set, in the same call as the redrive policy: the emulator
                // drops a queue's policy on any SetQueueAttributes that does not name it.
                let mut set = clients
                    .sqs
                    .set_queue_attributes()
                    .queue_url(queue)
                    .attributes(
                        QueueAttributeName::Policy,
                        policy.clone().unwrap_or_default(),
                    );
                if *redrive {
                    set = set.attributes(QueueAttributeName::RedrivePolicy, "");
                }
                set.send().await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot change the policy of queue {queue}: {}",
                        describe(&e)
                    )
                })?;
            }
            Removal::Table { name, .. } => delete_table(clients, name).await?,
            Removal::Bucket {
                name,
                holds_objects,
                ..
            } => {
                if *holds_objects {
                    let n = empty_bucket(clients, name).await?;
                    done(step(
                        "emptied",
                        format!("bucket {name} ({n} object versions and delete markers deleted)"),
                    ));
                }
                clients
                    .s3
                    .delete_bucket()
                    .bucket(name)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot delete bucket {name}: {} (objects written since the plan was made? run provision --destroy again)",
                            describe(&e)
                        )
                    })?;
            }
            Removal::Queue { url, .. } => {
                clients
                    .sqs
                    .delete_queue()
                    .queue_url(url)
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot delete queue {url}: {}", describe(&e)))?;
            }
        }
        done(step("removed", r.what()));
    }
    Ok(())
}

async fn bucket_exists(clients: &Clients, bucket: &str) -> Result<bool> {
    match clients.s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(true),
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
        Err(e) => bail!("cannot look at bucket {bucket}: {}", describe(&e)),
    }
}

/// The first `max` object versions and delete markers of a bucket.
async fn versions(
    clients: &Clients,
    bucket: &str,
    max: i32,
) -> Result<aws_sdk_s3::operation::list_object_versions::ListObjectVersionsOutput> {
    clients
        .s3
        .list_object_versions()
        .bucket(bucket)
        .max_keys(max)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot list the objects of bucket {bucket}: {}",
                describe(&e)
            )
        })
}

async fn bucket_holds_objects(clients: &Clients, bucket: &str) -> Result<bool> {
    let out = versions(clients, bucket, 1).await?;
    Ok(!out.versions().is_empty() || !out.delete_markers().is_empty())
}

/// Delete every object version and delete marker; how many.
async fn empty_bucket(clients: &Clients, bucket: &str) -> Result<u64> {
    let mut removed = 0u64;
    loop {
        // Deleting as we go: each listing starts from the top again.
        let out = versions(clients, bucket, 1000).await?;
        let ids: Vec<ObjectIdentifier> = out
            .versions()
            .iter()
            .map(|v| (v.key(), v.version_id()))
            .chain(
                out.delete_markers()
                    .iter()
                    .map(|m| (m.key(), m.version_id())),
            )
            .filter_map(|(k, v)| {
                ObjectIdentifier::builder()
                    .key(k?)
                    .set_version_id(v.map(str::to_string))
                    .build()
                    .ok()
            })
            .collect();
        if ids.is_empty() {
            return Ok(removed);
        }
        let n = ids.len() as u64;
        let out = clients
            .s3
            .delete_objects()
            .bucket(bucket)
            .delete(
                Delete::builder()
                    .set_objects(Some(ids))
                    .quiet(true)
                    .build()?,
            )
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot delete the objects of bucket {bucket}: {}",
                    describe(&e)
                )
            })?;
        if let Some(e) = out.errors().first() {
            bail!(
                "cannot delete s3://{bucket}/{} (version {}): {} {}",
                e.key().unwrap_or(""),
                e.version_id().unwrap_or("-"),
                e.code().unwrap_or(""),
                e.message().unwrap_or("")
            );
        }
        removed += n;
    }
}

async fn table_holds_items(clients: &Clients, table: &str) -> Result<bool> {
    let out = clients
        .dynamodb
        .scan()
        .table_name(table)
        .limit(1)
        .select(aws_sdk_dynamodb::types::Select::Count)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read DynamoDB table {table}: {}", describe(&e)))?;
    Ok(out.count() > 0)
}

async fn delete_table(clients: &Clients, table: &str) -> Result<()> {
    clients
        .dynamodb
        .delete_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot delete DynamoDB table {table}: {}", describe(&e)))?;
    // DeleteTable returns while the table is DELETING; wait (bounded) until it is gone, so that a
    // second run says there is nothing left.
    for _ in 0..120 {
        if super::existing_table(clients, table).await?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("DynamoDB table {table} is being deleted but still exists after a minute")
}

async fn queue_url(clients: &Clients, name: &str) -> Result<Option<String>> {
    match clients.sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(out.queue_url().map(str::to_string)),
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_queue_does_not_exist()) =>
        {
            Ok(None)
        }
        Err(e) => bail!("cannot look up queue {name}: {}", describe(&e)),
    }
}

async fn queue_exists(clients: &Clients, url: &str) -> Result<bool> {
    match clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_queue_does_not_exist()) =>
        {
            Ok(false)
        }
        Err(e) => bail!("cannot look at queue {url}: {}", describe(&e)),
    }
}

/// Whether the queue's redrive policy sends to the dead-letter queue at `dlq_url`.
async fn redrives_to(clients: &Clients, url: &str, dlq_url: &str) -> Result<bool> {
    let attrs = |u: &str| {
        clients
            .sqs
            .get_queue_attributes()
            .queue_url(u.to_string())
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
    };
    let main = attrs(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read queue {url}: {}", describe(&e)))?;
    let dlq = attrs(dlq_url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read queue {dlq_url}: {}", describe(&e)))?;
    let get =
        |o: &aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesOutput,
         k: QueueAttributeName| { o.attributes().and_then(|a| a.get(&k)).cloned() };
    let (Some(redrive), Some(dlq_arn)) = (
        get(&main, QueueAttributeName::RedrivePolicy),
        get(&dlq, QueueAttributeName::QueueArn),
    ) else {
        return Ok(false);
    };
    Ok(serde_json::from_str::<serde_json::Value>(&redrive)
        .ok()
        .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(|a| a == dlq_arn))
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_needs_force_and_the_plan_says_so() {
        let plan = Plan {
            removals: vec![
                Removal::Notifications {
                    bucket: "in".into(),
                    ids: vec!["offload-agent-orders".into()],
                },
                Removal::Table {
                    name: "t".into(),
                    made_by: "h:/a.toml".into(),
                    holds_items: true,
                },
                Removal::Bucket {
                    name: "out".into(),
                    made_by: "h:/a.toml".into(),
                    holds_objects: false,
                },
            ],
            kept: vec![not_ours("queue q")],
        };
        assert_eq!(plan.needs_force(), ["table t"]);
        let lines: Vec<String> = plan.lines().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            lines,
            [
                "remove    notification entries offload-agent-orders of bucket in",
                "remove    table t (made by h:/a.toml; holds items: needs --force)",
                "remove    bucket out (made by h:/a.toml; empty)",
                "keep      queue q: not made by provision (no offload-agent:provisioned-by tag)",
            ]
        );
    }
}
