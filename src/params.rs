//! Configuration from SSM Parameter Store: `[ssm] parameters_path`.
//!
//! Every parameter under the path (recursive; SecureString decrypted) maps onto a configuration key:
//! `/offload-agent/prod/queue/max_in_flight` sets `queue.max_in_flight`. The pipelines are one
//! parameter, `<path>/pipelines`, holding a TOML document of `[[pipeline]]` tables or a JSON array of
//! pipeline objects. The layer sits between the files and the environment
//! (defaults < files < Parameter Store < environment), and every value it sets remembers the parameter
//! it came from, so a value that does not parse is reported naming the parameter.

use std::collections::BTreeSet;

use config::{Map, Source, Value, ValueKind};

use crate::error::describe;

/// The parameter that holds the pipelines document.
pub(crate) const PIPELINES_PARAMETER: &str = "pipelines";

/// One parameter as read from Parameter Store.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Parameter {
    /// Its full name, `/offload-agent/prod/queue/max_in_flight`.
    pub(crate) name: String,
    pub(crate) value: String,
    /// A SecureString: its value is never printed.
    pub(crate) secure: bool,
}

impl std::fmt::Debug for Parameter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parameter")
            .field("name", &self.name)
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

/// The parameters under one path, as a configuration layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ParameterLayer {
    pub(crate) path: String,
    pub(crate) parameters: Vec<Parameter>,
}

impl ParameterLayer {
    /// The configuration key a parameter sets (`queue.max_in_flight`), or `None` for the pipelines
    /// document.
    fn key_of(&self, name: &str) -> Option<String> {
        let rel = name
            .strip_prefix(self.path.trim_end_matches('/'))
            .unwrap_or(name)
            .trim_start_matches('/');
        if rel == PIPELINES_PARAMETER {
            return None;
        }
        Some(rel.replace('/', "."))
    }

    /// The configuration keys whose values come from SecureString parameters (redacted in output).
    pub(crate) fn secure_keys(&self) -> BTreeSet<String> {
        self.parameters
            .iter()
            .filter(|p| p.secure)
            .filter_map(|p| self.key_of(&p.name))
            .collect()
    }
}

fn origin(name: &str) -> String {
    format!("SSM parameter {name}")
}

/// Give a value (and everything inside it) the parameter as its origin.
fn with_origin(v: Value, origin: &String) -> Value {
    let kind = match v.kind {
        ValueKind::Table(t) => ValueKind::Table(
            t.into_iter()
                .map(|(k, v)| (k, with_origin(v, origin)))
                .collect(),
        ),
        ValueKind::Array(a) => {
            ValueKind::Array(a.into_iter().map(|v| with_origin(v, origin)).collect())
        }
        other => other,
    };
    Value::new(Some(origin), kind)
}

/// Parse the pipelines document: TOML `[[pipeline]]` tables, or JSON (an array of pipelines, or an
/// object with a `pipeline` array).
fn pipelines_value(p: &Parameter) -> Result<Value, config::ConfigError> {
    let text = p.value.trim();
    let (text, format) = if text.starts_with('[') && !text.starts_with("[[") {
        (
            format!("{{\"pipeline\": {text}}}"),
            config::FileFormat::Json,
        )
    } else if text.starts_with('{') {
        (text.to_string(), config::FileFormat::Json)
    } else {
        (text.to_string(), config::FileFormat::Toml)
    };
    let map = config::File::from_str(&text, format)
        .collect()
        .map_err(|e| {
            config::ConfigError::Message(format!(
                "{} (in {}): cannot parse the pipelines document: {e}",
                PIPELINES_PARAMETER,
                origin(&p.name)
            ))
        })?;
    map.get("pipeline").cloned().ok_or_else(|| {
        config::ConfigError::Message(format!(
            "{} (in {}): the document has no pipeline list ([[pipeline]] tables, or a JSON array)",
            PIPELINES_PARAMETER,
            origin(&p.name)
        ))
    })
}

impl Source for ParameterLayer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        let mut out = Map::new();
        for p in &self.parameters {
            let o = origin(&p.name);
            match self.key_of(&p.name) {
                Some(key) => {
                    out.insert(
                        key,
                        Value::new(Some(&o), ValueKind::String(p.value.clone())),
                    );
                }
                None => {
                    let v = pipelines_value(p)?;
                    out.insert("pipeline".to_string(), with_origin(v, &o));
                }
            }
        }
        Ok(out)
    }
}

/// Parameter Store could not be read: the path, and the service's answer.
#[derive(Debug, thiserror::Error)]
#[error("cannot read Parameter Store path {path}: {answer}")]
pub(crate) struct FetchError {
    path: String,
    /// The service's code and message, or the chain of causes (`error::describe`).
    answer: String,
}

/// Read every parameter under `path` (recursive, decrypted), following pagination.
pub(crate) async fn fetch(
    ssm: &aws_sdk_ssm::Client,
    path: &str,
) -> Result<ParameterLayer, FetchError> {
    let mut parameters = Vec::new();
    let mut token = None;
    loop {
        let out = ssm
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .with_decryption(true)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| FetchError {
                path: path.to_string(),
                answer: describe(&e),
            })?;
        for p in out.parameters() {
            let (Some(name), Some(value)) = (p.name(), p.value()) else {
                continue;
            };
            parameters.push(Parameter {
                name: name.to_string(),
                value: value.to_string(),
                secure: p.r#type() == Some(&aws_sdk_ssm::types::ParameterType::SecureString),
            });
        }
        token = out.next_token().map(String::from);
        if token.is_none() {
            break;
        }
    }
    parameters.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ParameterLayer {
        path: path.to_string(),
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(ps: &[(&str, &str, bool)]) -> ParameterLayer {
        ParameterLayer {
            path: "/oa/prod".into(),
            parameters: ps
                .iter()
                .map(|(n, v, s)| Parameter {
                    name: n.to_string(),
                    value: v.to_string(),
                    secure: *s,
                })
                .collect(),
        }
    }

    #[test]
    fn names_map_onto_keys_and_documents_onto_pipelines() {
        let l = layer(&[
            ("/oa/prod/queue/max_in_flight", "3", false),
            ("/oa/prod/aws/endpoints/ssm", "http://x", true),
            (
                "/oa/prod/pipelines",
                "[{\"name\":\"p\",\"bucket\":\"b\"}]",
                false,
            ),
        ]);
        let m = l.collect().unwrap();
        assert_eq!(
            m["queue.max_in_flight"].origin(),
            Some("SSM parameter /oa/prod/queue/max_in_flight")
        );
        let ValueKind::Array(ps) = &m["pipeline"].kind else {
            panic!("{m:?}")
        };
        assert_eq!(ps.len(), 1);
        assert_eq!(
            l.secure_keys().into_iter().collect::<Vec<_>>(),
            ["aws.endpoints.ssm"]
        );
        let toml = layer(&[(
            "/oa/prod/pipelines",
            "[[pipeline]]\nname = \"a\"\n[[pipeline]]\nname = \"b\"\n",
            false,
        )]);
        let ValueKind::Array(ps) = &toml.collect().unwrap()["pipeline"].kind else {
            panic!()
        };
        assert_eq!(ps.len(), 2);
        let bad = layer(&[("/oa/prod/pipelines", "[[pipeline]\nname=", false)]);
        let e = bad.collect().unwrap_err().to_string();
        assert!(e.contains("/oa/prod/pipelines"), "{e}");
        assert!(!format!("{:?}", l.parameters[1]).contains("http://x"));
    }
}
