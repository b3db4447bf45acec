//! AWS credentials that follow the SSM agent's rotation on hybrid (`mi-…`) hosts.
//!
//! The SSM agent publishes the host's temporary credentials in a shared credentials file and rewrites it
//! about every 30 minutes **in place** (truncate, then write): a reader can see it empty or half
//! written. The SDK's profile provider reads that file once for the life of the process, so a daemon on
//! the default chain fails with expired-token errors within the hour. [`RotatingCredentials`] instead:
//!
//! - finds the file and profile in `identity_config.json` (`ShareFile`, `ShareProfile`), else uses
//!   `aws.credentials_file` / `aws.profile`;
//! - looks at the file's size and modification time at most once a second and re-reads it when they
//!   change, and at least every [`REREAD_EVERY`];
//! - keeps the last good credentials when a read is empty, half written or unparsable, and retries on
//!   the next check;
//! - hands the SDK an expiry of the earlier of now + 60 s and the real expiry minus 5 minutes;
//! - warns once per episode, naming the SSM agent, when what it holds is expired or was retrieved more
//!   than [`STALE_AFTER`] ago (the SSM agent is stuck, typically after the host was offline).
//!
//! It does its own caching, so the SDK's identity cache is switched off for it (see the `aws` module): a
//! rotation is picked up within about a second rather than at the cache's next expiry. Nothing here
//! logs a secret: not the secret key, not the session token, not the access key id.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::{error::CredentialsError, future, ProvideCredentials};
use aws_credential_types::Credentials;

/// Re-read the file at least this often, changed or not.
pub const REREAD_EVERY: Duration = Duration::from_secs(60);
/// How often the file's size and modification time are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The SSM agent refreshes about every 30 minutes; older than this means it is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(45 * 60);
/// The SDK is told the credentials expire this long before they really do.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The SSM agent's `identity_config.json`, re-read with the file (it names the file and expiry).
    pub identity_config: Option<PathBuf>,
    /// The credentials file, when not named by `identity_config`.
    pub file: Option<PathBuf>,
    /// The profile, when not named by `identity_config`.
    pub profile: String,
}

/// What `identity_config.json` says (fields of the SSM agent's runtime configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IdentityConfig {
    #[serde(default)]
    pub share_file: String,
    #[serde(default)]
    pub share_profile: String,
    #[serde(default)]
    pub credentials_expires_at: Option<String>,
    #[serde(default)]
    pub credentials_retrieved_at: Option<String>,
}

/// Why credentials could not be read, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} names no ShareFile", path.display())]
    NoShareFile { path: PathBuf },
    #[error("no credentials file configured")]
    NotConfigured,
    #[error("{}: {problem}", path.display())]
    Profile {
        path: PathBuf,
        problem: ProfileProblem,
    },
}

/// What is wrong with a shared credentials file's profile. Never quotes a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileProblem {
    #[error("the file is empty (being rewritten?)")]
    Empty,
    #[error("a section header is cut short")]
    CutShort,
    #[error("a line of profile [{0}] is not key = value")]
    NotKeyValue(String),
    #[error("no profile [{0}]")]
    Missing(String),
    #[error("profile [{0}] lacks aws_access_key_id or aws_secret_access_key (half written?)")]
    Incomplete(String),
}

fn read_file(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl IdentityConfig {
    pub fn read(path: &Path) -> Result<IdentityConfig, Error> {
        serde_json::from_str(&read_file(path)?).map_err(|source| Error::Invalid {
            path: path.to_path_buf(),
            source,
        })
    }

    fn expires_at(&self) -> Option<SystemTime> {
        self.credentials_expires_at.as_deref().and_then(parse_time)
    }

    fn retrieved_at(&self) -> Option<SystemTime> {
        self.credentials_retrieved_at
            .as_deref()
            .and_then(parse_time)
    }
}

/// RFC 3339 as the SSM agent (Go) writes it: `2026-01-02T03:04:05.123456789Z` or with an offset.
pub(crate) fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')) {
        if s.ends_with('Z') || !s.contains('+') {
            return Some(t);
        }
    }
    // An explicit offset: split it off and apply it.
    let (base, sign, off) = match (s.rfind('+'), s.rfind('-')) {
        (Some(i), _) if i > 10 => (&s[..i], 1i64, &s[i + 1..]),
        (_, Some(i)) if i > 10 => (&s[..i], -1i64, &s[i + 1..]),
        _ => return None,
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let (h, m) = off.split_once(':')?;
    let secs = (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60) * sign;
    if secs >= 0 {
        t.checked_sub(Duration::from_secs(secs as u64))
    } else {
        t.checked_add(Duration::from_secs((-secs) as u64))
    }
}

