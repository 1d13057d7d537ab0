install -d -o smartllm -g smartllm -m 0750 /var/lib/smartllm
chown -h root:smartllm /etc/smartllm /etc/smartllm/*
chmod 0750 /etc/smartllm
# An operator may have removed it (the unit reads it only if present).
if [ -e /etc/default/smartllm ]; then
    chown root:smartllm /etc/default/smartllm
    chmod 0640 /etc/default/smartllm
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
exit 0
