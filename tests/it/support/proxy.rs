//! A fault-injecting TCP proxy between the agent and the emulator, on 127.0.0.1: an outage (every
//! connection dropped at once), latency, answers of `503 Service Unavailable`, and connections reset in
//! the middle of the response, each at a set rate, and answers whose `Date` header is moved (a host
//! clock that drifted). moto closes every connection after one answer, so a connection is a request
//! and the rates are per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the connections it accepts from now on.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Drop every connection as soon as it is accepted (the service is unreachable).
    pub down: bool,
    /// Delay before each connection is forwarded.
    pub latency: Duration,
    /// Share of requests answered `503 Service Unavailable` without reaching the emulator.
    pub error_rate: f64,
    /// Share of requests forwarded whose response is cut off after a few bytes by a TCP reset.
    pub reset_rate: f64,
    /// Every answer's `Date` header moved this far ahead (AWS's clock ahead of the host's).
    pub date_ahead: Duration,
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct Counts {
    pub connections: AtomicU64,
    pub dropped: AtomicU64,
    pub errors: AtomicU64,
    pub resets: AtomicU64,
}

pub struct FaultProxy {
    pub endpoint: String,
    faults: Arc<Mutex<Faults>>,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward to `upstream` ("http://127.0.0.1:PORT").
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let faults = Arc::new(Mutex::new(Faults::default()));
        let counts = Arc::new(Counts::default());
        let (f, c) = (faults.clone(), counts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                c.connections.fetch_add(1, Ordering::Relaxed);
                let now = f.lock().unwrap().clone();
                let (c, upstream) = (c.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(client, &upstream, now, &c).await;
                });
            }
        });
        FaultProxy {
            endpoint,
            faults,
            counts,
            task,
        }
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    pub fn count(&self, which: fn(&Counts) -> &AtomicU64) -> u64 {
        which(&self.counts).load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: &str,
    faults: Faults,
    counts: &Counts,
) -> std::io::Result<()> {
    if faults.down {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
        reset(&client)?;
        return Ok(());
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let roll: f64 = rand::thread_rng().gen();
    if roll < faults.error_rate {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        // Read the request head, answer 503, close.
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = client.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        client
            .write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\
                  connection: close\r\n\r\nslow down!\r\n",
            )
            .await?;
        client.shutdown().await?;
        return Ok(());
    }
    let mut server = TcpStream::connect(upstream).await?;
    if roll < faults.error_rate + faults.reset_rate {
        counts.resets.fetch_add(1, Ordering::Relaxed);
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = tokio::io::copy(&mut cr, &mut sw);
        let down = async {
            let mut first = [0u8; 12];
            let n = sr.read(&mut first).await?;
            cw.write_all(&first[..n]).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            _ = up => {}
            r = down => { r?; }
        }
        reset(&client)?;
        return Ok(());
    }
    if !faults.date_ahead.is_zero() {
        return forward_with_date(client, server, faults.date_ahead).await;
    }
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// Forward one exchange, the answer's `Date` header moved `ahead`.
async fn forward_with_date(
    mut client: TcpStream,
    mut server: TcpStream,
    ahead: Duration,
) -> std::io::Result<()> {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let up = tokio::io::copy(&mut cr, &mut sw);
    let down = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                break head.len();
            }
            head.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8_lossy(&head[..end]).to_string();
        let date = aws_smithy_types::DateTime::from(std::time::SystemTime::now() + ahead)
            .fmt(aws_smithy_types::date_time::Format::HttpDate)
            .unwrap();
        let moved: Vec<String> = text
            .split("\r\n")
            .map(|l| {
                if l.to_ascii_lowercase().starts_with("date:") {
                    format!("Date: {date}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        cw.write_all(moved.join("\r\n").as_bytes()).await?;
        cw.write_all(&head[end..]).await?;
        tokio::io::copy(&mut sr, &mut cw).await?;
        cw.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        _ = up => {}
        r = down => { r?; }
    }
    Ok(())
}

/// Close with a TCP reset: SO_LINGER of zero (which never blocks, unlike the lingering tokio warns of).
#[allow(deprecated)]
fn reset(s: &TcpStream) -> std::io::Result<()> {
    s.set_linger(Some(Duration::ZERO))
}
