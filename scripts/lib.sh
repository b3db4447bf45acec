# Shared by scripts/test, scripts/demo and scripts/bench: idempotent set-up of what they need.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
MOTO_PID=""

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# A Python virtualenv inside the repository with moto's server and boto3 (which moto brings).
ensure_venv() {
  if [ -x "$VENV/bin/moto_server" ] && "$VENV/bin/python" -c 'import moto, boto3' 2>/dev/null; then
    return
  fi
  log "installing moto[server] into $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    log "python3 -m venv failed; installing python3-venv with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet 'moto[server]>=5,<6'
}

port_open() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.3)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

# Start moto_server on 127.0.0.1:$1 unless something already listens there.
start_moto() {
  local port="$1"
  if port_open "$port"; then
    log "moto already listening on 127.0.0.1:$port"
    return
  fi
  mkdir -p "$REPO_ROOT/target"
  log "starting moto_server on 127.0.0.1:$port (log: target/moto-$port.log)"
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$REPO_ROOT/target/moto-$port.log" 2>&1 &
  MOTO_PID=$!
  wait_port "$port" moto_server "target/moto-$port.log"
}

# Wait up to 20 s for something to listen on 127.0.0.1:$1 ($2 started it; its log is $3).
wait_port() {
  for _ in $(seq 1 100); do
    port_open "$1" && return
    sleep 0.2
  done
  echo "$2 did not start; see $3" >&2
  return 1
}

DOCKERD_PID=""

# Docker engine, busybox-static (the stand-in ECS agent image is built from it) and iptables (task IAM
# role rules); start dockerd unless one answers already.
ensure_docker() {
  if ! command -v dockerd >/dev/null 2>&1 || [ ! -x /bin/busybox ] || ! busybox --list 2>/dev/null | grep -qx httpd \
     || ! command -v iptables >/dev/null 2>&1; then
    log "installing docker.io, busybox-static and iptables with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io busybox-static iptables >/dev/null
  fi
  if timeout 10 docker info >/dev/null 2>&1; then
    log "dockerd already running"
    return
  fi
  mkdir -p "$REPO_ROOT/target"
  log "starting dockerd (log: target/dockerd.log)"
  dockerd >"$REPO_ROOT/target/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 150); do
    timeout 5 docker info >/dev/null 2>&1 && return
    sleep 0.4
  done
  echo "dockerd did not start; see target/dockerd.log" >&2
  return 1
}

# The company proxy of the egress tests: Debian's squid (with basic_ncsa_auth) and openssl for their CA.
ensure_squid() {
  if ! command -v squid >/dev/null 2>&1 || [ ! -x /usr/lib/squid/basic_ncsa_auth ] \
     || ! command -v openssl >/dev/null 2>&1; then
    log "installing squid and openssl with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq squid openssl >/dev/null
  fi
}

stop_docker() {
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
  fi
}

stop_moto() {
  if [ -n "$MOTO_PID" ]; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
    MOTO_PID=""
  fi
}

# Built once per machine, outside the repository: the packaging tools and the booted-systemd image.
CACHE="${OFFLOAD_CACHE:-/var/cache/offload-agent}"
TOOLS="$CACHE/tools"

# cargo-deb (about a minute to build on 2 cores, so cached in $TOOLS), and Debian's rpm (rpmbuild
# makes the .rpm from packaging/rpm/offload-agent.spec; rpm checks its file list and scriptlets).
# cargo-generate-rpm took 6 of a new machine's CI minutes to build; rpmbuild is a package.
ensure_packagers() {
  if [ ! -x "$TOOLS/bin/cargo-deb" ]; then
    log "building cargo-deb into $TOOLS (once per machine)"
    cargo install --locked --root "$TOOLS" cargo-deb
  fi
  if ! command -v rpm >/dev/null 2>&1; then
    log "installing rpm with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rpm >/dev/null
  fi
  export PATH="$TOOLS/bin:$PATH"
}

DYNALITE_PID=""

# dynalite (a DynamoDB implementation on LevelDB, from the npm registry) in $CACHE/dynalite, for the
# benchmarks: unlike moto it keeps connections alive, so CPU per row measures the agent, not the
# emulator's connection handling. node and npm from Debian when missing.
start_dynalite() {
  local port="$1"
  if ! command -v npm >/dev/null 2>&1; then
    log "installing nodejs and npm with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  fi
  if [ ! -x "$CACHE/dynalite/node_modules/.bin/dynalite" ]; then
    log "installing dynalite with npm into $CACHE/dynalite (once per machine)"
    mkdir -p "$CACHE/dynalite"
    npm install --prefix "$CACHE/dynalite" --no-audit --no-fund --loglevel=error dynalite >/dev/null
  fi
  if port_open "$port"; then
    log "something already listens on 127.0.0.1:$port; using it as dynalite"
    return
  fi
  log "starting dynalite on 127.0.0.1:$port (log: target/dynalite-$port.log)"
  "$CACHE/dynalite/node_modules/.bin/dynalite" --host 127.0.0.1 --port "$port" \
    >"$REPO_ROOT/target/dynalite-$port.log" 2>&1 &
  DYNALITE_PID=$!
  wait_port "$port" dynalite "target/dynalite-$port.log"
}

