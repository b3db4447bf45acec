# $1: 1 on install, 2 on upgrade. Same steps as the .deb's postinst.
install -d -m 0750 /etc/offload-agent /etc/offload-agent/conf.d
# 0711: searchable, not listable, so that a command processor's account reaches the one file
# handed over to it (it runs as processor.command.user, offload-proc by default, never as root).
install -d -m 0711 /var/lib/offload-agent /var/lib/offload-agent/spool
if ! getent passwd offload-proc >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "offload-agent command processors" offload-proc
fi
chmod 0640 /etc/offload-agent/agent.toml
if [ -d /run/systemd/system ]; then
  systemd-tmpfiles --create offload-agent.conf >/dev/null 2>&1 || true
  systemctl daemon-reload
  systemctl enable offload-agent.service >/dev/null 2>&1
  if problems=$(/usr/bin/offload-agent config check --config /etc/offload-agent/agent.toml 2>&1 >/dev/null); then
    systemctl restart offload-agent.service
  else
    # An upgrade leaves a running daemon running (its version, the configuration it loaded): say so.
    if systemctl is-active --quiet offload-agent.service; then
      echo "offload-agent: installed but not restarted (the running daemon keeps its version and the" \
           "configuration it loaded): /etc/offload-agent/agent.toml does not pass 'offload-agent config check':" >&2
      next="systemctl restart offload-agent"
    else
      echo "offload-agent: enabled but not started: /etc/offload-agent/agent.toml does not pass" \
           "'offload-agent config check':" >&2
      next="systemctl start offload-agent"
    fi
    printf '%s\n' "$problems" >&2
    echo "offload-agent: edit it (a key named above may have been renamed or removed in this version;" \
         "/etc/offload-agent/agent.toml.rpmnew, when your edited file was kept, lists those that exist), then: $next" >&2
  fi
fi
