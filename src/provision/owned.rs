//! What `provision` owns, and how it is recognised: a tag on every bucket, queue and table it creates,
//! and an id prefix on the bucket-notification entries and queue-policy statements it adds.
//! `provision --destroy` removes these and nothing else.

use std::path::Path;

use anyhow::{bail, Context, Result};
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::Value;

use crate::aws::Clients;
use crate::error::describe;

/// The tag `provision` puts on what it creates; its value is [`identity`].
pub(crate) const TAG_KEY: &str = "offload-agent:provisioned-by";

/// Id prefix of the notification entries and Sid prefix of the queue-policy statements this tool owns;
/// others in the same configuration are left alone.
pub(crate) const ID_PREFIX: &str = "offload-agent-";

/// The tag's value: the host and the configuration file that provisioned, for example
/// `web-1:/etc/offload-agent/agent.toml`, in the characters S3, SQS and DynamoDB all accept in a tag
/// value (others become `_`), at most 256 of them.
pub(crate) fn identity(config: &Path) -> String {
    let host = crate::host::hostname("unknown-host");
    let path = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    tag_value(&format!("{host}:{}", path.display()))
}

fn tag_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_alphanumeric() || " _.:/=+-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect()
}

/// Whether a notification entry or a policy statement is ours, by its id.
pub(crate) fn is_ours(id: Option<&str>) -> bool {
    id.is_some_and(|id| id.starts_with(ID_PREFIX))
}

/// The statements of an IAM-style policy document (`Statement` is an array, or a single object).
fn statements(policy: &Value) -> Vec<Value> {
    match policy.get("Statement") {
        Some(Value::Array(a)) => a.clone(),
        Some(s @ Value::Object(_)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn sid(statement: &Value) -> Option<&str> {
    statement.get("Sid").and_then(Value::as_str)
}

fn parse_policy(queue: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| {
        format!(
            "the policy of queue {queue} is not JSON; fix or remove it, then run provision again"
        )
    })
}

/// The queue's policy with `ours` in place of the statements we added before; every other statement
/// (and the document's other keys) kept as it is.
pub(crate) fn merged_policy(
    queue: &str,
    current: Option<&str>,
    ours: Vec<Value>,
) -> Result<String> {
    let mut doc = match current.filter(|t| !t.trim().is_empty()) {
        Some(text) => parse_policy(queue, text)?,
        None => serde_json::json!({"Version": "2012-10-17"}),
    };
    let mut kept: Vec<Value> = statements(&doc)
        .into_iter()
        .filter(|s| !is_ours(sid(s)))
        .collect();
    kept.extend(ours);
    let Some(obj) = doc.as_object_mut() else {
        bail!("the policy of queue {queue} is not a JSON object; fix or remove it, then run provision again")
    };
    obj.insert("Statement".into(), Value::Array(kept));
    Ok(doc.to_string())
}

/// The queue's policy without our statements: the Sids removed, and what is left (`None`: nothing,
/// so the policy is removed).
pub(crate) fn policy_without_ours(
    queue: &str,
    current: &str,
) -> Result<(Vec<String>, Option<String>)> {
    let mut doc = parse_policy(queue, current)?;
    let (ours, kept): (Vec<Value>, Vec<Value>) =
        statements(&doc).into_iter().partition(|s| is_ours(sid(s)));
    let removed = ours
        .iter()
        .filter_map(|s| sid(s).map(str::to_string))
        .collect();
    if kept.is_empty() {
        return Ok((removed, None));
    }
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("Statement".into(), Value::Array(kept));
    }
    Ok((removed, Some(doc.to_string())))
}

/// Our tag's value on a bucket (`None`: the bucket has no tags, or not ours).
pub(crate) async fn bucket_tag(clients: &Clients, bucket: &str) -> Result<Option<String>> {
    match clients.s3.get_bucket_tagging().bucket(bucket).send().await {
        Ok(out) => Ok(out
            .tag_set()
            .iter()
            .find(|t| t.key() == TAG_KEY)
            .map(|t| t.value().to_string())),
        Err(e)
            if e.as_service_error().and_then(|se| {
                aws_smithy_types::error::metadata::ProvideErrorMetadata::code(se)
            }) == Some("NoSuchTagSet") =>
        {
            Ok(None)
        }
        Err(e) => bail!("cannot read the tags of bucket {bucket}: {}", describe(&e)),
    }
}

/// Our tag's value on a queue.
pub(crate) async fn queue_tag(clients: &Clients, url: &str) -> Result<Option<String>> {
    let out = clients
        .sqs
        .list_queue_tags()
        .queue_url(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the tags of queue {url}: {}", describe(&e)))?;
    Ok(out.tags().and_then(|t| t.get(TAG_KEY)).cloned())
}

/// Our tag's value on a table (by its ARN).
pub(crate) async fn table_tag(clients: &Clients, table: &str, arn: &str) -> Result<Option<String>> {
    let out = clients
        .dynamodb
        .list_tags_of_resource()
        .resource_arn(arn)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the tags of DynamoDB table {table}: {}",
                describe(&e)
            )
        })?;
    Ok(out
        .tags()
        .iter()
        .find(|t| t.key() == TAG_KEY)
        .map(|t| t.value().to_string()))
}

