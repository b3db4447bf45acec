//! End-to-end scenarios of the file-event worker: the real `offload-agent` binary against moto on
//! 127.0.0.1 (S3 notifications to SQS, DynamoDB), each test with its own bucket, queues and table.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A 200-row file lands exactly 200 items (numbers as N, ISO dates) and a 201-line output; uploading it
/// again yields identical items and a byte-identical output.
#[tokio::test(flavor = "multi_thread")]
async fn a_200_row_file_lands_200_items_and_a_201_line_output_idempotently() {
    let w = World::new("e2e200").await;
    let agent = w.start();
    let csv = orders_csv(0, 200);
    w.put("input/orders.csv", csv.clone()).await;
    let out = w.wait_for("output/orders.csv", WAIT, &agent).await;
    let text = String::from_utf8(out.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 201);
    assert_eq!(lines[0], "OrderId,ConfirmationId");
    assert!(lines[1].starts_with("100000000,"));
    assert!(lines[200].starts_with("100000199,"));
    w.wait_queue_empty(WAIT, &agent).await;

    let items = w.items().await;
    assert_eq!(items.len(), 200);
    let item = items
        .iter()
        .find(|i| s(i, "OrderId") == "100000007")
        .unwrap();
    use aws_sdk_dynamodb::types::AttributeValue;
    assert_eq!(item["UnitSold"], AttributeValue::N("4491".into()));
    assert_eq!(item["UnitPrice"], AttributeValue::N("651.21".into()));
    assert_eq!(item["TotalProfit"], AttributeValue::N("566111.75".into()));
    assert_eq!(item["OrderDate"], AttributeValue::S("2011-01-27".into()));
    assert_eq!(item["ShipDate"], AttributeValue::S("2011-02-12".into()));
    assert_eq!(
        item["SourceKey"],
        AttributeValue::S("input/orders.csv".into())
    );
    assert_eq!(item["SourceBucket"], AttributeValue::S(w.bucket.clone()));
    let first = w.confirmations().await;
    for line in &lines[1..] {
        let (id, cid) = line.split_once(',').unwrap();
        assert_eq!(first[id], cid, "output and table agree on {id}");
    }
    assert!(w.get("output/orders.csv.rejects.csv").await.is_none());

    // Same bytes again: S3 gives the same ETag, so the same ids and the same output.
    w.clients
        .s3
        .delete_object()
        .bucket(&w.bucket)
        .key("output/orders.csv")
        .send()
        .await
        .unwrap();
    w.put("input/orders.csv", csv).await;
    let again = w.wait_for("output/orders.csv", WAIT, &agent).await;
    assert_eq!(again, out);
    w.wait_queue_empty(WAIT, &agent).await;
    assert_eq!(w.confirmations().await, first);
    assert!(w.drain_dlq().await.is_empty());
}

