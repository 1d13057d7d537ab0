"""The official anthropic SDK as a real client of the gateway (run by the e2e suite).

usage: anthropic_client.py BASE_URL [CA_FILE]   (the gateway's root: the SDK adds /v1)

Model `claude` is served by an Anthropic provider (passed through), `small`
by an OpenAI-compatible one (translated both ways); the key is `sk-ant-client`.
With CA_FILE (an https BASE_URL) the SDK's httpx client speaks HTTP/2 over
TLS, trusting CA_FILE, and every answer must have come over HTTP/2; the
gateway is then an open one (any key), so the wrong-key check is skipped.
"""
import ssl
import sys

import anthropic
from anthropic import Anthropic

base_url = sys.argv[1]
ca_file = sys.argv[2] if len(sys.argv) > 2 else None
http = None
if ca_file:
    http = anthropic.DefaultHttpxClient(http2=True, verify=ssl.create_default_context(cafile=ca_file))
client = Anthropic(base_url=base_url, api_key="sk-ant-client", max_retries=0, timeout=30, http_client=http)
if ca_file:
    raw = client.messages.with_raw_response.create(
        model="claude", max_tokens=20, messages=[{"role": "user", "content": "Hello over h2"}]
    )
    assert raw.http_response.http_version == "HTTP/2", raw.http_response.http_version
    print("h2 ok")

# messages.create, passed through to the Anthropic provider.
m = client.messages.create(
    model="claude",
    max_tokens=100,
    system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    messages=[{"role": "user", "content": "Hello from the SDK"}],
)
assert m.type == "message" and m.role == "assistant", m
assert m.content[0].type == "text" and m.content[0].text.startswith("Mock reply to: Hello from the SDK"), m
assert m.stop_reason == "end_turn", m
assert m.usage.output_tokens == 12 and m.usage.cache_creation_input_tokens > 0, m.usage
print("create ok:", m.content[0].text)

# messages.stream: the SDK assembles Anthropic's event sequence.
with client.messages.stream(
    model="claude", max_tokens=100, messages=[{"role": "user", "content": "Stream from the SDK"}]
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text.startswith("Mock reply to: Stream from the SDK"), text
assert final.content[0].text == text and final.stop_reason == "end_turn", final
assert final.usage.output_tokens == 12, final.usage
print("stream ok:", text)

# A tool round trip, on a translated (OpenAI-compatible) model, streamed and not.
tools = [
    {
        "name": "get_weather",
        "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]
ask = [{"role": "user", "content": "Weather in Oslo?"}]
m = client.messages.create(model="small", max_tokens=100, tools=tools, messages=ask)
assert m.stop_reason == "tool_use", m
# The provider called the tool alone (`content: null`): no text block.
assert [b.type for b in m.content] == ["tool_use"], m
call = next(b for b in m.content if b.type == "tool_use")
assert call.name == "get_weather" and call.input == {"query": "Weather in Oslo?"}, call
with client.messages.stream(model="small", max_tokens=100, tools=tools, messages=ask) as stream:
    streamed = stream.get_final_message()
assert [b.type for b in streamed.content] == ["tool_use"], streamed
scall = next(b for b in streamed.content if b.type == "tool_use")
assert scall.input == {"query": "Weather in Oslo?"} and streamed.stop_reason == "tool_use", streamed
m2 = client.messages.create(
    model="small",
    max_tokens=100,
    tools=tools,
    messages=ask
    + [
        {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Rain, 4 C"}]},
    ],
)
assert m2.stop_reason == "end_turn" and m2.content[0].type == "text", m2
print("tools ok:", call.id)

# Translated text answers carry Anthropic's usage.
m = client.messages.create(model="small", max_tokens=100, messages=[{"role": "user", "content": "Plain translated"}])
assert m.content[0].text.startswith("Mock reply to: Plain translated"), m
assert m.usage.input_tokens > 0 and m.usage.output_tokens == 12, m.usage
print("translated ok")

# count_tokens.
n = client.messages.count_tokens(model="claude", messages=[{"role": "user", "content": "Count these tokens please"}])
assert n.input_tokens > 0, n
print("count ok:", n.input_tokens)

# The model list, as Claude Code reads it.
models = client.models.list(limit=1000)
ids = [x.id for x in models.data]
assert "claude" in ids and "small" in ids, ids
print("models ok:", ids)

# Errors arrive as the SDK's typed exceptions.
try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except anthropic.NotFoundError as e:
    assert e.status_code == 404 and e.body["error"]["type"] == "not_found_error", e.body
if not ca_file:
    try:
        Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0).messages.create(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
        raise SystemExit("expected AuthenticationError")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401, e
try:
    client.messages.create(
        model="small",
        max_tokens=10,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "x"}],
    )
    raise SystemExit("expected BadRequestError")
except anthropic.BadRequestError as e:
    assert "thinking" in e.body["error"]["message"], e.body
print("errors ok")
