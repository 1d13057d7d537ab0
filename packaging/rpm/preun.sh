# $1 = 0: erase (not upgrade): stop the service.
if [ "$1" = 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now smartllm.service >/dev/null 2>&1 || true
fi
exit 0
