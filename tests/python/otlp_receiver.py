"""A small OTLP/HTTP trace receiver for the e2e tests (the OpenTelemetry
Collector and Jaeger are in none of the package registries the project uses).

It decodes each `POST /v1/traces` body (protobuf `ExportTraceServiceRequest`,
with the `opentelemetry-proto` package) and appends one JSON line per span to
SPANS; the raw request bodies go to RAW (so a test can search everything that
was exported for text that must not be there).

usage: otlp_receiver.py PORT SPANS RAW
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PORT, SPANS, RAW = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces" or not self.headers.get(
            "content-type", ""
        ).startswith("application/x-protobuf"):
            self.send_response(415 if self.path == "/v1/traces" else 404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        with open(RAW, "ab") as f:
            f.write(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        lines = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "name": s.name,
                                "kind": Span.SpanKind.Name(s.kind),
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "status": Status.StatusCode.Name(s.status.code),
                                "attributes": attributes(s.attributes),
                                "resource": resource,
                                "scope": ss.scope.name,
                            }
                        )
                    )
        with open(SPANS, "a") as f:
            for line in lines:
                f.write(line + "\n")
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self):
        # Readiness.
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