/// Bad rows (bad number, bad date, empty id, wrong field count, duplicate id) are listed in the rejects
/// report with their line numbers; every good row lands; written + rejected = rows.
#[tokio::test(flavor = "multi_thread")]
async fn bad_rows_are_reported_and_good_rows_land() {
    let w = World::new("badrows").await;
    let agent = w.start();
    let mut csv = format!("{HEADER}\n");
    csv += &order_row("1", 1); // line 2
    csv += "\n";
    csv += &order_row("2", 2).replace("651.21", "12,5"); // line 3: field count
    csv += "\n";
    csv += &order_row("3", 3).replace("1/27/2011", "31/31/2011"); // line 4: date
    csv += "\n";
    csv += &order_row("", 4); // line 5: empty id
    csv += "\n";
    csv += &order_row("5", 5).replace("651.21", "lots"); // line 6: number
    csv += "\n";
    csv += &order_row("1", 6); // line 7: duplicate of line 2
    csv += "\n";
    csv += &order_row("7", 7); // line 8, no final newline
    w.put("input/mixed.csv", csv).await;
    let out = w.wait_for("output/mixed.csv", WAIT, &agent).await;
    let out = String::from_utf8(out).unwrap();
    assert_eq!(out.lines().count(), 3, "{out}");
    let rejects = String::from_utf8(w.get("output/mixed.csv.rejects.csv").await.unwrap()).unwrap();
    let lines: Vec<&str> = rejects.lines().collect();
    assert_eq!(lines[0], "Line,OrderId,Reason");
    let numbers: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(numbers, ["3", "4", "5", "6", "7"], "{rejects}");
    assert!(lines[1].contains("expected 13 fields"));
    assert!(lines[2].contains("OrderDate"));
    assert!(lines[3].contains("OrderId is empty"));
    assert!(lines[4].contains("UnitPrice"));
    assert!(lines[5].contains("duplicate OrderId (first seen on line 2)"));
    w.wait_queue_empty(WAIT, &agent).await;
    let ids = w.confirmations().await;
    let mut keys: Vec<_> = ids.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["1", "7"]);
    // The first occurrence of "1" won: its UnitSold is 4485 (i = 1), not 4490.
    let item = w
        .items()
        .await
        .into_iter()
        .find(|i| s(i, "OrderId") == "1")
        .unwrap();
    assert_eq!(s(&item, "UnitSold"), "4485");
}

/// Keys with spaces, plus signs, unicode and `../` are decoded exactly, processed, and their outputs land
/// under the decoded names; nothing escapes the spool directory.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_and_unusual_keys_are_processed_under_their_exact_names() {
    let w = World::new("keys").await;
    let agent = w.start();
    let keys = [
        "input/with space+plus.csv",
        "input/ünïcødé 日本.csv",
        "input/../../etc/passwd.csv",
    ];
    for (i, k) in keys.iter().enumerate() {
        w.put(k, orders_csv(i * 10, 3)).await;
    }
    for k in keys {
        let out_key = k.replacen("input/", "output/", 1);
        let out = w.wait_for(&out_key, WAIT, &agent).await;
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 4, "{k}");
    }
    w.wait_queue_empty(WAIT, &agent).await;
    assert_eq!(w.items().await.len(), 9);
    let spool = w.dir.path().join("spool");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool emptied"
    );
    assert!(!std::path::Path::new("/etc/passwd.csv").exists());
    let sources: std::collections::BTreeSet<String> =
        w.items().await.iter().map(|i| s(i, "SourceKey")).collect();
    assert_eq!(sources.len(), 3);
    assert!(sources.contains("input/with space+plus.csv"));
}

/// Files that are not orders CSV (empty, binary, wrong header) get an error report under
/// output/errors/ and their message goes to the dead-letter queue with the reason; a header-only file is
/// fine and yields a header-only output.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_files_are_reported_and_dead_lettered() {
    let w = World::new("badfiles").await;
    let agent = w.start();
    w.put("input/empty.csv", Vec::new()).await;
    let binary: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    w.put("input/binary.csv", binary).await;
    w.put("input/wrong.csv", "a,b,c\n1,2,3\n").await;
    w.put("input/header-only.csv", format!("{HEADER}\n")).await;

    let out = w.wait_for("output/header-only.csv", WAIT, &agent).await;
    assert_eq!(String::from_utf8(out).unwrap(), "OrderId,ConfirmationId\n");
    for (k, why) in [
        ("empty", "empty"),
        ("binary", "not an orders CSV"),
        ("wrong", "lacks columns"),
    ] {
        let report = w
            .wait_for(&format!("output/errors/input/{k}.csv.json"), WAIT, &agent)
            .await;
        let v: serde_json::Value = serde_json::from_slice(&report).unwrap();
        assert_eq!(v["key"], format!("input/{k}.csv"));
        assert_eq!(v["pipeline"], "orders");
        assert!(v["reason"].as_str().unwrap().contains(why), "{k}: {v}");
    }
    w.wait_queue_empty(WAIT, &agent).await;
    let dead = w.drain_dlq().await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (body, reason) in &dead {
        assert!(
            body.contains("Records"),
            "the original message is kept: {body}"
        );
        assert!(!reason.is_empty());
    }
    assert!(w.items().await.is_empty());
}

