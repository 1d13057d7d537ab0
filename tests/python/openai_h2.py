"""The official openai SDK over HTTP/2 and TLS (run by the e2e suite).

usage: openai_h2.py BASE_URL CA_FILE

The SDK's httpx client with http2=True (the `h2` package, which `make venv`
installs) trusts CA_FILE; every answer must have come over HTTP/2, and
several streams run at once on the client's one connection.
"""
import asyncio
import ssl
import sys

import openai
from openai import AsyncOpenAI, OpenAI

base_url, ca_file = sys.argv[1], sys.argv[2]
http = openai.DefaultHttpxClient(http2=True, verify=ssl.create_default_context(cafile=ca_file))
client = OpenAI(base_url=base_url, api_key="sk-client-demo", max_retries=0, timeout=30, http_client=http)

raw = client.chat.completions.with_raw_response.create(
    model="small", messages=[{"role": "user", "content": "Hello over h2"}]
)
assert raw.http_response.http_version == "HTTP/2", raw.http_response.http_version
r = raw.parse()
assert r.choices[0].message.content.startswith("Mock reply to: Hello over h2"), r
print("h2 plain ok")

# Streams, several at once on the client's one HTTP/2 connection. The async
# client runs them: httpx's sync HTTP/2 connection is not thread-safe (two
# threads may take stream ids and send their HEADERS out of order, which a
# server must answer with GOAWAY PROTOCOL_ERROR).
actx = ssl.create_default_context(cafile=ca_file)
aclient = AsyncOpenAI(
    base_url=base_url,
    api_key="sk-client-demo",
    max_retries=0,
    timeout=30,
    http_client=openai.DefaultAsyncHttpxClient(http2=True, verify=actx),
)


async def stream(i):
    async with aclient.chat.completions.with_streaming_response.create(
        model="small",
        stream=True,
        messages=[{"role": "user", "content": f"h2 stream {i}"}],
    ) as resp:
        assert resp.http_response.http_version == "HTTP/2", resp.http_response.http_version
        text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
    assert text.startswith(f"Mock reply to: h2 stream {i}"), text
    return text


async def streams():
    try:
        return await asyncio.gather(*(stream(i) for i in range(8)))
    finally:
        await aclient.close()


results = asyncio.run(streams())
assert len(results) == 8, results
print("h2 streams ok")

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
print("h2 error ok")
