//! The ECS agent container as ecs-init creates it for ECS Anywhere, and the hash that decides between
//! adopting a running container and recreating it.
//!
//! The reference is ecs-init's Linux build: `ecs-init/docker/docker.go` (`getContainerConfig`,
//! `getHostConfig`, `getDockerPluginDirBinds`, `getCapabilityBinds`) and `ecs-init/docker/docker_config.go`
//! (`getPlatformSpecificEnvVariables`, `createHostConfig`) in aws/amazon-ecs-agent. The deliberate
//! differences are listed in docs/ecs-agent.md; the unit test below holds the whole environment and
//! bind list so that a change on either side shows.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use sha2::{Digest, Sha256};

use super::SetupError;
use crate::config::{EcsAgentConfig, HostConfig as HostPaths};

/// Label holding the hash of everything the container was created from.
pub(crate) const CONFIG_HASH_LABEL: &str = "io.offload-agent.config-hash";
/// Label marking containers this supervisor created.
pub(crate) const MANAGED_LABEL: &str = "io.offload-agent.managed";

/// ecs-init's environment for an ECS Anywhere agent; the env files override it.
pub(crate) const DEFAULT_ENV: &[(&str, &str)] = &[
    ("ECS_LOGFILE", "/log/ecs-agent.log"),
    ("ECS_DATADIR", "/data"),
    ("ECS_AGENT_CONFIG_FILE_PATH", "/etc/ecs/ecs.config.json"),
    ("ECS_UPDATE_DOWNLOAD_DIR", "/var/cache/ecs"),
    ("ECS_UPDATES_ENABLED", "true"),
    (
        "ECS_AVAILABLE_LOGGING_DRIVERS",
        "[\"json-file\",\"syslog\",\"awslogs\",\"fluentd\",\"none\"]",
    ),
    ("ECS_ENABLE_TASK_IAM_ROLE", "true"),
    ("ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST", "true"),
    ("ECS_EBSTA_SUPPORTED", "true"),
    // A JSON object of labels for the agent's container (and its instance attributes).
    ("ECS_AGENT_LABELS", ""),
    ("ECS_VOLUME_PLUGIN_CAPABILITIES", "[\"efsAuth\"]"),
    // The awslogs driver with the task execution role's credentials (amazon-ecs-agent#3074: ECS
    // Anywhere tasks without it lack awslogs credentials).
    ("ECS_ENABLE_AWSLOGS_EXECUTIONROLE_OVERRIDE", "true"),
    ("ECS_ENABLE_TASK_ENI", "false"),
    ("ECS_EXTERNAL", "true"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/rotatingcreds/credentials"),
];

/// The agent's own clean-up of stopped tasks and unused images, tighter than its defaults (3 h, 30 min,
/// 1 h, 5): a full disk is the most common cause of an external instance disconnecting
/// (amazon-ecs-agent#632, #1550), and an on-premises disk is small and not replaced by a fresh
/// instance. The env files override them.
pub(crate) const CLEANUP_ENV: &[(&str, &str)] = &[
    ("ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION", "1h"),
    ("ECS_IMAGE_CLEANUP_INTERVAL", "10m"),
    ("ECS_IMAGE_MINIMUM_CLEANUP_AGE", "30m"),
    ("ECS_NUM_IMAGES_DELETE_PER_CYCLE", "10"),
];

/// Values ecs-init sets after reading the env files on an external (ECS Anywhere) instance: a user's
/// env file cannot turn them on. Task networking needs EC2; EBS task attach too (ecs-init turns it off
/// when it cannot make the EBS mount directory, which an external host never has).
pub(crate) const FORCED_ENV: &[(&str, &str)] = &[
    ("ECS_ENABLE_TASK_ENI", "false"),
    ("ECS_EBSTA_SUPPORTED", "false"),
    ("ECS_EXTERNAL", "true"),
];

/// Where the rotating credentials directory appears inside the agent's container.
const ROTATING_CREDS: &str = "/rotatingcreds";

/// Where the ECS agent's container sees the CA bundle `register` writes (`host.ca_bundle()`), bound
/// read-only when its env file sets `SSL_CERT_FILE` to it.
pub(crate) const CONTAINER_CA_BUNDLE: &str = "/etc/offload-agent/ca-bundle.pem";

/// Env files, in order (later wins), relative to `host_root`.
pub(crate) const ENV_FILES: [&str; 2] = ["var/lib/ecs/ecs.config", "etc/ecs/ecs.config"];
/// Holds the path of the image tarball to load when the agent exits 42.
pub(crate) const DESIRED_IMAGE_FILE: &str = "var/cache/ecs/desired-image";

/// (host path relative to host_root, container path, read-only, required). Required directories are
/// created; optional ones are bound only if they exist — unlike ecs-init, which lets Docker create an
/// empty directory in their place.
pub(crate) const BINDS: &[(&str, &str, bool, bool)] = &[
    ("var/run", "/var/run", false, false),
    ("var/log/ecs", "/log", false, true),
    ("var/lib/ecs/data", "/data", false, true),
    ("etc/ecs", "/etc/ecs", false, true),
    ("var/cache/ecs", "/var/cache/ecs", false, true),
    ("sys/fs/cgroup", "/sys/fs/cgroup", false, false),
    ("var/lib/ecs", "/var/lib/ecs", false, true),
    ("proc", "/host/proc", true, false),
    // ECS Exec: the managed agents' binaries, their configuration and their logs.
    ("var/lib/ecs/deps", "/managed-agents", true, true),
    (
        "var/lib/ecs/deps/execute-command/config",
        "/managed-agents/execute-command/config",
        false,
        true,
    ),
    ("var/log/ecs/exec", "/log/exec", false, true),
    // Docker volume plugins for tasks: their sockets and spec files.
    ("run/docker/plugins", "/run/docker/plugins", true, false),
    ("etc/docker/plugins", "/etc/docker/plugins", true, false),
    (
        "usr/lib/docker/plugins",
        "/usr/lib/docker/plugins",
        true,
        false,
    ),
    // The host's iptables and the libraries it needs, for the agent's task networking rules.
    ("usr/lib", "/usr/lib", true, false),
    ("usr/lib64", "/usr/lib64", true, false),
    ("sbin", "/host/sbin", true, false),
    ("etc/alternatives", "/etc/alternatives", true, false),
    ("usr/sbin", "/usr/sbin", true, false),
    // ecs-init binds it read-write.
    ("usr/bin/lsblk", "/usr/bin/lsblk", false, false),
];

/// The default rotating credentials directory when the SSM agent's identity_config.json names none
/// (relative to `host_root`).
const DEFAULT_CREDS_DIR: &str = "root/.aws";

/// A problem with an env file, naming the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub(crate) struct EnvFileError {
    pub(crate) path: PathBuf,
    pub(crate) line: usize,
    pub(crate) reason: String,
}

