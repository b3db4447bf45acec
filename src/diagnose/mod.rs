//! `offload-agent diagnose`: one `.tar.gz` an operator attaches to a support ticket — the journals of
//! offload-agent, the ECS agent, the SSM agent and Docker for a period, Docker's view, the ECS agent's
//! introspection and container log, the firewall rules and sysctls the supervisor changes, the
//! effective configuration, the daemon's `/status`, where the credentials are and when they expire
//! (never what they are), the ECS agent's env files and a `preflight` table — every part through the
//! [`redact::Redactor`]. It needs no running daemon and no valid configuration; what it could not
//! collect is listed in `MANIFEST.txt` with the reason.

mod redact;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::config::Config;
use redact::Redactor;

/// The units whose journals are collected.
const UNITS: [&str; 4] = ["offload-agent", "ecs", "amazon-ssm-agent", "docker"];
/// A part's output beyond this is cut (the tail kept): a support bundle must stay attachable.
const PART_MAX_BYTES: usize = 32 << 20;
/// How long one command or request may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// One file of the bundle: its name in the archive, and its text or why it could not be collected.
struct Part {
    name: String,
    body: Result<String, String>,
}

fn part(name: impl Into<String>, body: Result<String, String>) -> Part {
    Part {
        name: name.into(),
        body,
    }
}

/// What `diagnose` wrote.
pub(crate) struct Written {
    pub(crate) path: PathBuf,
    /// Each part's name and, when it could not be collected, why.
    pub(crate) parts: Vec<(String, Option<String>)>,
}

/// Collect everything for the last `since`, and write the bundle to `output` (default:
/// `offload-agent-diagnose-HOST-TIME.tar.gz` in the current directory).
pub(crate) async fn run(
    config: &Path,
    since: Duration,
    output: Option<PathBuf>,
) -> Result<Written> {
    let (cfg, config_problem) = match crate::config::load(config, &crate::app::env_map()) {
        Ok(c) => (c, None),
        Err(e) => (Config::default(), Some(e.to_string())),
    };
    let effective = crate::app::effective_config(config).await;
    let mut redactor = known_secrets(&cfg);
    let config_part = match effective {
        Ok(e) => {
            for v in &e.secure_values {
                redactor.know(v);
                // A SecureString that is a proxy URL: its password alone too.
                if let Some(pass) = url_password(v) {
                    know_password(&mut redactor, &pass);
                }
            }
            part("config/check.txt", Ok(e.text))
        }
        Err(e) => part(
            "config/check.txt",
            Err(format!(
                "config check failed (defaults used for the rest): {}",
                config_problem.unwrap_or_else(|| e.to_string())
            )),
        ),
    };

    let mut parts = vec![part("about.txt", Ok(about(config, since))), config_part];
    let journals = UNITS.map(|u| journal(u, since));
    let (journals, docker, ecs, status, preflight) = tokio::join!(
        futures::future::join_all(journals),
        docker_parts(&cfg, since),
        introspection(&cfg),
        daemon_status(&cfg),
        preflight(&cfg),
    );
    parts.extend(journals);
    parts.extend(docker);
    parts.push(ecs);
    parts.push(status);
    parts.push(preflight);
    parts.push(part("host/iptables.txt", iptables().await));
    parts.push(part("host/sysctl.txt", Ok(sysctls())));
    parts.push(part("host/credentials.txt", Ok(credentials(&cfg))));
    for rel in crate::ecs_agent::spec::ENV_FILES {
        let path = cfg.ecs_agent.host_root.join(rel);
        parts.push(part(
            format!("ecs/{}", rel.replace('/', "-")),
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display())),
        ));
    }

    let path = output.unwrap_or_else(|| default_output(SystemTime::now()));
    write_bundle(&path, &parts, &redactor)
        .with_context(|| format!("cannot write the bundle to {}", path.display()))?;
    Ok(Written {
        path,
        parts: parts.into_iter().map(|p| (p.name, p.body.err())).collect(),
    })
}

/// The values known to be secret on this host: the credentials files' keys and tokens, the proxies'
/// passwords, and the secrets in the environment.
fn known_secrets(cfg: &Config) -> Redactor {
    let mut r = Redactor::default();
    let identity = crate::credentials::IdentityConfig::read(&cfg.host.identity_config()).ok();
    let files = [
        cfg.aws.credentials_file.clone(),
        identity
            .filter(|i| !i.share_file.is_empty())
            .map(|i| PathBuf::from(i.share_file)),
        std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")),
    ];
    for f in files.into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(&f) {
            for line in text.lines() {
                if let Some((_, v)) = line.split_once('=') {
                    r.know(v);
                }
            }
        }
    }
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "OFFLOAD_AGENT_ACTIVATION_CODE",
    ] {
        if let Ok(v) = std::env::var(var) {
            r.know(&v);
        }
    }
    for p in [&cfg.network.https_proxy, &cfg.network.http_proxy]
        .into_iter()
        .flatten()
    {
        if let Some(pass) = url_password(p.secret_url()) {
            know_password(&mut r, &pass);
        }
    }
    r
}

