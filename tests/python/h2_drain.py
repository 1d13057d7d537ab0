"""An HTTP/2 client across a gateway's drain (run by the e2e suite).

usage: h2_drain.py HOST:PORT GATEWAY_PID

Over cleartext HTTP/2 (prior knowledge) it opens a slow stream, sends the
gateway SIGTERM once the stream's first chunk is in, and then reads frames:
a GOAWAY must come while the stream is still open (so a client opens its
next streams elsewhere), and the stream must still end with [DONE].
Prints "goaway ok" and "stream ok".
"""
import os
import signal
import socket
import sys
import time

import h2.config
import h2.connection

host, port = sys.argv[1].rsplit(":", 1)
pid = int(sys.argv[2])

sock = socket.create_connection((host, int(port)), timeout=20)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
sock.sendall(conn.data_to_send())

body = b'{"model": "small", "stream": true, "messages": [{"role": "user", "content": "drain"}]}'
sid = conn.get_next_available_stream_id()
conn.send_headers(
    sid,
    [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        (":authority", sys.argv[1]),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ],
)
conn.send_data(sid, body, end_stream=True)
sock.sendall(conn.data_to_send())

# Frames are read by hand: the h2 package closes its connection state on a
# GOAWAY and refuses the DATA frames of streams still open, which RFC 9113
# (6.8) lets the server finish.
buf = b""
data = b""
signalled_at = None
goaway_at = None
ended = False
deadline = time.time() + 20
while not ended and time.time() < deadline:
    chunk = sock.recv(65536)
    if not chunk:
        break
    buf += chunk
    while len(buf) >= 9:
        length = int.from_bytes(buf[0:3], "big")
        if len(buf) < 9 + length:
            break
        kind, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = buf[9 : 9 + length]
        buf = buf[9 + length :]
        if kind == 0x4 and not flags & 0x1:  # SETTINGS: acknowledged
            sock.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        elif kind == 0x0 and stream == sid:  # DATA
            data += payload
            if signalled_at is None and payload:
                os.kill(pid, signal.SIGTERM)
                signalled_at = time.time()
            if flags & 0x1:
                ended = True
        elif kind == 0x1 and stream == sid and flags & 0x1:  # HEADERS ending it
            ended = True
        elif kind == 0x7 and goaway_at is None:  # GOAWAY
            goaway_at = time.time()
            assert not ended, "GOAWAY only after the stream ended"
        elif kind == 0x3 and stream == sid:  # RST_STREAM
            raise SystemExit(f"stream reset: {payload.hex()}")

assert signalled_at is not None, "no data before the deadline"
assert goaway_at is not None, "no GOAWAY while the stream was open"
assert goaway_at - signalled_at < 2.0, goaway_at - signalled_at
print("goaway ok", round(goaway_at - signalled_at, 3))
assert ended, "the stream did not end"
assert b"data: [DONE]" in data, data[-200:]
print("stream ok")