/// Parse `KEY=VALUE` lines. Unlike ecs-init's parser: `#` comments, blank lines, `export ` prefixes and
/// single- or double-quoted values are accepted.
pub(crate) fn parse_env_file(
    text: &str,
    path: &Path,
) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let err = |reason: &str| EnvFileError {
            path: path.to_path_buf(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err("expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(err("the key must be letters, digits and underscores"));
        }
        let value = value.trim();
        let value = match value.as_bytes().first() {
            Some(&q @ (b'"' | b'\'')) => {
                if value.len() < 2 || value.as_bytes()[value.len() - 1] != q {
                    return Err(err("unterminated quoted value"));
                }
                value[1..value.len() - 1].to_string()
            }
            _ => match value.find(" #") {
                Some(pos) => value[..pos].trim_end().to_string(),
                None => value.to_string(),
            },
        };
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// Everything the agent container is created from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContainerSpec {
    pub(crate) name: String,
    pub(crate) image: String,
    /// The image id the container must run; part of the hash, so a new image recreates it.
    pub(crate) image_id: String,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) binds: Vec<String>,
    pub(crate) log_max_size: String,
    pub(crate) log_max_files: u64,
}

/// The CA bundle `register` wrote, bound read-only where the env file's `SSL_CERT_FILE` expects it.
fn ca_bind(env: &BTreeMap<String, String>, host: &HostPaths) -> Option<String> {
    let bundle = host.ca_bundle();
    (env.get("SSL_CERT_FILE").map(String::as_str) == Some(CONTAINER_CA_BUNDLE) && bundle.exists())
        .then(|| format!("{}:{CONTAINER_CA_BUNDLE}:ro", bundle.display()))
}

pub(crate) fn host_path(cfg: &EcsAgentConfig, rel: &str) -> PathBuf {
    cfg.host_root.join(rel)
}

