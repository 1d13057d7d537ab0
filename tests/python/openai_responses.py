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

# The suite's mock answers 12 words (--words 12), each one output token.
MOCK_WORDS = 12


def wait_stored(response_id):
    """A stored response is written off the request path: wait until the
    gateway has it (5 s at most), or fail saying so."""
    for _ in range(50):
        try:
            return client.responses.retrieve(response_id)
        except openai.NotFoundError:
            time.sleep(0.1)
    raise SystemExit(f"response {response_id} was never stored (still 404 after 5 s)")


r = client.responses.create(model="small", instructions="Be brief.", input="Hello from responses")
assert r.object == "response" and r.status == "completed", r
assert r.output_text.startswith("Mock reply to: Hello from responses"), r.output_text
assert r.usage.output_tokens == MOCK_WORDS and r.usage.input_tokens > 0, r.usage
print("create ok:", r.output_text)

parts, final = [], None
with client.responses.stream(model="small", input="Stream from responses") as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            parts.append(event.delta)
    final = stream.get_final_response()
assert "".join(parts).startswith("Mock reply to: Stream from responses"), parts
assert final.status == "completed" and final.output_text == "".join(parts), final
assert final.usage is not None and final.usage.output_tokens == MOCK_WORDS and final.usage.input_tokens > 0, final.usage
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
wait_stored(r.id)
r2 = client.responses.create(
    model="small",
    previous_response_id=r.id,
    tools=tools,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 4 C"}],
)
assert r2.status == "completed" and r2.output_text, r2
print("tools ok:", call.call_id)

wait_stored(r2.id)
r3 = client.responses.create(model="small", previous_response_id=r2.id, input="Thanks!")
assert r3.output_text.startswith("Mock reply to: Thanks!"), r3.output_text
print("previous ok")

# The conversation r3 answered, newest first, two items a page (the SDK
# follows `after` through the pages): the tool turn, its result, r2's answer
# and the thanks.
wait_stored(r3.id)
items = list(client.responses.input_items.list(r3.id, limit=2))
kinds = [i.type for i in items]
assert kinds == ["message", "message", "function_call_output", "function_call", "message"], kinds
assert items[0].role == "user" and items[0].content[0].text == "Thanks!", items[0]
assert items[1].role == "assistant" and items[1].content[0].text == r2.output_text, items[1]
assert items[2].call_id == call.call_id and items[2].output == "Rain, 4 C", items[2]
assert items[3].call_id == call.call_id and items[3].name == "get_weather", items[3]
assert items[4].content[0].text == "Weather in Oslo?", items[4]
oldest_first = client.responses.input_items.list(r3.id, order="asc", limit=100)
assert [i.id for i in oldest_first.data] == [i.id for i in reversed(items)], oldest_first
assert not oldest_first.has_more
try:
    client.responses.input_items.list("resp_does_not_exist")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "response_not_found", e.body
print("input items ok")

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
