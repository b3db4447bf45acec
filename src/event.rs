//! Parsing SQS message bodies into the S3 objects they announce.
//!
//! Three shapes reach the queue: classic S3 notifications (`Records`, possibly several per message),
//! the same wrapped in an SNS envelope (`Type: Notification`, the notification as a JSON string in
//! `Message`), and EventBridge "Object Created" events. S3 form-URL-encodes object keys in
//! notifications: `+` stands for a space and `%2B` for a plus sign.

use serde_json::Value;

/// One object that a notification says was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub bucket: String,
    /// The decoded key, exactly as S3 stores it.
    pub key: String,
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub version_id: Option<String>,
}

impl ObjectRef {
    /// `s3://bucket/key`, for logs, metrics and reasons.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// Split `s3://bucket/key`.
pub(crate) fn parse_s3_url(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    if bucket.is_empty() || key.is_empty() {
        return None;
    }
    Some((bucket.to_string(), key.to_string()))
}

/// What a message body turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `s3:TestEvent`, sent once when a notification configuration is saved.
    Test { bucket: Option<String> },
    /// Created objects (at least one), and how many records of other kinds were skipped.
    Objects {
        objects: Vec<ObjectRef>,
        ignored: usize,
    },
    /// A valid notification that announces no created object (only deletions, say).
    Nothing { ignored: usize },
}

/// The body is not an S3 event we understand; the text says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an S3 event notification: {0}")]
pub struct NotAnEvent(pub String);

/// Decode an `application/x-www-form-urlencoded` key: `+` is a space, `%XX` a byte.
pub fn decode_key(raw: &str) -> Result<String, NotAnEvent> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| NotAnEvent(format!("object key {raw:?} does not decode to UTF-8")))
}

/// The object of one record; S3 notifications and EventBridge spell the ETag and version fields
/// differently.
fn object_ref(
    bucket: &str,
    raw_key: &str,
    object: &Value,
    etag_field: &str,
    version_field: &str,
) -> Result<ObjectRef, NotAnEvent> {
    let text = |f: &str| object.get(f).and_then(Value::as_str).map(String::from);
    let key = decode_key(raw_key)?;
    // S3 has no bucket without a name and no object without a key: such a record is not from S3.
    if bucket.is_empty() || key.is_empty() {
        return Err(NotAnEvent(format!(
            "empty bucket name or object key (bucket {bucket:?}, key {raw_key:?})"
        )));
    }
    Ok(ObjectRef {
        bucket: bucket.to_string(),
        key,
        size: object.get("size").and_then(Value::as_u64),
        etag: text(etag_field),
        version_id: text(version_field),
    })
}

pub fn parse(body: &str) -> Result<Event, NotAnEvent> {
    let v: Value = serde_json::from_str(body).map_err(|e| {
        NotAnEvent(format!(
            "body is not JSON ({e}); first bytes: {:?}",
            body.chars().take(60).collect::<String>()
        ))
    })?;
    parse_value(&v, 0)
}

fn parse_value(v: &Value, depth: u8) -> Result<Event, NotAnEvent> {
    let obj = v
        .as_object()
        .ok_or_else(|| NotAnEvent("body is JSON but not an object".into()))?;

    // SNS envelope: the notification travels as a string in `Message`.
    if obj.get("Type").and_then(Value::as_str) == Some("Notification") && depth == 0 {
        let inner = obj
            .get("Message")
            .and_then(Value::as_str)
            .ok_or_else(|| NotAnEvent("SNS notification without a Message string".into()))?;
        let inner: Value = serde_json::from_str(inner)
            .map_err(|e| NotAnEvent(format!("SNS Message is not JSON ({e})")))?;
        return parse_value(&inner, depth + 1);
    }

    if obj.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(Event::Test {
            bucket: obj.get("Bucket").and_then(Value::as_str).map(String::from),
        });
    }

    if let Some(records) = obj.get("Records") {
        return parse_records(records);
    }
    // EventBridge, delivered to SQS by a rule.
    if obj.get("source").and_then(Value::as_str) == Some("aws.s3") {
        return parse_eventbridge(obj);
    }
    Err(NotAnEvent(
        "JSON object with neither Records, Event nor an EventBridge source".into(),
    ))
}

/// A classic S3 notification's `Records`: the created objects, and how many records were not.
fn parse_records(records: &Value) -> Result<Event, NotAnEvent> {
    let records = records
        .as_array()
        .ok_or_else(|| NotAnEvent("Records is not an array".into()))?;
    let mut objects = Vec::new();
    let mut ignored = 0;
    for (i, r) in records.iter().enumerate() {
        let source = r.get("eventSource").and_then(Value::as_str).unwrap_or("");
        let name = r.get("eventName").and_then(Value::as_str).unwrap_or("");
        if source != "aws:s3" || !name.starts_with("ObjectCreated:") {
            ignored += 1;
            continue;
        }
        let s3 = r
            .get("s3")
            .ok_or_else(|| NotAnEvent(format!("Records[{i}] has no s3 field")))?;
        let bucket = s3
            .pointer("/bucket/name")
            .and_then(Value::as_str)
            .ok_or_else(|| NotAnEvent(format!("Records[{i}].s3.bucket.name is missing")))?;
        let raw_key = s3
            .pointer("/object/key")
            .and_then(Value::as_str)
            .ok_or_else(|| NotAnEvent(format!("Records[{i}].s3.object.key is missing")))?;
        objects.push(object_ref(
            bucket,
            raw_key,
            &s3["object"],
            "eTag",
            "versionId",
        )?);
    }
    Ok(if objects.is_empty() {
        Event::Nothing { ignored }
    } else {
        Event::Objects { objects, ignored }
    })
}

