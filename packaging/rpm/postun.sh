# $1 >= 1: an upgrade (the new files are in place): restart a running
# service on the new binary, as the deb does (restart-after-upgrade).
if [ "$1" -ge 1 ] 2>/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    systemctl try-restart smartllm.service >/dev/null 2>&1 || true
fi
exit 0
