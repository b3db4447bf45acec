//! The ECS agent supervisor against a real Docker engine, with a stand-in agent image built from a
//! busybox-static root filesystem (see tests/it/support/docker.rs): each scenario drives the library's
//! `Supervisor::run` and checks what Docker and the status report.

use std::time::Duration;

use crate::support::docker::*;
use offload_agent::ecs_agent::State;

const T: Duration = Duration::from_secs(30);

/// Fresh start: the container is created as ecs-init would for ECS Anywhere, answers introspection,
/// and is reported registered once it has a ContainerInstanceArn.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_start_creates_the_agent_and_reports_registration() {
    let mut rig = Rig::prepare("fresh", false).await;
    // Host paths ecs-init binds when they exist: Docker's plugin directories and the iptables paths.
    let present = [
        ("run/docker/plugins", "/run/docker/plugins:ro"),
        ("etc/docker/plugins", "/etc/docker/plugins:ro"),
        ("sbin", "/host/sbin:ro"),
        ("usr/sbin", "/usr/sbin:ro"),
        ("etc/alternatives", "/etc/alternatives:ro"),
    ];
    for (rel, _) in present {
        std::fs::create_dir_all(rig.root().join(rel)).unwrap();
    }
    std::fs::create_dir_all(rig.root().join("usr/bin")).unwrap();
    std::fs::write(rig.root().join("usr/bin/lsblk"), "").unwrap();
    rig.start();
    let s = rig.wait("answering", T, |s| s.metadata.is_some()).await;
    assert_eq!(s.state, State::Running);
    assert_eq!(s.metadata.unwrap().container_instance_arn, None);
    rig.ctl(
        "fake-arn",
        "arn:aws:ecs:us-east-1:123456789012:container-instance/test/abc",
    );
    let s = rig.wait_state(State::Registered, T).await;
    let m = s.metadata.unwrap();
    assert!(m.cluster.unwrap().starts_with("test-fresh"));
    // The journal's lines for a fresh start, in order.
    rig.wait_log("ECS agent: registered as", T).await;
    let lines = rig.log_lines();
    let mut at = 0;
    for want in [
        "INFO ECS agent: creating container ",
        "INFO ECS agent: started container ",
        "INFO ECS agent: registered as arn:aws:ecs:us-east-1:123456789012:container-instance/test/abc",
    ] {
        match lines[at..].iter().position(|l| l.starts_with(want)) {
            Some(i) => at += i + 1,
            None => panic!("no {want:?} after line {at}:\n{}", lines.join("\n")),
        }
    }
    assert_eq!(m.version.as_deref(), Some("fake v1"));

    let d = docker().await;
    let c = d.inspect_container(&rig.name, None).await.unwrap();
    let hc = c.host_config.unwrap();
    assert_eq!(hc.network_mode.as_deref(), Some("host"));
    assert_eq!(hc.init, Some(true));
    let policy = hc
        .restart_policy
        .clone()
        .and_then(|p| p.name)
        .map(|n| n.to_string())
        .unwrap_or_default();
    assert!(
        policy.is_empty() || policy == "no",
        "no restart policy: {policy}"
    );
    assert!(hc.cap_add.clone().unwrap_or_default().is_empty());
    let env = c.config.unwrap().env.unwrap();
    assert!(env.contains(&"ECS_EXTERNAL=true".to_string()));
    assert!(env.contains(&"ECS_LOGFILE=/log/ecs-agent.log".to_string()));
    for var in [
        "ECS_ENABLE_AWSLOGS_EXECUTIONROLE_OVERRIDE=true",
        "ECS_VOLUME_PLUGIN_CAPABILITIES=[\"efsAuth\"]",
        "ECS_EBSTA_SUPPORTED=false",
    ] {
        assert!(env.contains(&var.to_string()), "{var} not in {env:?}");
    }
    let binds = hc.binds.unwrap();
    assert!(binds.iter().any(|b| b.ends_with(":/data")));
    for (rel, inside) in present {
        let want = format!("{}:{inside}", rig.root().join(rel).display());
        assert!(binds.contains(&want), "{want} not in {binds:?}");
    }
    let lsblk = format!(
        "{}:/usr/bin/lsblk",
        rig.root().join("usr/bin/lsblk").display()
    );
    assert!(binds.contains(&lsblk), "{lsblk} not in {binds:?}");
    assert!(
        !binds.iter().any(|b| b.contains("rotatingcreds")),
        "absent optional paths are not bound: {binds:?}"
    );
    rig.stop().await;
}

