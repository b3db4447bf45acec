//! The laptop VM for real: a virtual machine with its own kernel, systemd, Docker (cgroup v2) and
//! network stack, booted by QEMU from the disk image `scripts/test` makes with debootstrap
//! (`ensure_vm_image` in scripts/lib.sh). User-mode networking only: the emulator on this machine's
//! 127.0.0.1 is 10.0.2.2 from inside, SSH is forwarded to a free port on 127.0.0.1, nothing leaves
//! loopback. The repository reaches the VM as Vagrant's synced folder does (copied to /vagrant) and
//! `vagrant/provision.sh` runs there as Vagrant's shell provisioner runs it (as root, from /vagrant).
//!
//! Each VM boots from a copy-on-write overlay of the cached disk (qcow2), so a power cut (QEMU
//! killed) keeps what the guest had flushed, as a real disk does, and the cached image is never
//! written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::docker::{docker, save, test_image, untag};
use crate::support::ssm_stub::SsmStub;
use crate::support::{
    cluster_with_instance, free_port, order_ids, orders_csv, repo, unique, Options, World,
};

const SETUP: &str = "run the tests with `scripts/test` (it installs qemu-system-x86 and makes the \
                     VM's disk image with debootstrap, cached in /var/cache/offload-agent/vm)";

/// What identifies each of the supervisor's task-role rules in `iptables-save` (src/ecs_agent/firewall.rs).
const FIREWALL_MARKERS: [&str; 4] = [
    "--to-destination 127.0.0.1:51679",
    "--to-ports 51679",
    "--dport 51678",
    "--ctstate RELATED,ESTABLISHED,DNAT",
];

const INSTANCE: &str = "mi-0a1b2c3d4e5f60718";
const CODE: &str = "VM-ACTIVATION-CODE-31c7";
const HOST_KEY: &str = "AKIAVMHOSTCREDS";

/// Stand-in for `amazon-ssm-agent -register -y -code CODE -id ID -region REGION` in the VM: records the
/// call (the code masked), refuses a wrong code, then writes what the real agent writes once
/// registered: the registration, the host's credentials and identity_config.json naming them with
/// the times of a fresh rotation.
fn ssm_agent_script() -> String {
    format!(
        r#"#!/bin/sh
echo "$@" | sed 's/-code [^ ]*/-code <seen>/' >> /root/ssm-agent-calls
[ "$4" = "{CODE}" ] || {{ echo "wrong activation code" >&2; exit 1; }}
ssm=/var/lib/amazon/ssm
mkdir -p $ssm/runtimeconfig /root/.aws
printf '{{"ManagedInstanceID":"{INSTANCE}","Region":"us-east-1"}}' > $ssm/registration
printf '[default]\naws_access_key_id = {HOST_KEY}\naws_secret_access_key = vm-host-secret\n' > /root/.aws/credentials
printf '{{"ShareFile":"/root/.aws/credentials","ShareProfile":"","CredentialsRetrievedAt":"%s","CredentialsExpiresAt":"%s"}}' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)" > $ssm/runtimeconfig/identity_config.json
"#
    )
}

/// The stand-in SSM agent's service: `register` enables and starts it as it does the real one.
const SSM_AGENT_UNIT: &str =
    "[Unit]\nDescription=Stand-in for the Amazon SSM agent (tests/it/vm.rs)\n\
[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

fn cache() -> PathBuf {
    PathBuf::from(
        std::env::var("OFFLOAD_CACHE").unwrap_or_else(|_| "/var/cache/offload-agent".into()),
    )
    .join("vm")
}

/// One virtual machine: its overlay disk, its console log and, while it runs, QEMU.
struct Vm {
    dir: tempfile::TempDir,
    port: u16,
    qemu: Option<Child>,
}

