# $1: 0 on removal, 1 on upgrade. Stop and disable only on removal.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
  systemctl disable --now offload-agent.service >/dev/null 2>&1 || true
fi