/// A running container with a matching configuration is adopted as it is (same id, not restarted);
/// a changed env file recreates it.
#[tokio::test(flavor = "multi_thread")]
async fn adopts_a_matching_container_and_recreates_on_config_change() {
    let mut rig = Rig::prepare("adopt", false).await;
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    let (first, running, _) = rig.container().await.unwrap();
    assert!(running);
    rig.stop().await;
    let (still, running, _) = rig.container().await.unwrap();
    assert!(
        running && still == first,
        "stopping the daemon leaves the agent running"
    );

    rig.start();
    let s = rig.wait("adopted", T, |s| s.adoptions == 1).await;
    assert_eq!(s.container_id.as_deref(), Some(first.as_str()));
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    assert_eq!(rig.starts(), 1, "the agent was not restarted");

    let env = rig.root().join("etc/ecs/ecs.config");
    let text = std::fs::read_to_string(&env).unwrap();
    std::fs::write(&env, format!("{text}ECS_LOGLEVEL=debug\n")).unwrap();
    rig.reload();
    let s = rig
        .wait("recreated", T, |s| {
            s.container_id.as_deref().is_some_and(|id| id != first) && s.metadata.is_some()
        })
        .await;
    assert_eq!(rig.starts(), 2);
    let d = docker().await;
    let c = d.inspect_container(&rig.name, None).await.unwrap();
    assert!(c
        .config
        .unwrap()
        .env
        .unwrap()
        .contains(&"ECS_LOGLEVEL=debug".to_string()));
    assert_eq!(c.id, s.container_id);
    rig.stop().await;
}

/// A crash loop backs off with growing delays; once the agent has been healthy for a while the next
/// crash starts from the minimum again.
#[tokio::test(flavor = "multi_thread")]
async fn crash_loop_backs_off_and_resets_after_healthy() {
    let mut rig = Rig::prepare("crash", false).await;
    rig.ctl("fake-crash", "3");
    rig.start();
    let mut delays = Vec::new();
    let mut seen = 0;
    while delays.len() < 4 {
        let s = rig.wait("another restart", T, |s| s.restarts > seen).await;
        seen = s.restarts;
        assert_eq!(s.last_exit_code, Some(3));
        delays.push(s.last_backoff.unwrap());
    }
    // Steps of 200ms, 400ms, 800ms, 1.6s, each jittered into its upper half.
    assert!(delays[3] > delays[0] * 2, "backoff grows: {delays:?}");
    assert!(delays[3] >= Duration::from_millis(800), "{delays:?}");

    rig.unctl("fake-crash");
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // healthy_reset_after = 2s
    let before = rig.current().restarts;
    rig.ctl("fake-exit", "1");
    let s = rig
        .wait("restart after a healthy period", T, |s| s.restarts > before)
        .await;
    assert!(
        s.last_backoff.unwrap() <= Duration::from_millis(200),
        "backoff reset: {:?}",
        s.last_backoff
    );
    rig.stop().await;
}

/// Exit 5 is terminal: the agent stays down, the status says so with its last log lines; a reload
/// retries it.
#[tokio::test(flavor = "multi_thread")]
async fn exit_5_is_terminal_until_reload() {
    let mut rig = Rig::prepare("terminal", false).await;
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.ctl("fake-exit", "5");
    let s = rig.wait_state(State::Terminal, T).await;
    assert_eq!(s.last_exit_code, Some(5));
    assert!(
        s.last_log_lines
            .iter()
            .any(|l| l.contains("exiting with 5")),
        "{:?}",
        s.last_log_lines
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, running, _) = rig.container().await.unwrap();
    assert!(!running, "a terminal agent is not restarted");
    assert_eq!(rig.current().state, State::Terminal);
    assert_eq!(rig.starts(), 1);
    rig.reload();
    rig.wait("answering again", T, |s| s.metadata.is_some())
        .await;
    assert_eq!(rig.starts(), 2);
    rig.stop().await;
}