/// One profile of a shared credentials file.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(** redacted **)")
    }
}

/// Parse one profile out of a shared credentials file (INI). Errors never quote values.
pub fn parse_profile(text: &str, profile: &str) -> Result<Keys, ProfileProblem> {
    if text.trim().is_empty() {
        return Err(ProfileProblem::Empty);
    }
    let mut in_profile = false;
    let mut seen = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let Some(name) = name.strip_suffix(']') else {
                return Err(ProfileProblem::CutShort);
            };
            let name = name.trim();
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            in_profile = name == profile;
            seen |= in_profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(ProfileProblem::NotKeyValue(profile.to_string()));
        };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" | "aws_security_token" => token = Some(v),
            _ => {}
        }
    }
    if !seen {
        return Err(ProfileProblem::Missing(profile.to_string()));
    }
    match (id, secret) {
        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok(Keys {
            access_key_id: a,
            secret_access_key: s,
            session_token: token.filter(|t| !t.is_empty()),
        }),
        _ => Err(ProfileProblem::Incomplete(profile.to_string())),
    }
}

/// The credentials held, and what is known about them.
#[derive(Clone)]
struct Held {
    keys: Keys,
    expires_at: Option<SystemTime>,
    retrieved_at: Option<SystemTime>,
    file: PathBuf,
}

#[derive(Default)]
struct State {
    held: Option<Held>,
    /// (length, modification time) of the file when it was last read successfully.
    stamp: Option<(u64, SystemTime)>,
    last_read: Option<Instant>,
    last_check: Option<Instant>,
    /// The last failed read's reason, to log each episode of failures once.
    failing: Option<String>,
    warned_stale: bool,
    reloads: u64,
}

/// A `ProvideCredentials` that re-reads a rotating shared credentials file. Cheap to clone.
#[derive(Clone)]
pub struct RotatingCredentials {
    source: Arc<Source>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for RotatingCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingCredentials")
            .field("source", &self.source)
            .finish()
    }
}

