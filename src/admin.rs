//! The local admin endpoint (`[admin] listen`, loopback by default): `/healthz`, `/readyz`, `/metrics`
//! (OpenMetrics text) and `/status` (JSON), served by hyper over HTTP/1.1. GET and HEAD only. A client
//! that misbehaves cannot delay another's answer: at most `MAX_CONNECTIONS` are held, a new one sheds
//! the oldest, a header must arrive within `HEADER_READ_TIMEOUT`, a connection makes at most
//! `MAX_REQUESTS_PER_CONNECTION` requests and lives at most 30 s.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Connections held at once. A new one past this sheds the oldest, so that clients that open
/// connections and never finish them cannot keep a health check waiting: a fresh request is always
/// admitted and answered at once (the answers come from state already computed).
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// A request's header must arrive within this long of the connection's start (or of the previous
/// answer): the requests are one line.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests one connection may make; the last answer carries `Connection: close`.
pub(crate) const MAX_REQUESTS_PER_CONNECTION: u64 = 100;
/// A connection (keep-alive included) lives at most this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What the endpoint reports; the daemon fills it.
pub(crate) trait Facts: Send + Sync {
    /// `Err(why)` when the main loop has not turned lately.
    fn alive(&self) -> Result<(), String>;
    /// `Err(why)` when the daemon cannot take work now (queue not reachable, workers not accepting).
    fn ready(&self) -> Result<(), String>;
    /// The document of `/status`.
    fn status(&self) -> crate::status::StatusDoc;
    fn metrics(&self) -> &Metrics;
}

/// The endpoint's address cannot be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the admin endpoint: {source} (change admin.listen, or set admin.enabled = false)")]
pub(crate) struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Bind `addr`, naming it in the error.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serve until `stop`.
pub(crate) async fn serve(listener: TcpListener, facts: Arc<dyn Facts>, stop: CancellationToken) {
    let mut held = Held::default();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: shedding the oldest frees one.
                    tracing::warn!(error = %e, "admin endpoint: accept failed");
                    held.shed_oldest();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        held.admit(tokio::spawn(connection(stream, facts.clone())));
        // Let the connections just accepted read their requests before a burst of new ones can
        // shed them: a well-behaved client's request is already in its socket.
        tokio::task::yield_now().await;
    }
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Held(std::collections::VecDeque<tokio::task::JoinHandle<()>>);

impl Held {
    /// Keep `task`, shedding finished connections and, when full, the oldest.
    fn admit(&mut self, task: tokio::task::JoinHandle<()>) {
        self.0.retain(|t| !t.is_finished());
        while self.0.len() >= MAX_CONNECTIONS {
            self.shed_oldest();
        }
        self.0.push_back(task);
    }

    fn shed_oldest(&mut self) {
        if let Some(t) = self.0.pop_front() {
            // Aborting drops the connection's future, and with it the socket.
            t.abort();
        }
    }
}

/// Serve one connection: HTTP/1.1 keep-alive, bounded in header time, requests and lifetime.
async fn connection(stream: tokio::net::TcpStream, facts: Arc<dyn Facts>) {
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let facts = facts.clone();
        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        async move {
            let mut resp = respond(facts.as_ref(), &req);
            if n >= MAX_REQUESTS_PER_CONNECTION {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = "no-store".parse() {
        r.headers_mut().insert(hyper::header::CACHE_CONTROL, v);
    }
    r
}

/// The response to one request.
pub(crate) fn respond<B>(facts: &dyn Facts, req: &Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        if let Ok(v) = "GET, HEAD".parse() {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    }
    let verdict = |r: Result<(), String>| match r {
        Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".into()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
    };
    let mut resp = match req.uri().path() {
        "/healthz" => verdict(facts.alive()),
        "/readyz" => verdict(facts.ready()),
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            facts.metrics().encode(),
        ),
        "/status" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&facts.status()).unwrap_or_default() + "\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    };
    if req.method() == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

/// `GET path` on the local endpoint, for `offload-agent status`: (status code, body). An error when
/// nothing answers at `addr`.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let host = if addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.take(16 << 20).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        // The server answers `Connection: close` requests with a plain (not chunked) body.
        Ok((code, body.to_string()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{addr} did not answer within {timeout:?}"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        metrics: Metrics,
        ready: bool,
    }

    impl Facts for Fixed {
        fn alive(&self) -> Result<(), String> {
            Ok(())
        }
        fn ready(&self) -> Result<(), String> {
            if self.ready {
                Ok(())
            } else {
                Err("queue q not found".into())
            }
        }
        fn status(&self) -> crate::status::StatusDoc {
            crate::status::example()
        }
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }
    }

    #[tokio::test]
    async fn endpoints_answer_over_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let facts = Arc::new(Fixed {
            metrics: Metrics::new(),
            ready: false,
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, facts, stop.clone()));
        let t = Duration::from_secs(5);
        assert_eq!(
            get(addr, "/healthz", t).await.unwrap(),
            (200, "ok\n".into())
        );
        let (code, body) = get(addr, "/readyz", t).await.unwrap();
        assert_eq!((code, body.as_str()), (503, "queue q not found\n"));
        let (code, body) = get(addr, "/metrics", t).await.unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("# TYPE offload_messages counter"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (code, body) = get(addr, "/status", t).await.unwrap();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["worker"]["in_flight"], 1);
        assert_eq!(get(addr, "/nope", t).await.unwrap().0, 404);
        stop.cancel();
        server.await.unwrap();
        assert!(get(addr, "/healthz", t).await.is_err(), "stopped");
    }
}
