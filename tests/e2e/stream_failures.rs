//! Streams that fail after the client has its `200`: the provider's error
//! event mid-stream (OpenAI-compatible `data: {"error": ...}`, Anthropic
//! `event: error`) or a broken stream reaches the client as an error event and
//! `[DONE]`, and counts as a failure everywhere: `smartllm_upstream_errors_total`,
//! the access log's `error`, the model's live profile and the deployment's
//! circuit breaker.

use crate::common::streamed_text;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::time::Duration;

/// What mock-llm's `error-mid-stream` fault says.
const MOCK_STREAM_ERROR: &str = "mock-llm injected an error mid-stream";

/// A gateway in front of one mock with two providers on it: `oai` (OpenAI
/// kind, model `small`) and `ant` (Anthropic kind, model `claude`), each with
/// a circuit breaker that opens after `failures` failures in a row.
fn gateway(failures: u32) -> (Mock, Gateway) {
    let mock = Mock::start(&["--words", "8"]);
    let breaker = format!(
        "    health_check: {{ kind: none }}\n    circuit_breaker: {{ failures: {failures}, cooldown: 60s }}\n"
    );
    let providers = format!(
        "providers:\n  oai:\n    kind: openai\n    base_url: http://{0}/v1\n{breaker}  ant:\n    kind: anthropic\n    base_url: http://{0}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n{breaker}",
        mock.addr
    );
    let models = "models:\n  - name: small\n    deployments: [ { provider: oai, model: mock-small } ]\n  - name: claude\n    deployments: [ { provider: ant, model: claude-x } ]\n";
    let gw = Gateway::start_with_env(
        ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, ""),
        &[("TEST_ANTHROPIC_KEY", "sk-ant-secret-1234")],
    );
    (mock, gw)
}

fn stream(gw: &Gateway, request_id: &str, body: &Value) -> Response {
    request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", request_id)],
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap()
}

/// The access-log line of a request.
fn log_line(gw: &Gateway, request_id: &str) -> Value {
    let find = || {
        gw.log_text()
            .lines()
            .filter(|l| l.contains(&format!("\"request_id\":\"{request_id}\"")))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "smartllm::access")
    };
    assert!(
        wait_until(Duration::from_secs(5), || find().is_some()),
        "no access-log line for {request_id}:\n{}",
        gw.log_text()
    );
    find().unwrap()
}

/// The `data:` payloads of a streamed answer: some content, then the error
/// event, then exactly one `[DONE]`, last. Returns the error object.
fn ends_with_error_event(r: &Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    assert_eq!(
        data.iter().filter(|d| *d == "[DONE]").count(),
        1,
        "{}",
        r.text()
    );
    let content = streamed_text(&data);
    assert!(
        content.starts_with("Mock reply"),
        "part of the answer came first: {}",
        r.text()
    );
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(err["error"]["message"].is_string(), "{}", r.text());
    err["error"].clone()
}

fn circuit(gw: &Gateway, deployment: &str) -> f64 {
    gw.metric("smartllm_circuit_state", &[("deployment", deployment)])
}

fn live_errors(gw: &Gateway, model: &str) -> u64 {
    get(&gw.admin, "/admin/models").json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .and_then(|m| m["live"]["errors"].as_u64())
        .unwrap_or(0)
}

/// The attempt's outcome is recorded once the answer is written: wait for it.
fn wait_live_errors(gw: &Gateway, model: &str, n: u64) {
    assert!(
        wait_until(Duration::from_secs(5), || live_errors(gw, model) == n),
        "{model}: {} live errors, not {n}",
        live_errors(gw, model)
    );
}

/// Three failed streams open the circuit (failures: 3); the next request
/// finds no deployment.
fn third_failure_opens_the_circuit(gw: &Gateway, model: &str, deployment: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || circuit(gw, deployment) == 2.0),
        "circuit of {deployment} not open: {}",
        gw.metrics()
    );
    let r = gw.chat(&chat_body(model, "while open"));
    assert_eq!(r.status, 503, "{}", r.text());
    let models = get(&gw.admin, "/admin/models").json();
    let m = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .unwrap()
        .clone();
    assert_eq!(m["deployments"][0]["circuit"], "open", "{m}");
    assert!(
        gw.metric(
            "smartllm_circuit_transitions_total",
            &[("deployment", deployment), ("to", "open")]
        ) >= 1.0
    );
}