impl ContainerSpec {
    /// Build the spec: default env, then the env files, then the values ecs-init forces; the rotating
    /// credentials directory is the one the SSM agent's identity_config.json names (`ShareFile`,
    /// `ShareProfile`), else `/root/.aws`. Required directories are created.
    pub(crate) fn build(
        cfg: &EcsAgentConfig,
        host: &HostPaths,
        image_id: &str,
    ) -> Result<ContainerSpec, SetupError> {
        let mut env: BTreeMap<String, String> = DEFAULT_ENV
            .iter()
            .chain(CLEANUP_ENV)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for rel in ENV_FILES {
            let path = host_path(cfg, rel);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    for (k, v) in parse_env_file(&text, &path)? {
                        env.insert(k, v);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(SetupError::File {
                        action: "read",
                        path,
                        source,
                    })
                }
            }
        }
        for (k, v) in FORCED_ENV {
            env.insert(k.to_string(), v.to_string());
        }
        let mut binds = Vec::new();
        let identity = crate::credentials::IdentityConfig::read(&host.identity_config()).ok();
        match identity.as_ref().filter(|i| !i.share_file.is_empty()) {
            Some(id) => {
                let file = Path::new(&id.share_file);
                if let (Some(dir), Some(name)) = (file.parent(), file.file_name()) {
                    binds.push(format!("{}:{ROTATING_CREDS}:ro", dir.display()));
                    env.insert(
                        "AWS_SHARED_CREDENTIALS_FILE".into(),
                        format!("{ROTATING_CREDS}/{}", name.to_string_lossy()),
                    );
                }
                if !id.share_profile.is_empty() && id.share_profile != "default" {
                    env.insert(
                        "ECS_ALTERNATE_CREDENTIAL_PROFILE".into(),
                        id.share_profile.clone(),
                    );
                }
            }
            None => {
                let dir = host_path(cfg, DEFAULT_CREDS_DIR);
                if dir.exists() {
                    binds.push(format!("{}:{ROTATING_CREDS}:ro", dir.display()));
                }
            }
        }
        binds.extend(ca_bind(&env, host));
        for (rel, inside, ro, required) in BINDS {
            let host = host_path(cfg, rel);
            if *required {
                std::fs::create_dir_all(&host).map_err(|source| SetupError::File {
                    action: "create",
                    path: host.clone(),
                    source,
                })?;
            } else if !host.exists() {
                continue;
            }
            binds.push(format!(
                "{}:{}{}",
                host.display(),
                inside,
                if *ro { ":ro" } else { "" }
            ));
        }
        Ok(ContainerSpec {
            name: cfg.container_name.clone(),
            image: cfg.image.clone(),
            image_id: image_id.to_string(),
            env,
            binds,
            log_max_size: cfg.log_max_size.clone(),
            log_max_files: cfg.log_max_files,
        })
    }

    /// A stable hash of the spec (sorted env, binds in order, image id, log options).
    pub(crate) fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |k: &str, v: &str| {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([1]);
        };
        field("image", &self.image);
        field("image_id", &self.image_id);
        for (k, v) in &self.env {
            field(&format!("env:{k}"), v);
        }
        for b in &self.binds {
            field("bind", b);
        }
        field("log_max_size", &self.log_max_size);
        field("log_max_files", &self.log_max_files.to_string());
        field("layout", "3"); // bump when create_body changes shape
        hex::encode(h.finalize())
    }

    /// The create request: host network and user namespace, an init process, capped json-file logs,
    /// no restart policy (the supervisor restarts it), no added capabilities.
    pub(crate) fn create_body(&self) -> ContainerCreateBody {
        // ecs-init's labels from ECS_AGENT_LABELS (a JSON object; anything else is skipped, as there);
        // ours are set last so that they cannot be overridden.
        let mut labels: HashMap<String, String> = self
            .env
            .get("ECS_AGENT_LABELS")
            .filter(|l| !l.is_empty())
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        labels.insert(CONFIG_HASH_LABEL.to_string(), self.hash());
        labels.insert(MANAGED_LABEL.to_string(), "true".to_string());
        let mut log_opts = HashMap::new();
        log_opts.insert("max-size".to_string(), self.log_max_size.clone());
        log_opts.insert("max-file".to_string(), self.log_max_files.to_string());
        ContainerCreateBody {
            image: Some(self.image.clone()),
            env: Some(self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                userns_mode: Some("host".into()),
                init: Some(true),
                binds: Some(self.binds.clone()),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(log_opts),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_accept_comments_blank_lines_and_quotes() {
        let text = "# cluster\n\nECS_CLUSTER=prod\nexport ECS_LOGLEVEL = \"debug\"\nX='a # b'\nY=v # note\n";
        let got = parse_env_file(text, Path::new("/etc/ecs/ecs.config")).unwrap();
        assert_eq!(
            got,
            [
                ("ECS_CLUSTER".to_string(), "prod".to_string()),
                ("ECS_LOGLEVEL".to_string(), "debug".to_string()),
                ("X".to_string(), "a # b".to_string()),
                ("Y".to_string(), "v".to_string()),
            ]
        );
        let err = parse_env_file("OK=1\nnot a line\n", Path::new("/e")).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().starts_with("/e:2:"));
        assert!(parse_env_file("A=\"open\n", Path::new("/e")).is_err());
    }

    /// The whole environment and bind list for a host that has every optional path, line by line
    /// against ecs-init's Linux build (aws/amazon-ecs-agent at 01c434c, `ecs-init/docker/docker.go`
    /// `getContainerConfig` and `getHostConfig`, `ecs-init/docker/docker_config.go`
    /// `getPlatformSpecificEnvVariables` and `createHostConfig`). Ours beside theirs: `ECS_EXTERNAL`
    /// and `AWS_SHARED_CREDENTIALS_FILE` (what the ECS Anywhere install script writes to ecs.config),
    /// `/proc` read-only at `/host/proc`; theirs not here: the Amazon Linux certificate directory, gMSA
    /// and GPU (not on an external Debian host). docs/ecs-agent.md has the table.
    #[test]
    fn the_container_matches_ecs_init_item_by_item() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut cfg = EcsAgentConfig {
            host_root: root.to_path_buf(),
            ..EcsAgentConfig::default()
        };
        cfg.container_name = "ecs-agent".into();
        let host = HostPaths {
            ssm_dir: root.join("ssm"),
            ..HostPaths::default()
        };
        for d in [
            "var/run",
            "sys/fs/cgroup",
            "proc",
            "root/.aws",
            "run/docker/plugins",
            "etc/docker/plugins",
            "usr/lib/docker/plugins",
            "usr/lib64",
            "sbin",
            "etc/alternatives",
            "usr/sbin",
            "usr/bin",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("usr/bin/lsblk"), "").unwrap();
        let spec = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            env,
            [
                "AWS_SHARED_CREDENTIALS_FILE=/rotatingcreds/credentials",
                "ECS_AGENT_CONFIG_FILE_PATH=/etc/ecs/ecs.config.json",
                "ECS_AGENT_LABELS=",
                "ECS_AVAILABLE_LOGGING_DRIVERS=[\"json-file\",\"syslog\",\"awslogs\",\"fluentd\",\"none\"]",
                "ECS_DATADIR=/data",
                "ECS_EBSTA_SUPPORTED=false",
                "ECS_ENABLE_AWSLOGS_EXECUTIONROLE_OVERRIDE=true",
                "ECS_ENABLE_TASK_ENI=false",
                "ECS_ENABLE_TASK_IAM_ROLE=true",
                "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true",
                "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION=1h",
                "ECS_EXTERNAL=true",
                "ECS_IMAGE_CLEANUP_INTERVAL=10m",
                "ECS_IMAGE_MINIMUM_CLEANUP_AGE=30m",
                "ECS_LOGFILE=/log/ecs-agent.log",
                "ECS_NUM_IMAGES_DELETE_PER_CYCLE=10",
                "ECS_UPDATES_ENABLED=true",
                "ECS_UPDATE_DOWNLOAD_DIR=/var/cache/ecs",
                "ECS_VOLUME_PLUGIN_CAPABILITIES=[\"efsAuth\"]",
            ]
        );
        let r = root.display().to_string();
        let binds: Vec<String> = spec.binds.iter().map(|b| b.replacen(&r, "", 1)).collect();
        assert_eq!(
            binds,
            [
                "/root/.aws:/rotatingcreds:ro",
                "/var/run:/var/run",
                "/var/log/ecs:/log",
                "/var/lib/ecs/data:/data",
                "/etc/ecs:/etc/ecs",
                "/var/cache/ecs:/var/cache/ecs",
                "/sys/fs/cgroup:/sys/fs/cgroup",
                "/var/lib/ecs:/var/lib/ecs",
                "/proc:/host/proc:ro",
                "/var/lib/ecs/deps:/managed-agents:ro",
                "/var/lib/ecs/deps/execute-command/config:/managed-agents/execute-command/config",
                "/var/log/ecs/exec:/log/exec",
                "/run/docker/plugins:/run/docker/plugins:ro",
                "/etc/docker/plugins:/etc/docker/plugins:ro",
                "/usr/lib/docker/plugins:/usr/lib/docker/plugins:ro",
                "/usr/lib:/usr/lib:ro",
                "/usr/lib64:/usr/lib64:ro",
                "/sbin:/host/sbin:ro",
                "/etc/alternatives:/etc/alternatives:ro",
                "/usr/sbin:/usr/sbin:ro",
                "/usr/bin/lsblk:/usr/bin/lsblk",
            ]
        );
        // Labels from ECS_AGENT_LABELS, as ecs-init's setLabels; ours cannot be overridden.
        std::fs::create_dir_all(root.join("etc/ecs")).unwrap();
        std::fs::write(
            root.join("etc/ecs/ecs.config"),
            "ECS_AGENT_LABELS={\"team\":\"data\",\"io.offload-agent.managed\":\"no\"}\n",
        )
        .unwrap();
        let labelled = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        let labels = labelled.create_body().labels.unwrap();
        assert_eq!(labels["team"], "data");
        assert_eq!(labels[MANAGED_LABEL], "true");
        std::fs::write(
            root.join("etc/ecs/ecs.config"),
            "ECS_AGENT_LABELS=not json\n",
        )
        .unwrap();
        let bad = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        assert_eq!(
            bad.create_body().labels.unwrap().len(),
            2,
            "invalid labels are skipped"
        );
    }

    #[test]
    fn spec_layers_env_files_skips_missing_optional_binds_and_hashes_stably() {
        let dir = tempfile::tempdir().unwrap();
        let full = crate::config::from_toml_str(
            "[queue]\nname='q'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='t'\noutput_prefix='out/'\n",
            "t.toml",
        )
        .unwrap();
        let mut cfg = full.ecs_agent.clone();
        let mut host = full.host.clone();
        host.ssm_dir = dir.path().join("ssm");
        cfg.host_root = dir.path().to_path_buf();
        std::fs::create_dir_all(dir.path().join("var/lib/ecs")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/ecs")).unwrap();
        std::fs::write(
            dir.path().join("var/lib/ecs/ecs.config"),
            "ECS_CLUSTER=a\nECS_X=1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/ecs/ecs.config"),
            "ECS_CLUSTER=b\nECS_ENABLE_TASK_ENI=true\n",
        )
        .unwrap();
        let spec = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        assert_eq!(spec.env["ECS_CLUSTER"], "b");
        assert_eq!(spec.env["ECS_X"], "1");
        assert_eq!(spec.env["ECS_EXTERNAL"], "true");
        assert_eq!(
            spec.env["ECS_ENABLE_TASK_ENI"], "false",
            "forced after the env files"
        );
        assert!(spec
            .binds
            .iter()
            .any(|b| b.ends_with(":/managed-agents:ro")));
        assert!(spec.binds.iter().any(|b| b.ends_with(":/data")));
        assert!(
            !spec.binds.iter().any(|b| b.contains("/rotatingcreds")),
            "optional path absent"
        );
        assert!(
            dir.path().join("var/log/ecs").is_dir(),
            "required dirs are created"
        );
        assert_eq!(
            spec.hash(),
            ContainerSpec::build(&cfg, &host, "sha256:1")
                .unwrap()
                .hash()
        );
        assert_ne!(
            spec.hash(),
            ContainerSpec::build(&cfg, &host, "sha256:2")
                .unwrap()
                .hash()
        );
        std::fs::create_dir_all(dir.path().join("root/.aws")).unwrap();
        let with_creds = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        assert!(with_creds
            .binds
            .iter()
            .any(|b| b.ends_with("/rotatingcreds:ro")));
        assert_ne!(spec.hash(), with_creds.hash());
        // On a hybrid host the SSM agent's identity_config.json names the file and profile.
        std::fs::create_dir_all(host.ssm_dir.join("runtimeconfig")).unwrap();
        std::fs::write(
            host.identity_config(),
            r#"{"ShareFile":"/var/lib/creds/shared","ShareProfile":"ssm"}"#,
        )
        .unwrap();
        let hybrid = ContainerSpec::build(&cfg, &host, "sha256:1").unwrap();
        assert!(hybrid
            .binds
            .contains(&"/var/lib/creds:/rotatingcreds:ro".to_string()));
        assert_eq!(
            hybrid.env["AWS_SHARED_CREDENTIALS_FILE"],
            "/rotatingcreds/shared"
        );
        assert_eq!(hybrid.env["ECS_ALTERNATE_CREDENTIAL_PROFILE"], "ssm");
        let body = spec.create_body();
        let hc = body.host_config.unwrap();
        assert_eq!(hc.network_mode.as_deref(), Some("host"));
        assert_eq!(hc.init, Some(true));
        assert!(hc.restart_policy.is_none() && hc.cap_add.is_none());
    }
}