/// A queue's current policy document, if it has one.
pub(crate) async fn queue_policy(clients: &Clients, url: &str) -> Result<Option<String>> {
    let out = clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::Policy)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the policy of queue {url}: {}", describe(&e)))?;
    Ok(out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::Policy))
        .filter(|p| !p.trim().is_empty())
        .cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(b: &str) -> Value {
        serde_json::json!({"Sid": format!("{ID_PREFIX}{b}"), "Effect": "Allow"})
    }

    #[test]
    fn our_statements_replace_ours_and_keep_everyone_elses() {
        let current = r#"{"Version":"2012-10-17","Id":"theirs","Statement":[
            {"Sid":"AuditRead","Effect":"Allow"},
            {"Sid":"offload-agent-old-bucket","Effect":"Allow"},
            {"Effect":"Deny"}]}"#;
        let merged: Value =
            serde_json::from_str(&merged_policy("q", Some(current), vec![ours("b")]).unwrap())
                .unwrap();
        let sids: Vec<Option<String>> = statements(&merged)
            .iter()
            .map(|s| sid(s).map(String::from))
            .collect();
        assert_eq!(
            sids,
            [
                Some("AuditRead".to_string()),
                None,
                Some("offload-agent-b".to_string())
            ]
        );
        assert_eq!(merged["Id"], "theirs");

        // A single statement object, and no policy at all.
        let single = r#"{"Statement":{"Sid":"Theirs"}}"#;
        let m: Value =
            serde_json::from_str(&merged_policy("q", Some(single), vec![ours("b")]).unwrap())
                .unwrap();
        assert_eq!(statements(&m).len(), 2);
        let m: Value =
            serde_json::from_str(&merged_policy("q", None, vec![ours("b")]).unwrap()).unwrap();
        assert_eq!(m["Version"], "2012-10-17");
        assert_eq!(statements(&m).len(), 1);

        let err = merged_policy("q1", Some("{not json"), vec![]).unwrap_err();
        assert!(format!("{err:#}").contains("policy of queue q1"), "{err:#}");
    }

    #[test]
    fn removing_ours_leaves_the_rest_or_nothing() {
        let current = r#"{"Statement":[{"Sid":"AuditRead"},{"Sid":"offload-agent-b"}]}"#;
        let (removed, rest) = policy_without_ours("q", current).unwrap();
        assert_eq!(removed, ["offload-agent-b"]);
        let rest: Value = serde_json::from_str(&rest.unwrap()).unwrap();
        assert_eq!(statements(&rest).len(), 1);
        assert_eq!(rest["Statement"][0]["Sid"], "AuditRead");

        let (removed, rest) =
            policy_without_ours("q", r#"{"Statement":[{"Sid":"offload-agent-b"}]}"#).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(rest, None);
    }

    #[test]
    fn the_identity_is_a_valid_tag_value() {
        assert_eq!(
            tag_value("web-1:/etc/offload agent/a,b;c.toml"),
            "web-1:/etc/offload agent/a_b_c.toml"
        );
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
        let id = identity(Path::new("agent.toml"));
        assert!(id.contains(":/") && id.ends_with("agent.toml"), "{id}");
    }
}
