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

# An Anthropic model through the same client, streamed, with the usage chunk
# (translated from Anthropic's message_start / message_delta). The suite's
# mock answers 12 words (its default --words), each one output token.
MOCK_WORDS = 12
parts, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model="claude",
    stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Hi Claude"}],
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason is not None:
            finish = c.finish_reason
assert "".join(parts).startswith("Mock reply to: Hi Claude"), parts
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == MOCK_WORDS and usage.prompt_tokens > 0, usage
print("anthropic ok")

# Errors surface as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e
print("error ok")

# With the cache on (the suite's gateway enables it), a repeated streamed
# question is replayed from the cache and still parses as a stream.
if len(sys.argv) > 2 and sys.argv[2] == "--cache":
    question = [{"role": "user", "content": "Which planet is the largest?"}]
    first = client.chat.completions.create(model="small", messages=question)
    import time
    for _ in range(50):
        raw = client.chat.completions.with_raw_response.create(model="small", stream=True, messages=question)
        if raw.headers.get("x-smartllm-cache") == "hit-exact":
            break
        time.sleep(0.1)
    else:
        raise SystemExit("no cache hit for the repeated question")
    parts = []
    for chunk in raw.parse():
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
    assert "".join(parts) == first.choices[0].message.content, (parts, first)
    print("cache stream ok")

models = [m.id for m in client.models.list()]
assert "small" in models and "auto" in models, models
print("models ok:", models)
