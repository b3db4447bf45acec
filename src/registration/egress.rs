//! The host's other AWS clients leave the same way as the daemon: `register` writes `[network]` for
//! the SSM agent and Docker (systemd drop-ins) and for the ECS agent's container (its env file, which
//! the supervisor passes on as ecs-init does), plus one CA bundle they all read; `deregister` removes
//! exactly these files and keys.
//!
//! The CA bundle ([`crate::config::HostConfig::ca_bundle`]) is the system's roots followed by
//! `network.ca_bundle`: the programs it is given to (`SSL_CERT_FILE`) replace their roots with it rather
//! than add to them.

use std::path::{Path, PathBuf};

use super::{env_file, step, var_config, Error};
use crate::config::Config;
use crate::ecs_agent::spec::CONTAINER_CA_BUNDLE;
use crate::host::Systemctl;

/// The drop-in file name, in `<unit>.service.d/` under `host.systemd_dir`.
pub(crate) const DROP_IN: &str = "offload-agent-egress.conf";
/// Keys written to `/var/lib/ecs/ecs.config` for the ECS agent.
pub(crate) const AGENT_KEYS: [&str; 7] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
];
/// Where distributions keep their roots as one PEM file (Debian and Ubuntu, RHEL and Fedora, SUSE,
/// Alpine), in the order they are tried.
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// The ECS agent talks to Docker over its socket: never through a proxy.
const AGENT_ALSO_DIRECT: &str = "/var/run/docker.sock";
const HEADER: &str = "# Written by `offload-agent register` from the [network] section of its configuration;\n\
                      # removed by `offload-agent deregister`. Change the configuration and run register again\n\
                      # rather than editing this file.\n";

fn drop_in(cfg: &Config, unit: &str) -> PathBuf {
    let unit = unit.strip_suffix(".service").unwrap_or(unit);
    cfg.host
        .systemd_dir
        .join(format!("{unit}.service.d"))
        .join(DROP_IN)
}

/// A value in a unit file's `Environment="…"`: `%` is a specifier there, `\` and `"` are escapes.
fn unit_quote(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
}

fn unit_text(env: &[(String, String)]) -> String {
    let mut text = format!("{HEADER}[Service]\n");
    for (k, v) in env {
        text.push_str(&format!("Environment=\"{k}={}\"\n", unit_quote(v)));
    }
    text
}

/// The system's roots (the first bundle of [`SYSTEM_BUNDLES`] that exists) followed by the operator's.
fn combined_bundle(extra: &[u8]) -> Vec<u8> {
    let mut out = SYSTEM_BUNDLES
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .unwrap_or_default();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(extra);
    out
}

/// Write (or remove, without `network.ca_bundle`) the combined CA bundle `host.ca_bundle()`: its path
/// and whether it changed, when there is one.
pub(crate) fn write_bundle(cfg: &Config) -> Result<Option<(PathBuf, bool)>, Error> {
    let bundle = cfg.host.ca_bundle();
    if cfg.network.ca_bundle.is_none() {
        env_file::remove(&bundle)?;
        return Ok(None);
    }
    let did = env_file::put(&bundle, &combined_bundle(&cfg.network.ca_pem), 0o644)?;
    Ok(Some((bundle, did)))
}

fn changed(path: &Path, did: bool, what: &str) {
    step(
        "egress",
        format!(
            "{}: {what} ({})",
            path.display(),
            if did { "written" } else { "already so" }
        ),
    );
}

/// Write the egress for the SSM agent, Docker and the ECS agent; restart the SSM agent when its
/// drop-in changed, and Docker only when `restart_docker` (a restart stops every container without
/// live restore). With no proxy and no extra CA, what an earlier run wrote is removed.
pub(crate) async fn write(
    cfg: &Config,
    systemctl: &Systemctl,
    restart_docker: bool,
) -> Result<(), Error> {
    let net = &cfg.network;
    if !net.is_customised() {
        step("egress", "direct (no proxy, no extra CA): nothing to write");
        return remove(cfg, systemctl).await;
    }
    let ca_host = match write_bundle(cfg)? {
        Some((bundle, did)) => {
            changed(&bundle, did, "the system's roots and network.ca_bundle");
            Some(bundle.display().to_string())
        }
        None => None,
    };
    let host_env = net.child_env(ca_host.as_deref());
    let ssm_unit = drop_in(cfg, &cfg.host.ssm_service);
    let ssm_changed = env_file::put(&ssm_unit, unit_text(&host_env).as_bytes(), 0o600)?;
    changed(&ssm_unit, ssm_changed, "the SSM agent's proxy and CA");
    // Docker pulls images through the proxy; its registries' CAs are its own (certs.d).
    let docker_env = net.child_env(None);
    let docker_unit = drop_in(cfg, &cfg.host.docker_service);
    let docker_changed = if docker_env.is_empty() {
        env_file::remove(&docker_unit)?
    } else {
        env_file::put(&docker_unit, unit_text(&docker_env).as_bytes(), 0o600)?
    };
    changed(
        &docker_unit,
        docker_changed,
        "Docker's proxy for image pulls",
    );

    let agent = agent_env(net);
    let set: Vec<(&str, &str)> = agent
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let unset: Vec<&str> = AGENT_KEYS
        .iter()
        .copied()
        .filter(|k| !agent.iter().any(|(a, _)| a == k))
        .collect();
    let path = var_config(cfg);
    let did = env_file::apply(&path, &set, &unset)?;
    let names: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
    changed(&path, did, &format!("the ECS agent's {}", names.join(", ")));

    apply_drop_ins(cfg, systemctl, ssm_changed, docker_changed, restart_docker).await
}