/// A message that is not JSON, and an event for an object deleted before it was read, both end in the
/// dead-letter queue with a reason; an s3:TestEvent is acknowledged and not dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn junk_messages_test_events_and_vanished_objects() {
    let w = World::new("junk").await;
    let agent = w.start();
    w.send_raw("this is not json").await;
    w.send_raw(&format!(
        r#"{{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"{}"}}"#,
        w.bucket
    ))
    .await;
    let gone = serde_json::json!({"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": w.bucket}, "object": {"key": "input/vanished%21.csv", "size": 10}}
    }]});
    w.send_raw(&gone.to_string()).await;
    let report = w
        .wait_for("output/errors/input/vanished!.csv.json", WAIT, &agent)
        .await;
    let v: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("no longer exists"));
    w.wait_queue_empty(WAIT, &agent).await;
    let dead = w.drain_dlq().await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead
        .iter()
        .any(|(b, r)| b == "this is not json" && r.contains("not JSON")));
    assert!(dead.iter().any(|(_, r)| r.contains("no longer exists")));
    agent
        .wait_log("s3:TestEvent received", Duration::from_secs(5))
        .await;
}

/// The same notification delivered twice (SQS is at-least-once) gives the same items and output.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_twice_gives_identical_results() {
    let w = World::new("twice").await;
    w.put("input/dup.csv", orders_csv(500, 40)).await;
    // The upload's own notification, captured so that it can be delivered twice.
    let url = w.queue_url(&w.queue).await;
    let mut body = None;
    for _ in 0..20 {
        let out = w
            .clients
            .sqs
            .receive_message()
            .queue_url(&url)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if let Some(m) = out.messages.unwrap_or_default().into_iter().next() {
            w.clients
                .sqs
                .delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
            body = m.body;
            break;
        }
    }
    let body = body.expect("S3 sent a notification for the upload");
    assert!(body.contains("dup.csv"), "{body}");
    let agent = w.start();
    w.send_raw(&body).await;
    let first_out = w.wait_for("output/dup.csv", WAIT, &agent).await;
    w.wait_queue_empty(WAIT, &agent).await;
    let first = w.confirmations().await;
    w.send_raw(&body).await;
    // Let the second delivery complete, then compare.
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.wait_queue_empty(WAIT, &agent).await;
    assert_eq!(w.get("output/dup.csv").await.unwrap(), first_out);
    assert_eq!(w.confirmations().await, first);
    assert_eq!(first.len(), 40);
    agent.wait_log("processed", Duration::from_secs(5)).await;
    assert_eq!(agent.log_text().matches(" processed").count(), 2);
}

/// SIGTERM during a large file: the agent exits 0 within the grace period, the message is released
/// (visible again at once), no output is stored; the next agent processes it and every row keeps the
/// ConfirmationId it had.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_file_releases_the_message_and_exits_0() {
    let w = World::with(
        "sigterm",
        Options {
            shutdown_grace: "1s",
            ..Options::default()
        },
    )
    .await;
    let rows = 5_000;
    w.put("input/big.csv", orders_csv(0, rows)).await;
    let mut agent = w.start();
    // Wait until rows are being written, then stop the agent in the middle of the file.
    let start = std::time::Instant::now();
    loop {
        let n = w
            .clients
            .dynamodb
            .scan()
            .table_name(&w.table)
            .limit(1)
            .send()
            .await
            .unwrap()
            .count();
        if n > 0 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no row written; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, took) = agent.terminate(Duration::from_secs(15));
    assert_eq!(code, 0, "log:\n{}", agent.log_text());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let log = agent.log_text();
    assert!(log.contains("released"), "{log}");
    assert!(
        w.get("output/big.csv").await.is_none(),
        "nothing half-done is stored"
    );
    let (visible, _) = w.depth(&w.queue).await;
    assert_eq!(visible, 1, "the message is back in the queue at once");
    let partial = w.confirmations().await;
    assert!(
        partial.len() < rows,
        "stopped in the middle ({} rows)",
        partial.len()
    );

    let agent2 = w.start();
    let out = w
        .wait_for("output/big.csv", Duration::from_secs(240), &agent2)
        .await;
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), rows + 1);
    w.wait_queue_empty(WAIT, &agent2).await;
    let all = w.confirmations().await;
    assert_eq!(all.len(), rows);
    for (id, cid) in &partial {
        assert_eq!(&all[id], cid, "row {id} kept its ConfirmationId");
    }
}