/// Exit 42 loads the image tarball named in /var/cache/ecs/desired-image and restarts at once with it.
#[tokio::test(flavor = "multi_thread")]
async fn exit_42_loads_the_desired_image_and_restarts() {
    let mut rig = Rig::prepare("upgrade", false).await;
    let d = docker().await;
    let (repo, tag_) = rig.image.rsplit_once(':').unwrap();
    let (repo, tag_) = (repo.to_string(), tag_.to_string());
    let v1 = image_id(&d, &rig.image).await.unwrap();
    // The new agent version, saved under the configured name, then the name put back on v1.
    let v2 = import_image(&d, &repo, &format!("{tag_}-v2"), "v2").await;
    tag(&d, &v2, &repo, &tag_).await;
    std::fs::create_dir_all(rig.root().join("var/cache/ecs")).unwrap();
    save(
        &d,
        &rig.image,
        &rig.root().join("var/cache/ecs/agent-v2.tar"),
    )
    .await;
    tag(&d, &v1, &repo, &tag_).await;
    untag(&d, &format!("{repo}:{tag_}-v2")).await;
    std::fs::write(
        rig.root().join("var/cache/ecs/desired-image"),
        "/var/cache/ecs/agent-v2.tar\n",
    )
    .unwrap();

    rig.start();
    let s = rig.wait("answering", T, |s| s.metadata.is_some()).await;
    assert_eq!(s.image_id.as_deref(), Some(v1.as_str()));
    rig.ctl("fake-exit", "42");
    let s = rig
        .wait("running v2", T, |s| {
            s.metadata
                .as_ref()
                .and_then(|m| m.version.as_deref())
                .is_some_and(|v| v == "fake v2")
        })
        .await;
    assert_eq!(s.image_id.as_deref(), Some(v2.as_str()));
    assert_eq!(s.last_exit_code, Some(42));
    assert!(
        s.last_backoff.is_none(),
        "no backoff before an upgrade restart"
    );
    rig.stop().await;
    untag(&d, &format!("{repo}:{tag_}")).await;
}

/// A missing image is loaded from the tarball; with no tarball the supervisor reports a clear error
/// naming both, and recovers once the tarball appears.
#[tokio::test(flavor = "multi_thread")]
async fn missing_image_is_loaded_from_the_tarball_when_it_appears() {
    let mut rig = Rig::prepare("tarball", false).await;
    let d = docker().await;
    let saved = rig.root().join("saved.tar");
    save(&d, &rig.image, &saved).await;
    untag(&d, &rig.image).await;
    assert!(image_id(&d, &rig.image).await.is_none());

    rig.start();
    let s = rig.wait_state(State::ImageUnavailable, T).await;
    assert!(s.reason.contains(&rig.image), "{}", s.reason);
    assert!(s.reason.contains("agent-image.tar"), "{}", s.reason);
    std::fs::rename(&saved, rig.tarball()).unwrap();
    rig.wait("answering", Duration::from_secs(60), |s| {
        s.metadata.is_some()
    })
    .await;
    assert!(
        image_id(&d, &rig.image).await.is_some(),
        "loaded from the tarball"
    );
    rig.stop().await;
}

/// An agent that was healthy and stops answering introspection is restarted.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_stops_answering_is_restarted() {
    let mut rig = Rig::prepare("silent", false).await;
    rig.start();
    let s = rig.wait("answering", T, |s| s.metadata.is_some()).await;
    let first = s.container_id.unwrap();
    rig.ctl("fake-silent", "1");
    let s = rig
        .wait("restarted", T, |s| {
            s.restarts >= 1 && s.container_id.as_deref() != Some(first.as_str())
        })
        .await;
    assert!(s.restarts >= 1);
    rig.unctl("fake-silent");
    rig.wait("answering again", T, |s| {
        s.metadata.is_some() && s.state == State::Running
    })
    .await;
    rig.stop().await;
}

/// An agent that never answers introspection after it starts is restarted after `start_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_never_answers_is_restarted_after_start_timeout() {
    let mut rig = Rig::prepare("neveranswers", false).await;
    rig.config.ecs_agent.start_timeout = Duration::from_secs(2);
    rig.ctl("fake-silent", "1");
    rig.start();
    let s = rig.wait("restarted", T, |s| s.restarts >= 1).await;
    assert_eq!(s.metadata, None);
    rig.unctl("fake-silent");
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.stop().await;
}

/// `stop_agent_on_exit = true` stops the agent with the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn stop_agent_on_exit_stops_it() {
    let mut rig = Rig::prepare("stoponexit", false).await;
    rig.config.ecs_agent.stop_agent_on_exit = true;
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.stop().await;
    let (_, running, _) = rig.container().await.unwrap();
    assert!(!running);
}