/// The ECS agent's egress variables, sorted: the proxies, `NO_PROXY` with the Docker socket too, and
/// `SSL_CERT_FILE` where its container sees the CA bundle.
fn agent_env(net: &crate::egress::Egress) -> Vec<(String, String)> {
    let mut agent: Vec<(String, String)> = net
        .child_env(net.ca_bundle.is_some().then_some(CONTAINER_CA_BUNDLE))
        .into_iter()
        .filter(|(k, _)| k != "AWS_CA_BUNDLE")
        .map(|(k, v)| {
            if k.eq_ignore_ascii_case("NO_PROXY") {
                (k, format!("{v},{AGENT_ALSO_DIRECT}"))
            } else {
                (k, v)
            }
        })
        .collect();
    agent.sort();
    agent
}

/// Restart what needs it after the drop-ins changed: the SSM agent when it runs, Docker only when
/// asked (otherwise say that it needs a restart).
async fn apply_drop_ins(
    cfg: &Config,
    systemctl: &Systemctl,
    ssm_changed: bool,
    docker_changed: bool,
    restart_docker: bool,
) -> Result<(), Error> {
    if ssm_changed || docker_changed {
        systemctl.must(&["daemon-reload"]).await?;
    }
    if ssm_changed {
        // Running (a kept registration): restarted with the new environment; not running: started
        // with it by the registration that follows.
        systemctl
            .must(&["try-restart", &cfg.host.ssm_service])
            .await?;
        step(
            "egress",
            format!("{} restarted if it was running", cfg.host.ssm_service),
        );
    }
    if !docker_changed {
        return Ok(());
    }
    let docker = &cfg.host.docker_service;
    if restart_docker {
        systemctl.must(&["restart", docker]).await?;
        step("egress", format!("{docker} restarted (--restart-docker)"));
    } else {
        step(
            "egress",
            format!(
                "{docker} needs a restart to pull through the proxy: `systemctl restart {docker}` when \
                 its containers may stop (or run register with --restart-docker)"
            ),
        );
    }
    Ok(())
}

/// Remove what [`write`] wrote (only its own files and keys); reload systemd and restart the SSM agent
/// when their drop-ins went away.
pub(crate) async fn remove(cfg: &Config, systemctl: &Systemctl) -> Result<(), Error> {
    let ssm = env_file::remove(&drop_in(cfg, &cfg.host.ssm_service))?;
    let docker = env_file::remove(&drop_in(cfg, &cfg.host.docker_service))?;
    let bundle = env_file::remove(&cfg.host.ca_bundle())?;
    let keys = env_file::apply(&var_config(cfg), &[], &AGENT_KEYS)?;
    if ssm || docker || bundle || keys {
        step(
            "egress",
            format!(
                "removed the drop-ins {DROP_IN} of {} and {}, {} and the ECS agent's proxy keys",
                cfg.host.ssm_service,
                cfg.host.docker_service,
                cfg.host.ca_bundle().display()
            ),
        );
    }
    if ssm || docker {
        systemctl.must(&["daemon-reload"]).await?;
    }
    if ssm {
        // Without a registration the unit may be stopped already: a failed restart is no error.
        let _ = systemctl.run(&["try-restart", &cfg.host.ssm_service]).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_values_escape_specifiers_and_quotes() {
        assert_eq!(
            unit_quote(r#"http://u:p%40ss"\@h:1"#),
            r#"http://u:p%%40ss\"\\@h:1"#
        );
        let text = unit_text(&[("HTTPS_PROXY".into(), "http://a%3Ab@p:3128".into())]);
        assert!(text.ends_with("[Service]\nEnvironment=\"HTTPS_PROXY=http://a%%3Ab@p:3128\"\n"));
    }
}
