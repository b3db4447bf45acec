#!/usr/bin/env bash
# Provision a Debian host (a Vagrant VM, or the booted-systemd test's container) with offload-agent:
# Docker, the .deb, the configuration from environment variables, `offload-agent register` when
# activation values are given, and the service enabled and started. Safe to run again.
#
# Environment (OFFLOAD_*):
#   REGION            AWS region (required)
#   QUEUE, BUCKET, TABLE   the SQS queue, the input bucket, the DynamoDB table (required)
#   DLQ               dead-letter queue (default: QUEUE-dlq)
#   ENDPOINT          an AWS endpoint override (an emulator), optional
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   static keys for the daemon (an emulator's); written to
#                     /etc/offload-agent/credentials (0600). On a hybrid host leave them unset: the SSM
#                     agent's rotating credentials are used.
#   CLUSTER, ACTIVATION_ID, ACTIVATION_CODE    register with SSM and ECS Anywhere (all three, or none)
#   DEB               the package (default: /vagrant/target/packages/offload-agent.deb)
set -euo pipefail
log() { printf '==> %s\n' "$*" >&2; }
need() { [ -n "${!1:-}" ] || { echo "provision.sh: $1 is required" >&2; exit 78; }; }
need OFFLOAD_REGION; need OFFLOAD_QUEUE; need OFFLOAD_BUCKET; need OFFLOAD_TABLE
DEB="${OFFLOAD_DEB:-/vagrant/target/packages/offload-agent.deb}"
[ -f "$DEB" ] || { echo "provision.sh: $DEB not found: run scripts/package on the host first" >&2; exit 66; }
export DEBIAN_FRONTEND=noninteractive

# Docker: installed unless an engine already answers (a host's socket mounted into a test container).
if [ ! -S /var/run/docker.sock ]; then
  log "installing docker.io"
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
  systemctl enable --now docker.service
fi

# Configuration before the package, so that its postinst finds a configuration that passes
# `config check` and starts the service with it.
install -d -m 0750 /etc/offload-agent /etc/offload-agent/conf.d
conf=/etc/offload-agent/conf.d/50-provision.toml
ecs_enabled=false
[ -n "${OFFLOAD_CLUSTER:-}" ] && ecs_enabled=true
{
  echo "# Written by vagrant/provision.sh; later conf.d files override it."
  echo "[aws]"
  echo "region = \"$OFFLOAD_REGION\""
  [ -n "${OFFLOAD_ENDPOINT:-}" ] && echo "endpoint_url = \"$OFFLOAD_ENDPOINT\""
  if [ -n "${OFFLOAD_AWS_ACCESS_KEY_ID:-}" ]; then
    echo "credentials_file = \"/etc/offload-agent/credentials\""
  fi
  echo "[queue]"
  echo "name = \"$OFFLOAD_QUEUE\""
  echo "dead_letter_queue = \"${OFFLOAD_DLQ:-$OFFLOAD_QUEUE-dlq}\""
  echo "[ecs_agent]"
  echo "enabled = $ecs_enabled"
  echo "[[pipeline]]"
  echo "name = \"orders\""
  echo "bucket = \"$OFFLOAD_BUCKET\""
  echo "prefix = \"input/\""
  echo "suffix = \".csv\""
  echo "processor = \"orders-csv\""
  echo "table = \"$OFFLOAD_TABLE\""
  echo "output_prefix = \"output/\""
} > "$conf.tmp"
chmod 0640 "$conf.tmp"
mv "$conf.tmp" "$conf"
if [ -n "${OFFLOAD_AWS_ACCESS_KEY_ID:-}" ]; then
  umask 077
  printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
    "$OFFLOAD_AWS_ACCESS_KEY_ID" "${OFFLOAD_AWS_SECRET_ACCESS_KEY:-}" > /etc/offload-agent/credentials
  umask 022
fi

log "installing $DEB"
apt-get install -y -qq "$DEB" >/dev/null

if [ -n "${OFFLOAD_ACTIVATION_ID:-}" ]; then
  need OFFLOAD_CLUSTER; need OFFLOAD_ACTIVATION_CODE
  code=$(mktemp)
  printf '%s' "$OFFLOAD_ACTIVATION_CODE" > "$code"
  log "registering with SSM and ECS Anywhere (cluster $OFFLOAD_CLUSTER)"
  status=0
  offload-agent register --region "$OFFLOAD_REGION" --cluster "$OFFLOAD_CLUSTER" \
    --activation-id "$OFFLOAD_ACTIVATION_ID" --activation-code-file "$code" || status=$?
  rm -f "$code"
  [ "$status" = 0 ] || exit "$status"
fi

systemctl enable offload-agent.service >/dev/null 2>&1
systemctl restart offload-agent.service
# The configuration written above is in the page cache until the kernel writes it back (30 s or
# more): a power cut soon after provisioning would boot the package's defaults. Flush it now.
sync
systemctl is-active offload-agent.service