impl Vm {
    /// A new machine on an overlay of the cached disk, booted and answering SSH.
    fn boot_new() -> Vm {
        let base = cache().join("disk.raw");
        for f in ["disk.raw", "vmlinuz", "initrd.img", "id_ed25519"] {
            let p = cache().join(f);
            assert!(p.exists(), "{} is missing: {SETUP}", p.display());
        }
        let dir = tempfile::Builder::new().prefix("oa-vm").tempdir().unwrap();
        let overlay = dir.path().join("disk.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay)
            .output()
            .unwrap_or_else(|e| panic!("qemu-img ({e}): {SETUP}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut vm = Vm {
            dir,
            port: free_port(),
            qemu: None,
        };
        vm.boot();
        vm
    }

    fn console(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    /// Start QEMU on the overlay and wait for SSH. TCG: on these machines /dev/kvm exists but a
    /// guest kernel does not run under it (`OFFLOAD_TEST_VM_ACCEL=kvm` where it does).
    fn boot(&mut self) {
        let accel = std::env::var("OFFLOAD_TEST_VM_ACCEL").unwrap_or_else(|_| "tcg".into());
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", &accel, "-cpu", "max", "-smp", "2",
            ])
            .args(["-m", "2048", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(cache().join("vmlinuz"))
            .arg("-initrd")
            .arg(cache().join("initrd.img"))
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.unified_cgroup_hierarchy=1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                self.dir.path().join("disk.qcow2").display()
            ))
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:22", self.port),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", self.console().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-system-x86_64 ({e}): {SETUP}"));
        self.qemu = Some(child);
        self.wait("SSH answering", Duration::from_secs(240), |vm| {
            vm.sh("true").0 == 0
        });
        eprintln!("vm: booted to SSH in {:?}", started.elapsed());
    }

    /// The power cut: QEMU killed, nothing inside told.
    fn power_cut(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ssh_command(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
        ])
        .arg("-i")
        .arg(cache().join("id_ed25519"))
        .args(["-p", &self.port.to_string(), "root@127.0.0.1"]);
        c
    }

