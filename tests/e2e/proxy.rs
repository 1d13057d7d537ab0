//! Proxying through the real server: chat completions as JSON and streams,
//! Anthropic models for OpenAI clients, completions, embeddings and models,
//! big and bad request bodies, upstream failures, provider keys, balancing
//! across deployments, HTTPS upstreams and the official OpenAI Python SDK.

use crate::common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use smartllm_e2e::*;
use std::time::{Duration, Instant};

#[test]
fn chat_completion_json_with_headers_usage_and_access_log() {
    let (mock, gw) = basic("", &[]);
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", "Bearer sk-client-own-key-999"),
            ("x-request-id", "req-abc-123"),
        ],
        &serde_json::to_vec(&chat_body("auto", "What is the capital of France?")).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("capital of France"));
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-smartllm-model"), Some("small"));
    assert_eq!(r.header("x-smartllm-provider"), Some("mock"));
    assert!(r.header("x-smartllm-route").unwrap().starts_with("auto"));
    assert_eq!(r.header("x-request-id"), Some("req-abc-123"));
    // The provider's own id of the request, for its support.
    let upstream_id = r
        .header("x-smartllm-upstream-request-id")
        .unwrap()
        .to_string();
    assert!(upstream_id.starts_with("req_mock_"), "{upstream_id}");
    // The upstream got its own model name and never the client's key.
    let last = mock.last();
    assert_eq!(last["model"], "mock-small");
    assert!(
        last["headers"].get("authorization").is_none(),
        "client key forwarded: {last}"
    );
    assert_eq!(last["headers"]["x-request-id"], "req-abc-123");
    // Deterministic answers: the same prompt, the same reply.
    let again = gw
        .chat(&chat_body("small", "What is the capital of France?"))
        .json();
    assert_eq!(
        again["choices"][0]["message"]["content"],
        v["choices"][0]["message"]["content"]
    );
    // One JSON access-log line per request, without secrets.
    // (Whole lines only: the gateway may be halfway through writing it.)
    let entry = |log: &str| {
        log.lines()
            .find(|l| l.contains("req-abc-123"))
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
    };
    assert!(wait_until(Duration::from_secs(5), || entry(&gw.log_text()).is_some()));
    let log = gw.log_text();
    let entry = entry(&log).unwrap();
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["model"], "small");
    assert_eq!(entry["provider"], "mock");
    assert_eq!(entry["upstream_request_id"], upstream_id.as_str());
    assert!(entry["latency_ms"].as_f64().is_some());
    assert!(entry["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(!log.contains("sk-client-own-key-999") && !log.contains("sk-ant-secret-1234"));
    let m = gw.metrics();
    assert!(
        m.contains("smartllm_requests_total{") && m.contains("status=\"200\""),
        "{m}"
    );
    assert!(m.contains("smartllm_gateway_overhead_seconds_bucket"));
    assert!(m.contains("smartllm_upstream_ttft_seconds_bucket"));
    assert!(!m.contains("sk-ant-secret-1234"));
}

#[test]
fn streaming_is_forwarded_chunk_by_chunk_and_usage_is_exact() {
    let (mock, gw) = basic("", &["--chunk-delay-ms", "80", "--words", "8"]);
    let r = gw.chat(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "stream please"}]}));
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    // The upstream was asked for usage even though the client was not.
    assert_eq!(mock.last()["stream_options"]["include_usage"], true);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !r.text().contains("\"usage\":{"),
        "usage chunk leaked to a client that did not ask: {}",
        r.text()
    );
    let text = streamed_text(&data);
    assert!(text.starts_with("Mock reply to: stream please"), "{text}");
    // Chunks arrive as produced: the first content well before the last.
    let first = r
        .chunks
        .iter()
        .find(|(_, c)| String::from_utf8_lossy(c).contains("Mock"))
        .unwrap()
        .0;
    let last = r.chunks.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(400),
        "not streamed: first {first:?} last {last:?}"
    );
    assert!(r.chunks.len() >= 8, "only {} chunks", r.chunks.len());

    // A client that asks for usage gets the usage chunk, with the mock's counts.
    let r = gw.chat(
        &json!({"model": "small", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "stream please"}]}),
    );
    let usage = r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert!(wait_until(Duration::from_secs(5), || gw
        .metric("smartllm_tokens_total", &[("kind", "completion")])
        >= 16.0));
}

