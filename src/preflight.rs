//! `offload-agent preflight`: every endpoint this host needs, checked step by step through the
//! configured egress — DNS, TCP, the proxy's CONNECT, TLS (with the certificate's issuer, so that a
//! TLS-inspecting proxy shows), an HTTP answer and its `Date` (clock skew) — each failure with what to
//! fix. `register` runs it before it changes anything.
//!
//! The endpoints: the daemon's (SQS, S3, DynamoDB, SSM for Parameter Store and registration), the SSM
//! agent's (`ssmmessages`, `ec2messages`), the ECS agent's (`ecs`, and the ACS/TCS poll endpoint when the
//! credentials allow `ecs:DiscoverPollEndpoint`). URLs are the configured overrides, else what the SDK's
//! own endpoint resolver gives for the region and `network.use_fips` / `use_dual_stack`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::egress::{Egress, ProxyUrl};

/// Which of the host's programs needs an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum User {
    Daemon,
    SsmAgent,
    EcsAgent,
}

impl User {
    fn label(self) -> &'static str {
        match self {
            User::Daemon => "daemon",
            User::SsmAgent => "SSM agent",
            User::EcsAgent => "ECS agent",
        }
    }
}

/// One endpoint to check.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) service: String,
    pub(crate) user: User,
    /// `None`: not checked, with the reason in `skipped`.
    pub(crate) url: Option<String>,
    pub(crate) skipped: Option<String>,
}

/// One step's outcome: what it found (or why it failed) and how long it took.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    pub(crate) ok: bool,
    pub(crate) detail: String,
    pub(crate) ms: u64,
}

/// One endpoint's row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) service: String,
    pub(crate) for_: &'static str,
    pub(crate) url: Option<String>,
    /// "direct", or the proxy (without its password).
    pub(crate) route: String,
    pub(crate) dns: Option<Step>,
    pub(crate) tcp: Option<Step>,
    /// The proxy's answer to CONNECT (https through a proxy).
    pub(crate) connect: Option<Step>,
    /// The TLS handshake; `detail` is the certificate's issuer.
    pub(crate) tls: Option<Step>,
    pub(crate) http: Option<Step>,
    pub(crate) ms: u64,
    /// AWS's clock minus this host's, from the answer's `Date`.
    pub(crate) clock_skew_s: Option<i64>,
    pub(crate) ok: bool,
    pub(crate) skipped: Option<String>,
    /// What to do about a failure.
    pub(crate) fix: Option<String>,
}

/// One table a pipeline writes to: the key its schema needs against the key DynamoDB has.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TableRow {
    pub(crate) table: String,
    pub(crate) pipeline: String,
    pub(crate) wanted: String,
    /// `None`: the table does not exist (provision creates it) or could not be described (`note`).
    pub(crate) found: Option<String>,
    /// False only when the table exists with another key.
    pub(crate) ok: bool,
    /// What to do: the mismatch, a missing table, or why it could not be checked.
    pub(crate) note: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) region: String,
    pub(crate) rows: Vec<Row>,
    /// Checked with credentials only.
    pub(crate) tables: Vec<TableRow>,
    pub(crate) ok: bool,
}

macro_rules! sdk_default_url {
    ($sdk:ident, $region:expr, $egress:expr) => {{
        use $sdk::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
        match Params::builder()
            .region($region.to_string())
            .use_fips($egress.use_fips)
            .use_dual_stack($egress.use_dual_stack)
            .build()
        {
            Ok(p) => DefaultResolver::new()
                .resolve_endpoint(&p)
                .await
                .ok()
                .map(|e| e.url().to_string()),
            Err(_) => None,
        }
    }};
}