stop_dynalite() {
  if [ -n "$DYNALITE_PID" ]; then
    kill "$DYNALITE_PID" 2>/dev/null || true
    wait "$DYNALITE_PID" 2>/dev/null || true
    DYNALITE_PID=""
  fi
}

SYSTEMD_IMAGE="offload-test-systemd:bookworm"

# A Debian 12 root filesystem with systemd (debootstrap, about 1.5 minutes; the tarball is cached in
# $CACHE), imported into Docker as $SYSTEMD_IMAGE for the booted-host test.
ensure_systemd_image() {
  if docker image inspect "$SYSTEMD_IMAGE" >/dev/null 2>&1; then
    return
  fi
  local tarball="$CACHE/rootfs-bookworm.tar"
  if [ ! -s "$tarball" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
      log "installing debootstrap with apt"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    fi
    local root="$CACHE/rootfs-build"
    rm -rf "$root"
    log "debootstrap: Debian 12 with systemd into $root (once per machine)"
    debootstrap --variant=minbase \
      --include=systemd,systemd-sysv,dbus,iptables,ca-certificates,procps \
      bookworm "$root" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
      || { echo "debootstrap failed; see $CACHE/debootstrap.log" >&2; return 1; }
    rm -f "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  log "importing $tarball as $SYSTEMD_IMAGE"
  docker import "$tarball" "$SYSTEMD_IMAGE" >/dev/null
}

# Vagrant itself (Debian's package, no recommends: no provider), for the test that Vagrant reads
# vagrant/Vagrantfile (`vagrant validate`); rsync for the synced folder that file declares.
ensure_vagrant() {
  local pkgs=""
  command -v vagrant >/dev/null 2>&1 || pkgs="vagrant"
  command -v rsync >/dev/null 2>&1 || pkgs="$pkgs rsync"
  [ -n "$pkgs" ] || return 0
  log "installing $pkgs with apt"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

# The VM test's tools, each package only when its command is missing. A machine may already carry a
# newer qemu-utils than its release (bookworm-backports' 10.x beside bookworm's 7.2); QEMU's packages
# must be one version, so qemu-system-x86 then comes from an archive that has that version: a private
# apt source list with backports, used for this one install and left nowhere in /etc/apt.
install_vm_tools() {
  local pkgs="" pair
  for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils ssh:openssh-client \
              ssh-keygen:openssh-client mkfs.ext4:e2fsprogs; do
    command -v "${pair%%:*}" >/dev/null 2>&1 && continue
    case " $pkgs " in *" ${pair#*:} "*) ;; *) pkgs="$pkgs ${pair#*:}" ;; esac
  done
  [ -n "$pkgs" ] || return 0
  export DEBIAN_FRONTEND=noninteractive
  local have
  have="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
  case " $pkgs " in
    *" qemu-system-x86 "*)
      apt-get update -qq
      local want
      want="$(apt-cache show --no-all-versions qemu-system-x86 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
      if [ -n "$have" ] && [ "$have" != "$want" ]; then
        local apt_dir="$CACHE/apt-qemu" codename
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
        mkdir -p "$apt_dir/lists/partial"
        printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian %s-backports main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
          "$codename" "$codename" "$codename" >"$apt_dir/sources.list"
        local opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
                    -o "Dir::State::Lists=$apt_dir/lists")
        log "qemu-utils $have is installed (the release has $want): installing qemu-system-x86=$have from $codename-backports"
        apt-get "${opts[@]}" update -qq
        # shellcheck disable=SC2086
        apt-get "${opts[@]}" install -y -qq --no-install-recommends -t "$codename-backports" \
          "qemu-system-x86=$have" ${pkgs/qemu-system-x86/} >/dev/null || {
          echo "could not install qemu-system-x86 $have to match the installed qemu-utils $have;" \
               "install a matching QEMU by hand (apt-get install qemu-system-x86 qemu-utils)" >&2
          return 1
        }
        return 0
      fi
      ;;
  esac
  log "installing$pkgs with apt"
  # shellcheck disable=SC2086
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