/// Task IAM role rules: present exactly once after several restarts (ecs-init piles up copies), the
/// localhost drop rule beside `route_localnet` (CVE-2020-8558's class), and after clean-up neither the
/// rules nor the sysctl change remain. This test changes the host's iptables (nat PREROUTING/OUTPUT,
/// filter INPUT) and `route_localnet`, and restores what the host had.
#[tokio::test(flavor = "multi_thread")]
async fn iptables_rules_exist_once_and_are_removed_by_cleanup() {
    let fw = offload_agent::ecs_agent::firewall::Firewall::default();
    let localnet = offload_agent::ecs_agent::firewall::ROUTE_LOCALNET;
    let had = std::fs::read_to_string(localnet).unwrap();
    fw.cleanup().unwrap();
    std::fs::write(localnet, "0").unwrap();
    let mut rig = Rig::prepare("iptables", true).await;
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    for i in 0..3 {
        let before = rig.current().restarts;
        rig.ctl("fake-exit", "1");
        rig.wait(&format!("restart {i}"), T, |s| {
            s.restarts > before && s.metadata.is_some()
        })
        .await;
    }
    assert_eq!(fw.count().unwrap(), vec![1, 1, 1, 1]);
    assert_eq!(
        std::fs::read_to_string(offload_agent::ecs_agent::firewall::ROUTE_LOCALNET)
            .unwrap()
            .trim(),
        "1"
    );
    rig.stop().await;
    assert_eq!(offload_agent::ecs_agent::cleanup().unwrap(), 4);
    assert_eq!(fw.count().unwrap(), vec![0, 0, 0, 0]);
    assert_eq!(std::fs::read_to_string(localnet).unwrap().trim(), "0");
    std::fs::write(localnet, had.trim()).unwrap();
}

/// Docker late, then restarting under the supervisor (a private engine with live-restore): the
/// supervisor waits for it without giving up, starts the agent when it comes, and after a restart of
/// the engine reconnects and re-adopts the container it left running.
#[tokio::test(flavor = "multi_thread")]
async fn waits_for_docker_then_reconnects_and_readopts_after_a_restart() {
    let mut engine = PrivateDocker::start().await;
    let mut rig = Rig::prepare_on("dockerd", false, Some(&engine.socket())).await;
    engine.stop();
    rig.start();
    let s = rig.wait_state(State::WaitingForDocker, T).await;
    assert!(s.reason.contains(&engine.socket()), "{}", s.reason);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rig.current().state,
        State::WaitingForDocker,
        "still waiting, not exited"
    );
    assert!(!rig.task.as_ref().unwrap().is_finished());
    engine.start_again().await;
    let s = rig
        .wait("answering", Duration::from_secs(60), |s| {
            s.metadata.is_some()
        })
        .await;
    let first = s.container_id.unwrap();
    engine.restart().await;
    let s = rig
        .wait("re-adopted", Duration::from_secs(60), |s| {
            s.adoptions == 1 && s.metadata.is_some()
        })
        .await;
    assert_eq!(s.container_id.as_deref(), Some(first.as_str()));
    assert_eq!(
        rig.starts(),
        1,
        "the agent kept running through the Docker restart"
    );
    rig.wait_log("ECS agent: adopted the running container", T)
        .await;
    rig.stop().await;
    // The log in its own words: Docker's absence said once (not once per retry), its end with the
    // count; every line a sentence starting with the component.
    let lines = rig.log_lines();
    let all = lines.join("\n");
    let started = lines
        .iter()
        .position(|l| l.contains("ECS agent: started container"))
        .unwrap_or_else(|| panic!("no start line:\n{all}"));
    let warned: Vec<&String> = lines[..started]
        .iter()
        .filter(|l| l.starts_with("WARN"))
        .collect();
    assert_eq!(warned.len(), 1, "Docker's absence said once:\n{all}");
    assert!(
        warned[0].contains("ECS agent: ") && warned[0].contains(&engine.socket()),
        "{all}"
    );
    assert!(
        lines[started].contains("(the problem before, waiting-for-docker: ")
            && lines[started].contains(" times over "),
        "the end of the episode with its count:\n{all}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ECS agent: adopted the running container")),
        "{all}"
    );
    for l in &lines {
        assert!(
            l.contains("ECS agent") && l.split_whitespace().count() >= 4,
            "a line that does not say what it is about: {l:?}\n{all}"
        );
    }
    drop(rig);
    drop(engine);
}