/// The endpoints of this configuration, in the order they are shown.
pub(crate) async fn targets(cfg: &Config, region: &str) -> Vec<Target> {
    let net = &cfg.network;
    let mut out = Vec::new();
    let mut push = |service: &str, user: User, url: Option<String>, skipped: Option<String>| {
        out.push(Target {
            service: service.into(),
            user,
            url,
            skipped,
        })
    };
    let configured = |svc: &str| cfg.aws.endpoint_for(svc).map(String::from);
    let sqs = match configured("sqs") {
        Some(u) => Some(u),
        None => sdk_default_url!(aws_sdk_sqs, region, net),
    };
    push("sqs", User::Daemon, sqs, None);
    let s3 = match configured("s3") {
        Some(u) => Some(u),
        None => sdk_default_url!(aws_sdk_s3, region, net),
    };
    push("s3", User::Daemon, s3, None);
    let dynamodb = match configured("dynamodb") {
        Some(u) => Some(u),
        None => sdk_default_url!(aws_sdk_dynamodb, region, net),
    };
    push("dynamodb", User::Daemon, dynamodb, None);
    let ssm = match configured("ssm") {
        Some(u) => Some(u),
        None => sdk_default_url!(aws_sdk_ssm, region, net),
    };
    push("ssm", User::Daemon, ssm.clone(), None);
    // The SSM agent's channels have no override here: under an emulator they are not checked.
    for svc in ["ssmmessages", "ec2messages"] {
        if cfg.aws.endpoint_url.is_some() || cfg.aws.endpoints.ssm.is_some() {
            push(
                svc,
                User::SsmAgent,
                None,
                Some("an endpoint override is configured (an emulator or a private endpoint): the SSM agent's own endpoints are not derived from it".into()),
            );
        } else {
            let url = ssm.as_deref().and_then(|u| sibling(u, "ssm", svc));
            push(svc, User::SsmAgent, url, None);
        }
    }
    let ecs = match configured("ecs") {
        Some(u) => Some(u),
        None => sdk_default_url!(aws_sdk_ecs, region, net),
    };
    push("ecs", User::EcsAgent, ecs, None);
    out
}

/// `https://ssm.<region>.amazonaws.com` → `https://<svc>.<region>.amazonaws.com` (FIPS forms too).
fn sibling(url: &str, from: &str, to: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (first, tail) = rest.split_once('.')?;
    let label = first.strip_prefix(from)?;
    Some(format!("{scheme}://{to}{label}.{tail}"))
}

/// Check every endpoint, concurrently; `poll` adds the ECS agent's poll endpoint when the credentials
/// allow `DiscoverPollEndpoint`.
pub(crate) async fn run(cfg: &Config, clients: Option<&crate::aws::Clients>) -> Report {
    let region = clients
        .map(|c| c.region.clone())
        .or_else(|| cfg.aws.region.clone())
        .unwrap_or_else(|| "us-east-1".into());
    let mut targets = targets(cfg, &region).await;
    if let Some(c) = clients {
        let mut poll = poll_endpoint(c).await;
        if let (Some(url), Some(_)) = (&poll.url, cfg.aws.endpoint_for("ecs")) {
            // An emulator's (or a private endpoint's) answer names no real ACS host.
            poll.skipped = Some(format!(
                "the ECS endpoint is overridden: the poll endpoint it answered ({url}) is not checked"
            ));
            poll.url = None;
        }
        targets.push(poll);
    }
    let egress = Arc::new(cfg.network.clone());
    let budget = cfg.aws.connect_timeout.max(Duration::from_secs(1)) * 2;
    let checks = targets.into_iter().map(|t| {
        let egress = egress.clone();
        async move { check(&t, &egress, budget).await }
    });
    let rows = futures::future::join_all(checks).await;
    let tables = match clients {
        Some(c) => tables(cfg, c).await,
        None => Vec::new(),
    };
    let ok = rows.iter().all(|r| r.ok) && tables.iter().all(|t| t.ok);
    Report {
        region,
        rows,
        tables,
        ok,
    }
}