# The VM test's machine (tests/it/vm.rs): a Debian 12 disk image made with debootstrap (Debian's cloud
# kernel and its initramfs, systemd, openssh-server, docker.io with apparmor, iptables), booted by QEMU
# with the kernel and initramfs given on its command line (no boot loader), and an SSH key for root.
# Cached in $CACHE/vm: made once per machine (about 2 minutes), then reused by every run; made again
# when the package list changes (VM_PACKAGES is kept beside the image).
#
# apparmor is one of docker.io's recommended packages, which `apt-get install docker.io` brings and
# debootstrap does not: Debian's kernel has AppArmor on, and without apparmor_parser Docker cannot
# start a container with its default profile (found when the VM first ran the ECS agent).
VM_DIR="$CACHE/vm"
VM_PACKAGES="linux-image-cloud-amd64,initramfs-tools,systemd,systemd-sysv,dbus,udev,kmod,openssh-server,docker.io,apparmor,iptables,ca-certificates,procps,iproute2"
ensure_vm_image() {
  install_vm_tools || return 1
  if [ -s "$VM_DIR/disk.raw" ] && [ -s "$VM_DIR/vmlinuz" ] && [ -s "$VM_DIR/initrd.img" ] && [ -s "$VM_DIR/id_ed25519" ] \
     && [ "$(cat "$VM_DIR/packages" 2>/dev/null)" = "$VM_PACKAGES" ]; then
    return
  fi
  command -v debootstrap >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  }
  local root="$VM_DIR/root"
  rm -rf "$VM_DIR" && mkdir -p "$root"
  log "debootstrap: a Debian 12 virtual machine (kernel, systemd, sshd, docker.io) into $root (once per machine)"
  debootstrap --variant=minbase \
    --include="$VM_PACKAGES" \
    bookworm "$root" http://deb.debian.org/debian >"$VM_DIR/debootstrap.log" 2>&1 \
    || { echo "debootstrap failed; see $VM_DIR/debootstrap.log" >&2; return 1; }
  ssh-keygen -q -t ed25519 -N '' -f "$VM_DIR/id_ed25519"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$VM_DIR/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
  echo offload-vm > "$root/etc/hostname"
  printf '/dev/vda / ext4 defaults 0 1\n' > "$root/etc/fstab"
  # User-mode networking: DHCP on the one interface (the host is 10.0.2.2).
  mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/system/multi-user.target.wants"
  printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' > "$root/etc/systemd/network/10-user.network"
  ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  printf 'nameserver 10.0.2.3\n' > "$root/etc/resolv.conf"
  # Nothing on the VM's console asks for a password; root logs in with the key only.
  sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin prohibit-password/' "$root/etc/ssh/sshd_config"
  cp "$root"/boot/vmlinuz-* "$VM_DIR/vmlinuz"
  cp "$root"/boot/initrd.img-* "$VM_DIR/initrd.img"
  rm -f "$root"/var/cache/apt/archives/*.deb
  mkfs.ext4 -q -L offload-vm -d "$root" "$VM_DIR/disk.raw.tmp" 4G
  mv "$VM_DIR/disk.raw.tmp" "$VM_DIR/disk.raw"
  rm -rf "$root"
  echo "$VM_PACKAGES" > "$VM_DIR/packages"
}

# A persistent CARGO_TARGET_DIR grows with every run: each change of the sources links new test
# executables beside the old ones, and each clone path leaves incremental state behind (43 GB over a
# few weeks here). Keep the newest executable of each name in every profile's deps/ and drop
# incremental state older than two days; compiled dependencies stay (they are what the cache is for).
prune_target_dir() {
  local dir="$1"
  [ -d "$dir" ] || return 0
  python3 - "$dir" <<'PY'
import glob, os, re, shutil, sys, time
root, freed = sys.argv[1], 0
# root/PROFILE and, for --target builds (the fuzz targets), root/TRIPLE/PROFILE.
for profile in glob.glob(os.path.join(root, "*")) + glob.glob(os.path.join(root, "*", "*")):
    deps = os.path.join(profile, "deps")
    if os.path.isdir(deps):
        newest = {}
        for name in os.listdir(deps):
            path = os.path.join(deps, name)
            m = re.fullmatch(r"([a-z0-9_]+)-[0-9a-f]{16}", name)
            if m and os.path.isfile(path) and os.access(path, os.X_OK):
                newest.setdefault(m.group(1), []).append(path)
        for paths in newest.values():
            paths.sort(key=os.path.getmtime)
            for old in paths[:-1]:
                freed += os.path.getsize(old)
                os.remove(old)
    inc = os.path.join(profile, "incremental")
    if os.path.isdir(inc):
        for name in os.listdir(inc):
            path = os.path.join(inc, name)
            if time.time() - os.path.getmtime(path) > 2 * 86400:
                freed += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                shutil.rmtree(path, ignore_errors=True)
if freed:
    print(f"\033[1m==> pruned {freed / 1e9:.1f} GB of stale test executables and incremental state from {root}\033[0m",
          file=sys.stderr)
PY
}

# valgrind (callgrind: the bench's instructions per row, steady on a shared machine).
ensure_valgrind() {
  if ! command -v valgrind >/dev/null; then
    log "installing valgrind"
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
  fi
}
