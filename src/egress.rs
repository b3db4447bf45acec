//! The host's way out to AWS: an HTTP(S) proxy (with its user and password), the hosts reached
//! directly (`no_proxy`), and a private root CA added to the system's roots (`ca_bundle`).
//!
//! One [`Egress`] is resolved from `[network]` and, for each key left unset, the standard environment
//! variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY` and their lowercase forms,
//! `AWS_CA_BUNDLE`), remembering which source each value came from. Every AWS client of every command is
//! built on [`Egress::http_client`]; the ECS agent's container, the SSM agent, Docker and the container
//! and command processors are given the same settings as environment variables
//! ([`Egress::child_env`]).
//!
//! A proxy's password is never shown: [`ProxyUrl`]'s `Display`, `Debug` and `Serialize` all redact it.
//! Loopback and the link-local addresses of the instance metadata and ECS task credentials endpoints
//! are always reached directly ([`ALWAYS_DIRECT`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use serde::Serialize;

/// Reached without the proxy whatever `no_proxy` says: loopback, the EC2 instance metadata service
/// (IPv4 and IPv6) and the ECS task credentials endpoint. A proxy in front of them breaks task roles
/// and the awslogs driver (amazon-ecs-agent#605).
pub const ALWAYS_DIRECT: [&str; 6] = [
    "localhost",
    "127.0.0.0/8",
    "::1",
    "169.254.169.254",
    "169.254.170.2",
    "fd00:ec2::254",
];

/// Environment variables read, in order, for each setting left unset in `[network]`.
pub const HTTPS_PROXY_VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];
pub const HTTP_PROXY_VARS: [&str; 4] = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];
pub const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];
pub const CA_BUNDLE_VARS: [&str; 1] = ["AWS_CA_BUNDLE"];

/// A proxy's URL: `http://[user[:password]@]host[:port]` (or `https://`), user and password
/// percent-encoded. Shown everywhere with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// As given (with the credentials, percent-encoded): what the HTTP client and children get.
    raw: String,
    scheme: String,
    /// `host:port` (the port defaulted from the scheme when absent; IPv6 bracketed).
    host_port: String,
    host: String,
    port: u16,
    user: Option<String>,
    has_password: bool,
}

impl ProxyUrl {
    /// Parse a proxy URL; the error says what is wrong without repeating the password.
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let text = text.trim();
        let (scheme, rest) = match text.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => return Err(
                "a proxy URL starts with http:// or https:// (e.g. http://proxy.example.com:3128)"
                    .into(),
            ),
        };
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "proxy scheme {scheme}:// is not supported: use http:// (or https:// for a TLS proxy)"
            ));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let path = &rest[authority.len()..];
        if !(path.is_empty() || path == "/") {
            return Err("a proxy URL has no path: give only scheme, host and port".into());
        }
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port)?;
        let port = match port {
            Some(p) => p,
            None if scheme == "https" => 443,
            None => 80,
        };
        let (user, has_password) = match userinfo {
            None => (None, false),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_encoding::percent_decode_str(user)
                    .decode_utf8()
                    .map_err(|_| "the proxy user is not valid percent-encoded UTF-8".to_string())?
                    .into_owned();
                if user.is_empty() {
                    return Err("the proxy URL has a password but no user name".into());
                }
                if let Some(p) = pass {
                    if percent_encoding::percent_decode_str(p)
                        .decode_utf8()
                        .is_err()
                    {
                        return Err(
                            "the proxy password is not valid percent-encoded UTF-8 (encode @ : / % \
                             as %40 %3A %2F %25)"
                                .into(),
                        );
                    }
                }
                (Some(user), pass.is_some())
            }
        };
        let host_port = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        // The HTTP client parses the URL again: refuse what it would not take.
        let bare = format!("{scheme}://{host_port}");
        if bare.parse::<http::Uri>().is_err() {
            return Err(format!("{bare} is not a valid URL"));
        }
        Ok(ProxyUrl {
            raw: text.to_string(),
            scheme,
            host_port,
            host,
            port,
            user,
            has_password,
        })
    }

    /// The URL with its credentials (for the HTTP client and the environment of children only).
    pub fn secret_url(&self) -> &str {
        &self.raw
    }

    /// `host:port` of the proxy.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// The proxy's host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The `Proxy-Authorization: Basic` token (base64 of the decoded `user:password`), if the URL
    /// has a user.
    pub fn basic_auth(&self) -> Option<String> {
        let userinfo = self
            .raw
            .split_once("://")?
            .1
            .split(['/', '?', '#'])
            .next()?
            .rsplit_once('@')?
            .0;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let plain = match userinfo.split_once(':') {
            Some((u, p)) => format!("{}:{}", decode(u), decode(p)),
            None => format!("{}:", decode(userinfo)),
        };
        Some(base64(plain.as_bytes()))
    }

    /// The URL as it may be shown: the password replaced by `***`.
    pub fn redacted(&self) -> String {
        match &self.user {
            None => format!("{}://{}", self.scheme, self.host_port),
            Some(u) if self.has_password => format!("{}://{u}:***@{}", self.scheme, self.host_port),
            Some(u) => format!("{}://{u}@{}", self.scheme, self.host_port),
        }
    }
}