/// Each pipeline's table against its schema's key (a table with another key would refuse every
/// batch: say so before a file does).
async fn tables(cfg: &Config, c: &crate::aws::Clients) -> Vec<TableRow> {
    let Ok(tables) = crate::provision::tables(cfg) else {
        return Vec::new(); // pipelines disagreeing on a table's key: `config check` says so
    };
    let mut rows = Vec::new();
    for (table, (want, pipeline)) in tables {
        let wanted = crate::provision::shown_key(&want);
        let (found, ok, note) = match crate::provision::existing_table(c, &table).await {
            Ok(Some((found, _))) if found == want => (Some(wanted.clone()), true, None),
            Ok(Some((found, _))) => (
                Some(crate::provision::shown_key(&found)),
                false,
                Some(crate::provision::key_mismatch(
                    &table, &pipeline, &want, &found,
                )),
            ),
            Ok(None) => (
                None,
                true,
                Some(format!(
                    "DynamoDB table {table} does not exist: run offload-agent provision"
                )),
            ),
            Err(e) => (None, true, Some(format!("not checked: {e:#}"))),
        };
        rows.push(TableRow {
            table,
            pipeline,
            wanted,
            found,
            ok,
            note,
        });
    }
    rows
}

async fn poll_endpoint(c: &crate::aws::Clients) -> Target {
    let call = c.ecs.discover_poll_endpoint().send();
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(out)) => Target {
            service: "ecs (ACS poll)".into(),
            user: User::EcsAgent,
            url: out.endpoint().map(|u| {
                // ACS answers a wss:// or bare host URL: the TLS and HTTP checks are the same.
                let u = u.replacen("wss://", "https://", 1);
                if u.contains("://") {
                    u
                } else {
                    format!("https://{u}")
                }
            }),
            skipped: out
                .endpoint()
                .is_none()
                .then(|| "DiscoverPollEndpoint answered no endpoint".to_string()),
        },
        Ok(Err(e)) => Target {
            service: "ecs (ACS poll)".into(),
            user: User::EcsAgent,
            url: None,
            skipped: Some(format!(
                "DiscoverPollEndpoint: {} (the ECS agent's own check after registration)",
                crate::error::describe(&e)
            )),
        },
        Err(_) => Target {
            service: "ecs (ACS poll)".into(),
            user: User::EcsAgent,
            url: None,
            skipped: Some("DiscoverPollEndpoint did not answer within 10 s".into()),
        },
    }
}

fn step<T>(
    started: Instant,
    r: Result<T, String>,
    show: impl FnOnce(&T) -> String,
) -> (Step, Option<T>) {
    let ms = started.elapsed().as_millis() as u64;
    match r {
        Ok(v) => (
            Step {
                ok: true,
                detail: show(&v),
                ms,
            },
            Some(v),
        ),
        Err(detail) => (
            Step {
                ok: false,
                detail,
                ms,
            },
            None,
        ),
    }
}

async fn within<T>(
    budget: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(budget, f).await.unwrap_or_else(|_| {
        Err(format!(
            "{what}: no answer within {}",
            humantime::format_duration(budget)
        ))
    })
}

/// One endpoint, step by step; the first failing step ends it.
async fn check(t: &Target, egress: &Egress, budget: Duration) -> Row {
    let started = Instant::now();
    let mut row = Row {
        service: t.service.clone(),
        for_: t.user.label(),
        url: t.url.clone(),
        route: "direct".into(),
        dns: None,
        tcp: None,
        connect: None,
        tls: None,
        http: None,
        ms: 0,
        clock_skew_s: None,
        ok: true,
        skipped: t.skipped.clone(),
        fix: None,
    };
    let Some(url) = &t.url else {
        if row.skipped.is_none() {
            row.skipped = Some("no endpoint is known for this region".into());
        }
        return row;
    };
    let parsed = match url.parse::<http::Uri>() {
        Ok(u) if u.host().is_some() => u,
        _ => {
            row.ok = false;
            row.fix = Some(format!(
                "{url} is not a URL: check the endpoint settings in [aws]"
            ));
            return row;
        }
    };
    let tls = parsed.scheme_str() != Some("http");
    let host = parsed
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let proxy = egress.route(url).cloned();
    if let Some(p) = &proxy {
        row.route = format!("via {p}");
    }
    let way = Way {
        egress,
        proxy: proxy.as_ref(),
        host: &host,
        port,
        tls,
        budget,
    };
    let result = steps(&mut row, &way).await;
    row.ms = started.elapsed().as_millis() as u64;
    if let Err(fix) = result {
        row.ok = false;
        row.fix = Some(fix);
    }
    row
}