/// While ecs.service (amazon-ecs-init) is active the supervisor refuses to touch the agent and says how
/// to switch over. (No systemd runs here: a stand-in `systemctl` answers "active".)
#[tokio::test(flavor = "multi_thread")]
async fn refuses_while_ecs_init_is_active() {
    let mut rig = Rig::prepare("conflict", false).await;
    let fake = rig.root().join("systemctl");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1 $3\" = \"is-active ecs.service\" ]\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    rig.start_with_systemctl(fake.to_str().unwrap());
    let s = rig.wait_state(State::Conflict, T).await;
    assert!(
        s.reason.contains("systemctl disable --now ecs"),
        "{}",
        s.reason
    );
    assert!(rig.container().await.is_none(), "no container was created");
    rig.stop().await;
}

/// Docker not answering while systemd says docker.service is still starting (a slow engine at boot)
/// is waited for without complaint: state docker-starting, said once at info. When the unit fails
/// instead, it is a problem: waiting-for-docker, one warning. When Docker answers the agent starts,
/// and the end of the episode is said with its count. (No systemd runs here: a stand-in `systemctl`
/// reports docker.service's ActiveState from a file.)
#[tokio::test(flavor = "multi_thread")]
async fn a_docker_still_starting_is_waited_for_at_info_and_a_failed_one_is_a_warning() {
    let mut rig = Rig::prepare("docker-starting", false).await;
    let answering = rig.config.ecs_agent.docker_socket.clone();
    let absent = rig.root().join("no-docker.sock").display().to_string();
    let state = rig.root().join("docker-state");
    std::fs::write(&state, "activating\n").unwrap();
    let fake = rig.root().join("systemctl");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1 $2 $3 $4\" = \"show --property=ActiveState --value docker.service\" ] || exit 3\ncat {}\n",
            state.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    rig.config.ecs_agent.docker_socket = absent.clone();
    rig.start_with_systemctl(fake.to_str().unwrap());
    let s = rig.wait_state(State::DockerStarting, T).await;
    assert!(
        s.reason
            .starts_with("docker.service is still starting: waiting for Docker (")
            && s.reason.contains(&absent),
        "{}",
        s.reason
    );
    rig.wait_log("ECS agent: docker.service is still starting", T)
        .await;
    std::fs::write(&state, "failed\n").unwrap();
    let s = rig.wait_state(State::WaitingForDocker, T).await;
    assert!(s.reason.contains(&absent), "{}", s.reason);
    rig.config.ecs_agent.docker_socket = answering;
    rig.reload();
    rig.wait_log("ECS agent: started container", T).await;
    rig.stop().await;
    let lines = rig.log_lines();
    let all = lines.join("\n");
    let starting: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("is still starting"))
        .collect();
    assert_eq!(starting.len(), 1, "said once, not per retry:\n{all}");
    assert!(starting[0].starts_with("INFO"), "{all}");
    let warned: Vec<&String> = lines.iter().filter(|l| l.starts_with("WARN")).collect();
    assert_eq!(
        warned.len(),
        1,
        "the failed unit is the one problem:\n{all}"
    );
    assert!(warned[0].contains(&absent), "{all}");
}

/// An agent that exits 42 on every start (and whose desired image cannot be read) is restarted with the
/// restart backoff, not in a hot loop.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_always_exits_42_is_restarted_with_backoff() {
    let mut rig = Rig::prepare("always42", false).await;
    rig.ctl("fake-crash", "42");
    rig.start();
    rig.wait("first restart", T, |s| s.restarts >= 1).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = rig.current();
    assert_eq!(s.last_exit_code, Some(42));
    assert!(s.last_backoff.is_some(), "backed off");
    // restart_backoff_min 200ms doubling to 3s: about 6 starts in 6 s; a hot loop makes dozens.
    let starts = rig.starts();
    assert!((2..=9).contains(&starts), "{starts} starts in ~6 s");
    rig.stop().await;
}

