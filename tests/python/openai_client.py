"""The official openai SDK as a real client of the gateway (run by the e2e suite).

usage: openai_client.py BASE_URL
"""
import sys

import openai
from openai import OpenAI

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-client-demo", max_retries=0, timeout=30)

# Plain chat completion.
r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hello from the SDK"}])
assert r.object == "chat.completion", r
assert r.choices[0].message.content.startswith("Mock reply to: Hello from the SDK"), r
assert r.usage.total_tokens > 0, r
print("plain ok:", r.choices[0].message.content)

# Streamed chat completion, with the usage chunk requested.
parts, usage = [], None
stream = client.chat.completions.create(
    model="small",
    stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Stream from the SDK"}],
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
text = "".join(parts)
assert text.startswith("Mock reply to: Stream from the SDK"), text
assert usage is not None and usage.completion_tokens > 0, usage
print("stream ok:", text)

# An Anthropic model through the same client, streamed.
parts = []
for chunk in client.chat.completions.create(model="claude", stream=True, messages=[{"role": "user", "content": "Hi Claude"}]):
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
assert "".join(parts).startswith("Mock reply to: Hi Claude"), parts
print("anthropic ok")

# Errors surface as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e
print("error ok")

models = [m.id for m in client.models.list()]
assert "small" in models and "auto" in models, models
print("models ok:", models)