/// The way to one endpoint: where it is, the proxy (if any) and the time each step may take.
struct Way<'a> {
    egress: &'a Egress,
    proxy: Option<&'a ProxyUrl>,
    host: &'a str,
    port: u16,
    tls: bool,
    budget: Duration,
}

impl Way<'_> {
    /// `host:port`, bracketed for IPv6.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolve what is dialled: the proxy when there is one (it resolves the endpoint itself).
    async fn dns(&self, row: &mut Row) -> Result<Vec<std::net::SocketAddr>, String> {
        let (host, port) = match self.proxy {
            Some(p) => (p.host().to_string(), p.port()),
            None => (self.host.to_string(), self.port),
        };
        let t = Instant::now();
        let found = within(self.budget, "DNS", async {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|a| a.collect::<Vec<_>>())
                .map_err(|e| format!("{host}: {e}"))
        })
        .await;
        let (s, addrs) = step(t, found, |a| {
            let first = a.first().map(|a| a.ip().to_string()).unwrap_or_default();
            match self.proxy {
                Some(_) => format!("proxy {first}"),
                None => first,
            }
        });
        row.dns = Some(s);
        addrs.ok_or_else(|| match self.proxy {
            Some(p) => format!(
                "the proxy's name does not resolve: check {} ({p})",
                self.egress.source_of("https_proxy")
            ),
            None => format!(
                "{} does not resolve on this host: fix its DNS, or reach it through a proxy \
                 (network.https_proxy)",
                self.host
            ),
        })
    }

    async fn tcp(
        &self,
        row: &mut Row,
        addrs: &[std::net::SocketAddr],
    ) -> Result<TcpStream, String> {
        let t = Instant::now();
        let tcp = within(self.budget, "TCP", async {
            let mut last = String::from("no address");
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(last)
        })
        .await;
        let (s, stream) = step(t, tcp, |s| {
            s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
        });
        row.tcp = Some(s);
        let stream = stream.ok_or_else(|| match self.proxy {
            Some(p) => format!(
                "the proxy {p} does not accept connections: check the proxy URL, or the firewall \
                 between this host and it"
            ),
            None => format!(
                "{} does not accept connections from this host: a firewall allows only a proxy? Set \
                 network.https_proxy",
                self.authority()
            ),
        })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// CONNECT through the proxy to the endpoint.
    async fn tunnel(
        &self,
        row: &mut Row,
        p: &ProxyUrl,
        stream: &mut TcpStream,
    ) -> Result<(), String> {
        let authority = self.authority();
        let t = Instant::now();
        let answer = within(self.budget, "CONNECT", async {
            let req = format!(
                "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{}\r\n",
                proxy_auth(p)
            );
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let (status, _) = read_head(stream).await?;
            Ok(status)
        })
        .await;
        let (s, status) = step(t, answer, |c| c.to_string());
        let status = status.unwrap_or(0);
        row.connect = Some(Step {
            ok: status == 200,
            ..s
        });
        match status {
            200 => Ok(()),
            407 => Err(format!(
                "the proxy {p} refused the credentials (407): set the right user and password in {}",
                self.egress.source_of("https_proxy")
            )),
            0 => Err(format!("the proxy {p} did not answer CONNECT")),
            other => Err(format!(
                "the proxy {p} would not connect to {authority} ({other}): it may not resolve or reach \
                 the name, or its rules forbid the port"
            )),
        }
    }

    /// The TLS handshake, with the issuer of the certificate shown whether or not it is trusted.
    async fn handshake(&self, row: &mut Row, stream: TcpStream) -> Result<TlsStream, String> {
        let t = Instant::now();
        let hs = tokio::time::timeout(self.budget, handshake(stream, self.host, self.egress))
            .await
            .unwrap_or_else(|_| Err(("TLS: no answer within the budget".into(), None)));
        let issuer = match &hs {
            Ok((_, i)) | Err((_, Some(i))) => i.clone(),
            Err(_) => String::new(),
        };
        let by = if issuer.is_empty() {
            "an unknown issuer"
        } else {
            issuer.as_str()
        };
        let hs = hs
            .map(|(s, _)| s)
            .map_err(|(e, _)| format!("{e} (issuer: {by})"));
        let (st, stream) = step(t, hs, |_| issuer.clone());
        row.tls = Some(st);
        stream.ok_or_else(|| {
            format!(
                "the certificate of {} (issued by {by}) is not trusted: behind a TLS-inspecting proxy \
                 or for a private endpoint, set {} to a PEM file of the root CA that issued it",
                self.host,
                self.egress.source_of("ca_bundle")
            )
        })
    }
}