/// An event for a key no pipeline matches is acknowledged and counted, not processed or dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn unmatched_keys_are_acknowledged() {
    let w = World::new("unmatched").await;
    let agent = w.start();
    let ev = serde_json::json!({"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": w.bucket}, "object": {"key": "elsewhere/x.csv"}}
    }]});
    w.send_raw(&ev.to_string()).await;
    agent
        .wait_log("no pipeline matches", Duration::from_secs(30))
        .await;
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());
}

/// A missing table is a transient failure: the message returns to the queue with a backoff, and once
/// the table exists (an operator ran `provision`) the file is processed; nothing goes to the DLQ.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_is_retried_until_it_exists() {
    let w = World::new("notable").await;
    w.clients
        .dynamodb
        .delete_table()
        .table_name(&w.table)
        .send()
        .await
        .unwrap();
    let agent = w.start();
    w.put("input/later.csv", orders_csv(0, 10)).await;
    agent
        .wait_log("failed for now", Duration::from_secs(30))
        .await;
    assert!(
        agent.log_text().contains(&w.table),
        "the log names the table"
    );
    let out = w.agent(&["provision"]).output().unwrap();
    assert!(out.status.success());
    let out = w.wait_for("output/later.csv", WAIT, &agent).await;
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 11);
    assert_eq!(w.items().await.len(), 10);
    assert!(w.drain_dlq().await.is_empty());
}

/// SIGHUP reloads the pipelines live: after the output prefix changes, new files land under it.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_pipelines() {
    let w = World::new("reload").await;
    let agent = w.start();
    agent.wait_log("offload-agent ready", WAIT).await;
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(
            "output_prefix = \"output/\"",
            "output_prefix = \"results/\"",
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent
        .wait_log("configuration reloaded", Duration::from_secs(10))
        .await;
    w.put("input/after.csv", orders_csv(0, 5)).await;
    let out = w.wait_for("results/after.csv", WAIT, &agent).await;
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 6);

    // A broken file on reload keeps the running configuration.
    std::fs::write(&w.config, "this is = not toml [").unwrap();
    agent.signal(libc::SIGHUP);
    agent
        .wait_log("configuration reload failed", Duration::from_secs(10))
        .await;
    w.put("input/still.csv", orders_csv(10, 5)).await;
    w.wait_for("results/still.csv", WAIT, &agent).await;
}

/// A queue that does not exist is an operator's problem: the agent says so with the fix (run
/// `provision`), backs off instead of spinning, stays responsive to SIGTERM, and starts working once the
/// queue exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_queue_is_reported_and_waited_for() {
    let w = World::new("noqueue").await;
    w.delete_queue().await;
    let mut agent = w.start();
    agent
        .wait_log("cannot find the queue", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = agent.log_text();
    assert!(log.contains("offload-agent provision"), "{log}");
    let attempts = log.matches("cannot find the queue").count();
    assert!(
        attempts <= 4,
        "backs off instead of spinning: {attempts} attempts in ~4 s"
    );
    let (code, took) = agent.terminate(Duration::from_secs(10));
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(5));

    let agent = w.start();
    let out = w.agent(&["provision"]).output().unwrap();
    assert!(out.status.success());
    w.put("input/after-provision.csv", orders_csv(0, 3)).await;
    w.wait_for(
        "output/after-provision.csv",
        Duration::from_secs(90),
        &agent,
    )
    .await;
}

