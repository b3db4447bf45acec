//! `provision` and `provision --destroy` against the AWS emulator: each table with its schema's key
//! (a table with another key reported and left alone, by `provision` and `preflight`), everything made
//! tagged, and `--destroy` removing exactly that — a pre-existing queue, bucket, someone else's
//! notification entry and policy statement stay. Needs moto (`scripts/test`).

use std::collections::HashMap;
use std::process::Output;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_s3::types::{
    BucketVersioningStatus, Event, NotificationConfiguration, QueueConfiguration,
    VersioningConfiguration,
};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::support::*;

const TAG: &str = "offload-agent:provisioned-by";

const COMPOSITE: &str = r#"
[[pipeline]]
name = "invoices"
bucket = "{bucket}"
prefix = "inv/"
processor = "table"
table = "{bucket}-inv"
output_prefix = "inv-out/"
[pipeline.schema]
partition_key = "CustomerId"
sort_key = "InvoiceNo"
[[pipeline.schema.attribute]]
name = "CustomerId"
column = "customer"
[[pipeline.schema.attribute]]
name = "InvoiceNo"
column = "invoice"
type = "N"
"#;

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (name, type) of the hash key, then of the range key.
async fn describe(w: &World, table: &str) -> aws_sdk_dynamodb::types::TableDescription {
    w.clients
        .dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await
        .unwrap()
        .table
        .unwrap()
}

async fn key_of(w: &World, table: &str) -> Vec<(String, String, String)> {
    let t = describe(w, table).await;
    let types: HashMap<String, String> = t
        .attribute_definitions()
        .iter()
        .map(|d| {
            (
                d.attribute_name().to_string(),
                d.attribute_type().as_str().to_string(),
            )
        })
        .collect();
    let mut key: Vec<_> = t
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                types[k.attribute_name()].clone(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    key.sort_by_key(|k| k.2 != "HASH");
    key
}

async fn table_tags(w: &World, table: &str) -> HashMap<String, String> {
    let arn = describe(w, table).await.table_arn.unwrap();
    w.clients
        .dynamodb
        .list_tags_of_resource()
        .resource_arn(arn)
        .send()
        .await
        .unwrap()
        .tags()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect()
}

async fn queue_tags(w: &World, name: &str) -> HashMap<String, String> {
    let url = w.queue_url(name).await;
    w.clients
        .sqs
        .list_queue_tags()
        .queue_url(url)
        .send()
        .await
        .unwrap()
        .tags
        .unwrap_or_default()
}

async fn bucket_exists(w: &World, bucket: &str) -> bool {
    w.clients
        .s3
        .head_bucket()
        .bucket(bucket)
        .send()
        .await
        .is_ok()
}

async fn table_exists(w: &World, table: &str) -> bool {
    w.clients
        .dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await
        .is_ok()
}

async fn queue_exists(w: &World, name: &str) -> bool {
    w.clients
        .sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .is_ok()
}

async fn notification_ids(w: &World, bucket: &str) -> Vec<String> {
    let mut ids: Vec<String> = w
        .clients
        .s3
        .get_bucket_notification_configuration()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .queue_configurations()
        .iter()
        .filter_map(|q| q.id().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

async fn queue_attribute(w: &World, name: &str, a: QueueAttributeName) -> Option<String> {
    let url = w.queue_url(name).await;
    w.clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(a.clone())
        .send()
        .await
        .unwrap()
        .attributes
        .and_then(|m| m.get(&a).cloned())
        .filter(|v| !v.is_empty())
}

fn sids(policy: Option<&str>) -> Vec<String> {
    let Some(p) = policy else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_str(p).unwrap();
    let mut s: Vec<String> = v["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Sid"].as_str().unwrap_or("").to_string())
        .collect();
    s.sort();
    s
}

/// A table made from a composite-key schema has that key (types included), and everything provision
/// made carries its tag; a table that exists with another key is reported by `provision` (after it
/// did everything else) and by `preflight`, each naming the table, the key wanted and the key found,
/// exit 78, and the table is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn provision_gives_each_table_its_schemas_key_and_leaves_another_key_alone() {
    let w = World::with(
        "prov-keys",
        Options {
            extra: COMPOSITE.into(),
            ..Options::default()
        },
    )
    .await;
    let inv = format!("{}-inv", w.bucket);
    assert_eq!(
        key_of(&w, &inv).await,
        [
            ("CustomerId".into(), "S".into(), "HASH".into()),
            ("InvoiceNo".into(), "N".into(), "RANGE".into())
        ]
    );
    let made_by = table_tags(&w, &inv).await[TAG].clone();
    assert!(made_by.ends_with("agent.toml"), "{made_by}");
    assert_eq!(table_tags(&w, &w.table).await[TAG], made_by);
    assert_eq!(queue_tags(&w, &w.queue).await[TAG], made_by);
    assert_eq!(queue_tags(&w, &w.dlq).await[TAG], made_by);
    let tags = w
        .clients
        .s3
        .get_bucket_tagging()
        .bucket(&w.bucket)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == TAG && t.value() == made_by),
        "{tags:?}"
    );

    // Someone's table, keyed Id, with an item; a pipeline of ours pointed at it.
    let other = format!("{}-other", w.bucket);
    w.clients
        .dynamodb
        .create_table()
        .table_name(&other)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("Id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("Id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    w.clients
        .dynamodb
        .put_item()
        .table_name(&other)
        .item("Id", AttributeValue::S("keep-me".into()))
        .send()
        .await
        .unwrap();
    let config = w.dir.path().join("other.toml");
    let base = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{base}\n[[pipeline]]\nname = \"legacy\"\nbucket = \"{}\"\nprefix = \"legacy/\"\nprocessor = \"orders-csv\"\ntable = \"{other}\"\noutput_prefix = \"legacy-out/\"\n",
            w.bucket
        ),
    )
    .unwrap();
    let out = w.agent_with(&config, &["provision"]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains(&format!("differs   table {other} (left alone)")),
        "{t}"
    );
    assert!(t.contains(&format!("exists    table {inv}")), "{t}");
    assert!(
        t.contains(&format!(
            "DynamoDB table {other} has key Id (S), but pipeline legacy's schema needs OrderId (S)"
        )),
        "{t}"
    );
    assert_eq!(
        key_of(&w, &other).await,
        [("Id".into(), "S".into(), "HASH".into())]
    );
    assert!(
        !table_tags(&w, &other).await.contains_key(TAG),
        "someone else's table got our tag"
    );
    let count = w
        .clients
        .dynamodb
        .scan()
        .table_name(&other)
        .send()
        .await
        .unwrap()
        .count();
    assert_eq!(count, 1);

    let out = w.agent_with(&config, &["preflight"]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("KEY WANTED"), "{t}");
    assert!(
        t.contains(&format!("FAILED DynamoDB table {other} has key Id (S)")),
        "{t}"
    );
    // The tables that fit are shown as such.
    assert!(
        t.lines()
            .any(|l| l.starts_with(&inv) && l.contains("CustomerId (S) + InvoiceNo (N)")),
        "{t}"
    );
}