/// One endpoint's steps in order; the first failing step ends them, with what to fix.
async fn steps(row: &mut Row, way: &Way<'_>) -> Result<(), String> {
    let addrs = way.dns(row).await?;
    let mut stream = way.tcp(row, &addrs).await?;
    let authority = way.authority();
    if let (Some(p), true) = (way.proxy, way.tls) {
        way.tunnel(row, p, &mut stream).await?;
    }
    if way.tls {
        let mut stream = way.handshake(row, stream).await?;
        let req = format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        http_step(row, &mut stream, &req, way.budget, None).await
    } else {
        let req = match way.proxy {
            Some(p) => format!(
                "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{}Connection: close\r\n\r\n",
                proxy_auth(p)
            ),
            None => format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
        };
        let plain_proxy = way.proxy.map(|p| (p, way.egress));
        http_step(row, &mut stream, &req, way.budget, plain_proxy).await
    }
}

async fn http_step<S: AsyncRead + AsyncWrite + Unpin>(
    row: &mut Row,
    stream: &mut S,
    request: &str,
    budget: Duration,
    plain_proxy: Option<(&ProxyUrl, &Egress)>,
) -> Result<(), String> {
    let t = Instant::now();
    let answer = within(budget, "HTTP", async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_head(stream).await
    })
    .await;
    let sent = SystemTime::now() - t.elapsed() / 2;
    let (s, head) = step(t, answer, |(status, _)| status.to_string());
    row.http = Some(s);
    let Some((status, headers)) = head else {
        return Err(
            "no HTTP answer: the endpoint accepted the connection but did not answer".into(),
        );
    };
    row.clock_skew_s = header(&headers, "date")
        .and_then(crate::clock::http_date)
        .map(|server| crate::clock::skew_ms(server, sent) / 1000);
    if let Some((p, egress)) = plain_proxy {
        if status == 407 {
            if let Some(h) = row.http.as_mut() {
                h.ok = false;
            }
            return Err(format!(
                "the proxy {p} refused the credentials (407): set the right user and password in {}",
                egress.source_of("http_proxy")
            ));
        }
        // A proxy's own error page (squid marks it): the endpoint was not reached.
        if header(&headers, "x-squid-error").is_some() {
            if let Some(h) = row.http.as_mut() {
                h.ok = false;
            }
            return Err(format!(
                "the proxy {p} could not reach the endpoint ({status})"
            ));
        }
    }
    if let Some(skew) = row.clock_skew_s {
        if skew.unsigned_abs() > crate::clock::WARN_ABOVE.as_secs() {
            return Err(format!(
                "this host's clock is {skew:+} s off AWS's: fix time synchronisation (timedatectl status, chronyc tracking)"
            ));
        }
    }
    Ok(())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn proxy_auth(p: &ProxyUrl) -> String {
    match p.basic_auth() {
        Some(token) => format!("Proxy-Authorization: Basic {token}\r\n"),
        None => String::new(),
    }
}