fn stamp_of(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl RotatingCredentials {
    pub fn new(source: Source) -> Self {
        RotatingCredentials {
            source: Arc::new(source),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// How many times the file was read successfully (metrics, tests).
    pub fn reloads(&self) -> u64 {
        self.state.lock().map(|s| s.reloads).unwrap_or(0)
    }

    /// The file and profile to read now, with what identity_config.json says about expiry.
    fn locate(&self) -> Result<(PathBuf, String, IdentityConfig), Error> {
        match &self.source.identity_config {
            Some(path) => {
                let id = IdentityConfig::read(path)?;
                let file = if id.share_file.is_empty() {
                    self.source
                        .file
                        .clone()
                        .ok_or_else(|| Error::NoShareFile { path: path.clone() })?
                } else {
                    PathBuf::from(&id.share_file)
                };
                let profile = if id.share_profile.is_empty() {
                    self.source.profile.clone()
                } else {
                    id.share_profile.clone()
                };
                Ok((file, profile, id))
            }
            None => match &self.source.file {
                Some(f) => Ok((
                    f.clone(),
                    self.source.profile.clone(),
                    IdentityConfig::default(),
                )),
                None => Err(Error::NotConfigured),
            },
        }
    }

    fn read(&self) -> Result<(Held, Option<(u64, SystemTime)>), Error> {
        let (file, profile, id) = self.locate()?;
        let stamp = stamp_of(&file);
        let text = read_file(&file)?;
        let keys = parse_profile(&text, &profile).map_err(|problem| Error::Profile {
            path: file.clone(),
            problem,
        })?;
        Ok((
            Held {
                keys,
                expires_at: id.expires_at(),
                retrieved_at: id.retrieved_at(),
                file,
            },
            stamp,
        ))
    }

    /// The current credentials: re-read when the file changed or `REREAD_EVERY` passed; the last good
    /// ones when a read fails.
    pub fn current(&self) -> Result<Credentials, String> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| "credentials state poisoned".to_string())?;
        let now = Instant::now();
        let due_check = st
            .last_check
            .map_or(true, |t| now.duration_since(t) >= CHECK_EVERY);
        if due_check {
            st.last_check = Some(now);
            let changed = match (&st.held, st.stamp) {
                (None, _) | (_, None) => true,
                (Some(h), Some(old)) => stamp_of(&h.file) != Some(old),
            };
            let due_reread = st
                .last_read
                .map_or(true, |t| now.duration_since(t) >= REREAD_EVERY);
            if changed || due_reread {
                match self.read() {
                    Ok((held, stamp)) => {
                        let rotated = st.held.as_ref().map(|h| h.keys != held.keys);
                        if rotated == Some(true) {
                            tracing::info!(file = %held.file.display(), "AWS credentials rotated in {}: using the new ones", held.file.display());
                        } else if rotated.is_none() {
                            tracing::info!(file = %held.file.display(), "AWS credentials loaded from the shared credentials file {}", held.file.display());
                        }
                        if st.failing.take().is_some() {
                            tracing::info!(file = %held.file.display(), "the credentials file {} is readable again", held.file.display());
                        }
                        st.held = Some(held);
                        st.stamp = stamp;
                        st.last_read = Some(now);
                        st.reloads += 1;
                    }
                    Err(e) => {
                        // Retry at the next check: forget the stamp so that any state re-reads.
                        st.stamp = None;
                        let e = crate::error::chain(&e);
                        if st.failing.as_deref() != Some(e.as_str()) {
                            if st.held.is_some() {
                                tracing::warn!(reason = %e, "cannot re-read the AWS credentials ({e}); keeping the last good ones and retrying");
                            } else {
                                tracing::warn!(reason = %e, "cannot read the AWS credentials yet ({e}); retrying");
                            }
                            st.failing = Some(e);
                        }
                    }
                }
            }
        }
        let Some(held) = st.held.clone() else {
            return Err(st
                .failing
                .clone()
                .unwrap_or_else(|| "no credentials read yet".into()));
        };
        self.warn_if_stale(&mut st, &held);
        let wall = SystemTime::now();
        let mut expiry = wall + REREAD_EVERY;
        if let Some(real) = held.expires_at {
            let early = real
                .checked_sub(EXPIRY_MARGIN)
                .unwrap_or(real)
                .max(wall + Duration::from_secs(5));
            expiry = expiry.min(early);
        }
        Ok(Credentials::new(
            held.keys.access_key_id,
            held.keys.secret_access_key,
            held.keys.session_token,
            Some(expiry),
            "offload-agent-rotating-file",
        ))
    }

    fn warn_if_stale(&self, st: &mut State, held: &Held) {
        let wall = SystemTime::now();
        let expired = held.expires_at.is_some_and(|t| t <= wall);
        let old = held
            .retrieved_at
            .and_then(|t| wall.duration_since(t).ok())
            .filter(|age| *age > STALE_AFTER);
        match (expired, old) {
            (false, None) => st.warned_stale = false,
            _ if st.warned_stale => {}
            (true, _) => {
                st.warned_stale = true;
                tracing::warn!(file = %held.file.display(), "the AWS credentials from the SSM agent have expired: the SSM agent is not refreshing them (check `systemctl status amazon-ssm-agent` and its log, /var/log/amazon/ssm/amazon-ssm-agent.log)");
            }
            (false, Some(age)) => {
                st.warned_stale = true;
                tracing::warn!(file = %held.file.display(), age_min = age.as_secs() / 60, "the AWS credentials from the SSM agent were retrieved more than 45 minutes ago: the SSM agent seems stuck (check `systemctl status amazon-ssm-agent`)");
            }
        }
    }
}

impl ProvideCredentials for RotatingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(self.current().map_err(CredentialsError::not_loaded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE_A: &str = "[default]\naws_access_key_id = AKIAA\naws_secret_access_key = secretA\n";
    const FILE_B: &str = "# comment\n[other]\naws_access_key_id=X\naws_secret_access_key=Y\n[default]\naws_access_key_id=AKIAB\naws_secret_access_key=secretB\naws_session_token=tok\n";

    #[test]
    fn profiles_parse_and_partial_files_are_errors_without_values() {
        let a = parse_profile(FILE_A, "default").unwrap();
        assert_eq!(a.access_key_id, "AKIAA");
        let b = parse_profile(FILE_B, "default").unwrap();
        assert_eq!(b.session_token.as_deref(), Some("tok"));
        assert_eq!(parse_profile(FILE_B, "other").unwrap().access_key_id, "X");
        assert!(parse_profile("", "default").is_err());
        let half = parse_profile("[default]\naws_access_key_id = AKIAA\n", "default")
            .unwrap_err()
            .to_string();
        assert!(
            half.contains("half written") && !half.contains("AKIAA"),
            "{half}"
        );
        assert!(parse_profile("[defa", "default").is_err());
        assert!(!format!("{a:?}").contains("secretA"));
    }

    #[test]
    fn times_parse_with_z_fractions_and_offsets() {
        let z = parse_time("2026-01-02T03:04:05Z").unwrap();
        assert!(parse_time("2026-01-02T03:04:05.5Z").unwrap() > z);
        assert_eq!(parse_time("2026-01-02T04:04:05+01:00").unwrap(), z);
        assert_eq!(parse_time("2026-01-02T02:04:05-01:00").unwrap(), z);
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn rotation_in_place_is_followed_and_an_empty_file_keeps_the_last_good_keys() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let identity = dir.path().join("identity_config.json");
        std::fs::write(&creds, FILE_A).unwrap();
        let soon = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(3600));
        std::fs::write(
            &identity,
            format!(
                r#"{{"ShareFile":"{}","ShareProfile":"","CredentialsExpiresAt":"{soon}"}}"#,
                creds.display()
            ),
        )
        .unwrap();
        let p = RotatingCredentials::new(Source {
            identity_config: Some(identity),
            file: None,
            profile: "default".into(),
        });
        let c = p.current().unwrap();
        assert_eq!(c.access_key_id(), "AKIAA");
        let exp = c.expiry().unwrap();
        assert!(exp <= SystemTime::now() + REREAD_EVERY);
        // Truncated in place: the last good keys are served.
        std::fs::write(&creds, "").unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(50));
        assert_eq!(p.current().unwrap().access_key_id(), "AKIAA");
        // Written: picked up at the next check.
        std::fs::write(&creds, FILE_B).unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(50));
        let c = p.current().unwrap();
        assert_eq!(c.access_key_id(), "AKIAB");
        assert_eq!(c.session_token(), Some("tok"));
        assert_eq!(p.reloads(), 2);
    }

    #[test]
    fn expiry_is_the_earlier_of_a_minute_and_real_expiry_less_five_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let identity = dir.path().join("identity_config.json");
        std::fs::write(&creds, FILE_A).unwrap();
        let real = SystemTime::now() + Duration::from_secs(330);
        std::fs::write(
            &identity,
            format!(
                r#"{{"ShareFile":"{}","CredentialsExpiresAt":"{}"}}"#,
                creds.display(),
                humantime::format_rfc3339(real)
            ),
        )
        .unwrap();
        let p = RotatingCredentials::new(Source {
            identity_config: Some(identity),
            file: None,
            profile: "default".into(),
        });
        let exp = p.current().unwrap().expiry().unwrap();
        let want = real - EXPIRY_MARGIN;
        let diff = exp.duration_since(want).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(2), "{diff:?}");
    }
}