#[test]
fn openai_error_event_mid_stream_is_a_failure_everywhere() {
    let (mock, gw) = gateway(3);
    let deployment = format!("small/oai/{}", mock.addr);
    let errors = |reason: &str| {
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("provider", "oai"), ("reason", reason)],
        )
    };
    let body = |fault: Option<&str>| {
        let mut b = json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "tell me a story"}]});
        if let Some(f) = fault {
            b["mock"] = json!({"fault": f});
        }
        b
    };

    // A clean stream is a success: no error, the circuit stays closed.
    let r = stream(&gw, "oai-clean", &body(None));
    assert_eq!(r.status, 200);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    assert!(!r.text().contains("\"error\""), "{}", r.text());
    let line = log_line(&gw, "oai-clean");
    assert!(line["error"].is_null(), "{line}");
    assert_eq!(circuit(&gw, &deployment), 0.0);
    assert_eq!(live_errors(&gw, "small"), 0);
    assert_eq!(errors("stream_error"), 0.0);
    // A connection reset after [DONE] loses nothing: the answer is whole,
    // with one [DONE] and no error event, and no failure is counted.
    let r = stream(&gw, "oai-reset-after-done", &body(Some("reset-after-done")));
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(
        data.iter().filter(|d| *d == "[DONE]").count(),
        1,
        "{}",
        r.text()
    );
    assert!(!r.text().contains("\"error\""), "{}", r.text());
    let line = log_line(&gw, "oai-reset-after-done");
    assert!(line["error"].is_null(), "{line}");
    assert_eq!(errors("stream_broken"), 0.0);
    assert_eq!(live_errors(&gw, "small"), 0);
    // The time to the first token is the first word's, not the headers'
    // (sent at once here, the words 300 ms apart).
    let mut slow = body(None);
    slow["mock"] = json!({"chunk_delay_ms": 300});
    assert_eq!(stream(&gw, "oai-slow-first-word", &slow).status, 200);
    let line = log_line(&gw, "oai-slow-first-word");
    let ttft = line["ttft_ms"].as_f64().unwrap();
    assert!(ttft >= 250.0, "{line}");
    assert!(ttft < line["latency_ms"].as_f64().unwrap(), "{line}");

    // The provider's `data: {"error": ...}` mid-stream (followed by its own
    // [DONE]) reaches the client as it is, and is counted as a failure.
    let r = stream(&gw, "oai-error-1", &body(Some("error-mid-stream")));
    let err = ends_with_error_event(&r);
    assert_eq!(err["message"], MOCK_STREAM_ERROR);
    assert_eq!(err["type"], "server_error");
    let line = log_line(&gw, "oai-error-1");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "upstream_stream_error", "{line}");
    assert_eq!(errors("stream_error"), 1.0);
    wait_live_errors(&gw, "small", 1);
    assert!(wait_until(Duration::from_secs(5), || gw.metric(
        "smartllm_upstream_attempts_total",
        &[("provider", "oai"), ("outcome", "failed")]
    ) == 1.0));
    assert_eq!(circuit(&gw, &deployment), 0.0, "one failure of three");
    // Nothing was retried: one request reached the mock per client request.
    assert_eq!(mock.requests(), 4);

    // A stream that breaks off counts the same way (with its own reason).
    let r = stream(&gw, "oai-broken", &body(Some("drop-mid-stream")));
    let err = ends_with_error_event(&r);
    assert_eq!(err["code"], "upstream_stream_broken");
    assert_eq!(
        log_line(&gw, "oai-broken")["error"],
        "upstream_stream_broken"
    );
    assert_eq!(errors("stream_broken"), 1.0);
    wait_live_errors(&gw, "small", 2);

    // The third failure in a row opens the circuit.
    let r = stream(&gw, "oai-error-2", &body(Some("error-mid-stream")));
    assert_eq!(ends_with_error_event(&r)["message"], MOCK_STREAM_ERROR);
    assert_eq!(errors("stream_error"), 2.0);
    wait_live_errors(&gw, "small", 3);
    third_failure_opens_the_circuit(&gw, "small", &deployment);
    // The streams were never stored or retried.
    assert_eq!(mock.requests(), 6);
}

