//! Anthropic Messages inbound through the real server: passed through byte
//! for byte to Anthropic providers (Claude Code's betas and prompt-cache
//! blocks), translated both ways for OpenAI-compatible ones (text, tools,
//! streams, usage, errors), count_tokens, the model list in Anthropic's
//! shape, cache hits replayed as Messages, and the official `anthropic` SDK.

use crate::common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use smartllm_e2e::*;

/// Models `claude` (Anthropic kind, upstream `claude-x`) and `small`
/// (OpenAI kind); the cache on; a virtual key `sk-ant-client` required.
fn gateway(mock_args: &[&str]) -> (Mock, Gateway) {
    gateway_with_budgets(mock_args, "")
}

/// [`gateway`], with `budgets` (a keys.yaml `budgets:` list) for the key.
fn gateway_with_budgets(mock_args: &[&str], budgets: &str) -> (Mock, Gateway) {
    gateway_with(mock_args, budgets, "routes:\n  auto:\n    model: small\n")
}

/// [`gateway_with_budgets`], with `routes` as routes.yaml.
fn gateway_with(mock_args: &[&str], budgets: &str, routes: &str) -> (Mock, Gateway) {
    let mock = Mock::start(mock_args);
    let providers = format!(
        "providers:\n{}  claude-mock:\n    kind: anthropic\n    base_url: http://{}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    profile: { max_output_tokens: 16384 }\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: claude\n    pricing: { input: 3, output: 15 }\n    profile: { max_output_tokens: 8192, capabilities: [tools, vision, json, streaming, structured_outputs, thinking] }\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n  - name: opus\n    pricing: { input: 5, output: 25 }\n    profile: { capabilities: [tools, json, streaming, system_messages] }\n    deployments:\n      - provider: claude-mock\n        model: claude-opus-4-8\n  - name: reasoner\n    pricing: { input: 2, output: 8 }\n    profile: { capabilities: [tools, json, streaming, reasoning] }\n    deployments:\n      - provider: mock\n        model: o4-mini\n  - name: thinker\n    pricing: { input: 3, output: 15 }\n    profile: { max_output_tokens: 64000, capabilities: [tools, streaming, thinking] }\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n  - name: plain\n    pricing: { input: 2, output: 8 }\n    profile: { capabilities: [tools, json, streaming] }\n    deployments:\n      - provider: mock\n        model: mock-small\n";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, routes);
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    cfg.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: cc\n    tenant: acme\n    app: claude-code\n    sha256: {}\n{budgets}",
            sha("sk-ant-client")
        ),
    );
    let gw = Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-provider-1234")]);
    (mock, gw)
}

fn messages(gw: &Gateway, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut h = vec![
        ("x-api-key", "sk-ant-client"),
        ("anthropic-version", "2023-06-01"),
    ];
    h.extend_from_slice(headers);
    request(&gw.addr, "POST", "/v1/messages", &h, body).unwrap()
}

fn names(evs: &[(String, Value)]) -> Vec<&str> {
    evs.iter().map(|(n, _)| n.as_str()).collect()
}

fn text_of(evs: &[(String, Value)]) -> String {
    evs.iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect()
}