#[test]
fn anthropic_models_work_for_openai_clients_both_ways() {
    let (mock, gw) = basic("", &["--words", "6"]);
    let r = gw.chat(&json!({"model": "claude", "max_tokens": 100, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi Claude"}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Mock reply to: Hi Claude"));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let last = mock.last();
    assert_eq!(last["path"], "/v1/messages");
    assert_eq!(last["headers"]["x-api-key"], "sk-ant-secret-1234");
    assert_eq!(last["headers"]["anthropic-version"], "2023-06-01");
    assert!(last["headers"].get("authorization").is_none());
    assert_eq!(last["model"], "claude-x");

    let r = gw.chat(
        &json!({"model": "claude", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hi Claude"}]}),
    );
    assert_eq!(r.status, 200);
    // Anthropic's `request-id`, on the stream's header too.
    assert!(r
        .header("x-smartllm-upstream-request-id")
        .is_some_and(|id| id.starts_with("req_mock_")));
    let chunks: Vec<Value> = r
        .sse_data()
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.starts_with("Mock reply to: Hi Claude"), "{text}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    // Anthropic has no embeddings: a clear 400. (The model's kind is
    // guessed from its name here, and a guessed chat model is not held to
    // it: many embedding models' names do not say so.)
    let r = post_json(
        &gw.addr,
        "/v1/embeddings",
        &json!({"model": "claude", "input": "x"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.api_error()["code"], "unsupported_endpoint");
}

#[test]
fn completions_embeddings_and_models() {
    let (_mock, gw) = basic("", &[]);
    let r = post_json(
        &gw.addr,
        "/v1/completions",
        &json!({"model": "small", "prompt": "Once upon a time"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "text_completion");
    let r = post_json(
        &gw.addr,
        "/v1/embeddings",
        &json!({"model": "embed", "input": ["a", "b"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    // An embedding model asked to chat: the gateway says so, rather than a
    // provider's 404 blamed on the configuration.
    let r = gw.chat(&json!({"model": "embed", "messages": [{"role": "user", "content": "Hi"}]}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "model_not_supported");
    assert!(r.api_error()["message"]
        .as_str()
        .unwrap()
        .contains("is an embedding model"));
    // Anthropic's list (Claude Code's model picker) holds only chat models.
    let r = request(
        &gw.addr,
        "GET",
        "/v1/models?limit=1000",
        &[("anthropic-version", "2023-06-01")],
        b"",
    )
    .unwrap();
    let anthropic_ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        anthropic_ids.contains(&"small".to_string()),
        "{anthropic_ids:?}"
    );
    assert!(
        !anthropic_ids.contains(&"embed".to_string()),
        "{anthropic_ids:?}"
    );
    let r = get(&gw.addr, "/v1/models");
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["small", "embed", "claude", "auto"]);
    assert_eq!(get(&gw.addr, "/v1/models/auto").json()["route_to"], "small");
    assert_eq!(get(&gw.addr, "/v1/models/nope").status, 404);
}

#[test]
fn four_mib_prompt_reaches_the_upstream_intact() {
    let (mock, gw) = basic("", &[]);
    let mut prompt = String::with_capacity(4 << 20);
    let mut i = 0u64;
    while prompt.len() < 4 << 20 {
        prompt.push_str(&format!("token{i} "));
        i += 1;
    }
    let r = gw.chat(&chat_body("small", &prompt));
    assert_eq!(r.status, 200, "{}", r.text());
    let last = mock.last();
    assert_eq!(
        last["last_user_len"].as_u64().unwrap() as usize,
        prompt.len()
    );
    assert_eq!(
        last["last_user_sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(prompt.as_bytes()))
    );
    // Streamed too, and through a chunked request body.
    let body = serde_json::to_vec(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": prompt}]})).unwrap();
    let mut chunked = Vec::new();
    for part in body.chunks(300_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Transfer-Encoding", "chunked")],
        &chunked,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mock.last()["last_user_sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(prompt.as_bytes()))
    );
}

#[test]
fn oversize_bodies_get_413() {
    let (_mock, gw) = basic("  max_body_size: 64KiB\n", &[]);
    let big = chat_body("small", &"x".repeat(100 * 1024));
    let r = gw.chat(&big);
    assert_eq!(r.status, 413);
    assert_eq!(r.api_error()["code"], "request_too_large");
    // Without a Content-Length (chunked), the limit holds while reading.
    let body = serde_json::to_vec(&big).unwrap();
    let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Transfer-Encoding", "chunked")],
        &chunked,
    )
    .unwrap();
    assert_eq!(r.status, 413);
    // Just under the limit is fine.
    assert_eq!(
        gw.chat(&chat_body("small", &"x".repeat(60 * 1024))).status,
        200
    );
}

#[test]
fn bad_requests_get_openai_shaped_errors() {
    let (_mock, gw) = basic("", &[]);
    let cases: Vec<(&[u8], u16, &str, Option<&str>)> = vec![
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
            400,
            "missing_required_parameter",
            Some("model"),
        ),
        (
            br#"{"model":42,"messages":[]}"#,
            400,
            "invalid_type",
            Some("model"),
        ),
        (
            br#"{"model":"small","messages":"hi"}"#,
            400,
            "invalid_type",
            Some("messages"),
        ),
        (
            br#"{"model":"small","messages":[{"role":"user","content":"x"}],"temperature":"warm"}"#,
            400,
            "invalid_type",
            Some("temperature"),
        ),
        (
            br#"{"model":"small","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            400,
            "invalid_type",
            Some("stream"),
        ),
        (
            br#"{"model":"gpt-17","messages":[{"role":"user","content":"x"}]}"#,
            404,
            "model_not_found",
            Some("model"),
        ),
    ];
    for (body, status, code, param) in cases {
        let r = request(&gw.addr, "POST", "/v1/chat/completions", &[], body).unwrap();
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
        let e = r.api_error();
        assert_eq!(e["code"], code, "{}", r.text());
        if let Some(p) = param {
            assert_eq!(e["param"], p);
        }
    }
    let r = gw.chat(&chat_body("gpt-17", "x"));
    assert!(
        r.api_error()["message"].as_str().unwrap().contains("small"),
        "lists the models: {}",
        r.text()
    );
    let r = get(&gw.addr, "/v1/nothing");
    assert_eq!(r.status, 404);
    r.api_error();
    let r = get(&gw.addr, "/v1/chat/completions");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    r.api_error();
    // The gateway keeps serving.
    assert_eq!(gw.chat(&chat_body("small", "still alive?")).status, 200);
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    let dead = free_port();
    let mock = Mock::start(&[]);
    let providers = format!(
        "providers:\n{}  dead:\n    kind: openai\n    base_url: http://127.0.0.1:{dead}/v1\n    health_check:\n      kind: none\n  slow:\n    kind: openai\n    base_url: http://{}/v1\n    first_byte_timeout: 500ms\n    idle_timeout: 500ms\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n  - name: gone\n    deployments:\n      - provider: dead\n  - name: slow\n    deployments:\n      - provider: slow\n";
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "",
    ));

    let r = gw.chat(&chat_body("gone", "hello"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.api_error()["code"], "upstream_unreachable");
    assert!(r.api_error()["message"].as_str().unwrap().contains("dead"));
    // Its one deployment refused the connection and nothing else was
    // tried: a failed attempt (an alert on `failed` sees the outage), not
    // a retried one.
    let attempts = |outcome| {
        gw.metric(
            "smartllm_upstream_attempts_total",
            &[("provider", "dead"), ("outcome", outcome)],
        )
    };
    assert_eq!((attempts("failed"), attempts("retried")), (1.0, 0.0));

    let r = gw.chat(&json!({"model": "small", "messages": [{"role": "user", "content": "x"}], "mock": {"fault": "reset"}}));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.api_error()["code"], "upstream_reset");

    let t = Instant::now();
    let r = gw.chat(&json!({"model": "slow", "messages": [{"role": "user", "content": "x"}], "mock": {"latency_ms": 3000}}));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.api_error()["code"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(2));

    let r = gw.chat(&json!({"model": "small", "messages": [{"role": "user", "content": "x"}], "mock": {"fault": "malformed-json"}}));
    assert_eq!(r.status, 502);
    assert_eq!(r.api_error()["code"], "upstream_invalid_response");

    // Upstream errors keep their status and OpenAI shape.
    let r = gw.chat(&json!({"model": "small", "messages": [{"role": "user", "content": "x"}], "mock": {"status": 429}}));
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    r.api_error();

    // A stream that breaks after bytes reached the client ends with an error event and [DONE].
    let r = gw.chat(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "x"}], "mock": {"fault": "drop-mid-stream"}}));
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "upstream_stream_broken");

    assert!(wait_until(Duration::from_secs(5), || gw.metric(
        "smartllm_upstream_errors_total",
        &[("reason", "connect")]
    ) >= 1.0));
    assert!(gw.metric("smartllm_upstream_errors_total", &[("reason", "timeout")]) >= 1.0);
    assert!(gw.metric("smartllm_requests_total", &[("status", "502")]) >= 3.0);
}

/// Upstream connections are kept alive and reused (`upstream_pool`); one the
/// provider closed while it sat idle is never sent a request.
#[test]
fn upstream_connections_are_reused_and_closed_ones_skipped() {
    let mock = Mock::start(&["--keepalive-ms", "300"]);
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "",
    ));
    let connections = || {
        get(&mock.addr, "/_mock/stats").json()["connections"]
            .as_u64()
            .unwrap()
    };
    for i in 0..20 {
        let r = gw.chat(&chat_body("small", &format!("one after another {i}")));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Twenty requests one after another reuse a few connections (one per
    // proxy thread; health checks and these stats reads open their own).
    let before = connections();
    assert!(
        before < 10,
        "{before} connections for 20 sequential requests"
    );
    // The mock closes idle connections after 300 ms: the next request must
    // notice the kept one is closed and open another, not fail or retry.
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..3 {
        let r = gw.chat(&chat_body("small", &format!("after the close {i}")));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("reason", "stale_connection")]
        ),
        0.0
    );
    assert_eq!(
        gw.metric(
            "smartllm_upstream_attempts_total",
            &[("outcome", "retried")]
        ),
        0.0
    );
    assert!(connections() > before, "a new connection after the close");
}

/// A provider that closes a kept connection just as a request arrives (the
/// mock answers two requests per connection, then reads the third and
/// hangs up): the request goes again on a new connection and the client
/// never sees it, even with a single deployment to send it to.
#[test]
fn a_kept_connection_closed_under_a_request_is_retried_on_a_new_one() {
    let mock = Mock::start(&["--drop-after", "2"]);
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!(
            "providers:\n  mock:\n    kind: openai\n    base_url: http://{}/v1\n    health_check:\n      kind: none\n",
            mock.addr
        ),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "",
    ));
    for i in 0..12 {
        let r = gw.chat(&chat_body("small", &format!("sequential {i}")));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Every third request met a closed connection, and was sent again.
    assert!(
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("reason", "stale_connection")]
        ) >= 3.0,
        "{}",
        gw.metrics()
    );
    assert_eq!(
        gw.metric("smartllm_upstream_attempts_total", &[("outcome", "ok")]),
        12.0
    );
}