/// An EventBridge "Object Created" event.
fn parse_eventbridge(obj: &serde_json::Map<String, Value>) -> Result<Event, NotAnEvent> {
    let detail_type = obj.get("detail-type").and_then(Value::as_str).unwrap_or("");
    if detail_type != "Object Created" {
        return Ok(Event::Nothing { ignored: 1 });
    }
    let detail = obj
        .get("detail")
        .ok_or_else(|| NotAnEvent("EventBridge event without detail".into()))?;
    let bucket = detail
        .pointer("/bucket/name")
        .and_then(Value::as_str)
        .ok_or_else(|| NotAnEvent("EventBridge detail.bucket.name is missing".into()))?;
    let raw_key = detail
        .pointer("/object/key")
        .and_then(Value::as_str)
        .ok_or_else(|| NotAnEvent("EventBridge detail.object.key is missing".into()))?;
    Ok(Event::Objects {
        objects: vec![object_ref(
            bucket,
            raw_key,
            &detail["object"],
            "etag",
            "version-id",
        )?],
        ignored: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse() {
        assert_eq!(
            parse_s3_url("s3://b/in/a b.csv"),
            Some(("b".into(), "in/a b.csv".into()))
        );
        assert_eq!(parse_s3_url("s3://b/"), None);
        assert_eq!(parse_s3_url("s3:///k"), None);
        assert_eq!(parse_s3_url("/tmp/x"), None);
    }

    fn record(bucket: &str, key: &str, name: &str) -> Value {
        serde_json::json!({
            "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 12, "eTag": "abc"}}
        })
    }

    #[test]
    fn keys_are_form_url_decoded() {
        assert_eq!(decode_key("a+b%2Bc.csv").unwrap(), "a b+c.csv");
        assert_eq!(
            decode_key("input/%C3%A9t%C3%A9.csv").unwrap(),
            "input/été.csv"
        );
        assert_eq!(
            decode_key("..%2F..%2Fetc%2Fpasswd").unwrap(),
            "../../etc/passwd"
        );
        assert!(decode_key("%FF").is_err());
    }

    #[test]
    fn an_empty_bucket_or_key_is_not_an_event() {
        for (bucket, key) in [("", "a.csv"), ("b", "")] {
            let body = serde_json::json!({"Records": [record(bucket, key, "ObjectCreated:Put")]});
            let e = parse(&body.to_string()).unwrap_err();
            assert!(e.0.contains("empty bucket name or object key"), "{e}");
        }
    }

    #[test]
    fn several_records_in_one_message_are_all_returned() {
        let body = serde_json::json!({"Records": [
            record("b", "input/one+1.csv", "ObjectCreated:Put"),
            record("b", "input/two.csv", "ObjectRemoved:Delete"),
            record("b", "input/three%2B.csv", "ObjectCreated:CompleteMultipartUpload"),
        ]})
        .to_string();
        match parse(&body).unwrap() {
            Event::Objects { objects, ignored } => {
                assert_eq!(ignored, 1);
                let keys: Vec<_> = objects.iter().map(|o| o.key.as_str()).collect();
                assert_eq!(keys, ["input/one 1.csv", "input/three+.csv"]);
                assert_eq!(objects[0].etag.as_deref(), Some("abc"));
                assert_eq!(objects[0].size, Some(12));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_events_sns_and_eventbridge_are_understood() {
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"bkt"}"#;
        assert_eq!(
            parse(test).unwrap(),
            Event::Test {
                bucket: Some("bkt".into())
            }
        );
        let inner = serde_json::json!({"Records": [record("b", "k+1", "ObjectCreated:Put")]});
        let sns = serde_json::json!({"Type": "Notification", "Message": inner.to_string()});
        match parse(&sns.to_string()).unwrap() {
            Event::Objects { objects, .. } => assert_eq!(objects[0].key, "k 1"),
            other => panic!("{other:?}"),
        }
        let eb = serde_json::json!({"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": "b"}, "object": {"key": "in/x.csv", "size": 5, "etag": "e"}}});
        match parse(&eb.to_string()).unwrap() {
            Event::Objects { objects, .. } => {
                assert_eq!(objects[0].bucket, "b");
                assert_eq!(objects[0].key, "in/x.csv");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_an_event() {
        assert!(parse("hello").unwrap_err().0.contains("not JSON"));
        assert!(parse("[1,2]").is_err());
        assert!(parse(r#"{"foo": 1}"#).is_err());
        assert!(parse(
            r#"{"Records": [{"eventSource":"aws:s3","eventName":"ObjectCreated:Put"}]}"#
        )
        .is_err());
        assert_eq!(
            parse(r#"{"Records": []}"#).unwrap(),
            Event::Nothing { ignored: 0 }
        );
    }
}