/// The types of a Messages stream's content blocks, in order, once it is
/// checked that they start at indices 0, 1, ... in order, that every delta
/// and stop names a block that was started and not yet stopped, and that
/// every block is stopped.
fn block_types(evs: &[(String, Value)]) -> Vec<String> {
    let mut started: Vec<String> = Vec::new();
    let mut open: Vec<u64> = Vec::new();
    for (name, v) in evs {
        match name.as_str() {
            "content_block_start" => {
                let i = v["index"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} without an index: {v}"));
                assert_eq!(
                    i,
                    started.len() as u64,
                    "blocks start at index 0, 1, ... in order: {v}"
                );
                started.push(
                    v["content_block"]["type"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                );
                open.push(i);
            }
            "content_block_delta" | "content_block_stop" => {
                let i = v["index"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} without an index: {v}"));
                assert!(
                    open.contains(&i),
                    "{name} of block {i}, which is not open (started {started:?}, open {open:?}): {v}"
                );
                if name == "content_block_stop" {
                    open.retain(|o| *o != i);
                }
            }
            _ => {}
        }
    }
    assert!(open.is_empty(), "blocks never stopped: {open:?}");
    started
}

/// Claude Code's default names (dated, not configured) are taken by an
/// alias's `match` pattern: the request is the alias's (its model, its
/// route label), its bytes reach the provider with only the model renamed,
/// and a name no pattern fits is a 404 that lists the patterns.
#[test]
fn dated_names_are_taken_by_an_alias_pattern() {
    let routes = "routes:\n  auto:\n    model: small\n  code:\n    model: claude\n    match: [\"claude-*\"]\n  cheap:\n    model: small\n    match: [\"claude-*haiku*\"]\n";
    let (mock, gw) = gateway_with(&["--words", "5"], "", routes);
    let body = br#"{"model":"claude-sonnet-4-5-20250929","max_tokens":64,"system":[{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"Where is main defined?"}]}"#;
    let r = messages(&gw, &[("anthropic-beta", "claude-code-20250219")], body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("x-smartllm-route").unwrap().starts_with("code;"),
        "{:?}",
        r.header("x-smartllm-route")
    );
    assert_eq!(r.header("x-smartllm-model"), Some("claude"));
    let expect = String::from_utf8_lossy(body).replace("claude-sonnet-4-5-20250929", "claude-x");
    assert_eq!(
        mock.last()["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes()))
    );
    // The more specific pattern wins: haiku names go to the OpenAI-kind model.
    let haiku = br#"{"model":"claude-haiku-4-5-20251001","max_tokens":64,"messages":[{"role":"user","content":"Name this chat"}]}"#;
    let r = messages(&gw, &[], haiku);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-smartllm-model"), Some("small"));
    assert_eq!(mock.last()["path"], "/v1/chat/completions");
    // Labels carry the alias, never the name the client sent.
    let metrics = gw.metrics();
    assert!(metrics.contains("route=\"code\""), "{metrics}");
    assert!(!metrics.contains("claude-sonnet-4-5-20250929"));
    // Looked up by that name (Claude Code checks the model it is set to).
    let looked = request(
        &gw.addr,
        "GET",
        "/v1/models/claude-sonnet-4-5-20250929",
        &[
            ("x-api-key", "sk-ant-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(looked.status, 200, "{}", looked.text());
    assert_eq!(looked.json()["id"], "claude-sonnet-4-5-20250929");
    // The admin explain resolves the name as a request does.
    let explained = post_json(
        &gw.admin,
        "/admin/route/explain",
        &json!({"model": "claude-opus-4-5", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(explained.status, 200, "{}", explained.text());
    let r = messages(
        &gw,
        &[],
        br#"{"model":"gpt-5","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], "not_found_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("claude-* (as code)"), "{msg}");
}

/// Claude Code on its default model (Claude Opus 4.8) sends `role:
/// "system"` turns among the messages: they reach a model listed with
/// `system_messages` byte for byte, join the system prompt of other Claude
/// models (which refuse them), and stay in place for OpenAI-compatible ones.
#[test]
fn mid_conversation_system_messages_reach_each_model_in_a_form_it_takes() {
    let (mock, gw) = gateway(&["--words", "3"]);
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 64, "system": "You are Claude Code.",
            "messages": [
                {"role": "user", "content": "Where is main defined?"},
                {"role": "system", "content": [{"type": "text", "text": "Available agent types: explore."}]}]})
    };
    let send = |v: &Value| messages(&gw, &[], &serde_json::to_vec(v).unwrap());
    // Claude Opus 4.8, listed with them: only the model renamed.
    let sent = serde_json::to_vec(&body("opus")).unwrap();
    let r = messages(&gw, &[], &sent);
    assert_eq!(r.status, 200, "{}", r.text());
    let expect = String::from_utf8_lossy(&sent).replace("\"opus\"", "\"claude-opus-4-8\"");
    assert_eq!(
        mock.last()["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes()))
    );
    // Another Claude model (the mock refuses them as Anthropic does): they
    // join its system prompt, plain and streamed.
    for stream in [false, true] {
        let mut b = body("claude");
        b["stream"] = json!(stream);
        let r = send(&b);
        assert_eq!(r.status, 200, "{}", r.text());
        if stream {
            assert!(r.text().contains("message_stop"), "{}", r.text());
        }
        let up = mock.last()["json"].clone();
        assert_eq!(
            up["messages"],
            json!([{"role": "user", "content": "Where is main defined?"}]),
            "{up}"
        );
        assert_eq!(
            up["system"],
            json!([{"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Available agent types: explore."}]),
            "{up}"
        );
    }
    // An OpenAI-compatible model takes them where they are.
    let r = send(&body("small"));
    assert_eq!(r.status, 200, "{}", r.text());
    let m = mock.last()["json"]["messages"].clone();
    assert_eq!(m[1]["role"], "user", "{m}");
    assert_eq!(
        m[2],
        json!({"role": "system", "content": "Available agent types: explore."}),
        "{m}"
    );
    // Text only, as Anthropic takes them: an image is a 400 naming it.
    let mut bad = body("claude");
    bad["messages"][1]["content"] =
        json!([{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]);
    let r = send(&bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.text().contains("messages.1.content.0"), "{}", r.text());
}

#[test]
fn claude_code_requests_reach_anthropic_byte_for_byte() {
    let (mock, gw) = gateway(&["--words", "12"]);
    // Claude Code's shape: system blocks with cache_control (and a ttl), betas.
    let body = br#"{"model":"claude","max_tokens":256,
  "system":[{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral","ttl":"1h"}}],
  "messages":[{"role":"user","content":[{"type":"text","text":"List the files","cache_control":{"type":"ephemeral"}}]}],
  "metadata":{"user_id":"u-1"}}"#;
    let betas = [(
        "anthropic-beta",
        "claude-code-20250219,prompt-caching-2024-07-31",
    )];
    let r = messages(&gw, &betas, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert!(v["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Mock reply to: List the files"));
    assert_eq!(v["stop_reason"], "end_turn");
    let written = v["usage"]["cache_creation_input_tokens"].as_u64().unwrap();
    assert!(written > 0, "{v}");
    let last = mock.last();
    assert_eq!(last["path"], "/v1/messages");
    // Every byte as sent, but the model name.
    let expect =
        String::from_utf8_lossy(body).replace(r#""model":"claude""#, r#""model":"claude-x""#);
    assert_eq!(
        last["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes())),
        "{last}"
    );
    assert_eq!(
        last["headers"]["anthropic-beta"],
        "claude-code-20250219,prompt-caching-2024-07-31"
    );
    assert_eq!(last["headers"]["anthropic-version"], "2023-06-01");
    // The provider gets the gateway's key, never the client's.
    assert_eq!(last["headers"]["x-api-key"], "sk-ant-provider-1234");
    assert_eq!(r.header("x-smartllm-model"), Some("claude"));

    // Streamed, the provider's events pass through as they come; the second
    // request reads the prompt cache the first one wrote.
    // (Another question: the first answer is in the gateway's cache by now.)
    let stream = String::from_utf8_lossy(body)
        .replace("\"max_tokens\":256", "\"max_tokens\":256,\"stream\":true")
        .replace("List the files", "List the files again");
    let r = messages(&gw, &betas, stream.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = named_events(&r);
    assert_eq!(
        names(&evs),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(block_types(&evs), ["text"]);
    assert_eq!(cache_header(&r), "miss");
    assert_eq!(
        evs[0].1["message"]["usage"]["cache_read_input_tokens"],
        written
    );
    assert!(text_of(&evs).starts_with("Mock reply to: List the files again"));
    // Billed from Anthropic's own usage fields (the ledger writes in batches).
    assert!(wait_until(std::time::Duration::from_secs(5), || costs(
        &gw, "model"
    )["total"]["requests"]
        == 2));
    let c = costs(&gw, "model");
    assert_eq!(c["rows"][0]["cached_tokens"], written, "{c}");
}

#[test]
fn anthropic_clients_of_openai_models_get_translated_answers_tools_and_streams() {
    let (mock, gw) = gateway(&["--words", "12"]);
    let r = messages(
        &gw,
        &[],
        br#"{"model":"small","max_tokens":50,"system":"Be brief.","messages":[{"role":"user","content":"Hello there"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Where Anthropic's SDKs read the request's id: the gateway's.
    assert!(r.header("request-id").is_some());
    assert_eq!(r.header("request-id"), r.header("x-request-id"));
    let v = r.json();
    assert_eq!(
        (v["type"].as_str(), v["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    // An endpoint the gateway does not serve (the Batches API), asked by an
    // Anthropic client: a 404 in Anthropic's shape that says so.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages/batches",
        &[
            ("x-api-key", "sk-ant-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"{}",
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["type"], "error", "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_found_error", "{}", r.text());
    assert!(
        r.text().contains("not an endpoint this gateway serves"),
        "{}",
        r.text()
    );
    let r = request(
        &gw.addr,
        "GET",
        "/v1/files",
        &[
            ("x-api-key", "sk-ant-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (404, Some("error")),
        "{}",
        r.text()
    );
    assert!(v["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Mock reply to: Hello there"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 12);
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let last = mock.last();
    assert_eq!(last["path"], "/v1/chat/completions");
    assert_eq!(
        last["json"]["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(last["json"]["max_tokens"], 50);
    // The client's key stays at the gateway.
    assert!(last["headers"].get("x-api-key").is_none(), "{last}");

    // A tool round trip.
    let tools = json!([{"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]);
    let ask = json!({"model": "small", "max_tokens": 50, "tools": tools,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}]});
    let r = messages(&gw, &[], &serde_json::to_vec(&ask).unwrap());
    let v = r.json();
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    // The provider sent the call alone (`content: null`): no text block.
    assert_eq!(v["content"][0]["type"], "tool_use", "{v}");
    assert_eq!(v["content"].as_array().unwrap().len(), 1, "{v}");
    let call = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"]["query"], "Weather in Oslo?");
    assert_eq!(
        mock.last()["json"]["tools"][0]["function"]["name"],
        "get_weather"
    );
    let answer = json!({"model": "small", "max_tokens": 50, "tools": tools, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": v["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Rain, 4 C"}]}]});
    let r = messages(&gw, &[], &serde_json::to_vec(&answer).unwrap());
    assert_eq!(r.json()["stop_reason"], "end_turn", "{}", r.text());
    let sent = &mock.last()["json"]["messages"];
    assert_eq!(sent[1]["tool_calls"][0]["id"], call["id"]);
    assert_eq!(
        sent[2],
        json!({"role": "tool", "tool_call_id": call["id"], "content": "Rain, 4 C"})
    );

    // Streamed: Anthropic's event sequence, tool call included.
    let mut s = ask.clone();
    s["stream"] = json!(true);
    s["messages"][0]["content"] = json!("Weather in Bergen?");
    let r = messages(&gw, &[], &serde_json::to_vec(&s).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = named_events(&r);
    let n = names(&evs);
    assert_eq!(n[..2], ["message_start", "ping"]);
    assert_eq!(n[n.len() - 2..], ["message_delta", "message_stop"]);
    // A tool-only turn upstream (no content deltas, only tool_calls deltas):
    // one tool_use block, at index 0, opened, filled and stopped in order.
    assert_eq!(block_types(&evs), ["tool_use"], "{}", r.text());
    assert_eq!(text_of(&evs), "", "{}", r.text());
    let tool_start = evs
        .iter()
        .find(|(_, v)| v["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(tool_start.1["content_block"]["name"], "get_weather");
    let args: String = evs
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap()["query"],
        "Weather in Bergen?"
    );
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 12);
    assert_eq!(mock.last()["stream_options"]["include_usage"], true);

    // Thinking goes only to providers that take it: a clear 400 here.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"small","max_tokens":50,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("thinking"));
    // ... and through to Anthropic ones, whose thinking blocks come back.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"claude","max_tokens":50,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"think"}]}"#,
    );
    assert_eq!(r.json()["content"][0]["type"], "thinking", "{}", r.text());
}

/// Extended thinking and reasoning effort cross between the two APIs for
/// models listed with `reasoning` (OpenAI-compatible) or `thinking`
/// (Claude): an Anthropic client's thinking budget reaches a reasoning model
/// as `reasoning_effort`, an OpenAI client's effort reaches Claude as a
/// thinking budget, and a routed alias may pick the reasoning model for a
/// request with thinking.
#[test]
fn thinking_and_reasoning_effort_cross_between_the_apis() {
    let (mock, gw) = gateway_with(
        &[],
        "",
        "routes:\n  mixed:\n    candidates: [small, reasoner]\n    rules:\n      - name: first\n        when: {}\n        pin: small\n  deep:\n    candidates: [reasoner, small]\n    rules:\n      - name: first\n        when: {}\n        pin: reasoner\n",
    );
    // Claude Code's budget (31,999) on a reasoning model: effort high, the
    // history's thinking blocks left out.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"reasoner","max_tokens":40000,"thinking":{"type":"enabled","budget_tokens":31999},"messages":[{"role":"user","content":"Plan it"},{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"sig"},{"type":"text","text":"A plan."}]},{"role":"user","content":"Refine it"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "message");
    let sent = mock.last();
    assert_eq!(sent["path"], "/v1/chat/completions");
    assert_eq!(sent["json"]["reasoning_effort"], "high", "{sent}");
    assert!(sent["json"].get("thinking").is_none(), "{sent}");
    // A reasoning model takes its limit as `max_completion_tokens`.
    assert_eq!(sent["json"]["max_completion_tokens"], 40000, "{sent}");
    assert!(sent["json"].get("max_tokens").is_none(), "{sent}");
    assert!(
        !sent["json"]["messages"].to_string().contains("sig"),
        "{sent}"
    );
    let r = messages(
        &gw,
        &[],
        br#"{"model":"reasoner","max_tokens":5000,"thinking":{"type":"enabled","budget_tokens":2048},"messages":[{"role":"user","content":"Quick one"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["json"]["reasoning_effort"], "low");
    // A model not listed with `reasoning` still refuses it by name.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"small","max_tokens":50,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // A routed alias pinned to a model that cannot take thinking picks the
    // one that can.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"mixed","max_tokens":20000,"thinking":{"type":"enabled","budget_tokens":8000},"messages":[{"role":"user","content":"Say hello."}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-smartllm-model"),
        Some("reasoner"),
        "{:?}",
        r.headers
    );
    assert_eq!(mock.last()["json"]["reasoning_effort"], "medium");

    // A tool loop the reasoning model began, moved to Claude (a fallback, a
    // rule): its tool call has no thinking block, which Claude wants first
    // with thinking on, so Claude gets this request without thinking; its
    // own tool turn (opening with its signed thinking) keeps it.
    let loop_body = |first: &str| {
        format!(
            r#"{{"model":"claude","max_tokens":4000,"thinking":{{"type":"enabled","budget_tokens":2000}},"tools":[{{"name":"f","input_schema":{{"type":"object"}}}}],"messages":[{{"role":"user","content":"Go"}},{{"role":"assistant","content":[{first}{{"type":"tool_use","id":"call_1","name":"f","input":{{}}}}]}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"call_1","content":"done"}}]}}]}}"#
        )
    };
    let r = messages(&gw, &[], loop_body("").as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = mock.last();
    assert_eq!(sent["path"], "/v1/messages");
    assert!(sent["json"].get("thinking").is_none(), "{sent}");
    let r = messages(
        &gw,
        &[],
        loop_body(r#"{"type":"thinking","thinking":"hm","signature":"sig"},"#).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["json"]["thinking"]["budget_tokens"], 2000);

    // The other way: an OpenAI client's effort reaches Claude as a budget,
    // without the sampling settings thinking refuses.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-ant-client")],
        br#"{"model":"thinker","reasoning_effort":"medium","temperature":0.2,"messages":[{"role":"user","content":"Think about it"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = mock.last();
    assert_eq!(sent["path"], "/v1/messages");
    assert_eq!(
        sent["json"]["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192}),
        "{sent}"
    );
    assert!(sent["json"].get("temperature").is_none(), "{sent}");
    let answer = r.json();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("Mock reply"), "{answer}");
    // A Claude model not listed with `thinking` gets none.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-ant-client")],
        br#"{"model":"opus","reasoning_effort":"high","messages":[{"role":"user","content":"Think"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(mock.last()["json"].get("thinking").is_none());
    // `reasoning_effort` (agents often send one) goes to a model
    // listed with `reasoning` or listing nothing, and is left out for one
    // listed without it (which would answer 400).
    for (model, kept) in [("reasoner", true), ("small", true), ("plain", false)] {
        let body = json!({"model": model, "reasoning_effort": "low", "messages": [{"role": "user", "content": "Hi"}]});
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer sk-ant-client")],
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        let sent = mock.last();
        assert_eq!(
            sent["json"].get("reasoning_effort").is_some(),
            kept,
            "{model}: {sent}"
        );
        assert_eq!(sent["json"]["messages"][0]["content"], "Hi");
    }

    // A reasoning model answers 400 to sampling settings: it gets the
    // request without them, from either API.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"reasoner","max_tokens":100,"temperature":0.3,"top_p":0.9,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = mock.last();
    assert!(sent["json"].get("temperature").is_none(), "{sent}");
    assert!(sent["json"].get("top_p").is_none(), "{sent}");
    let chat = |body: Value| {
        request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer sk-ant-client")],
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap()
    };
    let r = chat(
        json!({"model": "reasoner", "temperature": 0.2, "presence_penalty": 0.5,
        "frequency_penalty": 0.1, "stop": ["END"], "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = mock.last();
    for k in ["temperature", "presence_penalty", "frequency_penalty"] {
        assert!(sent["json"].get(k).is_none(), "{k}: {sent}");
    }
    // Named directly, what it cannot give goes as sent (its 400 says why);
    // a model listed without `reasoning` keeps every setting.
    assert_eq!(sent["json"]["stop"], json!(["END"]), "{sent}");
    let r = chat(
        json!({"model": "plain", "temperature": 0.2, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["json"]["temperature"], 0.2);
    // Routed, stop sequences keep a request off a reasoning model, even
    // one a rule pins: the route says why.
    for (body, model) in [
        (
            json!({"model": "deep", "messages": [{"role": "user", "content": "Hi"}]}),
            "reasoner",
        ),
        (
            json!({"model": "deep", "stop": "END", "messages": [{"role": "user", "content": "Hi"}]}),
            "small",
        ),
        (
            json!({"model": "deep", "logprobs": true, "messages": [{"role": "user", "content": "Hi"}]}),
            "small",
        ),
    ] {
        let r = chat(body.clone());
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        assert_eq!(
            r.header("x-smartllm-model"),
            Some(model),
            "{body}: {:?}",
            r.headers
        );
    }
    let r = messages(
        &gw,
        &[],
        br#"{"model":"deep","max_tokens":100,"stop_sequences":["</answer>"],"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-smartllm-model"),
        Some("small"),
        "{:?}",
        r.headers
    );
}

/// A routed alias never picks a model that cannot take the request: with
/// extended thinking (which OpenAI-compatible providers refuse), the router
/// leaves out the model served only by one, even where a rule pins it.
#[test]
fn routing_keeps_thinking_on_models_that_take_it() {
    let (_mock, gw) = gateway_with(
        &[],
        "",
        "routes:\n  mixed:\n    candidates: [small, claude]\n    rules:\n      - name: first\n        when: {}\n        pin: small\n",
    );
    let plain = messages(
        &gw,
        &[],
        br#"{"model":"mixed","max_tokens":50,"messages":[{"role":"user","content":"Say hello."}]}"#,
    );
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(
        plain.header("x-smartllm-model"),
        Some("small"),
        "{:?}",
        plain.headers
    );
    let think = messages(
        &gw,
        &[],
        br#"{"model":"mixed","max_tokens":2000,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"Say hello."}]}"#,
    );
    assert_eq!(think.status, 200, "{}", think.text());
    assert_eq!(
        think.header("x-smartllm-model"),
        Some("claude"),
        "{:?}",
        think.headers
    );
    assert_eq!(
        think.json()["content"][0]["type"],
        "thinking",
        "{}",
        think.text()
    );
}

#[test]
fn anthropic_errors_count_tokens_models_and_cache_hits() {
    let (mock, gw) = gateway(&["--words", "12"]);
    // Errors in Anthropic's shape, with the right status.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[],
        br#"{"model":"small"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    // Not worth sending again (Claude Code would retry a refused key for
    // minutes without it), and the request's id as Anthropic gives it.
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(
        r.json()["request_id"].as_str(),
        r.header("x-request-id"),
        "{}",
        r.text()
    );
    // Counted under its endpoint, though refused before it was read (the
    // count comes after the answer is written: waited for).
    let counted = || {
        gw.metrics().lines().any(|l| {
            l.starts_with("smartllm_requests_total{")
                && l.contains("endpoint=\"messages\"")
                && l.contains("status=\"401\"")
        })
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), counted),
        "{}",
        gw.metrics()
    );
    // Claude Code's reachability probe at start, without a key: not a 401.
    let probe = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
        .arg(format!("http://{}/", gw.addr))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "200");
    assert_eq!(get(&gw.addr, "/").status, 200);
    let r = messages(
        &gw,
        &[],
        br#"{"model":"small","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let r = messages(
        &gw,
        &[],
        br#"{"model":"nope","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["type"].as_str()),
        (404, Some("not_found_error"))
    );
    // A provider's error, in the client's shape.
    let r = messages(
        &gw,
        &[],
        br#"{"model":"small","max_tokens":5,"messages":[{"role":"user","content":"x [mock-status:429]"}]}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["type"].as_str()),
        (429, Some("rate_limit_error")),
        "{}",
        r.text()
    );
    let r = messages(
        &gw,
        &[],
        br#"{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"x [mock-status:529]"}]}"#,
    );
    assert_eq!(r.status, 529, "{}", r.text());
    assert_eq!(r.json()["type"], "error");
    // Anthropic's own error passes through, its type included.
    assert_eq!(
        r.json()["error"]["type"],
        "overloaded_error",
        "{}",
        r.text()
    );
    // A stream that fails mid-way ends in Anthropic's error event, both ways.
    for model in ["small", "claude"] {
        let body = format!(
            r#"{{"model":"{model}","max_tokens":50,"stream":true,"messages":[{{"role":"user","content":"x [mock-fault:error-mid-stream]"}}]}}"#
        );
        let r = messages(&gw, &[], body.as_bytes());
        let evs = named_events(&r);
        let (name, v) = evs.last().unwrap();
        assert_eq!(name, "error", "{model}: {}", r.text());
        assert_eq!(v["type"], "error");
        assert!(
            !r.text().contains("sk-ant-provider-1234"),
            "the key is scrubbed"
        );
    }

    // A pass-through stream broken inside an event: the client gets whole
    // events only, then the gateway's error event (never half an event
    // glued to it).
    let body = br#"{"model":"claude","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"x [mock-fault:drop-mid-event]"}]}"#;
    let r = messages(&gw, &[], body);
    let evs = named_events(&r);
    assert!(
        evs.iter().all(|(_, v)| v.is_object()),
        "an event that is not whole: {}",
        r.text()
    );
    assert!(
        evs.iter().any(|(n, _)| n == "content_block_delta"),
        "{}",
        r.text()
    );
    let (name, v) = evs.last().unwrap();
    assert_eq!(
        (name.as_str(), &v["type"]),
        ("error", &json!("error")),
        "{}",
        r.text()
    );
    assert!(!r.text().contains(" cut"), "{}", r.text());

    // count_tokens: exact from Anthropic providers, estimated for others.
    let count = |model: &str| {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"How many tokens is this question?"}}]}}"#
        );
        request(
            &gw.addr,
            "POST",
            "/v1/messages/count_tokens",
            &[("x-api-key", "sk-ant-client")],
            body.as_bytes(),
        )
        .unwrap()
    };
    let before = mock.requests();
    let r = count("claude");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(mock.last()["path"], "/v1/messages/count_tokens");
    assert_eq!(mock.requests(), before + 1);
    let r = count("small");
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-smartllm-estimated"), Some("true"));
    assert_eq!(mock.requests(), before + 1, "estimated locally");

    // The model list, as Claude Code asks for it.
    let r = request(
        &gw.addr,
        "GET",
        "/v1/models?limit=1000",
        &[
            ("x-api-key", "sk-ant-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"",
    )
    .unwrap();
    let v = r.json();
    assert_eq!(v["has_more"], false, "{v}");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"claude") && ids.contains(&"auto"), "{v}");
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["first_id"], ids[0]);
    let page = request(
        &gw.addr,
        "GET",
        "/v1/models?limit=1",
        &[
            ("x-api-key", "sk-ant-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"",
    )
    .unwrap()
    .json();
    assert_eq!(
        (
            page["data"].as_array().unwrap().len(),
            page["has_more"].as_bool()
        ),
        (1, Some(true))
    );

    // Cache hits replayed as Messages, JSON and stream; each API its own namespace.
    let q = br#"{"model":"small","max_tokens":20,"messages":[{"role":"user","content":"What is the capital of Norway?"}]}"#;
    let stored = get(&gw.admin, "/admin/cache/stats").json()["stats"]["l1_entries"]
        .as_u64()
        .unwrap();
    let first = messages(&gw, &[], q);
    assert_eq!(cache_header(&first), "miss");
    wait_cached(&gw, stored + 1);
    let before = mock.requests();
    let hit = messages(&gw, &[], q);
    assert_eq!(cache_header(&hit), "hit-exact", "{:?}", hit.headers);
    assert_eq!(hit.json()["content"], first.json()["content"]);
    assert_eq!(hit.json()["type"], "message");
    let s = String::from_utf8_lossy(q)
        .replace("\"max_tokens\":20", "\"max_tokens\":20,\"stream\":true");
    let hit = messages(&gw, &[], s.as_bytes());
    assert_eq!(cache_header(&hit), "hit-exact");
    let evs = named_events(&hit);
    assert_eq!(names(&evs).first(), Some(&"message_start"));
    assert_eq!(names(&evs).last(), Some(&"message_stop"));
    assert_eq!(block_types(&evs), ["text"], "{}", hit.text());
    assert_eq!(
        text_of(&evs),
        first.json()["content"][0]["text"].as_str().unwrap()
    );
    assert_eq!(mock.requests(), before, "hits never reach the upstream");
    let chat = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-ant-client")],
        br#"{"model":"small","max_tokens":20,"messages":[{"role":"user","content":"What is the capital of Norway?"}]}"#,
    )
    .unwrap();
    assert_eq!(
        cache_header(&chat),
        "miss",
        "a chat client never gets a Messages entry"
    );
}

#[test]
fn the_official_anthropic_sdk_works_against_the_gateway() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the anthropic package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let (_mock, gw) = gateway(&["--words", "12"]);
    let out = std::process::Command::new(python)
        .arg(workspace_root().join("tests/python/anthropic_client.py"))
        .arg(format!("http://{}", gw.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "create ok",
        "stream ok",
        "tools ok",
        "count ok",
        "models ok",
        "errors ok",
        "translated ok",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
}

#[test]
fn the_per_request_cost_cap_reaches_bodies_passed_through() {
    // claude: $3 / $15 per 1M tokens; a $0.0002 cap leaves room for a few
    // output tokens, far fewer than the 256 asked for.
    let (mock, gw) = gateway_with_budgets(
        &["--words", "40"],
        "budgets:\n  - scope: tenant\n    name: acme\n    max_request_usd: 0.0002\n",
    );
    let body = br#"{"model":"claude","max_tokens":256,"messages":[{"role":"user","content":"Tell me a long story"}]}"#;
    let r = messages(&gw, &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
    let last = mock.last();
    let sent = last["json"]["max_tokens"].as_u64().unwrap();
    assert!(sent < 256, "the cap lowered max_tokens: {sent}");
    // Still every other byte as the client sent it.
    let expect = String::from_utf8_lossy(body)
        .replace(r#""model":"claude""#, r#""model":"claude-x""#)
        .replace(r#""max_tokens":256"#, &format!(r#""max_tokens":{sent}"#));
    assert_eq!(
        last["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes()))
    );
    let u = &r.json()["usage"];
    let cost =
        u["input_tokens"].as_f64().unwrap() * 3e-6 + u["output_tokens"].as_f64().unwrap() * 15e-6;
    assert!(cost <= 0.0002, "{u}");
}

/// `l1_entries` of the cache now.
fn cache_entries(gw: &Gateway) -> u64 {
    get(&gw.admin, "/admin/cache/stats").json()["stats"]["l1_entries"]
        .as_u64()
        .unwrap()
}

#[test]
fn what_the_cache_key_cannot_see_is_never_answered_from_the_cache() {
    let (mock, gw) = gateway(&["--words", "12"]);
    // A document only an Anthropic provider reads: each question about a
    // document goes upstream, whatever an earlier document's answer was.
    let doc = |data: &str| {
        format!(
            r#"{{"model":"claude","max_tokens":20,"messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{data}"}}}},{{"type":"text","text":"Summarize this document."}}]}}]}}"#
        )
    };
    let before = mock.requests();
    for data in ["QUFBQQ==", "QkJCQg==", "QUFBQQ=="] {
        let r = messages(&gw, &[], doc(data).as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(cache_header(&r), "bypass");
    }
    // Extended thinking: its blocks are not what the cache keeps.
    let think = br#"{"model":"claude","max_tokens":2000,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;
    for _ in 0..2 {
        assert_eq!(cache_header(&messages(&gw, &[], think)), "bypass");
    }
    assert_eq!(mock.requests(), before + 5, "every one went upstream");

    // top_k has no Chat Completions field, but it is part of the key.
    let top_k = |k: u32| {
        format!(
            r#"{{"model":"claude","max_tokens":20,"top_k":{k},"messages":[{{"role":"user","content":"Name a river in Spain."}}]}}"#
        )
    };
    let stored = cache_entries(&gw);
    assert_eq!(
        cache_header(&messages(&gw, &[], top_k(5).as_bytes())),
        "miss"
    );
    wait_cached(&gw, stored + 1);
    assert_eq!(
        cache_header(&messages(&gw, &[], top_k(40).as_bytes())),
        "miss"
    );
    assert_eq!(
        cache_header(&messages(&gw, &[], top_k(5).as_bytes())),
        "hit-exact"
    );

    // An answer cut at the model's own limit (no max tokens asked for) is
    // not stored; one cut at the limit the client set may be.
    let chat = |body: &Value| {
        request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer sk-ant-client")],
            &serde_json::to_vec(body).unwrap(),
        )
        .unwrap()
    };
    let cut = json!({"model": "small", "messages": [{"role": "user", "content": "Tell me everything about rivers [mock-truncate]"}]});
    let r = chat(&cut);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    let stored = cache_entries(&gw);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(cache_entries(&gw), stored, "a cut-off answer was stored");
    assert_eq!(cache_header(&chat(&cut)), "miss");
    let limited = json!({"model": "small", "max_tokens": 3, "messages": [{"role": "user", "content": "Count to ten slowly"}]});
    let r = chat(&limited);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    wait_cached(&gw, stored + 1);
    assert_eq!(cache_header(&chat(&limited)), "hit-exact");
}

#[test]
fn a_substitute_models_answer_is_not_cached_as_the_asked_models() {
    // Every request passes the key's tiny budget: claude degrades to the
    // cheaper plain.
    let (_mock, gw) = gateway_with_budgets(
        &["--words", "12"],
        "budgets:\n  - scope: key\n    name: cc\n    monthly_usd: 0.000000001\n    on_exceed: degrade\n    degrade_to: plain\n",
    );
    let q = br#"{"model":"claude","max_tokens":20,"messages":[{"role":"user","content":"What is the capital of Peru?"}]}"#;
    let stored = cache_entries(&gw);
    for _ in 0..2 {
        let r = messages(&gw, &[], q);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-smartllm-model"),
            Some("plain"),
            "{:?}",
            r.headers
        );
        assert_eq!(cache_header(&r), "miss");
        std::thread::sleep(std::time::Duration::from_millis(800));
        assert_eq!(
            cache_entries(&gw),
            stored,
            "plain's answer stored as claude's"
        );
    }
}

/// OpenAI's reasoning models refuse `max_tokens` (the mock does too): a
/// provider with `max_tokens_field: max_completion_tokens` gets every
/// client's token limit under that name, Anthropic's required `max_tokens`,
/// a Responses `max_output_tokens` and an OpenAI client's `max_tokens` alike.
#[test]
fn a_reasoning_model_gets_the_token_limit_under_the_name_it_takes() {
    let mock = Mock::start(&[]);
    let providers = format!(
        "providers:\n{}{}    max_tokens_field: max_completion_tokens\n",
        mock_provider("compat", &mock),
        mock_provider("openai", &mock)
    );
    let models = "models:\n  - name: reasoner\n    pricing: { input: 1, output: 4 }\n    deployments:\n      - provider: openai\n        model: o3-mini\n  - name: reasoner-compat\n    pricing: { input: 1, output: 4 }\n    deployments:\n      - provider: compat\n        model: o3-mini\n  - name: plain-compat\n    pricing: { input: 1, output: 4 }\n    deployments:\n      - provider: compat\n        model: o3x-tuned\n";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, "");
    let gw = Gateway::start(cfg);
    let h = [("anthropic-version", "2023-06-01")];
    let msg = |model: &str| {
        let body = json!({"model": model, "max_tokens": 50,
            "messages": [{"role": "user", "content": "Think about primes."}]});
        request(
            &gw.addr,
            "POST",
            "/v1/messages",
            &h,
            body.to_string().as_bytes(),
        )
        .unwrap()
    };
    // Under the old name the model refuses, and the Anthropic client
    // reads why in its own shape (a name the gateway does not know for a
    // reasoning model's: nothing renamed).
    let r = msg("plain-compat");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"]["type"],
        "invalid_request_error",
        "{}",
        r.text()
    );
    assert!(r.text().contains("max_completion_tokens"), "{}", r.text());
    let sent = |r: Response| {
        assert_eq!(r.status, 200, "{}", r.text());
        let last = mock.last()["json"].clone();
        (
            last["max_tokens"].clone(),
            last["max_completion_tokens"].clone(),
        )
    };
    assert_eq!(sent(msg("reasoner")), (Value::Null, json!(50)));
    let chat = json!({"model": "reasoner", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Think about primes."}]});
    assert_eq!(sent(gw.chat(&chat)), (Value::Null, json!(5)));
    let resp = json!({"model": "reasoner", "max_output_tokens": 7, "input": "Think about primes."});
    let r = post_json(&gw.addr, "/v1/responses", &resp);
    assert_eq!(sent(r), (Value::Null, json!(7)));
    // A provider with no name of its own: an upstream OpenAI reasoning
    // model's name (o3-mini) renames as well; other models get the
    // client's name as given.
    assert_eq!(sent(msg("reasoner-compat")), (Value::Null, json!(50)));
    let chat = json!({"model": "plain-compat", "max_completion_tokens": 5,
        "messages": [{"role": "user", "content": "Say hi."}]});
    assert_eq!(sent(gw.chat(&chat)), (Value::Null, json!(5)));
}

/// A provider that takes no `stream_options` (`stream_usage: false`) is not
/// sent one for an Anthropic client's stream either: the Messages stream
/// reports estimated usage, and the gateway bills its own estimate.
#[test]
fn a_provider_without_stream_usage_serves_messages_streams_with_estimates() {
    let mock = Mock::start(&["--words", "12"]);
    let providers = format!(
        "providers:\n{}    stream_usage: false\n",
        mock_provider("plain", &mock)
    );
    let models = "models:\n  - name: local\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: plain\n        model: local-model\n";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, "");
    let gw = Gateway::start(cfg);
    let body = json!({"model": "local", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Tell me about streams."}]});
    let h = [("anthropic-version", "2023-06-01")];
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &h,
        body.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["stream_options"], Value::Null);
    let evs = named_events(&r);
    assert_eq!(names(&evs).last(), Some(&"message_stop"), "{evs:?}");
    let delta = &evs.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    let out = delta["usage"]["output_tokens"].as_u64().unwrap();
    assert!((5..=30).contains(&out), "12 words estimated: {delta}");
    let line = || {
        gw.log_text()
            .lines()
            .filter(|l| l.contains("\"endpoint\":\"messages\""))
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    };
    assert!(wait_until(std::time::Duration::from_secs(5), || line().is_some()));
    let line = line().unwrap();
    assert_eq!(line["usage_estimated"], true, "{line}");
    assert!(line["completion_tokens"].as_u64().unwrap() > 0, "{line}");
}

/// What Claude Code and the OpenAI SDKs send reaches the other provider in
/// a form it takes: Claude Code's long user id and its 32,000-token limit
/// to an OpenAI model, images a tool returned; structured outputs, one tool
/// call at a time and PDFs to Claude; what Claude cannot take is a 400
/// naming it; a field given twice is refused before anything is sent.
#[test]
fn what_each_sdk_sends_reaches_the_other_provider_in_a_form_it_takes() {
    let (mock, gw) = gateway(&["--words", "3"]);
    let user_id = format!(
        "user_{}_account_{}_session_{}",
        "a".repeat(64),
        "b".repeat(36),
        "c".repeat(36)
    );
    let ask = json!({"model": "small", "max_tokens": 32000, "metadata": {"user_id": user_id},
        "messages": [
            {"role": "user", "content": "Read the screenshot"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a.png"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
                {"type": "text", "text": "What does it show?"}]}]});
    let r = messages(&gw, &[], &serde_json::to_vec(&ask).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    let up = mock.last()["json"].clone();
    // OpenAI takes a `user` of at most 64 characters and a limit the model has.
    let user = up["user"].as_str().unwrap();
    assert_eq!(user.len(), 64, "{up}");
    assert!(!user.starts_with("user_"), "a digest, not a cut id");
    assert_eq!(up["max_tokens"], 16384, "lowered to the model's most");
    let m = up["messages"].as_array().unwrap();
    assert_eq!(m[2]["role"], "tool");
    assert_eq!(m[3]["role"], "user");
    assert_eq!(
        m[3]["content"][0]["image_url"]["url"],
        "data:image/png;base64,iVBORw0KGgo="
    );
    assert_eq!(
        m[3]["content"].as_array().unwrap().last().unwrap()["text"],
        "What does it show?"
    );
    // Structured outputs and strict tools keep their schema: OpenAI's
    // json_schema response format and strict functions.
    let city = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
    let r = messages(
        &gw,
        &[],
        &serde_json::to_vec(&json!({"model": "small", "max_tokens": 100,
            "output_config": {"format": {"type": "json_schema", "schema": city}},
            "tools": [{"name": "lookup", "input_schema": city, "strict": true}],
            "messages": [{"role": "user", "content": "Capital of Norway?"}]}))
        .unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let up = mock.last()["json"].clone();
    assert_eq!(
        up["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "output", "schema": city, "strict": true}}),
        "{up}"
    );
    assert_eq!(up["tools"][0]["function"]["strict"], true, "{up}");

    // Chat Completions to Claude.
    let chat = |body: Value| {
        request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-ant-client")],
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap()
    };
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
    let r = chat(json!({"model": "claude", "max_tokens": 50000,
        "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
            {"type": "text", "text": "Which city?"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": true, "schema": schema}},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "parallel_tool_calls": false}));
    assert_eq!(r.status, 200, "{}", r.text());
    let last = mock.last();
    assert_eq!(last["path"], "/v1/messages");
    let up = &last["json"];
    assert_eq!(
        up["output_config"],
        json!({"format": {"type": "json_schema", "schema": schema}})
    );
    assert_eq!(
        up["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(up["max_tokens"], 8192, "lowered to the model's most");
    assert_eq!(up["messages"][0]["content"][0]["type"], "document");
    assert_eq!(
        up["messages"][0]["content"][0]["source"]["data"],
        "JVBERi0x"
    );
    let before = mock.requests();
    for (body, param) in [
        (
            json!({"model": "claude", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
            "n",
        ),
        (
            json!({"model": "claude", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
            "content",
        ),
    ] {
        let r = chat(body);
        assert_eq!(r.status, 400, "{}", r.text());
        let e = r.json();
        assert_eq!(
            (e["error"]["code"].as_str(), e["error"]["param"].as_str()),
            (Some("unsupported_for_provider"), Some(param)),
            "{e}"
        );
    }
    assert_eq!(mock.requests(), before, "nothing sent");

    // MCP servers are Anthropic's API's to connect to: an OpenAI-compatible
    // model would answer without their tools, so it says so instead.
    let r = messages(&gw, &[], br#"{"model":"small","max_tokens":5,"mcp_servers":[{"type":"url","url":"https://x.example/mcp","name":"x"}],"messages":[{"role":"user","content":"use my tools"}]}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["type"], "error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mcp_servers"),
        "{e}"
    );
    assert_eq!(mock.requests(), before, "nothing sent");

    // A field given twice: read one way here, another upstream. Refused.
    let r = messages(&gw, &[], br#"{"model":"small","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"max_tokens":100000}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["type"], "error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`max_tokens` more than once"),
        "{e}"
    );
    assert_eq!(mock.requests(), before);
}