#[test]
fn provider_keys_from_env_and_file_are_injected() {
    let mock = Mock::start(&[]);
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key");
    std::fs::write(&key_file, "sk-from-file-777\n").unwrap();
    let providers = format!(
        "providers:\n  envkey:\n    kind: openai\n    base_url: http://{0}/v1\n    api_key_env: TEST_PROVIDER_KEY\n    headers:\n      OpenAI-Organization: org-1\n  filekey:\n    kind: openai\n    base_url: http://{0}/v1\n    api_key_file: {1}\n  nokey:\n    kind: openai\n    base_url: http://{0}/v1\n    api_key_env: TEST_UNSET_KEY\n",
        mock.addr,
        key_file.display()
    );
    let models = "models:\n  - name: a\n    deployments:\n      - provider: envkey\n  - name: b\n    deployments:\n      - provider: filekey\n  - name: c\n    deployments:\n      - provider: nokey\n";
    let gw = Gateway::start_with_env(
        ConfigDir::new("", "demo:\n  mode: auto\n", &providers, models, ""),
        &[("TEST_PROVIDER_KEY", "sk-from-env-555")],
    );
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer client-key")],
        &serde_json::to_vec(&chat_body("a", "hi")).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let h = &mock.last()["headers"];
    assert_eq!(h["authorization"], "Bearer sk-from-env-555");
    assert_eq!(h["openai-organization"], "org-1");
    assert_eq!(gw.chat(&chat_body("b", "hi")).status, 200);
    assert_eq!(
        mock.last()["headers"]["authorization"],
        "Bearer sk-from-file-777"
    );
    // A provider whose key is missing answers 503 saying which variable to set.
    let r = gw.chat(&chat_body("c", "hi"));
    assert_eq!(r.status, 503);
    assert!(r.api_error()["message"]
        .as_str()
        .unwrap()
        .contains("TEST_UNSET_KEY"));
    // The admin API shows key status, never the key.
    let cfg = get(&gw.admin, "/admin/config").text();
    assert!(
        cfg.contains("\"set\"")
            && !cfg.contains("sk-from-env-555")
            && !cfg.contains("sk-from-file-777")
    );
    assert!(!gw.log_text().contains("sk-from-env-555"));
}

