//! OpenTelemetry tracing through the real server, against a real OTLP/HTTP
//! receiver (`tests/python/otlp_receiver.py`: the protobufs decoded with the
//! `opentelemetry-proto` package; no Collector or Jaeger is packaged in the
//! registries the project uses): one trace per request, spans nested as the
//! pipeline runs, the client's `traceparent` continued, the upstream's
//! parent span the attempt's, no prompt or answer text exported, and
//! parent-based sampling (ratio 0 exports nothing of its own).

use serde_json::{json, Value};
use smartllm_e2e::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// Words only the prompts hold (the mock's answers echo them, too).
const SECRET: &str = "zebraquartz";

/// The receiver process and the files it writes.
struct Receiver {
    child: Child,
    port: u16,
    spans: PathBuf,
    raw: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// None where Python is not set up (SMARTLLM_SKIP_PYTHON).
    fn start() -> Option<Receiver> {
        let python = match std::env::var("SMARTLLM_PYTHON") {
            Ok(p) => p,
            Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return None,
            Err(_) => panic!("set SMARTLLM_PYTHON to a python with the opentelemetry-proto package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
        };
        let dir = tempfile::tempdir().unwrap();
        let (spans, raw) = (dir.path().join("spans.jsonl"), dir.path().join("raw.bin"));
        let port = free_port();
        let child = Command::new(python)
            .arg(workspace_root().join("tests/python/otlp_receiver.py"))
            .arg(port.to_string())
            .arg(&spans)
            .arg(&raw)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP receiver");
        let r = Receiver {
            child,
            port,
            spans,
            raw,
            _dir: dir,
        };
        let addr = format!("127.0.0.1:{port}");
        assert!(
            wait_until(Duration::from_secs(15), || get_ok(&addr)),
            "the OTLP receiver did not start"
        );
        Some(r)
    }

    /// The spans written so far: whole lines only (the receiver may be
    /// halfway through appending one while the test reads).
    fn spans(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.spans).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn raw(&self) -> Vec<u8> {
        std::fs::read(&self.raw).unwrap_or_default()
    }

    /// The spans of each trace, once every trace in `want` has its server span.
    fn traces(&self, want: &[&str]) -> BTreeMap<String, Vec<Value>> {
        let done = |spans: &[Value]| {
            want.iter().all(|t| {
                spans
                    .iter()
                    .any(|s| s["trace_id"] == *t && s["kind"] == "SPAN_KIND_SERVER")
            })
        };
        let ok = wait_until(Duration::from_secs(15), || done(&self.spans()));
        let spans = self.spans();
        assert!(ok, "traces {want:?} not all exported: {spans:#?}");
        let mut by_trace: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for s in spans {
            by_trace
                .entry(s["trace_id"].as_str().unwrap().to_string())
                .or_default()
                .push(s);
        }
        by_trace
    }
}

fn get_ok(addr: &str) -> bool {
    request(addr, "GET", "/", &[], b"").is_ok_and(|r| r.status == 200)
}

/// A gateway on one mock (`small` -> mock-small), cache on, tracing to `rx`.
fn gateway(rx: &Receiver, sample_ratio: &str) -> (Mock, Gateway) {
    let mock = Mock::start(&["--chunk-delay-ms", "2"]);
    let cfg = ConfigDir::new(
        "",
        &format!(
            "demo:\n  mode: off\ntracing:\n  otlp_endpoint: http://127.0.0.1:{}\n  sample_ratio: {sample_ratio}\n  service_name: smartllm-e2e\n",
            rx.port
        ),
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n",
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    (mock, Gateway::start(cfg))
}

fn chat(gw: &Gateway, body: &Value, traceparent: Option<&str>) -> Response {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(tp) = traceparent {
        headers.push(("traceparent", tp));
        headers.push(("tracestate", "vendor=abc"));
    }
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// The (trace id, parent span id, flags) of a `traceparent`.
fn parse_traceparent(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00", "{tp}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

fn upstream_traceparent(mock: &Mock) -> (String, String, String) {
    let last = mock.last();
    let tp = last["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent upstream: {last}"));
    parse_traceparent(tp)
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// The one upstream attempt (client span) of a trace.
fn client_span(spans: &[Value]) -> &Value {
    let found: Vec<&Value> = spans
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_CLIENT")
        .collect();
    assert_eq!(found.len(), 1, "one client span: {spans:#?}");
    found[0]
}

fn one<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one {name:?} span: {spans:#?}");
    found[0]
}

/// Every span's parent is the server span or another span of its trace,
/// and each `(child, parent)` is there, hanging where it should.
fn assert_nested(spans: &[Value], pairs: &[(&str, &str)]) {
    let server: Vec<&Value> = spans
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_SERVER")
        .collect();
    assert_eq!(server.len(), 1, "one server span per trace: {spans:#?}");
    let ids: BTreeSet<&str> = spans
        .iter()
        .map(|s| s["span_id"].as_str().unwrap())
        .collect();
    for s in spans {
        if s["kind"] != "SPAN_KIND_SERVER" {
            assert!(
                ids.contains(s["parent_span_id"].as_str().unwrap()),
                "{} has a parent outside its trace: {spans:#?}",
                s["name"]
            );
        }
        assert!(
            s["start"].as_u64() <= s["end"].as_u64(),
            "{} ends before it starts",
            s["name"]
        );
    }
    for (child, parent) in pairs {
        let p = one(spans, parent);
        let children = named(spans, child);
        assert!(!children.is_empty(), "no {child:?} span: {spans:#?}");
        for c in children {
            assert_eq!(
                c["parent_span_id"], p["span_id"],
                "{child} should be a child of {parent}: {spans:#?}"
            );
            assert!(
                c["start"].as_u64() >= p["start"].as_u64()
                    && c["end"].as_u64() <= p["end"].as_u64(),
                "{child} should lie within {parent}: {spans:#?}"
            );
        }
    }
}

#[test]
fn tracing_exports_one_nested_trace_per_request_and_continues_the_client_context() {
    let Some(rx) = Receiver::start() else { return };
    let (mock, gw) = gateway(&rx, "1");

    // 1. A client with its own trace context (sampled): continued.
    let cached_entries = || {
        get(&gw.admin, "/admin/cache/stats").json()["stats"]["l1_entries"]
            .as_u64()
            .unwrap_or(0)
    };
    let entries_before = cached_entries();
    let prompt = format!("Tell me about the {SECRET} migration routes of spring birds");
    let client_tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    chat(&gw, &chat_body("small", &prompt), Some(&client_tp));
    // Its answer is stored off the request path: wait until it is (the
    // cache hit below depends on it).
    assert!(
        wait_until(Duration::from_secs(5), || cached_entries() > entries_before),
        "the first answer was not stored: {} entries",
        cached_entries()
    );
    let (up_trace, up_parent, up_flags) = upstream_traceparent(&mock);
    assert_eq!(
        up_trace, TRACE_ID,
        "the upstream continues the client's trace"
    );
    assert_eq!(up_flags, "01");
    assert_ne!(
        up_parent, CLIENT_SPAN,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(mock.last()["headers"]["tracestate"], "vendor=abc");

    // 2. A streamed request without trace context: a new trace.
    let mut body = chat_body("auto", &format!("Explain {SECRET} tides in two lines"));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = chat(&gw, &body, None);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    let (stream_trace, stream_parent, _) = upstream_traceparent(&mock);
    assert_ne!(stream_trace, TRACE_ID);

    // 3. The first question again (stored, as waited for above): answered
    // by the cache (no upstream attempt).
    let hit_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = chat(&gw, &chat_body("small", &prompt), Some(hit_tp));
    assert_eq!(r.header("x-smartllm-cache"), Some("hit-exact"));

    let traces = rx.traces(&[TRACE_ID, &stream_trace, "0af7651916cd43dd8448eb211c80319c"]);
    assert_eq!(traces.len(), 3, "one trace per request: {traces:#?}");

    // The continued trace: the server span's parent is the client's span.
    let t1 = &traces[TRACE_ID];
    let server = one(t1, "POST /v1/chat/completions");
    assert_eq!(server["kind"], "SPAN_KIND_SERVER");
    assert_eq!(server["parent_span_id"], CLIENT_SPAN);
    assert_nested(
        t1,
        &[
            ("admit", "POST /v1/chat/completions"),
            ("auth", "admit"),
            ("cache lookup", "POST /v1/chat/completions"),
            ("embed", "cache lookup"),
            ("search", "cache lookup"),
            ("route", "POST /v1/chat/completions"),
            ("chat mock-small", "POST /v1/chat/completions"),
        ],
    );
    // Named as the GenAI conventions name a client span: operation, model.
    let attempt = one(t1, "chat mock-small");
    assert_eq!(attempt["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(
        attempt["span_id"], up_parent,
        "the upstream's traceparent names the attempt span"
    );
    let a = &attempt["attributes"];
    assert_eq!(a["gen_ai.request.model"], "mock-small");
    assert_eq!(a["smartllm.provider"], "mock");
    assert_eq!(a["smartllm.outcome"], "ok");
    assert_eq!(a["http.response.status_code"], 200);
    // OpenTelemetry's GenAI and HTTP conventions.
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["http.request.method"], "POST");
    let s = &server["attributes"];
    assert_eq!(s["url.path"], "/v1/chat/completions");
    assert_eq!(s["url.scheme"], "http");
    assert_eq!(s["gen_ai.request.model"], "small");
    assert_eq!(s["gen_ai.response.model"], "mock-small");
    assert_eq!(s["smartllm.cache"], "miss");
    assert_eq!(s["http.response.status_code"], 200);
    assert!(s["gen_ai.usage.input_tokens"].as_i64() > Some(0), "{s}");
    assert!(s["gen_ai.usage.output_tokens"].as_i64() > Some(0), "{s}");
    assert_eq!(server["resource"]["service.name"], "smartllm-e2e");
    assert_eq!(
        one(t1, "cache lookup")["attributes"]["smartllm.cache"],
        "miss"
    );

    // The streamed trace: a root server span; the stream under its attempt.
    let t2 = &traces[&stream_trace];
    let server = one(t2, "POST /v1/chat/completions");
    assert_eq!(
        server["parent_span_id"], "",
        "a new trace starts at the gateway"
    );
    let attempt = client_span(t2);
    let attempt_name = attempt["name"].as_str().unwrap();
    assert_eq!(
        attempt_name,
        format!(
            "chat {}",
            attempt["attributes"]["gen_ai.request.model"]
                .as_str()
                .unwrap()
        )
    );
    assert_nested(
        t2,
        &[
            ("route", "POST /v1/chat/completions"),
            (attempt_name, "POST /v1/chat/completions"),
            ("stream", attempt_name),
        ],
    );
    assert_eq!(attempt["span_id"], stream_parent);
    let st = &one(t2, "stream")["attributes"];
    assert_eq!(st["smartllm.stream.end"], "complete");
    assert!(st["smartllm.stream.bytes"].as_i64() > Some(0));
    assert_eq!(server["attributes"]["smartllm.route"], "auto");
    assert_eq!(server["attributes"]["smartllm.stream"], true);

    // The cache hit: looked up, answered, nothing upstream.
    let t3 = &traces["0af7651916cd43dd8448eb211c80319c"];
    assert_nested(t3, &[("cache lookup", "POST /v1/chat/completions")]);
    assert!(
        !t3.iter().any(|s| s["kind"] == "SPAN_KIND_CLIENT"),
        "{t3:#?}"
    );
    assert_eq!(
        one(t3, "POST /v1/chat/completions")["attributes"]["smartllm.cache"],
        "hit-exact"
    );

    // Nothing the client asked or was answered is in what was exported.
    let raw = String::from_utf8_lossy(&rx.raw()).to_lowercase();
    assert!(!raw.is_empty());
    for text in [SECRET, "migration", "tides", "mock reply"] {
        assert!(!raw.contains(text), "{text:?} was exported");
    }
    // Counted once the receiver's answer is back (it writes the spans first).
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .metric("smartllm_trace_spans_exported_total", &[])
            >= 10.0),
        "{}",
        gw.metrics()
    );
    assert_eq!(gw.metric("smartllm_trace_spans_dropped_total", &[]), 0.0);
}

#[test]
fn tracing_sample_ratio_zero_exports_only_what_a_client_sampled() {
    let Some(rx) = Receiver::start() else { return };
    let (mock, gw) = gateway(&rx, "0");

    // Not sampled: a new trace, and a client's unsampled one. The upstream
    // still gets a trace context of its own (flag 00).
    chat(&gw, &chat_body("small", "first unsampled question"), None);
    let (t_new, _, flags) = upstream_traceparent(&mock);
    assert_eq!(flags, "00");
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    chat(
        &gw,
        &chat_body("small", "second unsampled question"),
        Some(unsampled),
    );
    let (t_client, parent, flags) = upstream_traceparent(&mock);
    assert_eq!(
        (t_client.as_str(), flags.as_str()),
        ("11111111111111111111111111111111", "00")
    );
    assert_ne!(parent, "2222222222222222");

    // A client's sampled trace is honoured (parent-based); spans leave in
    // order, so once it is in, the two before would be too.
    let sampled = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    chat(
        &gw,
        &chat_body("small", "third question, sampled"),
        Some(&sampled),
    );
    let traces = rx.traces(&[TRACE_ID]);
    assert_eq!(
        traces.keys().collect::<Vec<_>>(),
        [TRACE_ID],
        "only the client-sampled trace is exported (not {t_new})"
    );
}

/// A provider's 503 that a fallback mends is on the retried attempt's
/// span as its status (it had `error.type` and no status, so the trace
/// never said what failed over).
#[test]
fn a_retried_attempt_carries_the_providers_status() {
    let Some(rx) = Receiver::start() else { return };
    let mock = Mock::start(&["--model-status", "mock-down=503"]);
    let cfg = ConfigDir::new(
        "",
        &format!(
            "demo:\n  mode: off\ntracing:\n  otlp_endpoint: http://127.0.0.1:{}\n  sample_ratio: 1\n  service_name: smartllm-e2e\n",
            rx.port
        ),
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: down\n    deployments:\n      - provider: mock\n        model: mock-down\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n",
        "routes:\n  auto:\n    model: down\n    fallback: [small]\n",
    );
    let gw = Gateway::start(cfg);
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = chat(&gw, &chat_body("auto", "hello"), Some(&tp));
    assert_eq!(r.status, 200, "{}", r.text());
    let traces = rx.traces(&[TRACE_ID]);
    let attempts: Vec<&Value> = traces[TRACE_ID]
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_CLIENT")
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    let attr = |s: &Value, k: &str| s["attributes"][k].clone();
    let retried = attempts
        .iter()
        .find(|s| attr(s, "smartllm.outcome") == "retried")
        .expect("a retried attempt");
    assert_eq!(
        attr(retried, "http.response.status_code"),
        503,
        "{retried:#}"
    );
    assert_eq!(
        attr(retried, "error.type"),
        "upstream_status",
        "{retried:#}"
    );
    assert_eq!(retried["name"], "chat mock-down", "{retried:#}");
}
