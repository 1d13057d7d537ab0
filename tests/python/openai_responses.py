"""The official openai SDK's Responses API against the gateway (run by the e2e suite).

usage: openai_responses.py BASE_URL

Model `small` is served by an OpenAI-compatible chat provider: the gateway
translates, and keeps the conversation for previous_response_id.
"""
import sys
import time

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="sk-resp-a", max_retries=0, timeout=30)

r = client.responses.create(model="small", instructions="Be brief.", input="Hello from responses")
assert r.object == "response" and r.status == "completed", r
assert r.output_text.startswith("Mock reply to: Hello from responses"), r.output_text
assert r.usage.output_tokens == 12 and r.usage.input_tokens > 0, r.usage
print("create ok:", r.output_text)

parts, final = [], None
with client.responses.stream(model="small", input="Stream from responses") as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            parts.append(event.delta)
    final = stream.get_final_response()
assert "".join(parts).startswith("Mock reply to: Stream from responses"), parts
assert final.status == "completed" and final.output_text == "".join(parts), final
print("stream ok")

tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    }
]
r = client.responses.create(model="small", input="Weather in Oslo?", tools=tools)
call = next(o for o in r.output if o.type == "function_call")
assert call.name == "get_weather", call
# The stored response is written off the request path.
for _ in range(50):
    try:
        client.responses.retrieve(r.id)
        break
    except openai.NotFoundError:
        time.sleep(0.1)
r2 = client.responses.create(
    model="small",
    previous_response_id=r.id,
    tools=tools,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 4 C"}],
)
assert r2.status == "completed" and r2.output_text, r2
print("tools ok:", call.call_id)

for _ in range(50):
    try:
        client.responses.retrieve(r2.id)
        break
    except openai.NotFoundError:
        time.sleep(0.1)
r3 = client.responses.create(model="small", previous_response_id=r2.id, input="Thanks!")
assert r3.output_text.startswith("Mock reply to: Thanks!"), r3.output_text
print("previous ok")

try:
    client.responses.create(model="small", previous_response_id="resp_does_not_exist", input="x")
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
    assert e.code == "previous_response_not_found", e
try:
    client.responses.create(model="no-such-model", input="x")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("errors ok")