/// Model `small` on two deployments: provider p1 on `m1`, p2 on `m2`.
fn two_deployments(m1: &Mock, m2: &Mock) -> Gateway {
    let providers = format!(
        "providers:\n{}{}",
        mock_provider("p1", m1),
        mock_provider("p2", m2)
    );
    let models =
        "models:\n  - name: small\n    deployments:\n      - provider: p1\n      - provider: p2\n";
    Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "",
    ))
}

#[test]
fn deployments_are_balanced_and_failed_ones_avoided() {
    let m1 = Mock::start(&["--name", "one"]);
    let m2_port = free_port();
    let m2 = Mock::start_on(m2_port, &["--name", "two"]);
    let gw = two_deployments(&m1, &m2);
    for i in 0..40 {
        assert_eq!(gw.chat(&chat_body("small", &format!("q{i}"))).status, 200);
    }
    let (a, b) = (m1.requests(), m2.requests());
    assert_eq!(a + b, 40);
    assert!(a >= 15 && b >= 15, "unbalanced: {a} / {b}");
    // Kill one deployment: every request still succeeds (retry on refused
    // connections at once, then the health check takes it out of rotation).
    drop(m2);
    for i in 0..30 {
        let r = gw.chat(&chat_body("small", &format!("after {i}")));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(wait_until(Duration::from_secs(5), || get(
        &gw.admin, "/readyz"
    )
    .text()
    .contains("\"healthy\": false")));
    let m1_addr = m1.addr.clone();
    let m2_addr = format!("127.0.0.1:{m2_port}");
    assert!(wait_until(Duration::from_secs(5), || gw
        .metric("smartllm_upstream_healthy", &[("address", &m2_addr)])
        == 0.0
        && gw.metric(
            "smartllm_upstream_healthy",
            &[("address", &m1_addr)]
        ) == 1.0));
    // And it comes back.
    let _m2 = Mock::start_on(m2_port, &["--name", "two"]);
    assert!(wait_until(Duration::from_secs(5), || !get(
        &gw.admin, "/readyz"
    )
    .text()
    .contains("\"healthy\": false")));
}

/// A deployment dropped by a reload leaves `/metrics`: its health series is
/// not reported as the last value it had (the exporter keeps it otherwise).
#[test]
fn a_deployment_removed_by_reload_leaves_the_health_metrics() {
    let m1 = Mock::start(&["--name", "one"]);
    // The second answers 500: its circuit has a series too.
    let m2 = Mock::start(&["--name", "two", "--fail-status", "500"]);
    let gw = two_deployments(&m1, &m2);
    let series = |addr: &str| format!("address=\"{addr}\"");
    let circuit = |addr: &str| format!("smartllm_circuit_state{{deployment=\"small/p2/{addr}\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = gw.metrics();
            m.contains(&series(&m1.addr)) && m.contains(&series(&m2.addr))
        }),
        "both deployments' health series"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = gw.chat(&chat_body("small", "to both"));
            gw.metrics().contains(&circuit(&m2.addr))
        }),
        "{}",
        gw.metrics()
    );
    gw.config.write(
        "models.yaml",
        "models:\n  - name: small\n    deployments:\n      - provider: p1\n",
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    let m = gw.metrics();
    assert!(!m.contains(&series(&m2.addr)), "{m}");
    assert!(m.contains(&series(&m1.addr)), "{m}");
    assert!(!m.contains(&circuit(&m2.addr)), "{m}");
    // Each failed attempt has its line (the access line names only the
    // deployment that answered).
    assert!(gw.log_text().lines().any(|l| l
        .contains("upstream attempt failed; trying the next deployment")
        && l.contains("\"provider\":\"p2\"")
        && l.contains("\"status\":500")));
    assert_eq!(gw.chat(&chat_body("small", "still served")).status, 200);
}

