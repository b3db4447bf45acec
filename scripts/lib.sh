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
  for _ in $(seq 1 100); do
    port_open "$port" && return
    sleep 0.2
  done
  echo "moto_server did not start; see target/moto-$port.log" >&2
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