/// Standard base64 with padding (RFC 4648), for the basic authentication token.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let bad_port = |p: &str| format!("{p:?} is not a port number (1-65535)");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "an IPv6 address in a URL is written [address]:port".to_string())?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after [{host}]")),
        };
        (host.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("the proxy URL has no host name".into());
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(bad_port(p)),
        },
    };
    Ok((host, port))
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({})", self.redacted())
    }
}

impl Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Check one `no_proxy` entry: `*`, a host name, a `.suffix` domain, an IP address or a CIDR range
/// (an optional `:port` is ignored by the matcher, so it is refused to avoid surprises).
pub fn check_no_proxy_entry(entry: &str) -> Result<(), String> {
    if entry == "*" || entry.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some((addr, bits)) = entry.split_once('/') {
        let max = match addr.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => 32,
            Ok(std::net::IpAddr::V6(_)) => 128,
            Err(_) => {
                return Err(format!(
                    "{entry:?}: {addr:?} before the / is not an IP address"
                ))
            }
        };
        return match bits.parse::<u8>() {
            Ok(b) if b <= max => Ok(()),
            _ => Err(format!("{entry:?}: the prefix length must be 0-{max}")),
        };
    }
    let name = entry.strip_prefix('.').unwrap_or(entry);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{entry:?} is not a host name, .domain suffix, IP address, CIDR range or *"
        ))
    }
}

/// Where one egress setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The configuration key (`network.https_proxy`), as the file or Parameter Store set it.
    Key(&'static str),
    /// A standard environment variable of the daemon's process.
    Env(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Key(k) => f.write_str(k),
            Source::Env(v) => write!(f, "{v} in the environment"),
        }
    }
}

/// The resolved egress of this host: what every connection to AWS uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Egress {
    /// The proxy for `https://` endpoints (every real AWS endpoint).
    pub https_proxy: Option<ProxyUrl>,
    /// The proxy for `http://` endpoints (emulators, plain-HTTP private endpoints).
    pub http_proxy: Option<ProxyUrl>,
    /// Hosts reached directly, besides [`ALWAYS_DIRECT`].
    pub no_proxy: Vec<String>,
    /// A PEM file of root certificates trusted besides the system's.
    pub ca_bundle: Option<PathBuf>,
    /// Use the services' FIPS endpoints.
    pub use_fips: bool,
    /// Use the services' dual-stack (IPv4 and IPv6) endpoints.
    pub use_dual_stack: bool,
    /// The certificates of `ca_bundle`, read when the configuration was loaded.
    #[serde(skip)]
    pub ca_pem: Vec<u8>,
    /// Where each setting that is set came from, by key (`https_proxy`, `http_proxy`, `no_proxy`,
    /// `ca_bundle`).
    #[serde(skip)]
    pub sources: BTreeMap<&'static str, Source>,
}