#[test]
fn official_openai_python_sdk_works_against_the_gateway() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the openai package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let (_mock, gw) = basic("", &["--chunk-delay-ms", "5"]);
    gw.config.write("cache.yaml", "cache:\n  enabled: true\n");
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    let out = std::process::Command::new(python)
        .arg(workspace_root().join("tests/python/openai_client.py"))
        .arg(format!("http://{}/v1", gw.addr))
        .arg("--cache")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("plain ok")
            && stdout.contains("stream ok")
            && stdout.contains("error ok")
            && stdout.contains("anthropic ok")
            && stdout.contains("cache stream ok"),
        "{stdout}"
    );
}

/// A test CA and a server certificate for `localhost` signed by it.
fn test_pki(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (make test installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=smartllm-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn https_upstreams_verify_certificates_and_send_sni() {
    let pki = tempfile::tempdir().unwrap();
    test_pki(pki.path());
    let tls_port = free_port();
    let tls_addr = format!("127.0.0.1:{tls_port}");
    let cert = pki.path().join("cert.pem");
    let key = pki.path().join("key.pem");
    let mock = Mock::start(&[
        "--tls-listen",
        &tls_addr,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let providers = format!(
        "providers:\n  secure:\n    kind: openai\n    base_url: https://localhost:{tls_port}/v1\n    tls_ca_file: {}\n    api_key_env: TEST_TLS_KEY\n    health_check:\n      kind: tcp\n      interval: 200ms\n  untrusted:\n    kind: openai\n    base_url: https://localhost:{tls_port}/v1\n    health_check:\n      kind: none\n",
        pki.path().join("ca.pem").display()
    );
    let models = "models:\n  - name: secure\n    deployments:\n      - provider: secure\n  - name: untrusted\n    deployments:\n      - provider: untrusted\n";
    let gw = Gateway::start_with_env(
        ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, ""),
        &[("TEST_TLS_KEY", "sk-tls-123")],
    );
    for stream in [false, true] {
        let r = gw.chat(&json!({"model": "secure", "stream": stream, "messages": [{"role": "user", "content": "over tls"}]}));
        assert_eq!(r.status, 200, "{}", r.text());
        if stream {
            assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
        } else {
            assert!(r.text().contains("over tls"), "{}", r.text());
        }
        let last = mock.last();
        assert_eq!(last["tls_sni"], "localhost", "{last}");
        assert_eq!(last["headers"]["authorization"], "Bearer sk-tls-123");
        assert_eq!(last["headers"]["host"], format!("localhost:{tls_port}"));
    }
    // The TCP health check's handshake trusts the provider's CA too: after
    // a dozen checks the deployment is still healthy (it was marked down
    // for good, which routed aliases and fallbacks would avoid).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        gw.metric("smartllm_upstream_healthy", &[("model", "secure")]),
        1.0,
        "{}",
        gw.metrics()
    );
    // Without the CA the certificate is not trusted: refused, not sent.
    let before = mock.requests();
    let r = gw.chat(&chat_body("untrusted", "over tls"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.api_error()["code"], "upstream_unreachable");
    assert_eq!(mock.requests(), before);
}

/// A client that leaves while the provider works (a slow non-streamed
/// answer, a silent stretch before a stream's first word) cancels the
/// upstream request at once: the gateway logs a 499 long before the answer
/// would have come, billed for the prompt it sent (estimated), not left to
/// run and be billed in full.
#[test]
fn a_client_that_leaves_cancels_the_upstream_request() {
    use std::io::Write;
    let (_mock, gw) = basic("", &[]);
    let leave = |id: &str, body: Value| {
        let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
        let body = serde_json::to_vec(&body).unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nx-request-id: {id}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        drop(s);
        Instant::now()
    };
    let line = |id: &str| {
        gw.log_text()
            .lines()
            .filter(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "smartllm::access")
    };
    let mut slow = chat_body("small", "a slow answer");
    slow["mock"] = json!({"latency_ms": 8000});
    let mut silent = chat_body("small", "a slow stream");
    silent["stream"] = json!(true);
    silent["mock"] = json!({"chunk_delay_ms": 8000, "words": 3});
    for (id, body) in [("left-waiting", slow), ("left-streaming", silent)] {
        let left = leave(id, body);
        assert!(
            wait_until(Duration::from_secs(4), || line(id).is_some()),
            "{id}: no access-log line within 4 s of the client leaving (the answer takes 8 s):\n{}",
            gw.log_text()
        );
        assert!(left.elapsed() < Duration::from_secs(6));
        let l = line(id).unwrap();
        assert_eq!(l["status"], 499, "{l}");
        assert!(l["prompt_tokens"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["usage_estimated"], true, "{l}");
    }
    // The gateway still serves.
    assert_eq!(gw.chat(&chat_body("small", "still here")).status, 200);
}

/// A client that stops reading a long streamed answer, its connection left
/// open (a full TCP window), is cut off after `server.client_write_timeout`:
/// the request ends (logged, billed as a client that left) instead of
/// holding its in-flight slot and upstream connection for good.
#[test]
fn a_client_that_stops_reading_is_cut_off() {
    use std::io::Write;
    let (_mock, gw) = basic("  client_write_timeout: 1s\n", &[]);
    let mut body = chat_body("small", "a very long story");
    body["stream"] = json!(true);
    // About 30 MB of events: far more than the socket buffers hold.
    body["mock"] = json!({"words": 300_000});
    let body = serde_json::to_vec(&body).unwrap();
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nx-request-id: stopped-reading\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let line = || {
        gw.log_text()
            .lines()
            .filter(|l| l.contains("\"request_id\":\"stopped-reading\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "smartllm::access")
    };
    // (The socket is still open and never read.)
    assert!(
        wait_until(Duration::from_secs(20), || line().is_some()),
        "no access-log line while the client holds its connection unread:\n{}",
        gw.log_text()
    );
    assert_eq!(
        gw.metric("smartllm_requests_in_flight", &[]),
        0.0,
        "{}",
        gw.metrics()
    );
    drop(s);
    assert_eq!(gw.chat(&chat_body("small", "still here")).status, 200);
}

/// Only a kept connection closed as the request arrives is resent
/// uncounted: one the provider resets after working on the request (here
/// 1.5 s) is a failure of the deployment, not sent again on the quiet.
#[test]
fn a_kept_connection_reset_after_the_provider_worked_is_a_failure() {
    let mock = Mock::start(&[]);
    // No health checks: the mock's connection count is the gateway's
    // requests' and the test's own.
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!(
            "providers:\n  mock:\n    kind: openai\n    base_url: http://{}/v1\n    health_check:\n      kind: none\n",
            mock.addr
        ),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n",
        "",
    ));
    let stats = || {
        let v = get(&mock.addr, "/_mock/stats").json();
        (
            v["requests"].as_u64().unwrap(),
            v["connections"].as_u64().unwrap(),
        )
    };
    let mut reused = false;
    for i in 0..10 {
        // A kept connection on the gateway thread this request lands on.
        let r = gw.chat(&chat_body("small", &format!("warm {i}")));
        assert_eq!(r.status, 200);
        let (requests, connections) = stats();
        let mut body = chat_body("small", &format!("then reset after a while {i}"));
        body["mock"] = json!({"latency_ms": 1500, "fault": "reset"});
        let r = gw.chat(&body);
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "upstream_reset", "{}", r.text());
        let (requests_after, connections_after) = stats();
        // Sent once, whatever connection it went on.
        assert_eq!(
            requests_after,
            requests + 1,
            "the reset request was sent again"
        );
        // One new connection: this stats call's own; the request went on a kept one.
        if connections_after == connections + 1 {
            reused = true;
            break;
        }
    }
    assert!(reused, "no request went on a kept connection");
    assert_eq!(
        gw.metric(
            "smartllm_upstream_errors_total",
            &[("reason", "stale_connection")]
        ),
        0.0,
        "{}",
        gw.metrics()
    );
}
