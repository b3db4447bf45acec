//! Task IAM roles on ECS Anywhere: traffic to the credentials endpoint 169.254.170.2:80 is sent to the
//! agent's credentials server on 127.0.0.1:51679 (which needs `route_localnet`), and off-host traffic
//! to the introspection port 51678 is dropped. `route_localnet` alone would make every service bound to
//! loopback reachable from the local network (the class of CVE-2020-8558), so, as ecs-init does, packets
//! to 127.0.0.0/8 from elsewhere are dropped unless they belong to a DNAT'ed (task credentials) or
//! established connection. Every rule is checked (`iptables -C`) before it is added, so restarts never
//! pile up duplicates as ecs-init's do; clean-up deletes every copy and switches `route_localnet` off
//! again.

use std::process::Command;

/// The rules, as `iptables` arguments after `-t TABLE -X CHAIN`.
pub fn rules() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "nat",
            "PREROUTING",
            vec![
                "-d",
                "169.254.170.2/32",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                "127.0.0.1:51679",
            ],
        ),
        (
            "nat",
            "OUTPUT",
            vec![
                "-d",
                "169.254.170.2/32",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "80",
                "-j",
                "REDIRECT",
                "--to-ports",
                "51679",
            ],
        ),
        (
            "filter",
            "INPUT",
            vec![
                "-p", "tcp", "-m", "tcp", "--dport", "51678", "!", "-i", "lo", "-j", "DROP",
            ],
        ),
        (
            "filter",
            "INPUT",
            vec![
                "-d",
                "127.0.0.0/8",
                "!",
                "-s",
                "127.0.0.0/8",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "RELATED,ESTABLISHED,DNAT",
                "-j",
                "DROP",
            ],
        ),
    ]
}

/// What identifies each rule of [`rules`] in `iptables -S` output, in the same order.
const MARKERS: [&str; 4] = [
    "--to-destination 127.0.0.1:51679",
    "--to-ports 51679",
    "--dport 51678",
    "--ctstate RELATED,ESTABLISHED,DNAT",
];

/// Where `route_localnet` is switched on.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

#[derive(Debug, Clone)]
pub struct Firewall {
    /// The iptables command (a path or a name on PATH).
    pub iptables: String,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall {
            iptables: "iptables".into(),
        }
    }
}

/// What went wrong with the task IAM role rules, naming the command or the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: install iptables, or set ecs_agent.task_iam_roles = false")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{program} refused to add a rule to {table}/{chain}")]
    Refused {
        program: String,
        table: String,
        chain: String,
    },
    #[error("cannot write {ROUTE_LOCALNET}")]
    RouteLocalnet {
        #[source]
        source: std::io::Error,
    },
}

impl Firewall {
    fn run(&self, args: &[&str]) -> Result<bool, Error> {
        let out = Command::new(&self.iptables)
            .arg("-w")
            .args(args)
            .output()
            .map_err(|source| self.spawn_error(source))?;
        match out.status.code() {
            Some(0) => Ok(true),
            // 1: the rule does not exist (for -C / -D).
            Some(1) => Ok(false),
            _ => Err(Error::Failed {
                command: format!("{} {}", self.iptables, args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> Error {
        Error::Spawn {
            program: self.iptables.clone(),
            source,
        }
    }

    fn exists(&self, table: &str, chain: &str, rule: &[&str]) -> Result<bool, Error> {
        let mut args = vec!["-t", table, "-C", chain];
        args.extend_from_slice(rule);
        self.run(&args)
    }

    /// Add whatever is missing; returns how many rules were added.
    pub fn ensure(&self) -> Result<usize, Error> {
        std::fs::write(ROUTE_LOCALNET, "1").map_err(|source| Error::RouteLocalnet { source })?;
        let mut added = 0;
        for (table, chain, rule) in rules() {
            if self.exists(table, chain, &rule)? {
                continue;
            }
            // The DROP goes first in INPUT so that no earlier ACCEPT lets off-host traffic through.
            let op = if chain == "INPUT" { "-I" } else { "-A" };
            let mut args = vec!["-t", table, op, chain];
            args.extend_from_slice(&rule);
            if !self.run(&args)? {
                return Err(Error::Refused {
                    program: self.iptables.clone(),
                    table: table.to_string(),
                    chain: chain.to_string(),
                });
            }
            added += 1;
        }
        Ok(added)
    }

    /// Delete every copy of every rule (also duplicates that ecs-init left); returns how many. When any
    /// was removed, `route_localnet` (which only they needed) is switched off again.
    pub fn cleanup(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for (table, chain, rule) in rules() {
            for _ in 0..100 {
                let mut args = vec!["-t", table, "-D", chain];
                args.extend_from_slice(&rule);
                if !self.run(&args)? {
                    break;
                }
                removed += 1;
            }
        }
        if removed > 0 {
            std::fs::write(ROUTE_LOCALNET, "0")
                .map_err(|source| Error::RouteLocalnet { source })?;
        }
        Ok(removed)
    }

    /// How many copies of each rule exist (for status and tests).
    pub fn count(&self) -> Result<Vec<usize>, Error> {
        let mut counts = Vec::new();
        for ((table, chain, _), marker) in rules().into_iter().zip(MARKERS) {
            let out = Command::new(&self.iptables)
                .args(["-w", "-t", table, "-S", chain])
                .output()
                .map_err(|source| self.spawn_error(source))?;
            let listing = String::from_utf8_lossy(&out.stdout);
            counts.push(listing.lines().filter(|l| l.contains(marker)).count());
        }
        Ok(counts)
    }
}
