//! The SSM side of a hybrid host: the SSM agent's registration, its rotating credentials, and whether
//! Systems Manager sees the managed instance online.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::{InstanceInformationStringFilter, PingStatus};

use super::Error;
use crate::config::HostConfig;
use crate::credentials::IdentityConfig;
use crate::error::describe;

/// What `/var/lib/amazon/ssm/registration` holds (the private key lives elsewhere and is never read).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct Registration {
    #[serde(rename = "ManagedInstanceID")]
    pub(crate) managed_instance_id: String,
    #[serde(rename = "Region", default)]
    pub(crate) region: String,
}

/// The host's managed instance, if the SSM agent registered it.
pub(crate) fn registration(host: &HostConfig) -> Result<Option<Registration>, Error> {
    let path = host.ssm_registration();
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => serde_json::from_str::<Registration>(&text)
            .map(Some)
            .map_err(|source| Error::Malformed {
                what: "registration file",
                path,
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::File {
            action: "read",
            path,
            source,
        }),
    }
}

/// The activation inputs. `Debug` never shows the code.
pub(crate) struct Activation {
    pub(crate) id: String,
    pub(crate) code: String,
    pub(crate) region: String,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("id", &self.id)
            .field("code", &"<hidden>")
            .field("region", &self.region)
            .finish()
    }
}

/// Run `amazon-ssm-agent -register` (non-interactive: `-y` answers its overwrite prompt). Its output
/// is returned with the activation code blanked out, should it echo it.
/// Run `amazon-ssm-agent -register`; `env` is the egress (proxy variables) it registers through.
pub(crate) async fn run_register(
    binary: &Path,
    env: &[(String, String)],
    a: &Activation,
) -> Result<(), Error> {
    if !binary.exists() {
        return Err(Error::Failed(format!(
            "the SSM agent is not installed ({} does not exist): install the amazon-ssm-agent package for \
             this distribution (AWS publishes .deb and .rpm packages), or set host.ssm_agent to its path",
            binary.display()
        )));
    }
    let out = tokio::process::Command::new(binary)
        .args([
            "-register",
            "-y",
            "-code",
            &a.code,
            "-id",
            &a.id,
            "-region",
            &a.region,
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .map_err(|_| {
            Error::Failed(format!(
                "{} -register did not finish within 2 minutes",
                binary.display()
            ))
        })?
        .map_err(|source| Error::File {
            action: "run",
            path: binary.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .replace(&a.code, "<activation code>");
    let tail: Vec<&str> = text.lines().rev().take(10).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(Error::Failed(format!(
        "{} -register failed ({}): {}\ncheck the activation id, code and region (an activation expires, and allows a fixed number of registrations)",
        binary.display(),
        out.status,
        tail.join(" | ")
    )))
}

/// Wait until `identity_config.json` and the credentials file it names exist and hold a profile.
pub(crate) async fn wait_for_credentials(
    host: &HostConfig,
    deadline: Instant,
) -> Result<PathBuf, Error> {
    let identity = host.identity_config();
    let mut last;
    loop {
        match IdentityConfig::read(&identity) {
            Ok(id) if !id.share_file.is_empty() => {
                let file = PathBuf::from(&id.share_file);
                let profile = if id.share_profile.is_empty() {
                    "default".to_string()
                } else {
                    id.share_profile.clone()
                };
                match std::fs::read_to_string(&file) {
                    Ok(t) => match crate::credentials::parse_profile(&t, &profile) {
                        Ok(_) => return Ok(file),
                        Err(e) => last = format!("{}: {e}", file.display()),
                    },
                    Err(e) => last = format!("{}: {e}", file.display()),
                }
            }
            Ok(_) => last = format!("{} names no ShareFile yet", identity.display()),
            Err(e) => last = crate::error::chain(&e),
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "the SSM agent has not published credentials yet ({last}): check `systemctl status {}` and /var/log/amazon/ssm/amazon-ssm-agent.log",
                host.ssm_service
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wait until Systems Manager reports the managed instance online (`DescribeInstanceInformation`).
pub(crate) async fn wait_online(
    ssm: &aws_sdk_ssm::Client,
    instance: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let mut last;
    loop {
        let r = ssm
            .describe_instance_information()
            .filters(
                InstanceInformationStringFilter::builder()
                    .key("InstanceIds")
                    .values(instance)
                    .build()
                    .map_err(|e| Error::Failed(e.to_string()))?,
            )
            .send()
            .await;
        match r {
            Ok(out) => {
                let info = out
                    .instance_information_list()
                    .iter()
                    .find(|i| i.instance_id() == Some(instance));
                match info.and_then(|i| i.ping_status()) {
                    Some(PingStatus::Online) => return Ok(()),
                    Some(s) => last = format!("ping status {}", s.as_str()),
                    None => last = "not listed yet".to_string(),
                }
            }
            Err(e) => last = describe(&e),
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "Systems Manager does not report {instance} online ({last}): check that the host reaches \
                 ssm.<region>.amazonaws.com on 443, and the SSM agent's log /var/log/amazon/ssm/amazon-ssm-agent.log"
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deregister the managed instance; an instance that is already gone counts as done.
pub(crate) async fn deregister(ssm: &aws_sdk_ssm::Client, instance: &str) -> Result<bool, Error> {
    match ssm
        .deregister_managed_instance()
        .instance_id(instance)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if crate::error::code(&e) == Some("InvalidInstanceId") => Ok(false),
        Err(e) => Err(Error::Failed(format!(
            "cannot deregister the managed instance {instance}: {}",
            describe(&e)
        ))),
    }
}