/// Rows DynamoDB would refuse (a number beyond its range, one beyond its precision, a key over 2048
/// bytes, an item over 400 KB) and ids that collide only after the one normalisation are rejected rows
/// with reasons; every good row is written, the output is stored, and nothing reaches the DLQ.
#[tokio::test(flavor = "multi_thread")]
async fn rows_dynamodb_would_refuse_are_rejected_and_the_rest_written() {
    let w = World::new("ddb-limits").await;
    let mut text = format!("{HEADER}\n");
    for (i, id) in ["1", "2", "3"].iter().enumerate() {
        text.push_str(&order_row(id, i));
        text.push('\n');
    }
    let huge = format!("1{}", "0".repeat(126));
    text.push_str(&order_row("4", 4).replace("651.21", &huge));
    text.push('\n');
    let precise = format!("1.{}", "3".repeat(40));
    text.push_str(&order_row("5", 5).replace("651.21", &precise));
    text.push('\n');
    text.push_str(&order_row(&"k".repeat(2049), 6));
    text.push('\n');
    text.push_str(&order_row("7", 7).replacen("Sub-Saharan Africa", &"w".repeat(409_500), 1));
    text.push('\n');
    text.push_str(&order_row("\u{a0}2", 8)); // the same id as "2" once normalised
    text.push('\n');
    w.put("input/limits.csv", text).await;
    let agent = w.start();
    let out = w.wait_for("output/limits.csv", WAIT, &agent).await;
    let out = String::from_utf8(out).unwrap();
    let ids: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids, ["1", "2", "3"], "{out}");
    let rejects = String::from_utf8(w.get("output/limits.csv.rejects.csv").await.unwrap()).unwrap();
    for (line, reason) in [
        ("5,", "number range"),
        ("6,", "significant digits"),
        ("7,", "longer than a DynamoDB key"),
        ("8,", "larger than"),
        ("9,", "duplicate OrderId (first seen on line 3)"),
    ] {
        assert!(
            rejects
                .lines()
                .any(|l| l.starts_with(line) && l.contains(reason)),
            "line {line} {reason} in:\n{rejects}"
        );
    }
    assert_eq!(w.items().await.len(), 3);
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());
}

/// A row that passes validation but that DynamoDB still refuses (here: an empty `Country`, which the
/// table's secondary index on it does not take) fails its whole batch; the agent writes that batch's rows
/// one at a time, rejects the refused ones with DynamoDB's reason, and writes the rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_dynamodb_refuses_is_found_in_its_batch_and_rejected() {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType,
    };
    let w = World::new("ddb-refuses").await;
    let ddb = &w.clients.dynamodb;
    ddb.delete_table()
        .table_name(&w.table)
        .send()
        .await
        .unwrap();
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let hash = |name: &str| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(KeyType::Hash)
            .build()
            .unwrap()
    };
    ddb.create_table()
        .table_name(&w.table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("OrderId"))
        .attribute_definitions(attr("Country"))
        .key_schema(hash("OrderId"))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("by-country")
                .key_schema(hash("Country"))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let mut text = format!("{HEADER}\n");
    for i in 0..60 {
        let row = order_row(&format!("{}", 500 + i), i);
        text.push_str(&if i == 9 || i == 39 {
            row.replacen(",Chad,", ",,", 1)
        } else {
            row
        });
        text.push('\n');
    }
    w.put("input/gsi.csv", text).await;
    let agent = w.start();
    let out = String::from_utf8(w.wait_for("output/gsi.csv", WAIT, &agent).await).unwrap();
    assert_eq!(out.lines().count(), 59, "{out}");
    assert!(!out.contains("509,") && !out.contains("539,"), "{out}");
    let rejects = String::from_utf8(w.get("output/gsi.csv.rejects.csv").await.unwrap()).unwrap();
    let lines: Vec<&str> = rejects.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{rejects}");
    for (line, id) in [("11", "509"), ("41", "539")] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{line},{id},"))
                && l.contains("DynamoDB refused the item")
                && l.contains("secondary index")),
            "line {line} in:\n{rejects}"
        );
    }
    let items = w.items().await;
    assert_eq!(items.len(), 58);
    assert!(items.iter().all(|i| s(i, "Country") == "Chad"));
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());
    assert!(agent.log_text().contains("writing its rows one at a time"));
}