/// Exit 0 is a stop on purpose (`docker stop`): the agent stays stopped, the state says why, and a
/// reload starts it again.
#[tokio::test(flavor = "multi_thread")]
async fn exit_0_stays_stopped_until_reload() {
    let mut rig = Rig::prepare("exit0", false).await;
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.ctl("fake-exit", "0");
    let s = rig.wait_state(State::Stopped, T).await;
    assert!(s.reason.contains("exited 0"), "{}", s.reason);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.starts(), 1, "not restarted");
    rig.reload();
    rig.wait("answering again", T, |s| s.metadata.is_some())
        .await;
    assert_eq!(rig.starts(), 2);
    rig.stop().await;
}

/// An ECS client for a local endpoint, with fixed test credentials.
fn ecs_client(endpoint: &str) -> aws_sdk_ecs::Client {
    let conf = aws_sdk_ecs::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_ecs::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "AKIDSTUB", "stub", None, None, "test",
        ))
        .build();
    aws_sdk_ecs::Client::from_conf(conf)
}

/// ECS connectivity, against the local stub (the emulator's DescribeContainerInstances always says
/// connected, so it cannot show this): the registered agent answers introspection but ECS reports it
/// disconnected; past `disconnected_after` the supervisor restarts it (with its backoff), and once
/// ECS reports it connected again there is no further restart.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_ecs_reports_disconnected_is_restarted() {
    let stub = crate::support::ssm_stub::SsmStub::start("mi-unused");
    stub.set_ecs_connected(false);
    let mut rig = Rig::prepare("disconnected", false).await;
    rig.config.ecs_agent.connectivity_interval = Duration::from_millis(500);
    rig.config.ecs_agent.disconnected_after = Duration::from_secs(2);
    rig.start_with_ecs(ecs_client(&stub.endpoint));
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.ctl(
        "fake-arn",
        "arn:aws:ecs:us-east-1:123456789012:container-instance/test/disc",
    );
    let s = rig
        .wait("reported disconnected", T, |s| s.connected == Some(false))
        .await;
    let before = s.restarts;
    rig.wait("restarting for the disconnection", T, |s| {
        s.reason
            .contains("ECS has reported the agent disconnected for")
    })
    .await;
    rig.wait("restarted", T, |s| {
        s.restarts > before && s.state == State::Registered
    })
    .await;
    stub.set_ecs_connected(true);
    let s = rig
        .wait("connected again", T, |s| s.connected == Some(true))
        .await;
    let restarts = s.restarts;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rig.current().restarts,
        restarts,
        "restarted while connected"
    );
    assert!(
        stub.calls()
            .iter()
            .any(|c| c.target.ends_with("DescribeContainerInstances")),
        "ECS was never asked"
    );
    rig.stop().await;
}