/// A URL's password, as written (percent-encoded) and decoded.
fn know_password(r: &mut Redactor, pass: &str) {
    r.know(pass);
    if let Ok(decoded) = percent_encoding::percent_decode_str(pass).decode_utf8() {
        r.know(&decoded);
    }
}

/// The password of `scheme://user:password@host`.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(userinfo.split_once(':')?.1.to_string())
}

fn default_output(now: SystemTime) -> PathBuf {
    let host = crate::host::hostname("host");
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace([':', '-'], "");
    PathBuf::from(format!("offload-agent-diagnose-{host}-{stamp}.tar.gz"))
}

fn about(config: &Path, since: Duration) -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let pretty = os
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("unknown")
        .trim_matches('"');
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    format!(
        "offload-agent {}\nhost {}\nos {pretty}\nkernel {}\nuptime_s {}\ncollected_at {}\nsince {}\nconfig {}\n",
        env!("CARGO_PKG_VERSION"),
        crate::host::hostname("host"),
        kernel.trim(),
        uptime.split_whitespace().next().unwrap_or("-"),
        humantime::format_rfc3339_seconds(SystemTime::now()),
        humantime::format_duration(since),
        config.display()
    )
}

/// Run a program; its stdout, or why not (it is missing, failed, or took too long).
async fn command(program: &str, args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let shown = format!("{program} {}", args.join(" "));
    match tokio::time::timeout(STEP_TIMEOUT, run).await {
        Err(_) => Err(format!("{shown} did not finish within {STEP_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("cannot run {shown}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(tail(out.stdout)),
        Ok(Ok(out)) => Err(format!(
            "{shown} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// At most [`PART_MAX_BYTES`], the newest kept.
fn tail(bytes: Vec<u8>) -> String {
    let cut = bytes.len().saturating_sub(PART_MAX_BYTES);
    let text = String::from_utf8_lossy(&bytes[cut..]).into_owned();
    if cut > 0 {
        format!("[the first {cut} bytes were left out]\n{text}")
    } else {
        text
    }
}

async fn journal(unit: &'static str, since: Duration) -> Part {
    let since = format!("--since=-{}s", since.as_secs());
    let body = command(
        "journalctl",
        &["--no-pager", "-o", "short-iso-precise", "-u", unit, &since],
    )
    .await;
    part(format!("journal/{unit}.log"), body)
}

/// Docker's info and version, the containers (ours labelled), and the ECS agent container's log.
async fn docker_parts(cfg: &Config, since: Duration) -> Vec<Part> {
    let names = [
        "docker/info.json",
        "docker/version.json",
        "docker/containers.json",
        "ecs/agent-container.log",
    ];
    let docker = match crate::docker::connect(&cfg.ecs_agent.docker_socket).await {
        Ok(d) => d,
        Err(e) => {
            let why = crate::error::chain(&e);
            return names.iter().map(|n| part(*n, Err(why.clone()))).collect();
        }
    };
    let json = |v: Result<serde_json::Value, bollard::errors::Error>| {
        v.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(|e| e.to_string())
    };
    let info = json(
        docker
            .info()
            .await
            .map(|i| serde_json::to_value(i).unwrap_or_default()),
    );
    let version = json(
        docker
            .version()
            .await
            .map(|v| serde_json::to_value(v).unwrap_or_default()),
    );
    let containers = json(
        docker
            .list_containers(Some(
                bollard::query_parameters::ListContainersOptionsBuilder::default()
                    .all(true)
                    .build(),
            ))
            .await
            .map(|c| serde_json::to_value(c).unwrap_or_default()),
    );
    let log = agent_log(&docker, &cfg.ecs_agent.container_name, since).await;
    vec![
        part(names[0], info),
        part(names[1], version),
        part(names[2], containers),
        part(names[3], log),
    ]
}

async fn agent_log(
    docker: &bollard::Docker,
    name: &str,
    since: Duration,
) -> Result<String, String> {
    use futures::StreamExt;
    let from = SystemTime::now()
        .checked_sub(since)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i32);
    let mut logs = docker.logs(
        name,
        Some(
            bollard::query_parameters::LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .timestamps(true)
                .since(from)
                .build(),
        ),
    );
    let mut out = Vec::new();
    let work = async {
        while let Some(chunk) = logs.next().await {
            match chunk {
                Ok(c) => out.extend_from_slice(&c.into_bytes()),
                Err(e) => return Err(format!("docker logs {name}: {e}")),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(STEP_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(tail(out)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "docker logs {name} took longer than {STEP_TIMEOUT:?}"
        )),
    }
}

/// A GET of a local HTTP endpoint (`http://host:port/path`).
async fn local_get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to nothing"))?;
    let path = if path.is_empty() { "/" } else { path };
    match crate::admin::get(addr, path, Duration::from_secs(5)).await {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => Err(format!("{url} answered {code}: {}", body.trim())),
        Err(e) => Err(format!("nothing answers at {url}: {e}")),
    }
}

async fn introspection(cfg: &Config) -> Part {
    part(
        "ecs/introspection-metadata.json",
        local_get(&cfg.ecs_agent.introspection_url).await,
    )
}

async fn daemon_status(cfg: &Config) -> Part {
    let url = format!("http://{}/status", cfg.admin.addr());
    part(
        "daemon/status.json",
        local_get(&url)
            .await
            .map_err(|e| format!("{e} (is the daemon running? systemctl status offload-agent)")),
    )
}

async fn preflight(cfg: &Config) -> Part {
    let clients = match crate::aws::clients(cfg).await {
        Ok(c) if c.require_credentials().await.is_ok() => Some(c),
        _ => None,
    };
    let report = crate::preflight::run(cfg, clients.as_ref()).await;
    part("preflight.txt", Ok(report.render()))
}

async fn iptables() -> Result<String, String> {
    let filter = command("iptables-save", &["-t", "filter"]).await?;
    let nat = command("iptables-save", &["-t", "nat"]).await?;
    Ok(format!("{filter}\n{nat}"))
}

fn sysctls() -> String {
    let path = crate::ecs_agent::firewall::ROUTE_LOCALNET;
    match std::fs::read_to_string(path) {
        Ok(v) => format!("{path} = {}\n", v.trim()),
        Err(e) => format!("{path}: {e}\n"),
    }
}

/// Where the credentials are and when they expire; never what they are.
fn credentials(cfg: &Config) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let describe = |o: &mut String, what: &str, path: &Path| {
        let _ = match std::fs::metadata(path) {
            Ok(m) => writeln!(
                o,
                "{what}: {} ({} bytes, modified {})",
                path.display(),
                m.len(),
                m.modified()
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|_| "-".into())
            ),
            Err(e) => writeln!(o, "{what}: {} ({e})", path.display()),
        };
    };
    let ic = cfg.host.identity_config();
    describe(&mut o, "SSM identity config", &ic);
    match crate::credentials::IdentityConfig::read(&ic) {
        Ok(i) => {
            let _ = writeln!(
                o,
                "  credentials retrieved at {}, expire at {}",
                i.credentials_retrieved_at.as_deref().unwrap_or("-"),
                i.credentials_expires_at.as_deref().unwrap_or("-")
            );
            if !i.share_file.is_empty() {
                describe(
                    &mut o,
                    "rotating credentials file",
                    Path::new(&i.share_file),
                );
            }
        }
        Err(e) => {
            let _ = writeln!(o, "  {}", crate::error::chain(&e));
        }
    }
    if let Some(f) = &cfg.aws.credentials_file {
        describe(&mut o, "aws.credentials_file", f);
    }
    o
}

/// The parts as one gzip-compressed tar, mode 0600, under a directory named after the file.
fn write_bundle(path: &Path, parts: &[Part], redactor: &Redactor) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let root = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".tar.gz").trim_end_matches(".tgz"))
        .filter(|n| !n.is_empty())
        .unwrap_or("offload-agent-diagnose")
        .to_string();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut manifest = String::new();
    let add = |tar: &mut tar::Builder<_>, name: &str, text: &str| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        h.set_cksum();
        tar.append_data(&mut h, format!("{root}/{name}"), text.as_bytes())?;
        Ok(())
    };
    for p in parts {
        let (line, text) = match &p.body {
            Ok(t) => {
                let t = redactor.text(t);
                (format!("ok             {} ({} bytes)", p.name, t.len()), t)
            }
            Err(why) => {
                let why = redactor.text(why);
                (
                    format!("NOT COLLECTED  {}: {why}", p.name),
                    format!("not collected: {why}\n"),
                )
            }
        };
        manifest.push_str(&line);
        manifest.push('\n');
        add(&mut tar, &p.name, &text)?;
    }
    manifest.push_str(
        "\nSecrets (access keys, secret keys, session tokens, activation codes, proxy passwords, \
         SecureString values) were replaced by <redacted> in every file.\n",
    );
    add(&mut tar, "MANIFEST.txt", &manifest)?;
    let gz = tar.into_inner()?;
    gz.finish()?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_password_is_found() {
        assert_eq!(
            url_password("http://u:p%40ss@proxy:3128").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(url_password("http://proxy:3128"), None);
        assert_eq!(url_password("http://u@proxy:3128"), None);
    }

    #[test]
    fn the_default_name_says_host_and_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let p = default_output(t).display().to_string();
        assert!(
            p.starts_with("offload-agent-diagnose-") && p.ends_with("Z.tar.gz"),
            "{p}"
        );
        assert!(!p.contains(':'), "{p}");
    }
}
