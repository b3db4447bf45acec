//! The ECS agent's introspection endpoint (`GET /v1/metadata`), read with a minimal HTTP/1.0 client:
//! the URL is always a plain-HTTP loopback address, and the answer is a few hundred bytes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Metadata {
    pub cluster: Option<String>,
    /// `None` until the agent has registered the host with its cluster.
    pub container_instance_arn: Option<String>,
    pub version: Option<String>,
}

const MAX_RESPONSE: usize = 64 * 1024;

/// Why the agent's introspection endpoint gave no metadata; each names the URL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{url}: only http:// URLs are supported")]
    NotHttp { url: String },
    #[error("{url}: {error}")]
    Io { url: String, error: std::io::Error },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: malformed HTTP response")]
    Malformed { url: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: String },
    #[error("{url}: not JSON ({error})")]
    NotJson {
        url: String,
        error: serde_json::Error,
    },
}

/// `http://host:port/path` → (host:port, path).
fn split_url(url: &str) -> Result<(String, String), Error> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::NotHttp { url: url.into() })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// Ask the agent; any failure (refused, timeout, non-200, bad JSON) is an error naming the URL.
pub(crate) async fn fetch(url: &str, timeout: Duration) -> Result<Metadata, Error> {
    let (authority, path) = split_url(url)?;
    let io = |error| Error::Io {
        url: url.into(),
        error,
    };
    let work = async {
        let mut stream = TcpStream::connect(&authority).await.map_err(io)?;
        let host = authority.split(':').next().unwrap_or("");
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(io)?;
        let mut buf = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        Ok::<_, Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::Timeout {
            url: url.into(),
            timeout,
        })??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Malformed { url: url.into() })?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(Error::Status {
            url: url.into(),
            status: status.into(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|error| Error::NotJson {
            url: url.into(),
            error,
        })?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    Ok(Metadata {
        cluster: s("Cluster"),
        container_instance_arn: s("ContainerInstanceArn"),
        version: s("Version"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_metadata_and_reports_failures() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for body in [
                r#"{"Cluster":"c","ContainerInstanceArn":null,"Version":"v1"}"#,
                r#"{"Cluster":"c","ContainerInstanceArn":"arn:x","Version":"v1"}"#,
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await.unwrap();
                let resp =
                    format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/v1/metadata");
        let m = fetch(&url, Duration::from_secs(2)).await.unwrap();
        assert_eq!(m.cluster.as_deref(), Some("c"));
        assert_eq!(m.container_instance_arn, None);
        let m = fetch(&url, Duration::from_secs(2)).await.unwrap();
        assert_eq!(m.container_instance_arn.as_deref(), Some("arn:x"));
        assert!(
            fetch("http://127.0.0.1:1/v1/metadata", Duration::from_secs(2))
                .await
                .is_err()
        );
        assert!(fetch("https://x/", Duration::from_secs(1)).await.is_err());
    }
}