/// An event that is no JSON never reaches the client: the stream ends
/// there with the gateway's error event and [DONE], a failure counted as
/// `malformed_stream`, and nothing is stored in the cache.
#[test]
fn an_event_that_is_no_json_ends_the_stream_with_the_gateways_error() {
    let (mock, gw) = gateway(3);
    let body = json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "tell me a story"}], "mock": {"fault": "malformed-sse"}});
    let r = stream(&gw, "oai-malformed", &body);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("garbage"), "{}", r.text());
    let data = r.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(
        err["error"]["code"],
        "upstream_invalid_stream",
        "{}",
        r.text()
    );
    for d in &data[..data.len() - 1] {
        serde_json::from_str::<Value>(d).unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    let line = log_line(&gw, "oai-malformed");
    assert_eq!(line["error"], "upstream_invalid_stream", "{line}");
    assert_eq!(
        gw.metric(
            "smartllm_upstream_errors_total",
            &[
                ("provider", "oai"),
                ("model", "small"),
                ("reason", "malformed_stream")
            ],
        ),
        1.0
    );
    wait_live_errors(&gw, "small", 1);
    // Not stored: the same request (without the fault) goes upstream again.
    let before = mock.requests();
    let mut clean = body.clone();
    clean.as_object_mut().unwrap().remove("mock");
    assert_eq!(stream(&gw, "oai-after", &clean).status, 200);
    assert_eq!(mock.requests(), before + 1);
}

#[test]
fn anthropic_error_event_mid_stream_is_a_failure_everywhere() {
    let (mock, gw) = gateway(3);
    let deployment = format!("claude/ant/{}", mock.addr);
    let errors = || {
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("provider", "ant"), ("reason", "stream_error")],
        )
    };
    // The `mock` object does not survive translation to Anthropic's API: the
    // fault is named in the prompt instead.
    let body = |prompt: &str| json!({"model": "claude", "stream": true, "messages": [{"role": "user", "content": prompt}]});

    let r = stream(&gw, "ant-clean", &body("tell me a story"));
    assert_eq!(r.status, 200);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    assert!(!r.text().contains("\"error\""), "{}", r.text());
    assert!(log_line(&gw, "ant-clean")["error"].is_null());
    assert_eq!(circuit(&gw, &deployment), 0.0);

    for i in 1..=3 {
        let id = format!("ant-error-{i}");
        let r = stream(
            &gw,
            &id,
            &body(&format!("story {i} [mock-fault:error-mid-stream]")),
        );
        // Anthropic's `event: error` reaches the OpenAI client in its own
        // shape, with the provider key it quotes scrubbed.
        let err = ends_with_error_event(&r);
        assert_eq!(
            err["message"],
            format!("{MOCK_STREAM_ERROR} (key: [redacted])"),
            "{}",
            r.text()
        );
        assert!(!r.text().contains("sk-ant-secret-1234"), "{}", r.text());
        assert_eq!(err["type"], "server_error");
        let line = log_line(&gw, &id);
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["error"], "upstream_stream_error", "{line}");
        // Billed for the half answer it generated, estimated from its text
        // (message_start's output count of 1 is no final figure).
        assert!(line["completion_tokens"].as_u64().unwrap() > 1, "{line}");
        assert_eq!(line["usage_estimated"], true, "{line}");
        assert_eq!(errors(), i as f64);
        wait_live_errors(&gw, "claude", i);
        if i < 3 {
            assert_eq!(circuit(&gw, &deployment), 0.0);
        }
    }
    third_failure_opens_the_circuit(&gw, "claude", &deployment);
    assert_eq!(mock.requests(), 4, "nothing was retried");
    // The OpenAI-kind deployment on the same mock is not affected.
    assert_eq!(gw.chat(&chat_body("small", "still fine")).status, 200);
}

