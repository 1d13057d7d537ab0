install -d -o smartllm -g smartllm -m 0750 /var/lib/smartllm
chown root:smartllm /etc/smartllm /etc/default/smartllm /etc/smartllm/*
chmod 0750 /etc/smartllm
chmod 0640 /etc/default/smartllm
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
exit 0
