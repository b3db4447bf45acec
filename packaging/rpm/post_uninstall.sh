# $1: 0 on removal (rpm has no purge: the state goes with the package), 1 on upgrade.
if [ "$1" -eq 0 ]; then
  rm -rf /var/lib/offload-agent
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
