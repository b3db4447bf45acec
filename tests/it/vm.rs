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

use crate::support::{free_port, order_ids, orders_csv, repo, Options, World};

const SETUP: &str = "run the tests with `scripts/test` (it installs qemu-system-x86 and makes the \
                     VM's disk image with debootstrap, cached in /var/cache/offload-agent/vm)";

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

async fn wait_s3(w: &World, key: &str, vm: &Vm, timeout: Duration) {
    w.wait_for_with(key, timeout, || vm.tail()).await;
}

/// The laptop VM's life: `provision.sh` from nothing (the synced folder copied to /vagrant) → the
/// unit active and a file processed, `status` saying so; then a Docker slow at boot (its start
/// delayed two minutes by a drop-in) and a power cut (QEMU killed) in the middle of a 3,000-row file
/// → after the boot the unit active while Docker is still starting, the file processed exactly once
/// (every id, unchanged ConfirmationIds, one output). The times are printed (`vm:` lines).
#[tokio::test(flavor = "multi_thread")]
async fn a_vagrant_style_vm_provisions_processes_and_survives_a_power_cut() {
    const ROWS: usize = 3_000;
    let w = World::with(
        "vm",
        Options {
            visibility_timeout: "10s",
            ..Options::default()
        },
    )
    .await;
    let began = Instant::now();
    let mut vm = Vm::boot_new();

    // The synced folder, as Vagrant makes it: the repository's package and provisioner at /vagrant.
    let deb = repo().join("target/packages/offload-agent.deb");
    vm.copy(&deb, "/vagrant/target/packages/offload-agent.deb");
    vm.copy(
        &repo().join("vagrant/provision.sh"),
        "/vagrant/vagrant/provision.sh",
    );
    vm.ok("install -d -m 0750 /etc/offload-agent/conf.d && printf '[agent]\\nshutdown_grace = \"5s\"\\n[queue]\\nvisibility_timeout = \"10s\"\\nwait_time = \"1s\"\\nretry_base = \"1s\"\\n' > /etc/offload-agent/conf.d/60-test.toml");
    // From inside, the emulator on this machine's loopback is QEMU's gateway, 10.0.2.2.
    let endpoint = w.endpoint.replace("127.0.0.1", "10.0.2.2");
    let provisioned = Instant::now();
    vm.ok(&format!(
        "cd /vagrant && OFFLOAD_REGION=us-east-1 OFFLOAD_QUEUE={q} OFFLOAD_DLQ={dlq} OFFLOAD_BUCKET={b} \
         OFFLOAD_TABLE={t} OFFLOAD_ENDPOINT={endpoint} OFFLOAD_AWS_ACCESS_KEY_ID=testing \
         OFFLOAD_AWS_SECRET_ACCESS_KEY=testing bash vagrant/provision.sh",
        q = w.queue,
        dlq = w.dlq,
        b = w.bucket,
        t = w.table,
    ));
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

    // Docker slow at boot: two minutes before its daemon starts (flushed, so that the cut below
    // does not take the drop-in with it).
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