/// `--destroy` removes exactly what provision made. Before provision: a queue (with someone's
/// policy statement) and an input bucket (with someone's notification entry to that queue). After
/// provision and `--destroy --yes --force`: the queue, the bucket, their entry and statement are
/// there, our statement, notification entry and redrive policy are not; the output bucket (with
/// object versions and a delete marker), the dead-letter queue and the table provision made are
/// gone. Without `--yes` nothing changes; with `--yes` but without `--force` the bucket with objects
/// is refused and nothing changes either; a second run has nothing to do.
#[tokio::test(flavor = "multi_thread")]
async fn destroy_removes_what_provision_made_and_nothing_else() {
    let w = World::new("prov-destroy").await;
    let id = unique("pd");
    let (queue, input, output, dlq, table) = (
        format!("pre-{id}"),
        format!("pre-{id}"),
        format!("out-{id}"),
        format!("dlq-{id}"),
        format!("tbl-{id}"),
    );

    // What was there before.
    let url = w
        .clients
        .sqs
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let arn = w
        .clients
        .sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let theirs = serde_json::json!({"Version": "2012-10-17", "Statement": [{
        "Sid": "AuditSend", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "sqs:SendMessage", "Resource": arn}]});
    w.clients
        .sqs
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::Policy, theirs.to_string())
        .send()
        .await
        .unwrap();
    w.clients
        .s3
        .create_bucket()
        .bucket(&input)
        .send()
        .await
        .unwrap();
    w.clients
        .s3
        .put_bucket_notification_configuration()
        .bucket(&input)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(
                    QueueConfiguration::builder()
                        .id("someone-else")
                        .queue_arn(&arn)
                        .events(Event::from("s3:ObjectRemoved:*"))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();

    let config = w.dir.path().join("destroy.toml");
    let base = std::fs::read_to_string(&w.config).unwrap();
    let text_cfg = base
        .replace(
            &format!("name = \"{}\"", w.queue),
            &format!("name = \"{queue}\""),
        )
        .replace(
            &format!("dead_letter_queue = \"{}\"", w.dlq),
            &format!("dead_letter_queue = \"{dlq}\""),
        )
        .replace(
            &format!("bucket = \"{}\"", w.bucket),
            &format!("bucket = \"{input}\"\noutput_bucket = \"{output}\""),
        )
        .replace(
            &format!("table = \"{}\"", w.table),
            &format!("table = \"{table}\""),
        );
    assert!(text_cfg.contains(&output) && text_cfg.contains(&dlq) && text_cfg.contains(&table));
    std::fs::write(&config, text_cfg).unwrap();
    let run = |args: &[&str]| w.agent_with(&config, args).output().unwrap();

    let out = run(&["provision"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("exists    queue {queue}")), "{t}");
    assert!(t.contains(&format!("exists    bucket {input}")), "{t}");
    assert!(t.contains(&format!("created   bucket {output}")), "{t}");
    let policy = queue_attribute(&w, &queue, QueueAttributeName::Policy).await;
    assert_eq!(
        sids(policy.as_deref()),
        [
            "AuditSend".to_string(),
            format!("offload-agent-{output}"),
            format!("offload-agent-{input}")
        ]
    );
    assert_eq!(
        notification_ids(&w, &input).await,
        ["offload-agent-orders", "someone-else"]
    );
    assert!(
        queue_attribute(&w, &queue, QueueAttributeName::RedrivePolicy)
            .await
            .is_some()
    );

    // Data where --force is needed: versions and a delete marker in the output bucket, an item.
    w.clients
        .s3
        .put_bucket_versioning()
        .bucket(&output)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    for body in ["one", "two"] {
        w.clients
            .s3
            .put_object()
            .bucket(&output)
            .key("output/a.csv")
            .body(body.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    w.clients
        .s3
        .delete_object()
        .bucket(&output)
        .key("output/a.csv")
        .send()
        .await
        .unwrap();
    w.clients
        .dynamodb
        .put_item()
        .table_name(&table)
        .item("OrderId", AttributeValue::S("o1".into()))
        .send()
        .await
        .unwrap();

    let everything_there = || async {
        assert!(bucket_exists(&w, &output).await);
        assert!(table_exists(&w, &table).await);
        assert!(queue_exists(&w, &dlq).await);
        assert_eq!(
            notification_ids(&w, &input).await,
            ["offload-agent-orders", "someone-else"]
        );
        assert_eq!(
            sids(
                queue_attribute(&w, &queue, QueueAttributeName::Policy)
                    .await
                    .as_deref()
            )
            .len(),
            3
        );
    };

    // The plan, and nothing changed.
    let out = run(&["provision", "--destroy"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for line in [
        format!("remove    notification entries offload-agent-orders of bucket {input}"),
        format!("remove    policy statements offload-agent-{output}, offload-agent-{input} and the redrive policy (its dead-letter queue goes) of queue"),
        format!("remove    table {table} (made by "),
        "holds items: needs --force".to_string(),
        format!("remove    bucket {output} (made by "),
        format!("remove    queue {dlq} (made by "),
        format!("keep      bucket {input}: not made by provision"),
        format!("keep      queue {queue}: not made by provision"),
        "nothing changed: run again with --yes".to_string(),
    ] {
        assert!(t.contains(&line), "{line:?} not in\n{t}");
    }
    everything_there().await;

    // --yes without --force: refused as a whole.
    let out = run(&["provision", "--destroy", "--yes"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!(
            "nothing removed: table {table}, bucket {output} still hold(s) data"
        )),
        "{t}"
    );
    assert!(t.contains("--force"), "{t}");
    everything_there().await;

    let out = run(&["provision", "--destroy", "--yes", "--force"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("emptied   bucket {output} (3 object versions")),
        "{t}"
    );
    assert!(t.contains(&format!("removed   bucket {output}")), "{t}");
    assert!(!bucket_exists(&w, &output).await);
    assert!(!table_exists(&w, &table).await);
    assert!(!queue_exists(&w, &dlq).await);
    assert!(bucket_exists(&w, &input).await);
    assert!(queue_exists(&w, &queue).await);
    assert_eq!(notification_ids(&w, &input).await, ["someone-else"]);
    assert_eq!(
        sids(
            queue_attribute(&w, &queue, QueueAttributeName::Policy)
                .await
                .as_deref()
        ),
        ["AuditSend"]
    );
    assert_eq!(
        queue_attribute(&w, &queue, QueueAttributeName::RedrivePolicy).await,
        None
    );
    // The world's own resources (another configuration's) are untouched.
    assert!(bucket_exists(&w, &w.bucket).await && table_exists(&w, &w.table).await);

    let out = run(&["provision", "--destroy", "--yes"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("nothing to remove"), "{t}");
    assert!(t.contains(&format!("keep      queue {queue}")), "{t}");
}
