getent group smartllm >/dev/null || groupadd --system smartllm
getent passwd smartllm >/dev/null || useradd --system --gid smartllm \
    --home-dir /var/lib/smartllm --no-create-home --shell /sbin/nologin \
    --comment "SmartLLM Router" smartllm
exit 0