/// Without a dead-letter queue in the configuration, a file that fails permanently gets its error report
/// and its message is deleted (SQS cannot hide it for longer than 12 hours): settled once, never
/// re-downloaded and re-failed.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_dlq_a_permanent_failure_is_settled_once() {
    let w = World::with(
        "nodlq",
        Options {
            no_dlq: true,
            ..Options::default()
        },
    )
    .await;
    let agent = w.start();
    w.put("input/not-orders.csv", "name,age\nann,3\n").await;
    w.wait_for("output/errors/input/not-orders.csv.json", WAIT, &agent)
        .await;
    w.wait_queue_empty(WAIT, &agent).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = agent.log_text();
    assert_eq!(
        log.matches("processing").count(),
        1,
        "processed once:\n{log}"
    );
    assert!(
        log.contains("no queue.dead_letter_queue is configured"),
        "{log}"
    );
    assert!(w.drain_dlq().await.is_empty());
}

/// A file that keeps failing transiently (its table is missing) is given up on the last receive the
/// queue's redrive policy allows: the agent moves it to the dead-letter queue itself, with the reason
/// attribute and an error report, before SQS would move it bare.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_failing_transiently_reaches_the_dlq_with_its_reason() {
    let w = World::with(
        "giveup",
        Options {
            retry_base: "1s",
            retry_max: "2s",
            visibility_timeout: "10s",
            ..Options::default()
        },
    )
    .await;
    w.clients
        .dynamodb
        .delete_table()
        .table_name(&w.table)
        .send()
        .await
        .unwrap();
    let agent = w.start();
    w.put("input/doomed.csv", orders_csv(0, 5)).await;
    let report = w
        .wait_for(
            "output/errors/input/doomed.csv.json",
            Duration::from_secs(90),
            &agent,
        )
        .await;
    let report = String::from_utf8(report).unwrap();
    assert!(report.contains("gave up after 5 receives"), "{report}");
    w.wait_queue_empty(WAIT, &agent).await;
    let dlq = w.drain_dlq().await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert!(dlq[0].1.contains("gave up after 5 receives"), "{dlq:?}");
    assert!(
        dlq[0].1.contains(&w.table),
        "the reason names the table: {dlq:?}"
    );
}

/// Two uploads of one key 50 ms apart, several times: the table and the output always end as the
/// second upload says (the first is processed before it, or acknowledged as superseded).
#[tokio::test(flavor = "multi_thread")]
async fn the_newest_upload_of_a_key_wins() {
    let w = World::new("versions").await;
    let agent = w.start();
    for round in 0..4 {
        let key = format!("input/twice-{round}.csv");
        let out_key = format!("output/twice-{round}.csv");
        let first = orders_csv(round * 100, 5);
        // Same OrderIds, other values: the second upload must win every item.
        let second = first.replace(",651.21,", ",999.99,");
        w.put(&key, first).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.put(&key, second.clone()).await;
        w.wait_for(&out_key, WAIT, &agent).await;
    }
    w.wait_queue_empty(WAIT, &agent).await;
    let items = w.items().await;
    assert_eq!(items.len(), 20);
    for item in &items {
        assert_eq!(s(item, "UnitPrice"), "999.99", "{item:?}");
    }
    let log = agent.log_text();
    assert!(
        log.contains("superseded by a newer upload"),
        "events for replaced versions are acknowledged as superseded:\n{log}"
    );
    // Each output lists the ConfirmationIds of the second upload (they derive from its ETag).
    let ids = w.confirmations().await;
    for round in 0..4 {
        let out =
            String::from_utf8(w.get(&format!("output/twice-{round}.csv")).await.unwrap()).unwrap();
        for line in out.lines().skip(1) {
            let (id, cid) = line.split_once(',').unwrap();
            assert_eq!(ids[id], cid, "output and table agree on {id}");
        }
    }
}