/// A running container the way the ECS agent starts a task's (a labelled busybox); its id.
async fn task_container(d: &bollard::Docker, name: &str) -> String {
    let image = format!("offload-test-task:{name}");
    import_rootfs(
        d,
        busybox_rootfs(&[], &["tmp"], &["sh", "sleep"]),
        &image,
        "[\"/bin/sleep\",\"3600\"]",
    )
    .await;
    let body = bollard::models::ContainerCreateBody {
        image: Some(image),
        labels: Some(std::collections::HashMap::from([(
            "com.amazonaws.ecs.task-arn".to_string(),
            format!("arn:aws:ecs:us-east-1:123456789012:task/test/{name}"),
        )])),
        // No bridge on the test engine; a task's network is not the point here.
        host_config: Some(bollard::models::HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = d
        .create_container(
            Some(
                bollard::query_parameters::CreateContainerOptionsBuilder::default()
                    .name(name)
                    .build(),
            ),
            body,
        )
        .await
        .unwrap();
    d.start_container(&c.id, None).await.unwrap();
    c.id
}

async fn remove_forced(d: &bollard::Docker, name: &str) {
    let _ = d
        .remove_container(
            name,
            Some(
                bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .build(),
            ),
        )
        .await;
}

async fn running_id(d: &bollard::Docker, name: &str) -> Option<String> {
    let c = d.inspect_container(name, None).await.ok()?;
    c.state
        .and_then(|s| s.running)
        .unwrap_or(false)
        .then(|| c.id.unwrap_or_default())
}

/// ECS agent updates owned by the supervisor. v1 registered, a task container running → desired v2
/// (healthy) → v2 runs with the same state directory, reported as updated; desired v3 that never
/// answers → rolled back to v2 within `update_timeout`, reported, and not tried again while the
/// configuration asks for it; a tarball with a wrong `sha256` → refused, the v2 container untouched.
/// The task container runs throughout (same id). (The change arrives the way a Parameter Store
/// refresh or SIGHUP hands it over: a new configuration on the supervisor's channel.)
#[tokio::test(flavor = "multi_thread")]
async fn an_update_is_proven_rolled_back_or_refused_and_tasks_keep_running() {
    let d = docker().await;
    let mut rig = Rig::prepare("update", false).await;
    rig.config.ecs_agent.update_timeout = Duration::from_secs(6);
    rig.start();
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.ctl(
        "fake-arn",
        "arn:aws:ecs:us-east-1:123456789012:container-instance/test/upd",
    );
    rig.wait_state(State::Registered, T).await;
    let task_name = format!("offload-test-task-{}", std::process::id());
    remove_forced(&d, &task_name).await;
    let task = task_container(&d, &task_name).await;
    let tag = rig.image.rsplit_once(':').unwrap().1.to_string();

    // v2, healthy: proven.
    import_image(&d, "offload-test-ecs-agent", &format!("{tag}-v2"), "v2").await;
    rig.config.ecs_agent.image = format!("offload-test-ecs-agent:{tag}-v2");
    rig.reload();
    let s = rig.wait_updated("fake v2", T).await;
    assert_eq!(s.updates, 1);
    let v2_container = rig.container().await.unwrap().0;

    // v3 never answers: rolled back to v2, and not tried again.
    let v3 = format!("offload-test-ecs-agent:{tag}-v3");
    import_rootfs(
        &d,
        busybox_rootfs(&[], &["tmp"], &["sh", "sleep"]),
        &v3,
        "[\"/bin/sleep\",\"3600\"]",
    )
    .await;
    rig.config.ecs_agent.image = v3.clone();
    rig.reload();
    let s = rig
        .wait("rolled back", Duration::from_secs(60), |s| s.rollbacks == 1)
        .await;
    let report = s.last_update.clone().unwrap();
    assert!(
        report.starts_with(&format!("rolled back from {v3}"))
            && report.contains(&format!("to offload-test-ecs-agent:{tag}-v2"))
            && report.contains("was not healthy within ecs_agent.update_timeout (6s)"),
        "{report}"
    );
    rig.wait("v2 registered again", T, |s| {
        s.state == State::Registered
            && s.metadata.as_ref().and_then(|m| m.version.as_deref()) == Some("fake v2")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = rig.current();
    assert_eq!((s.rollbacks, s.updates), (1, 1), "{s:#?}");
    assert_eq!(
        s.running_image.as_deref(),
        Some(&*format!("offload-test-ecs-agent:{tag}-v2"))
    );
    assert_eq!(s.desired_image.as_deref(), Some(v3.as_str()));
    let v2_again = rig.container().await.unwrap().0;

    // v4 from a tarball whose digest is wrong: refused, the running v2 untouched.
    let v4 = format!("offload-test-ecs-agent:{tag}-v4");
    import_image(&d, "offload-test-ecs-agent", &format!("{tag}-v4"), "v4").await;
    save(&d, &v4, &rig.tarball()).await;
    untag(&d, &v4).await;
    rig.config.ecs_agent.image = v4.clone();
    rig.config.ecs_agent.image_sha256 = Some("0".repeat(64));
    rig.reload();
    let s = rig.wait("refused", T, |s| s.refusals == 1).await;
    let why = s.last_update.clone().unwrap();
    assert!(
        why.starts_with(&format!("refused the update to {v4}")) && why.contains("not loaded"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.container().await.unwrap().0, v2_again, "v2 was touched");
    assert!(
        image_id(&d, &v4).await.is_none(),
        "the refused tarball was loaded"
    );

    assert_eq!(
        running_id(&d, &task_name).await.as_deref(),
        Some(task.as_str()),
        "the task container stopped"
    );
    assert_ne!(v2_container, "");
    rig.stop().await;
    remove_forced(&d, &task_name).await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A fleet's agent update from S3 (`ecs_agent.image_url`, the emulator's bucket): v1 registered →
/// desired v2 at `s3://…/agents/v2.tar` with its SHA-256 → fetched into `image_tarball`, loaded, proven,
/// reported as updated; desired v3 whose object does not have the configured digest → refused, the
/// running v2 untouched, the host's tarball still v2's and no partial download left; desired v4 whose
/// object is missing → the state names the URL and S3's reason, retried, the running v2 untouched.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_fetched_from_s3_is_verified_before_it_is_loaded() {
    let d = docker().await;
    let w = crate::support::World::new("agent-s3").await;
    let mut rig = Rig::prepare("s3update", false).await;
    rig.start_with_s3(w.clients.s3.clone());
    rig.wait("answering", T, |s| s.metadata.is_some()).await;
    rig.ctl(
        "fake-arn",
        "arn:aws:ecs:us-east-1:123456789012:container-instance/test/s3",
    );
    rig.wait_state(State::Registered, T).await;
    let tag = rig.image.rsplit_once(':').unwrap().1.to_string();
    let dir = tempfile::tempdir().unwrap();
    let url = |key: &str| format!("s3://{}/agents/{key}", w.bucket);
    // An image of version `v` as a tarball in the bucket (not in Docker); its bytes.
    let upload = |v: &'static str| {
        let (d, w, dir, tag) = (d.clone(), &w, dir.path().to_path_buf(), tag.clone());
        async move {
            let name = format!("offload-test-ecs-agent:{tag}-{v}");
            import_image(&d, "offload-test-ecs-agent", &format!("{tag}-{v}"), v).await;
            let tar = dir.join(format!("{v}.tar"));
            save(&d, &name, &tar).await;
            untag(&d, &name).await;
            let bytes = std::fs::read(&tar).unwrap();
            w.put(&format!("agents/{v}.tar"), bytes.clone()).await;
            (name, bytes)
        }
    };
    let part = rig.tarball().with_extension("tar.part");

    // v2, its digest in the configuration: fetched, loaded, proven.
    let (v2, v2_bytes) = upload("v2").await;
    rig.config.ecs_agent.image = v2.clone();
    rig.config.ecs_agent.image_url = Some(url("v2.tar"));
    rig.config.ecs_agent.image_sha256 = Some(sha256_hex(&v2_bytes));
    rig.reload();
    rig.wait_updated("fake v2", T).await;
    rig.wait_log(
        &format!(
            "ECS agent: fetched {} into {} ({} bytes, SHA-256 as configured)",
            url("v2.tar"),
            rig.tarball().display(),
            v2_bytes.len()
        ),
        T,
    )
    .await;
    assert!(std::fs::read(rig.tarball()).unwrap() == v2_bytes);
    assert!(!part.exists());
    let v2_container = rig.container().await.unwrap().0;

    // v3's object is not what the configuration's digest says: refused before it is loaded.
    let (v3, _) = upload("v3").await;
    rig.config.ecs_agent.image = v3.clone();
    rig.config.ecs_agent.image_url = Some(url("v3.tar"));
    rig.config.ecs_agent.image_sha256 = Some("1".repeat(64));
    rig.reload();
    let s = rig.wait("refused", T, |s| s.refusals == 1).await;
    let why = s.last_update.clone().unwrap();
    assert!(
        why.starts_with(&format!("refused the update to {v3}"))
            && why.contains(&format!("{} has SHA-256 ", url("v3.tar")))
            && why.contains("not loaded"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rig.container().await.unwrap().0,
        v2_container,
        "v2 was touched"
    );
    assert!(
        image_id(&d, &v3).await.is_none(),
        "the refused image was loaded"
    );
    assert!(
        std::fs::read(rig.tarball()).unwrap() == v2_bytes,
        "the verified tarball was replaced"
    );
    assert!(!part.exists(), "a partial download was left");

    // v4's object does not exist: said with S3's reason, retried; v2 keeps running.
    let v4 = format!("offload-test-ecs-agent:{tag}-v4");
    rig.config.ecs_agent.image = v4;
    rig.config.ecs_agent.image_url = Some(url("missing.tar"));
    rig.config.ecs_agent.image_sha256 = Some("2".repeat(64));
    rig.reload();
    let s = rig
        .wait("the fetch failing", T, |s| {
            s.state == State::ImageUnavailable
                && s.reason.contains(&format!(
                    "cannot fetch the agent image's tarball {} (ecs_agent.image_url): ",
                    url("missing.tar")
                ))
        })
        .await;
    assert!(
        s.reason.contains("NoSuchKey") || s.reason.contains("not exist"),
        "{}",
        s.reason
    );
    assert_eq!(
        rig.container().await.unwrap().0,
        v2_container,
        "v2 was touched"
    );
    rig.stop().await;
}