/// Read a response head: the status and the headers (at most 64 KiB).
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(u16, Vec<(String, String)>), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 65_536 {
            return Err("an answer head of over 64 KiB".into());
        }
        match s.read(&mut byte).await {
            Ok(0) => {
                return Err(if head.is_empty() {
                    "the connection was closed without an answer".into()
                } else {
                    "the answer was cut off".into()
                })
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// The certificates the server presented, kept whether or not they verify.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The TLS handshake with the daemon's trust store (the system's roots plus `ca_bundle`): the stream
/// and the issuer, or the failure and the issuer when a certificate was seen.
async fn handshake(
    stream: TcpStream,
    host: &str,
    egress: &Egress,
) -> Result<(TlsStream, String), (String, Option<String>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !egress.ca_pem.is_empty() {
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&egress.ca_pem).flatten() {
            let _ = roots.add(cert);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| (format!("no trust store: {e}"), None))?;
    let verifier = Arc::new(Recording {
        inner,
        seen: std::sync::Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| (e.to_string(), None))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| (format!("{host}: {e}"), None))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = connector.connect(name, stream).await;
    let issuer = verifier
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_deref()
        .and_then(issuer_of);
    match result {
        Ok(s) => Ok((s, issuer.unwrap_or_default())),
        Err(e) => Err((e.to_string(), issuer)),
    }
}

/// A DER element: (tag, content, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The issuer of a DER certificate as `CN=…, O=…` (its common name and organisation).
pub(crate) fn issuer_of(cert: &[u8]) -> Option<String> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    rest = r;
    if tag == 0xa0 {
        // The explicit version; the serial follows.
        let (_, _, r) = der(rest)?;
        rest = r;
    }
    let (_, _, r) = der(rest)?; // signature algorithm
    let (_, issuer, _) = der(r)?;
    let mut parts = Vec::new();
    let mut sets = issuer;
    while let Some((_, set, next)) = der(sets) {
        sets = next;
        let (_, atv, _) = der(set)?;
        let (_, oid, value) = der(atv)?;
        let (_, value, _) = der(value)?;
        let name = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x0a] => "O",
            _ => continue,
        };
        parts.push(format!("{name}={}", String::from_utf8_lossy(value)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

impl Report {
    /// The table, then what to fix for each failure.
    pub(crate) fn render(&self) -> String {
        use std::fmt::Write;
        let cell = |s: &Option<Step>| match s {
            None => "-".to_string(),
            Some(s) if s.ok => format!("ok {} ms", s.ms),
            Some(_) => "FAILED".to_string(),
        };
        let mut o = String::new();
        let _ = writeln!(o, "preflight for region {}", self.region);
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<44} {:<42} {:<12} {:<12} {:<12} {:<40} {:<6} {:>7} {:>6}",
            "SERVICE",
            "FOR",
            "ENDPOINT",
            "ROUTE",
            "DNS",
            "TCP",
            "CONNECT",
            "TLS (ISSUER)",
            "HTTP",
            "TIME",
            "SKEW"
        );
        for r in &self.rows {
            let tls = match &r.tls {
                None => "-".to_string(),
                Some(s) if s.ok => s.detail.clone(),
                Some(s) => format!("FAILED {}", s.detail),
            };
            let http = match &r.http {
                None => "-".to_string(),
                Some(s) if s.ok => s.detail.clone(),
                Some(s) => format!("FAILED {}", s.detail),
            };
            let _ = writeln!(
                o,
                "{:<16} {:<10} {:<44} {:<42} {:<12} {:<12} {:<12} {:<40} {:<6} {:>7} {:>6}",
                r.service,
                r.for_,
                r.url.as_deref().unwrap_or("-"),
                if r.skipped.is_some() {
                    "not checked".to_string()
                } else {
                    r.route.clone()
                },
                cell(&r.dns),
                cell(&r.tcp),
                cell(&r.connect),
                tls,
                http,
                format!("{} ms", r.ms),
                r.clock_skew_s.map_or("-".into(), |s| format!("{s:+} s")),
            );
        }
        let mut first = true;
        for r in &self.rows {
            let note = match (&r.fix, &r.skipped) {
                (Some(fix), _) => format!(
                    "FAILED {} ({}): {fix}",
                    r.service,
                    r.url.as_deref().unwrap_or("-")
                ),
                (None, Some(why)) => format!("not checked {}: {why}", r.service),
                _ => continue,
            };
            if first {
                o.push('\n');
                first = false;
            }
            let _ = writeln!(o, "{note}");
        }
        if !self.tables.is_empty() {
            let _ = writeln!(
                o,
                "\n{:<32} {:<16} {:<36} KEY FOUND",
                "TABLE", "PIPELINE", "KEY WANTED"
            );
            for t in &self.tables {
                let _ = writeln!(
                    o,
                    "{:<32} {:<16} {:<36} {}",
                    t.table,
                    t.pipeline,
                    t.wanted,
                    t.found.as_deref().unwrap_or("-")
                );
            }
            for t in &self.tables {
                if let Some(note) = &t.note {
                    let _ = writeln!(o, "{}{note}", if t.ok { "" } else { "FAILED " });
                }
            }
        }
        let failed = self.rows.iter().filter(|r| !r.ok).count();
        let _ = writeln!(
            o,
            "\n{}",
            if failed == 0 {
                "every endpoint answered".to_string()
            } else {
                format!("{failed} endpoint(s) failed")
            }
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssm_agents_endpoints_are_the_ssm_endpoints_siblings() {
        assert_eq!(
            sibling("https://ssm.eu-west-1.amazonaws.com", "ssm", "ssmmessages").as_deref(),
            Some("https://ssmmessages.eu-west-1.amazonaws.com")
        );
        assert_eq!(
            sibling(
                "https://ssm-fips.us-east-1.amazonaws.com",
                "ssm",
                "ec2messages"
            )
            .as_deref(),
            Some("https://ec2messages-fips.us-east-1.amazonaws.com")
        );
        assert_eq!(sibling("https://other.example", "ssm", "x"), None);
    }

    const PIPELINE: &str = "[queue]\nname='q'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='t'\noutput_prefix='out/'\n";

    #[tokio::test]
    async fn endpoints_follow_the_region_fips_dual_stack_and_overrides() {
        let url = |t: &[Target], svc: &str| {
            t.iter()
                .find(|t| t.service == svc)
                .and_then(|t| t.url.clone())
                .unwrap_or_default()
        };
        let cfg = crate::config::from_toml_str(
            &format!("{PIPELINE}[network]\nuse_fips = true\n"),
            "test.toml",
        )
        .unwrap();
        let t = targets(&cfg, "us-east-1").await;
        assert_eq!(url(&t, "sqs"), "https://sqs-fips.us-east-1.amazonaws.com");
        assert_eq!(
            url(&t, "dynamodb"),
            "https://dynamodb-fips.us-east-1.amazonaws.com"
        );
        assert_eq!(
            url(&t, "ssmmessages"),
            "https://ssmmessages-fips.us-east-1.amazonaws.com"
        );
        let cfg = crate::config::from_toml_str(
            &format!("{PIPELINE}[network]\nuse_dual_stack = true\n[aws.endpoints]\nsqs = 'https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com'\n"),
            "test.toml",
        )
        .unwrap();
        let t = targets(&cfg, "eu-west-1").await;
        assert_eq!(
            url(&t, "sqs"),
            "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com"
        );
        assert_eq!(url(&t, "dynamodb"), "https://dynamodb.eu-west-1.api.aws");
        assert!(t
            .iter()
            .any(|t| t.service == "ssmmessages" && t.skipped.is_none()));
    }

    #[test]
    fn the_issuer_is_read_from_a_certificate() {
        // A self-signed certificate made by `openssl req -x509 -subj "/CN=Corp Root/O=Corp"`.
        let pem = include_str!("../tests/fixtures/issuer-test.pem");
        use rustls_pki_types::pem::PemObject;
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(issuer_of(&cert).as_deref(), Some("CN=Corp Root, O=Corp"));
        assert_eq!(issuer_of(b"\x30\x03\x02\x01\x00"), None);
    }
}