/// A stream that fails before its answer began (the provider overloaded at
/// once: its error event right after the `200`, or after Anthropic's
/// `message_start`) has sent the client nothing yet: the fallback answers
/// and the client sees a clean stream; with nothing left to try the client
/// gets an HTTP error its SDK retries on, not a `200` whose stream holds
/// only an error. A stream that just stops halfway (no finish reason, no
/// `[DONE]`) is a cut answer: an error event for the client, never stored.
#[test]
fn a_stream_that_fails_before_its_answer_goes_to_the_fallback() {
    let mock = Mock::start(&[
        "--words",
        "8",
        "--model-fault",
        "mock-busy=error-at-start",
        "--model-fault",
        "claude-busy=error-at-start",
        "--model-fault",
        "mock-cut=end-mid-stream",
    ]);
    let providers = format!(
        "providers:\n  oai:\n    kind: openai\n    base_url: http://{0}/v1\n    health_check: {{ kind: none }}\n  ant:\n    kind: anthropic\n    base_url: http://{0}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n    health_check: {{ kind: none }}\n",
        mock.addr
    );
    let models = "models:
  - name: busy
    profile: { quality: { default: 0.95 } }
    deployments: [ { provider: oai, model: mock-busy } ]
  - name: small
    profile: { quality: { default: 0.2 } }
    deployments: [ { provider: oai, model: mock-small } ]
  - name: cut
    deployments: [ { provider: oai, model: mock-cut } ]
  - name: claude-busy
    profile: { quality: { default: 0.95 } }
    deployments: [ { provider: ant, model: claude-busy } ]
  - name: claude
    profile: { quality: { default: 0.2 } }
    deployments: [ { provider: ant, model: claude-x } ]
";
    let routes = "routes:
  r:
    candidates: [busy, small]
    weights: { quality: 1, cost: 0, latency: 0 }
  ra:
    candidates: [claude-busy, claude]
    weights: { quality: 1, cost: 0, latency: 0 }
";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, routes);
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    let gw = Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-secret-1234")]);
    let body = |model: &str, prompt: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": prompt}]});

    // Overloaded at once, OpenAI-compatible and Anthropic: the fallback's
    // clean stream, one request more at the mock, the failure counted.
    let mut sent = 0;
    for (route, id) in [("r", "first-oai"), ("ra", "first-ant")] {
        let r = stream(
            &gw,
            id,
            &body(route, &format!("tell me a story via {route}")),
        );
        sent += 2;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.text().contains("error"), "{}", r.text());
        let data = r.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        assert!(
            streamed_text(&data).starts_with("Mock reply"),
            "{}",
            r.text()
        );
        // Exactly one role chunk: the failed attempt's never reached the client.
        assert_eq!(r.text().matches("\"role\"").count(), 1, "{}", r.text());
        let line = log_line(&gw, id);
        assert_eq!(line["status"], 200, "{line}");
        assert!(line["error"].is_null(), "{line}");
        assert_eq!(mock.requests(), sent);
    }
    assert_eq!(
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("provider", "oai"), ("reason", "stream_error")]
        ),
        1.0
    );
    assert_eq!(
        gw.metric(
            "smartllm_route_fallbacks_total",
            &[("from", "claude-busy"), ("to", "claude")]
        ),
        1.0
    );

    // Nothing left to try: an HTTP error, in the client's shape. Anthropic's
    // overload is a 503 (the SDKs retry it), with the key it quotes scrubbed.
    let r = stream(
        &gw,
        "alone-ant",
        &body("claude-busy", "tell me a story alone"),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["code"], "upstream_overloaded", "{e}");
    assert!(!r.text().contains("sk-ant-secret-1234"), "{}", r.text());
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[("x-api-key", "client"), ("anthropic-version", "2023-06-01")],
        &serde_json::to_vec(
            &json!({"model": "claude-busy", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "tell me a story natively"}]}),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["type"], "error", "{}", r.text());
    assert_eq!(
        r.json()["error"]["type"],
        "overloaded_error",
        "{}",
        r.text()
    );
    let r = stream(&gw, "alone-oai", &body("busy", "tell me a story alone"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_stream_error");

    // A stream that stops halfway, cleanly: a failure, not an answer.
    for i in 0..2 {
        let id = format!("cut-{i}");
        let r = stream(&gw, &id, &body("cut", "tell me a story, cut"));
        let data = r.sse_data();
        assert_eq!(r.status, 200);
        assert!(
            streamed_text(&data).starts_with("Mock reply"),
            "{}",
            r.text()
        );
        let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(
            err["error"]["code"],
            "upstream_stream_incomplete",
            "{}",
            r.text()
        );
        assert_eq!(r.header("x-smartllm-cache"), Some("miss"));
        assert_eq!(log_line(&gw, &id)["error"], "upstream_stream_incomplete");
    }
    wait_live_errors(&gw, "cut", 2);
}

/// A stream's `200` waits for its first word, but not for ever: a provider
/// silent for 10 s after its role chunk (a model thinking) has its stream
/// opened then, so the client and any proxy in front see bytes.
#[test]
fn a_silent_start_is_held_ten_seconds_at_most() {
    let (_mock, gw) = gateway(3);
    let body = json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "think first"}],
        "mock": {"chunk_delay_ms": 12000, "words": 1}});
    let r = stream(&gw, "slow-start", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (first_at, first) = r.chunks.first().expect("no chunk").clone();
    assert!(
        first_at >= Duration::from_millis(9500) && first_at < Duration::from_millis(11800),
        "the first bytes came after {first_at:?}"
    );
    let first = String::from_utf8_lossy(&first);
    assert!(first.contains("\"role\""), "{first}");
    assert!(!first.contains("Mock reply"), "{first}");
    assert_eq!(streamed_text(&r.sse_data()), "Mock", "{}", r.text());
}