    fn sh(&self, script: &str) -> (i32, String) {
        let out = self
            .ssh_command()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ok(&self, script: &str) -> String {
        let (code, out) = self.sh(script);
        assert_eq!(code, 0, "{script}: {out}\n{}", self.tail());
        out
    }

    /// Copy a local file to `to` inside (through SSH: no scp needed on either side).
    fn copy(&self, from: &Path, to: &str) {
        let data = std::fs::File::open(from)
            .unwrap_or_else(|e| panic!("{}: {e}: {SETUP}", from.display()));
        let out = self
            .ssh_command()
            .arg(format!("mkdir -p \"$(dirname {to})\" && cat > {to}"))
            .stdin(data)
            .output()
            .unwrap();
        assert!(out.status.success(), "copy {}: {:?}", from.display(), out);
    }

    /// Write `text` to `to` inside with `mode` (a stand-in program, a unit file).
    fn write(&self, to: &str, text: &str, mode: &str) {
        let mut cmd = self.ssh_command();
        cmd.arg(format!(
            "mkdir -p \"$(dirname {to})\" && cat > {to} && chmod {mode} {to}"
        ));
        crate::support::feed(cmd, text, &format!("write {to}"));
    }

    /// How many times each of the task-role network rules is in the VM's kernel (`iptables-save`).
    fn firewall_rules(&self) -> Vec<usize> {
        let rules = self.ok("iptables-save");
        FIREWALL_MARKERS
            .iter()
            .map(|m| rules.lines().filter(|l| l.contains(m)).count())
            .collect()
    }

    fn agent_starts(&self) -> usize {
        self.ok("cat /var/lib/ecs/fake-starts 2>/dev/null || true")
            .lines()
            .count()
    }

    fn unit(&self, unit: &str) -> String {
        self.sh(&format!("systemctl show -p ActiveState --value {unit}"))
            .1
            .trim()
            .to_string()
    }

    /// The unit's journal and the console's last lines, for a failure's message.
    fn tail(&self) -> String {
        let journal = self
            .sh("journalctl -u offload-agent --no-pager -o cat | tail -40")
            .1;
        let console = std::fs::read_to_string(self.console()).unwrap_or_default();
        let console: Vec<&str> = console.lines().rev().take(20).collect();
        format!(
            "journal:\n{journal}\nconsole (last lines, newest first):\n{}",
            console.join("\n")
        )
    }

    fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Vm) -> bool) {
        let start = Instant::now();
        while !f(self) {
            if start.elapsed() > timeout {
                panic!("{what}: not within {timeout:?}\n{}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// `offload-agent status` says the supervised agent is registered.
fn registered(vm: &Vm) -> bool {
    vm.sh("offload-agent status")
        .1
        .contains("ECS agent:    registered")
}

fn route_localnet(vm: &Vm) -> String {
    vm.ok("sysctl -n net.ipv4.conf.all.route_localnet")
        .trim()
        .to_string()
}

async fn wait_s3(w: &World, key: &str, vm: &Vm, timeout: Duration) {
    w.wait_for_with(key, timeout, || vm.tail()).await;
}

/// The command pipeline [`command_in_its_own_cgroup`] adds (also in the world's configuration, so that
/// `provision` sends the bucket's `hog/` events to the queue).
const HOG_PIPELINE: &str =
    "[[pipeline]]\nname = \"hog\"\nbucket = \"{bucket}\"\nprefix = \"hog/\"\n\
     output_prefix = \"hog-out/\"\n[pipeline.processor.command]\nprogram = \"/usr/local/bin/hog\"\n\
     args = [\"{input}\", \"{output_dir}\"]\nmemory = \"64m\"\npermanent_exit_codes = [137]\n";

/// A command pipeline under the packaged unit on a cgroup v2 kernel: the daemon in its own leaf of the
/// service's delegated cgroup, the program as offload-proc in a cgroup of its own (`run-<n>`), and a
/// program that allocates past its 64 MiB `memory` killed by the kernel's OOM killer and reported out
/// of memory, naming the limit and the cgroup; no command's cgroup left behind.
async fn command_in_its_own_cgroup(w: &World, vm: &Vm) {
    const SERVICE: &str = "/sys/fs/cgroup/system.slice/offload-agent.service";
    vm.write(
        "/usr/local/bin/hog",
        "#!/bin/sh\ncat /proc/self/cgroup > \"$2/cgroup.txt\"\nid -un > \"$2/user.txt\"\n\
         if grep -q hog \"$1\"; then dd if=/dev/zero of=/dev/null bs=200M count=1 2>&1; fi\n",
        "0755",
    );
    // Appended to provision.sh's file, after its [[pipeline]]: a drop-in's list would replace it.
    vm.write(
        "/root/hog.toml",
        &HOG_PIPELINE.replace("{bucket}", &w.bucket),
        "0600",
    );
    vm.ok("cat /root/hog.toml >> /etc/offload-agent/conf.d/50-provision.toml && systemctl restart offload-agent");
    assert_eq!(vm.unit("offload-agent"), "active");
    let own = vm.ok("cat /proc/$(systemctl show -p MainPID --value offload-agent)/cgroup");
    assert_eq!(
        own.trim(),
        "0::/system.slice/offload-agent.service/daemon",
        "the daemon in its own leaf"
    );
    let journal = vm.ok("journalctl -u offload-agent -b --no-pager -o cat");
    assert!(
        journal.contains("each command runs in a cgroup of its own under"),
        "{journal}"
    );
    // systemd runs ExecReload= beside the daemon's leaf, not in the service's cgroup (which holds no
    // process once its controllers are enabled below it).
    vm.ok("systemctl reload offload-agent");
    assert_eq!(vm.unit("offload-agent"), "active");
    w.put("hog/fine.txt", "fine\n").await;
    wait_s3(w, "hog-out/fine.txt/user.txt", vm, Duration::from_secs(60)).await;
    let user = w.get("hog-out/fine.txt/user.txt").await.unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&user), "offload-proc\n");
    let cgroup = w
        .get("hog-out/fine.txt/cgroup.txt")
        .await
        .unwrap_or_default();
    let cgroup = String::from_utf8_lossy(&cgroup);
    assert!(
        cgroup.starts_with("0::/system.slice/offload-agent.service/run-"),
        "the program in a cgroup of its own: {cgroup}"
    );
    w.put("hog/big.txt", "hog\n").await;
    let said = "was killed for exceeding its memory limit of 64 MiB (the kernel's, cgroup \
                /sys/fs/cgroup/system.slice/offload-agent.service/run-";
    vm.wait(
        "the hog reported out of memory",
        Duration::from_secs(60),
        |vm| {
            vm.ok("journalctl -u offload-agent -b --no-pager -o cat")
                .contains(said)
        },
    );
    vm.wait("no command cgroup left", Duration::from_secs(10), |vm| {
        !vm.ok(&format!("ls {SERVICE}")).contains("run-")
    });
    let oom = vm.ok("journalctl -k -b --no-pager -o cat");
    assert!(
        oom.contains("Memory cgroup out of memory") || oom.contains("oom-kill"),
        "the kernel's OOM killer did it:\n{oom}"
    );
    // Failed for good (137 is permanent here): its message in the dead-letter queue with the reason,
    // taken out so that the scenario's accounting below starts from empty queues.
    let dead = w.drain_dlq().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].0.contains("big.txt") && dead[0].1.contains(said),
        "{dead:?}"
    );
}