/// Shutdown in the middle of a multipart upload (an output larger than one part) aborts it: no
/// incomplete upload is left in the bucket (ListMultipartUploads), and no object appears.
#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_cut_short_is_aborted() {
    let w = World::new("multipart").await;
    let path = w.dir.path().join("big.out");
    let size = offload_agent::transfer::MULTIPART_PART_SIZE as usize * 3;
    std::fs::write(&path, vec![b'x'; size]).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let upload = {
        let (s3, bucket, path, cancel) = (
            w.clients.s3.clone(),
            w.bucket.clone(),
            path.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            offload_agent::transfer::upload(
                &s3,
                &bucket,
                "output/big.csv",
                &path,
                "text/csv",
                &cancel,
            )
            .await
        })
    };
    let uploads = |w: &World| {
        let s3 = w.clients.s3.clone();
        let bucket = w.bucket.clone();
        async move {
            s3.list_multipart_uploads()
                .bucket(bucket)
                .send()
                .await
                .unwrap()
                .uploads()
                .len()
        }
    };
    let start = std::time::Instant::now();
    while uploads(&w).await == 0 {
        assert!(start.elapsed() < WAIT, "the multipart upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    let r = upload.await.unwrap();
    assert!(
        matches!(r, Err(offload_agent::error::ProcessError::Cancelled)),
        "{r:?}"
    );
    assert_eq!(uploads(&w).await, 0, "no incomplete upload left");
    assert!(w.get("output/big.csv").await.is_none());
}

/// The checked-in corpus of nasty files (`tests/corpus/`: an Excel export with BOM and CRLF, quotes
/// with commas, escaped quotes, a newline and an unclosed quote, padded and non-ASCII ids, invalid UTF-8
/// and NUL bytes, wrong field counts and blank lines, numbers and dates at their edges, a header alone)
/// through the running daemon: each file settled, its rows written or rejected at the right lines,
/// written + rejected = rows, the table holding exactly the written rows, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn the_corpus_of_nasty_files_is_accounted_for_row_by_row() {
    let expected: [(&str, usize, &[u64]); 7] = [
        ("bom-crlf.csv", 5, &[]),
        ("bytes.csv", 3, &[3]),
        ("edges.csv", 6, &[3, 7, 8, 9, 10, 12, 13, 15]),
        ("header-only.csv", 0, &[]),
        ("quotes.csv", 4, &[7]),
        ("shapes.csv", 2, &[3, 4, 5]),
        ("unicode-ids.csv", 3, &[3, 6, 7, 8]),
    ];
    let w = World::new("corpus").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    for (name, _, _) in &expected {
        w.put(
            &format!("input/{name}"),
            std::fs::read(dir.join(name)).unwrap(),
        )
        .await;
    }
    let agent = w.start();
    let mut written = 0;
    for (name, good, bad) in &expected {
        let out = w.wait_for(&format!("output/{name}"), WAIT, &agent).await;
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.lines().count(), good + 1, "{name} output:\n{out}");
        written += good;
        let lines: Vec<u64> = match w.get(&format!("output/{name}.rejects.csv")).await {
            Some(r) => {
                let mut rdr = csv::Reader::from_reader(r.as_slice());
                rdr.records()
                    .map(|r| r.unwrap()[0].parse().unwrap())
                    .collect()
            }
            None => Vec::new(),
        };
        assert_eq!(lines, *bad, "{name} rejected lines");
    }
    assert_eq!(w.items().await.len(), written);
    w.wait_queue_empty(WAIT, &agent).await;
    assert!(w.drain_dlq().await.is_empty());
}