/// The values `[network]` holds, before the environment fills the gaps.
#[derive(Debug, Default)]
pub struct Declared {
    pub https_proxy: Option<String>,
    pub http_proxy: Option<String>,
    pub no_proxy: Option<Vec<String>>,
    pub ca_bundle: Option<PathBuf>,
    pub use_fips: bool,
    pub use_dual_stack: bool,
}

/// A problem with one egress setting: the key or variable, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub source: Source,
    pub message: String,
}

impl Egress {
    /// Resolve the declared values, filling each unset one from `env`. Every problem is returned,
    /// each naming its key or variable.
    pub fn resolve(declared: Declared, env: &BTreeMap<String, String>) -> (Egress, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut sources = BTreeMap::new();
        let from_env = |vars: &[&'static str]| {
            vars.iter().find_map(|v| {
                env.get(*v)
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| (Source::Env(v), s.clone()))
            })
        };
        let mut proxy = |name: &'static str, declared: Option<String>, vars: &[&'static str]| {
            let found = match declared {
                Some(v) if !v.trim().is_empty() => Some((Source::Key(name), v)),
                // An empty key turns the environment's proxy off.
                Some(_) => None,
                None => from_env(vars),
            };
            let (source, text) = found?;
            match ProxyUrl::parse(&text) {
                Ok(url) => {
                    sources.insert(short(name), source);
                    Some(url)
                }
                Err(message) => {
                    problems.push(Problem { source, message });
                    None
                }
            }
        };
        let https_proxy = proxy(
            "network.https_proxy",
            declared.https_proxy,
            &HTTPS_PROXY_VARS,
        );
        let http_proxy = proxy("network.http_proxy", declared.http_proxy, &HTTP_PROXY_VARS);
        let (no_proxy_source, no_proxy) = match declared.no_proxy {
            Some(list) => (Source::Key("network.no_proxy"), list),
            None => match from_env(&NO_PROXY_VARS) {
                Some((s, text)) => (s, split_list(&text)),
                None => (Source::Key("network.no_proxy"), Vec::new()),
            },
        };
        for entry in &no_proxy {
            if let Err(message) = check_no_proxy_entry(entry) {
                problems.push(Problem {
                    source: no_proxy_source.clone(),
                    message,
                });
            }
        }
        if !no_proxy.is_empty() {
            sources.insert("no_proxy", no_proxy_source);
        }
        let ca = match declared.ca_bundle {
            Some(p) if !p.as_os_str().is_empty() => Some((Source::Key("network.ca_bundle"), p)),
            Some(_) => None,
            None => from_env(&CA_BUNDLE_VARS).map(|(s, v)| (s, PathBuf::from(v))),
        };
        let mut ca_pem = Vec::new();
        let ca_bundle = match ca {
            None => None,
            Some((source, path)) => match read_ca_bundle(&path) {
                Ok(pem) => {
                    ca_pem = pem;
                    sources.insert("ca_bundle", source);
                    Some(path)
                }
                Err(message) => {
                    problems.push(Problem { source, message });
                    None
                }
            },
        };
        let egress = Egress {
            https_proxy,
            http_proxy,
            no_proxy,
            ca_bundle,
            use_fips: declared.use_fips,
            use_dual_stack: declared.use_dual_stack,
            ca_pem,
            sources,
        };
        (egress, problems)
    }

    /// The proxy for a URL scheme (`https` or `http`), if any.
    pub fn proxy_for(&self, scheme: &str) -> Option<&ProxyUrl> {
        if scheme.eq_ignore_ascii_case("http") {
            self.http_proxy.as_ref()
        } else {
            self.https_proxy.as_ref()
        }
    }

    /// The `no_proxy` list as the HTTP client and children get it: the operator's entries, then
    /// [`ALWAYS_DIRECT`].
    pub fn no_proxy_list(&self) -> String {
        let mut all: Vec<&str> = self.no_proxy.iter().map(String::as_str).collect();
        for d in ALWAYS_DIRECT {
            if !all.contains(&d) {
                all.push(d);
            }
        }
        all.join(",")
    }

    /// The proxy a request to `url` goes through, or `None` when it goes directly.
    pub fn route(&self, url: &str) -> Option<&ProxyUrl> {
        let uri: http::Uri = url.parse().ok()?;
        let proxy = self.proxy_for(uri.scheme_str().unwrap_or("https"))?;
        let matcher = hyper_util::client::proxy::matcher::Matcher::builder()
            .all(proxy.secret_url().to_string())
            .no(self.no_proxy_list())
            .build();
        matcher.intercept(&uri).map(|_| proxy)
    }

    /// Where a setting came from, for messages ("network.https_proxy", "HTTPS_PROXY in the
    /// environment"); the key when it is unset.
    pub fn source_of(&self, setting: &'static str) -> String {
        match self.sources.get(setting) {
            Some(s) => s.to_string(),
            None => format!("network.{setting}"),
        }
    }

    /// The HTTP client for endpoints of one scheme: its proxy, the `no_proxy` list, and a trust store
    /// of the system's roots plus `ca_bundle`. Connections are pooled and kept alive (to the proxy
    /// too).
    pub fn http_client(&self, scheme: &str) -> SharedHttpClient {
        let proxy = match self.proxy_for(scheme) {
            Some(p) => match ProxyConfig::all(p.secret_url()) {
                Ok(c) => c.no_proxy(self.no_proxy_list()),
                // Parsed and checked at load; the client's own parser agreeing is tested.
                Err(_) => ProxyConfig::disabled(),
            },
            None => ProxyConfig::disabled(),
        };
        let mut trust = TrustStore::default();
        if !self.ca_pem.is_empty() {
            trust = trust.with_pem_certificate(self.ca_pem.clone());
        }
        let context = TlsContext::builder().with_trust_store(trust).build().ok();
        aws_smithy_http_client::Builder::new().build_with_connector_fn(
            move |settings, components| {
                let mut builder = aws_smithy_http_client::ConnectorBuilder::default()
                    .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
                if let Some(ctx) = &context {
                    builder = builder.tls_context(ctx.clone());
                }
                builder.set_connector_settings(settings.cloned());
                if let Some(c) = components {
                    builder.set_sleep_impl(c.sleep_impl());
                }
                builder.set_proxy_config(Some(proxy.clone()));
                builder.build()
            },
        )
    }

    /// The variables a child process or container gets so that it leaves the host the same way:
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` (each in both cases, as tools disagree on which they
    /// read), and, when `ca_in_child` names where the CA bundle is visible to it, `SSL_CERT_FILE`
    /// and `AWS_CA_BUNDLE`. Empty without a proxy or a bundle.
    pub fn child_env(&self, ca_in_child: Option<&str>) -> Vec<(String, String)> {
        let mut env = Vec::new();
        let mut both = |name: &str, value: &str| {
            env.push((name.to_string(), value.to_string()));
            env.push((name.to_ascii_lowercase(), value.to_string()));
        };
        if let Some(p) = &self.https_proxy {
            both("HTTPS_PROXY", p.secret_url());
        }
        if let Some(p) = &self.http_proxy {
            both("HTTP_PROXY", p.secret_url());
        }
        if self.https_proxy.is_some() || self.http_proxy.is_some() {
            both("NO_PROXY", &self.no_proxy_list());
        }
        if let (Some(path), true) = (ca_in_child, self.ca_bundle.is_some()) {
            env.push(("SSL_CERT_FILE".into(), path.to_string()));
            env.push(("AWS_CA_BUNDLE".into(), path.to_string()));
        }
        env
    }

    /// Whether any proxy or extra root is configured.
    pub fn is_customised(&self) -> bool {
        self.https_proxy.is_some() || self.http_proxy.is_some() || self.ca_bundle.is_some()
    }
}

fn short(key: &'static str) -> &'static str {
    key.rsplit('.').next().unwrap_or(key)
}

/// A comma- (or whitespace-) separated list, as `NO_PROXY` is written.
pub fn split_list(text: &str) -> Vec<String> {
    text.split([',', ' ', '\t', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Read a CA bundle: a PEM file holding at least one certificate that parses as a trust anchor.
pub fn read_ca_bundle(path: &Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the CA bundle {}: {e}", path.display()))?;
    let mut count = 0;
    for (i, cert) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
        let cert = cert.map_err(|e| {
            format!(
                "{}: certificate {} is not valid PEM: {e:?}",
                path.display(),
                i + 1
            )
        })?;
        webpki_anchor(&cert).map_err(|e| {
            format!(
                "{}: certificate {} is not a usable root: {e}",
                path.display(),
                i + 1
            )
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(format!(
            "{} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- blocks is expected)",
            path.display()
        ));
    }
    Ok(bytes)
}

fn webpki_anchor(cert: &rustls_pki_types::CertificateDer<'_>) -> Result<(), String> {
    let mut store = rustls::RootCertStore::empty();
    store.add(cert.clone()).map_err(|e| e.to_string())
}

/// What went wrong on the way to an endpoint, when it is the egress's doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// The proxy answered 407: its user or password is wrong or missing.
    ProxyAuth,
    /// The proxy did not accept the connection or closed it.
    ProxyDown(String),
    /// The server's certificate is not trusted (a TLS-inspecting proxy, or a private endpoint).
    Certificate(String),
}

impl Blocker {
    /// Recognise an egress failure from an HTTP status and an error's chain of causes (as
    /// [`crate::error::chain`] prints it); `proxied` says whether the request went through a proxy.
    pub fn recognise(status: Option<u16>, chain: &str, proxied: bool) -> Option<Blocker> {
        if status == Some(407) || chain.contains("proxy authorization required") {
            return Some(Blocker::ProxyAuth);
        }
        if let Some(at) = chain.find("invalid peer certificate") {
            return Some(Blocker::Certificate(chain[at..].to_string()));
        }
        if chain.contains("UnknownIssuer") || chain.contains("certificate verify failed") {
            return Some(Blocker::Certificate(chain.to_string()));
        }
        let refused = ["Connection refused", "tcp connect error", "tunnel error"];
        if proxied && status.is_none() && refused.iter().any(|r| chain.contains(r)) {
            return Some(Blocker::ProxyDown(chain.to_string()));
        }
        None
    }

    /// One line: what failed, for which endpoint, through which proxy, and what to set.
    pub fn explain(&self, endpoint: &str, egress: &Egress, proxy: Option<&ProxyUrl>) -> String {
        let via = proxy.map_or_else(String::new, |p| format!(" through the proxy {p}"));
        let proxy_key = match proxy {
            Some(p) if p.scheme() == "http" && egress.http_proxy.as_ref() == Some(p) => {
                egress.source_of("http_proxy")
            }
            _ => egress.source_of("https_proxy"),
        };
        match self {
            Blocker::ProxyAuth => format!(
                "{endpoint}: the proxy{} refused the request with 407 Proxy Authentication Required: \
                 set the right user and password in {proxy_key} (percent-encoded: \
                 http://USER:PASSWORD@HOST:PORT)",
                proxy.map_or_else(String::new, |p| format!(" {p}")),
            ),
            Blocker::ProxyDown(why) => format!(
                "{endpoint}: the proxy{} does not answer ({why}): check {proxy_key}, or list the \
                 endpoint's host in network.no_proxy if it is reached directly",
                proxy.map_or_else(String::new, |p| format!(" {p}")),
            ),
            Blocker::Certificate(why) => format!(
                "{endpoint}{via}: the server's certificate is not trusted ({why}): behind a \
                 TLS-inspecting proxy or for a private endpoint, set {} to a PEM file of the \
                 company's root CA{}",
                egress.source_of("ca_bundle"),
                if egress.ca_bundle.is_some() {
                    " that signed this certificate (the one given does not)"
                } else {
                    " (or AWS_CA_BUNDLE)"
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_proxy_url_never_shows_its_password() {
        let p = ProxyUrl::parse("http://svc%40corp:s3cr%3At@proxy.corp:3128").unwrap();
        assert_eq!(p.redacted(), "http://svc@corp:***@proxy.corp:3128");
        assert_eq!(p.to_string(), p.redacted());
        assert!(!format!("{p:?}").contains("s3cr"));
        assert!(!serde_json::to_string(&p).unwrap().contains("s3cr"));
        assert_eq!(p.secret_url(), "http://svc%40corp:s3cr%3At@proxy.corp:3128");
        let bare = ProxyUrl::parse("http://proxy.corp").unwrap();
        assert_eq!(bare.host_port(), "proxy.corp:80");
        let v6 = ProxyUrl::parse("https://[fd00::1]:8443/").unwrap();
        assert_eq!(v6.redacted(), "https://[fd00::1]:8443");
    }

    #[test]
    fn the_basic_token_is_the_decoded_user_and_password() {
        let p = ProxyUrl::parse("http://Aladdin:open%20sesame@proxy:3128").unwrap();
        assert_eq!(
            p.basic_auth().as_deref(),
            Some("QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(
            ProxyUrl::parse("http://proxy:3128").unwrap().basic_auth(),
            None
        );
    }

    #[test]
    fn bad_proxy_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("proxy.corp:3128", "starts with http://"),
            ("socks5://proxy:1080", "not supported"),
            ("http://u:hunter2@proxy:99999", "not a port"),
            ("http://u:hunter2@:3128", "no host"),
            ("http://:hunter2@proxy:3128", "no user"),
            ("http://proxy:3128/path", "no path"),
        ] {
            let e = ProxyUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn no_proxy_takes_names_suffixes_addresses_ranges_and_star() {
        for ok in [
            "*",
            "s3.amazonaws.com",
            ".internal",
            "10.0.0.1",
            "10.0.0.0/8",
            "fd00::/8",
            "::1",
        ] {
            assert!(check_no_proxy_entry(ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.0/33", "host:8080", "a b", "no/8", "-.."] {
            assert!(check_no_proxy_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unset_keys_fall_back_to_the_standard_variables_with_their_source() {
        let (e, problems) = Egress::resolve(
            Declared::default(),
            &env(&[
                ("https_proxy", "http://lower:3128"),
                ("ALL_PROXY", "http://all:3128"),
                ("no_proxy", "corp.example, 10.0.0.0/8"),
            ]),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(e.https_proxy.unwrap().host_port(), "lower:3128");
        assert_eq!(e.http_proxy.unwrap().host_port(), "all:3128");
        assert_eq!(e.no_proxy, vec!["corp.example", "10.0.0.0/8"]);
        assert_eq!(e.sources["https_proxy"], Source::Env("https_proxy"));
        assert_eq!(e.sources["http_proxy"], Source::Env("ALL_PROXY"));
        assert_eq!(e.sources["no_proxy"], Source::Env("no_proxy"));

        // The key wins over the variable; an empty key turns the variable off.
        let (e, _) = Egress::resolve(
            Declared {
                https_proxy: Some("http://key:3128".into()),
                http_proxy: Some(String::new()),
                ..Declared::default()
            },
            &env(&[
                ("HTTPS_PROXY", "http://env:1"),
                ("HTTP_PROXY", "http://env:1"),
            ]),
        );
        assert_eq!(e.https_proxy.unwrap().host_port(), "key:3128");
        assert_eq!(e.sources["https_proxy"], Source::Key("network.https_proxy"));
        assert!(e.http_proxy.is_none());
    }

    #[test]
    fn every_bad_value_is_a_problem_naming_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let (_, problems) = Egress::resolve(
            Declared {
                https_proxy: Some("ftp://u:pw@x".into()),
                ca_bundle: Some(empty.clone()),
                ..Declared::default()
            },
            &env(&[
                ("HTTP_PROXY", "nonsense"),
                ("NO_PROXY", "ok.example,bad/99"),
            ]),
        );
        let sources: Vec<String> = problems.iter().map(|p| p.source.to_string()).collect();
        assert_eq!(
            sources,
            [
                "network.https_proxy",
                "HTTP_PROXY in the environment",
                "NO_PROXY in the environment",
                "network.ca_bundle"
            ]
        );
        assert!(problems[3].message.contains("holds no certificate"));
        let (_, problems) = Egress::resolve(
            Declared::default(),
            &env(&[("AWS_CA_BUNDLE", "/nonexistent/ca.pem")]),
        );
        assert_eq!(problems[0].source, Source::Env("AWS_CA_BUNDLE"));
        assert!(problems[0].message.contains("cannot read"));
    }

    #[test]
    fn loopback_and_link_local_always_go_direct() {
        let (e, _) = Egress::resolve(
            Declared {
                https_proxy: Some("http://u:p@proxy.corp:3128".into()),
                http_proxy: Some("http://u:p@proxy.corp:3128".into()),
                no_proxy: Some(vec![".corp.example".into()]),
                ..Declared::default()
            },
            &BTreeMap::new(),
        );
        for direct in [
            "http://169.254.169.254/latest/meta-data",
            "http://169.254.170.2/v2/credentials",
            "http://127.0.0.1:5123/",
            "http://localhost:51678/v1/metadata",
            "https://[::1]:443/",
            "https://s3.corp.example/",
        ] {
            assert!(e.route(direct).is_none(), "{direct}");
        }
        let p = e.route("https://sqs.us-east-1.amazonaws.com/").unwrap();
        assert_eq!(p.host_port(), "proxy.corp:3128");
        assert!(e.route("http://moto.test:5123/").is_some());
        let env = e.child_env(Some("/etc/offload-agent/ca.pem"));
        let no_proxy = &env.iter().find(|(k, _)| k == "NO_PROXY").unwrap().1;
        assert!(no_proxy.starts_with(".corp.example,localhost,127.0.0.0/8"));
        assert!(no_proxy.contains("169.254.170.2"));
        assert!(
            !env.iter().any(|(k, _)| k == "SSL_CERT_FILE"),
            "no bundle, no variable"
        );
    }

    #[test]
    fn egress_failures_are_recognised_from_their_causes() {
        use Blocker::*;
        assert_eq!(Blocker::recognise(Some(407), "", true), Some(ProxyAuth));
        assert_eq!(
            Blocker::recognise(
                None,
                "dispatch failure: io error: proxy authorization required",
                true
            ),
            Some(ProxyAuth)
        );
        assert!(matches!(
            Blocker::recognise(
                None,
                "io error: invalid peer certificate: UnknownIssuer",
                false
            ),
            Some(Certificate(_))
        ));
        assert!(matches!(
            Blocker::recognise(
                None,
                "tcp connect error: Connection refused (os error 111)",
                true
            ),
            Some(ProxyDown(_))
        ));
        assert_eq!(
            Blocker::recognise(None, "tcp connect error: Connection refused", false),
            None,
            "without a proxy a refused connection is the endpoint's"
        );
        assert_eq!(Blocker::recognise(Some(503), "service error", true), None);
    }
}