/// The laptop VM's life: `provision.sh` from nothing (the synced folder copied to /vagrant) with the
/// activation's values → `register` with the stand-ins (an `amazon-ssm-agent` script and unit, the
/// stand-in ECS agent image loaded from its tarball; the SSM stub on this machine's loopback answers
/// the two SSM APIs moto lacks) → the SSM agent registered once, the instance online, the container
/// instance ACTIVE, the unit active and a file processed, `status` saying so, the task-role rules in
/// the VM's kernel once each. Then a Docker slow at boot (its start delayed two minutes by a drop-in)
/// and a power cut (QEMU killed) in the middle of a 3,000-row file → after the boot the unit active
/// while Docker is still starting, the file processed exactly once (every id, unchanged
/// ConfirmationIds, one output); once Docker is up the agent started once more and registered, the
/// rules there once each, and nothing at warning or above in the boot's journal. The times are
/// printed (`vm:` lines).
#[tokio::test(flavor = "multi_thread")]
async fn a_vagrant_style_vm_provisions_processes_and_survives_a_power_cut() {
    const ROWS: usize = 3_000;
    let w = World::with(
        "vm",
        Options {
            visibility_timeout: "10s",
            extra: HOG_PIPELINE.to_string(),
            ..Options::default()
        },
    )
    .await;
    let began = Instant::now();
    // The hybrid host's other side, on this machine's loopback (10.0.2.2 from inside): the SSM stub for
    // the two APIs moto lacks, and a cluster with the container instance the stand-in agent reports.
    let stub = SsmStub::start(INSTANCE);
    let cluster = format!("c-{}", w.queue);
    let (ecs, arn) = cluster_with_instance(&w.endpoint, &cluster).await;
    // The stand-in ECS agent image, as the tarball the supervisor loads (no registry in the VM).
    let d = docker().await;
    let image = test_image(&d, &unique("vm")).await;
    let mut vm = Vm::boot_new();
    let tarball = vm.dir.path().join("ecs-agent.tar");
    save(&d, &image, &tarball).await;
    untag(&d, &image).await;

    // The synced folder, as Vagrant makes it: the repository's package and provisioner at /vagrant.
    let deb = repo().join("target/packages/offload-agent.deb");
    vm.copy(&deb, "/vagrant/target/packages/offload-agent.deb");
    vm.copy(
        &repo().join("vagrant/provision.sh"),
        "/vagrant/vagrant/provision.sh",
    );
    // What the activation brings to a real host: the SSM agent (stand-in) and its unit; the agent
    // image's tarball; the ARN the stand-in agent reports once it runs with ECS_CLUSTER.
    vm.copy(&tarball, "/var/cache/ecs/ecs-agent.tar");
    vm.write("/usr/bin/amazon-ssm-agent", &ssm_agent_script(), "0755");
    vm.write(
        "/etc/systemd/system/amazon-ssm-agent.service",
        SSM_AGENT_UNIT,
        "0644",
    );
    vm.write("/var/lib/ecs/fake-arn", &arn, "0644");
    vm.ok("systemctl daemon-reload");
    // From inside, this machine's loopback is QEMU's gateway, 10.0.2.2.
    let inside = |url: &str| url.replace("127.0.0.1", "10.0.2.2");
    vm.write(
        "/etc/offload-agent/conf.d/60-test.toml",
        &format!(
            "[agent]\nshutdown_grace = \"5s\"\n[queue]\nvisibility_timeout = \"10s\"\nwait_time = \"1s\"\n\
             retry_base = \"1s\"\n[aws.endpoints]\nssm = \"{ssm}\"\n[ecs_agent]\nimage = \"{image}\"\n\
             allow_pull = false\n",
            ssm = inside(&stub.endpoint),
        ),
        "0640",
    );
    let endpoint = inside(&w.endpoint);
    let provisioned = Instant::now();
    let said = vm.ok(&format!(
        "cd /vagrant && OFFLOAD_REGION=us-east-1 OFFLOAD_QUEUE={q} OFFLOAD_DLQ={dlq} OFFLOAD_BUCKET={b} \
         OFFLOAD_TABLE={t} OFFLOAD_ENDPOINT={endpoint} OFFLOAD_AWS_ACCESS_KEY_ID=testing \
         OFFLOAD_AWS_SECRET_ACCESS_KEY=testing OFFLOAD_CLUSTER={cluster} OFFLOAD_ACTIVATION_ID=act-vm \
         OFFLOAD_ACTIVATION_CODE={CODE} bash vagrant/provision.sh 2>&1",
        q = w.queue,
        dlq = w.dlq,
        b = w.bucket,
        t = w.table,
    ));
    eprintln!(
        "vm: provision.sh with register in {:?}",
        provisioned.elapsed()
    );
    // Registered: the SSM agent once, the instance online per the stub (asked with the host's own
    // key, which the stand-in published), the container instance ACTIVE in the emulator.
    assert!(
        said.contains(&format!("container instance: {arn}")),
        "{said}"
    );
    assert!(
        !said.contains(CODE),
        "the activation code in the output: {said}"
    );
    assert_eq!(
        vm.ok("cat /root/ssm-agent-calls").lines().count(),
        1,
        "the SSM agent registered once"
    );
    assert_eq!(vm.unit("amazon-ssm-agent"), "active");
    assert!(
        stub.calls()
            .iter()
            .any(|c| c.target.ends_with("DescribeInstanceInformation")
                && c.access_key_id == HOST_KEY),
        "{:?}",
        stub.calls()
    );
    let described = ecs
        .describe_container_instances()
        .cluster(&cluster)
        .container_instances(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(described.container_instances()[0].status(), Some("ACTIVE"));
    assert_eq!(vm.unit("offload-agent"), "active");
    assert_eq!(vm.unit("docker"), "active", "the VM's own Docker");
    w.put("input/vm-1.csv", orders_csv(0, 200)).await;
    wait_s3(&w, "output/vm-1.csv", &vm, Duration::from_secs(120)).await;
    let journal = vm.ok("journalctl -u offload-agent --no-pager -o cat");
    let said = format!(
        "processed s3://{b}/input/vm-1.csv: 200 rows written, 0 rejected, output s3://{b}/output/vm-1.csv in ",
        b = w.bucket
    );
    assert!(
        journal.contains(&said),
        "the journal in its own words:\n{journal}"
    );
    eprintln!(
        "vm: provision.sh to a processed file in {:?} ({:?} from nothing)",
        provisioned.elapsed(),
        began.elapsed()
    );
    vm.wait("status counts the file", Duration::from_secs(30), |vm| {
        vm.sh("offload-agent status").1.contains(", 1 files done,")
    });
    let cgroup = vm.ok("stat -fc %T /sys/fs/cgroup");
    assert_eq!(cgroup.trim(), "cgroup2fs", "the VM's own kernel, cgroup v2");
    // The supervised agent, and its task-role rules in the VM's own kernel, once each.
    vm.wait(
        "status shows the agent registered",
        Duration::from_secs(120),
        registered,
    );
    assert_eq!(vm.firewall_rules(), [1; 4], "{}", vm.ok("iptables-save"));
    assert_eq!(route_localnet(&vm), "1");
    command_in_its_own_cgroup(&w, &vm).await;
    let starts = vm.agent_starts();

    // Docker slow at boot: two minutes before its daemon starts (flushed with the agent's start
    // count, so that the cut below takes neither with it).
    vm.ok("mkdir -p /etc/systemd/system/docker.service.d && printf '[Service]\\nExecStartPre=/bin/sleep 120\\n' > /etc/systemd/system/docker.service.d/slow.conf && systemctl daemon-reload && sync");

    // A power cut in the middle of a file, then a boot.
    w.put("input/vm-2.csv", orders_csv(10_000, ROWS)).await;
    let start = Instant::now();
    while w.items().await.len() <= 200 + 25 {
        assert!(start.elapsed() < Duration::from_secs(120), "{}", vm.tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    vm.power_cut();
    let cut = Instant::now();
    vm.boot();
    vm.wait(
        "the unit active after the boot",
        Duration::from_secs(120),
        |vm| vm.unit("offload-agent") == "active",
    );
    wait_s3(&w, "output/vm-2.csv", &vm, Duration::from_secs(180)).await;
    eprintln!("vm: power cut to the file processed in {:?}", cut.elapsed());
    assert_eq!(
        vm.unit("docker"),
        "activating",
        "the file was processed while Docker was still starting"
    );
    // This boot's daemon processed it (the spool's leftovers may or may not have reached the disk
    // before the cut: unlike the booted container's, this kernel's page cache died with it).
    let journal = vm.ok("journalctl -u offload-agent -b --no-pager -o cat");
    let processed = format!(
        "processed s3://{}/input/vm-2.csv: {ROWS} rows written",
        w.bucket
    );
    assert!(journal.contains(&processed), "{journal}");
    // Docker up at last: the supervisor, which waited for it on its own, starts the agent once more,
    // and the task-role rules are in the new kernel once each.
    vm.wait("Docker active", Duration::from_secs(240), |vm| {
        vm.unit("docker") == "active"
    });
    vm.wait(
        "the agent registered again after the boot",
        Duration::from_secs(180),
        registered,
    );
    eprintln!(
        "vm: power cut to the ECS agent registered in {:?}",
        cut.elapsed()
    );
    assert_eq!(
        vm.agent_starts(),
        starts + 1,
        "the agent started once after the boot"
    );
    assert_eq!(vm.firewall_rules(), [1; 4], "{}", vm.ok("iptables-save"));
    assert_eq!(route_localnet(&vm), "1");
    // Nothing at warning or above in this boot: a slow Docker and a power cut are no problem of ours.
    let problems = vm.ok("journalctl -u offload-agent -b -p warning --no-pager -o cat");
    assert!(problems.trim().is_empty(), "{problems}");
    w.account(
        &[
            ("input/vm-1.csv".to_string(), order_ids(0, 200)),
            ("input/vm-2.csv".to_string(), order_ids(10_000, ROWS)),
        ],
        "output/",
    )
    .await;
    eprintln!("vm: the whole scenario in {:?}", began.elapsed());
}

/// `vagrant validate` on a copy of `vagrant/` (the Vagrantfile and the provisioner it names): the file
/// users run on their laptops is read by Vagrant itself (Debian's `vagrant`; no provider is installed here, so each provider's block is
/// left out with `--ignore-provider`). The same file with a setting Vagrant does not know fails, so a
/// pass means Vagrant read it. Vagrant's state (`.vagrant`, `~/.vagrant.d`) goes to a temporary
/// directory, not the repository.
#[test]
fn vagrant_reads_the_vagrantfile() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |vagrantfile: &str| {
        let project = dir.path().join("repo/vagrant");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(project.join("Vagrantfile"), vagrantfile).unwrap();
        // Vagrant checks that the shell provisioner's script is there.
        std::fs::copy(
            repo().join("vagrant/provision.sh"),
            project.join("provision.sh"),
        )
        .unwrap();
        let out = Command::new("vagrant")
            .args(["validate", "--ignore-provider"])
            .current_dir(&project)
            .env("VAGRANT_HOME", dir.path().join("vagrant.d"))
            .env("VAGRANT_DOTFILE_PATH", dir.path().join("dotfile"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .output()
            .unwrap_or_else(|e| {
                panic!("vagrant ({e}): run the tests with `scripts/test` (it installs vagrant)")
            });
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let ours = std::fs::read_to_string(repo().join("vagrant/Vagrantfile")).unwrap();
    let (ok, said) = validate(&ours);
    assert!(ok, "vagrant validate: {said}");
    assert!(said.contains("validated successfully"), "{said}");
    let broken = ours.replacen(
        "config.vm.hostname",
        "config.vm.no_such_setting = 1\n  config.vm.hostname",
        1,
    );
    assert_ne!(broken, ours);
    let (ok, said) = validate(&broken);
    assert!(!ok, "a setting Vagrant does not know passed: {said}");
    assert!(said.contains("no_such_setting"), "{said}");
}
