//! OpenAI Responses inbound through the real server: translated to Chat
//! Completions (and on to Anthropic) with the conversation kept by the
//! gateway for `previous_response_id`, `GET`/`DELETE` of stored responses
//! scoped by tenant, function calling, streams with the Responses event
//! sequence, input_tokens, cache hits, passthrough to a provider that speaks
//! Responses, and the official openai SDK's `client.responses`.

use crate::common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use smartllm_e2e::*;
use std::time::Duration;

/// Models `small` (OpenAI chat), `claude` (Anthropic), `native` (a
/// provider that speaks Responses) and `native2` (two accounts of one that
/// does, `resp-mock` and `resp-mock-b`); the cache on; keys for tenants
/// acme and beta.
fn gateway() -> (Mock, Gateway) {
    let mock = Mock::start(&["--words", "12"]);
    let providers = format!(
        "providers:\n{}  claude-mock:\n    kind: anthropic\n    base_url: http://{1}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n  resp-mock:\n    kind: openai\n    base_url: http://{1}/v1\n    responses: true\n  resp-mock-b:\n    kind: openai\n    base_url: http://{1}/v1\n    responses: true\n    api_key_env: TEST_RESP_B_KEY\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = "models:\n  - name: small\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: claude\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n  - name: native\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: resp-mock\n        model: gpt-native\n  - name: native-4o\n    profile: { capabilities: [tools, json, streaming] }\n    deployments:\n      - provider: resp-mock\n        model: gpt-native\n  - name: native-o3\n    profile: { capabilities: [tools, json, streaming, reasoning] }\n    deployments:\n      - provider: resp-mock\n        model: o3\n  - name: native2\n    deployments:\n      - provider: resp-mock\n        model: gpt-native\n      - provider: resp-mock-b\n        model: gpt-native\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    cfg.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: a\n    tenant: acme\n    app: agents\n    sha256: {}\n  - name: b\n    tenant: beta\n    app: agents\n    sha256: {}\n",
            sha("sk-resp-a"),
            sha("sk-resp-b")
        ),
    );
    let gw = Gateway::start_with_env(
        cfg,
        &[
            ("TEST_ANTHROPIC_KEY", "sk-ant-provider-1234"),
            ("TEST_RESP_B_KEY", "sk-resp-b-provider-5678"),
        ],
    );
    (mock, gw)
}

fn call(gw: &Gateway, key: &str, method: &str, path: &str, body: &Value) -> Response {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).unwrap()
    };
    request(
        &gw.addr,
        method,
        path,
        &[("Authorization", &format!("Bearer {key}"))],
        &bytes,
    )
    .unwrap()
}

fn create(gw: &Gateway, body: &Value) -> Response {
    call(gw, "sk-resp-a", "POST", "/v1/responses", body)
}

fn output_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .filter_map(|c| c["text"].as_str())
        .collect()
}

/// `store.responses: false`: the gateway keeps no conversation; answers
/// still come, `GET` finds none and `previous_response_id` is refused as
/// unknown.
#[test]
fn with_the_responses_store_off_nothing_is_kept() {
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\nstore:\n  responses: false\n  responses_ttl: 1h\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: a\n    tenant: acme\n    sha256: {}\n",
            sha("sk-resp-a")
        ),
    );
    let gw = Gateway::start(cfg);
    let r = create(&gw, &json!({"model": "small", "input": "Name a fjord"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let got = call(
        &gw,
        "sk-resp-a",
        "GET",
        &format!("/v1/responses/{id}"),
        &Value::Null,
    );
    assert_eq!(got.status, 404, "{}", got.text());
    let cont = create(
        &gw,
        &json!({"model": "small", "previous_response_id": id, "input": "And another?"}),
    );
    assert_eq!(cont.status, 400, "{}", cont.text());
    assert_eq!(cont.api_error()["code"], "previous_response_not_found");
}

/// A tenant's erasure (`POST /admin/cache/purge?tenant=`): the responses
/// the gateway keeps for it go with its cache entries, another tenant's
/// stay.
#[test]
fn a_tenant_purge_erases_its_kept_responses_and_cached_answers() {
    let (_mock, gw) = gateway();
    let mut ids = Vec::new();
    for key in ["sk-resp-a", "sk-resp-b"] {
        let r = call(
            &gw,
            key,
            "POST",
            "/v1/responses",
            &json!({"model": "small", "input": "Name a fjord"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let get_response = |key: &str, id: &str| {
        call(
            &gw,
            key,
            "GET",
            &format!("/v1/responses/{id}"),
            &Value::Null,
        )
    };
    assert!(wait_until(Duration::from_secs(10), || get_response(
        "sk-resp-a",
        &ids[0]
    )
    .status
        == 200));
    wait_cached(&gw, 2);
    let r = request(
        &gw.admin,
        "POST",
        "/admin/cache/purge?tenant=acme",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["removed"], 1, "{}", r.text());
    assert_eq!(r.json()["stored_responses_removed"], 1, "{}", r.text());
    assert_eq!(get_response("sk-resp-a", &ids[0]).status, 404);
    let cont = call(
        &gw,
        "sk-resp-a",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "previous_response_id": ids[0], "input": "And another?"}),
    );
    assert_eq!(cont.status, 400, "{}", cont.text());
    assert_eq!(cont.api_error()["code"], "previous_response_not_found");
    let again = call(
        &gw,
        "sk-resp-a",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "input": "Name a fjord"}),
    );
    assert_eq!(again.header("x-smartllm-cache"), Some("miss"));
    // beta's answer and kept response are untouched.
    assert_eq!(get_response("sk-resp-b", &ids[1]).status, 200);
    let beta = call(
        &gw,
        "sk-resp-b",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "input": "Name a fjord"}),
    );
    assert_eq!(beta.header("x-smartllm-cache"), Some("hit-exact"));
}

#[test]
fn responses_are_translated_kept_per_tenant_and_continued() {
    let (mock, gw) = gateway();
    let r = create(
        &gw,
        &json!({"model": "small", "instructions": "Be brief.", "input": "Name a fjord"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("resp_"), "{v}");
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert!(
        output_text(&v).starts_with("Mock reply to: Name a fjord"),
        "{v}"
    );
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(v["usage"]["output_tokens"], 12);
    assert_eq!(v["instructions"], "Be brief.");
    let sent = mock.last();
    assert_eq!(sent["path"], "/v1/chat/completions");
    assert_eq!(
        sent["json"]["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        sent["json"]["messages"][1],
        json!({"role": "user", "content": "Name a fjord"})
    );

    // Kept by the gateway: GET it back (the store is written off the request path).
    let got = || {
        call(
            &gw,
            "sk-resp-a",
            "GET",
            &format!("/v1/responses/{id}"),
            &Value::Null,
        )
    };
    assert!(wait_until(std::time::Duration::from_secs(5), || got()
        .status
        == 200));
    assert_eq!(got().json()["output"], v["output"]);
    // Its input items: what it answered (not its instructions).
    let items = |key: &str, query: &str| {
        call(
            &gw,
            key,
            "GET",
            &format!("/v1/responses/{id}/input_items{query}"),
            &Value::Null,
        )
    };
    let list = items("sk-resp-a", "");
    assert_eq!(list.status, 200, "{}", list.text());
    let list = list.json();
    assert_eq!(
        (list["object"].as_str(), list["has_more"].as_bool()),
        (Some("list"), Some(false)),
        "{list}"
    );
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["role"], "user");
    assert_eq!(
        list["data"][0]["content"],
        json!([{"type": "input_text", "text": "Name a fjord"}])
    );
    assert_eq!(list["first_id"], list["data"][0]["id"]);
    let other = items("sk-resp-b", "");
    assert_eq!(other.status, 404, "{}", other.text());
    assert_eq!(other.api_error()["code"], "response_not_found");
    let bad = items("sk-resp-a", "?limit=0");
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.api_error()["param"], "limit");
    // Another tenant never sees it.
    let other = call(
        &gw,
        "sk-resp-b",
        "GET",
        &format!("/v1/responses/{id}"),
        &Value::Null,
    );
    assert_eq!(other.status, 404);
    assert_eq!(other.api_error()["code"], "response_not_found");

    // previous_response_id: the conversation goes on, the history from the store.
    let r = create(
        &gw,
        &json!({"model": "small", "previous_response_id": id, "input": "And another one?"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let msgs = &mock.last()["json"]["messages"];
    assert_eq!(msgs.as_array().unwrap().len(), 3, "{msgs}");
    assert_eq!(msgs[0]["content"], "Name a fjord");
    assert_eq!(msgs[1]["role"], "assistant");
    assert!(msgs[1]["content"]
        .as_str()
        .unwrap()
        .starts_with("Mock reply to: Name a fjord"));
    assert_eq!(msgs[2]["content"], "And another one?");
    // Another tenant cannot continue it; an unknown id is OpenAI's 400
    // `previous_response_not_found`.
    let r = call(
        &gw,
        "sk-resp-b",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "previous_response_id": id, "input": "x"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["param"], "previous_response_id");
    assert_eq!(r.api_error()["code"], "previous_response_not_found");
    // Even with the same input in that tenant's cache: an unknown previous
    // response is still refused, never the answer to a fresh question.
    let stored = get(&gw.admin, "/admin/cache/stats").json()["stats"]["l1_entries"]
        .as_u64()
        .unwrap();
    let fresh = call(
        &gw,
        "sk-resp-b",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "input": "x"}),
    );
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    wait_cached(&gw, stored + 1);
    let r = call(
        &gw,
        "sk-resp-b",
        "POST",
        "/v1/responses",
        &json!({"model": "small", "previous_response_id": "resp_unknown", "input": "x"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "previous_response_not_found");
    // DELETE, then it is gone.
    let d = call(
        &gw,
        "sk-resp-a",
        "DELETE",
        &format!("/v1/responses/{id}"),
        &Value::Null,
    );
    assert_eq!(
        d.json(),
        json!({"id": id, "object": "response", "deleted": true})
    );
    assert_eq!(got().status, 404);

    // Through an Anthropic provider, translated twice.
    let r = create(&gw, &json!({"model": "claude", "input": "Hello Claude"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(output_text(&r.json()).starts_with("Mock reply to: Hello Claude"));
    assert_eq!(mock.last()["path"], "/v1/messages");

    // Bad requests name the parameter.
    let r = create(
        &gw,
        &json!({"model": "small", "input": "x", "tools": [{"type": "web_search"}]}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.api_error()["param"], "tools[0].type");
}

#[test]
fn responses_stream_call_functions_count_tokens_and_hit_the_cache() {
    let (mock, gw) = gateway();
    let r = create(
        &gw,
        &json!({"model": "small", "input": "Stream a fjord", "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = named_events(&r);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    assert_eq!(names.last(), Some(&"response.completed"));
    for (i, (n, v)) in evs.iter().enumerate() {
        assert_eq!(
            (v["type"].as_str(), v["sequence_number"].as_u64()),
            (Some(n.as_str()), Some(i as u64))
        );
    }
    let text: String = evs
        .iter()
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert!(text.starts_with("Mock reply to: Stream a fjord"), "{text}");
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["usage"]["output_tokens"], 12);
    assert!(!r.text().contains("[DONE]"));

    // Function calling, then the tool's output continues the conversation.
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]);
    let r = create(
        &gw,
        &json!({"model": "small", "input": "Weather in Oslo?", "tools": tools}),
    );
    let v = r.json();
    let call = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap()
        .clone();
    assert_eq!(call["name"], "get_weather", "{v}");
    assert_eq!(
        serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap()["query"],
        "Weather in Oslo?"
    );
    // Codex's sub-agent tools come as a `namespace`: flattened for the chat
    // provider, and the call names its namespace again.
    let grouped = json!([{"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
        "tools": [{"type": "function", "name": "spawn_agent", "description": "Start one.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]},
        {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}]);
    let r = create(
        &gw,
        &json!({"model": "small", "input": "Spawn a helper", "tools": grouped, "store": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: Vec<Value> = mock.last()["json"]["tools"].as_array().unwrap().clone();
    assert_eq!(sent[0]["function"]["name"], "spawn_agent", "{sent:?}");
    assert_eq!(sent[1]["function"]["name"], "exec_command", "{sent:?}");
    let grouped_call = r.json()["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap()
        .clone();
    assert_eq!(grouped_call["name"], "spawn_agent");
    assert_eq!(grouped_call["namespace"], "multi_agent_v1");

    let id = v["id"].as_str().unwrap();
    assert!(wait_until(
        std::time::Duration::from_secs(5),
        || crate::responses::call(
            &gw,
            "sk-resp-a",
            "GET",
            &format!("/v1/responses/{id}"),
            &Value::Null
        )
        .status
            == 200
    ));
    let r = create(
        &gw,
        &json!({"model": "small", "previous_response_id": id, "tools": tools,
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "Rain, 4 C"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let msgs = &mock.last()["json"]["messages"];
    let n = msgs.as_array().unwrap().len();
    assert_eq!(
        msgs[n - 1],
        json!({"role": "tool", "tool_call_id": call["call_id"], "content": "Rain, 4 C"})
    );
    assert_eq!(msgs[n - 2]["tool_calls"][0]["id"], call["call_id"]);

    // input_tokens: the gateway's estimate.
    let r = crate::responses::call(
        &gw,
        "sk-resp-a",
        "POST",
        "/v1/responses/input_tokens",
        &json!({"model": "small", "input": "How many tokens is this?"}),
    );
    assert_eq!(r.json()["object"], "response.input_tokens", "{}", r.text());
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 0);

    // A repeated question is answered from the cache, in the Responses shape,
    // with a new id that can be continued.
    let q = json!({"model": "small", "input": "What is the longest fjord?"});
    // The answers above are in the cache already: wait for one more entry.
    let stored = get(&gw.admin, "/admin/cache/stats").json()["stats"]["l1_entries"]
        .as_u64()
        .unwrap();
    let first = create(&gw, &q);
    wait_cached(&gw, stored + 1);
    let before = mock.requests();
    let hit = create(&gw, &q);
    assert_eq!(cache_header(&hit), "hit-exact");
    assert_eq!(output_text(&hit.json()), output_text(&first.json()));
    assert_ne!(hit.json()["id"], first.json()["id"]);
    let mut s = q.clone();
    s["stream"] = json!(true);
    let hit = create(&gw, &s);
    assert_eq!(cache_header(&hit), "hit-exact");
    assert_eq!(named_events(&hit).last().unwrap().0, "response.completed");
    assert_eq!(mock.requests(), before, "hits never reach the upstream");
}

#[test]
fn responses_pass_through_to_providers_that_speak_them() {
    let (mock, gw) = gateway();
    // These bytes, as the client sends them.
    let post = |body: &[u8]| {
        request(
            &gw.addr,
            "POST",
            "/v1/responses",
            &[("Authorization", "Bearer sk-resp-a")],
            body,
        )
        .unwrap()
    };
    let body = br#"{"model":"native","input":"Hello native","store":true,"metadata":{"k":"v"}}"#;
    let r = post(body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(
        v["id"].as_str().unwrap().starts_with("resp_mock"),
        "the provider's own id: {v}"
    );
    let last = mock.last();
    assert_eq!(last["path"], "/v1/responses");
    let expect =
        String::from_utf8_lossy(body).replace(r#""model":"native""#, r#""model":"gpt-native""#);
    assert_eq!(
        last["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes()))
    );
    // The provider keeps the state: previous_response_id goes through.
    let r = create(
        &gw,
        &json!({"model": "native", "previous_response_id": v["id"], "input": "More"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["json"]["previous_response_id"], v["id"]);
    // The provider keeps every tenant's answers under the gateway's one
    // key: another tenant's id, or one the gateway never gave, is a 400 and
    // never reaches it.
    let before = mock.requests();
    for (key, id) in [
        ("sk-resp-b", v["id"].clone()),
        ("sk-resp-a", json!("resp_mock_not_ours")),
    ] {
        let r = call(
            &gw,
            key,
            "POST",
            "/v1/responses",
            &json!({"model": "native", "previous_response_id": id, "input": "Repeat it"}),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.api_error()["code"], "previous_response_not_found");
    }
    // Nor do references to items or conversations the provider keeps.
    for (body, param) in [
        (
            json!({"model": "native", "input": [{"type": "item_reference", "id": "msg_someone_elses"}]}),
            "input[0]",
        ),
        (
            json!({"model": "native", "conversation": "conv_1", "input": "Go on"}),
            "conversation",
        ),
    ] {
        let r = create(&gw, &body);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.api_error()["code"], "unsupported_parameter");
        assert_eq!(r.api_error()["param"], param);
    }
    assert_eq!(mock.requests(), before, "nothing went upstream");
    // Streamed, the provider's events pass through; usage is billed; its
    // id is the tenant's to continue.
    let r = create(
        &gw,
        &json!({"model": "native", "input": "Stream native", "stream": true}),
    );
    let evs = named_events(&r);
    let streamed_id = evs
        .iter()
        .find(|(n, _)| n == "response.created")
        .map(|(_, v)| v["response"]["id"].clone())
        .unwrap();

    assert_eq!(evs.last().unwrap().0, "response.completed");
    let text: String = evs
        .iter()
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert!(text.starts_with("Mock reply to: Stream native"));
    assert!(wait_until(std::time::Duration::from_secs(5), || costs(
        &gw, "model"
    )["total"]["requests"]
        == 5));
    // (The two refusals are in the ledger, with no tokens.)
    let c = costs(&gw, "model");
    assert_eq!(c["rows"][0]["output_tokens"], 36, "{c}");
    // `reasoning` goes to a model listing no capabilities as sent, and is
    // left out (every other byte as sent) for one listed without
    // `reasoning`, which would answer 400 to it.
    let r = post(br#"{"model":"native","input":"Hi","reasoning":{"effort":"low"}}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.last()["json"]["reasoning"], json!({"effort": "low"}));
    let r = post(br#"{"model":"native-4o","input":"Hi","reasoning":{"effort":"low"}}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mock.last()["body_sha256"],
        hex::encode(Sha256::digest(br#"{"model":"gpt-native","input":"Hi"}"#))
    );
    // A reasoning model gets it without the sampling settings it refuses.
    let r = post(
        br#"{"model":"native-o3","temperature":0.2,"input":"Hi","top_p":0.5,"reasoning":{"effort":"low"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mock.last()["body_sha256"],
        hex::encode(Sha256::digest(
            br#"{"model":"o3","input":"Hi","reasoning":{"effort":"low"}}"#
        ))
    );
    let r = create(
        &gw,
        &json!({"model": "native", "previous_response_id": streamed_id, "input": "More"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // What only the Responses API has (a built-in tool, background) reaches
    // a provider that speaks it as sent; a translated model refuses it, in
    // OpenAI's shape, naming the field.
    let body = br#"{"model":"native","input":"News today?","tools":[{"type":"web_search"}],"background":true,"stream":true}"#;
    let r = post(body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cache_header(&r), "bypass");
    let expect =
        String::from_utf8_lossy(body).replace(r#""model":"native""#, r#""model":"gpt-native""#);
    assert_eq!(
        mock.last()["body_sha256"],
        hex::encode(Sha256::digest(expect.as_bytes()))
    );
    let before = mock.requests();
    // A background response to be fetched later (never relayed, never
    // billed) is refused; streamed, it came through above.
    let r = create(
        &gw,
        &json!({"model": "native", "input": "News today?", "background": true}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["param"], "background", "{}", r.text());
    let r = create(
        &gw,
        &json!({"model": "small", "input": "News today?", "tools": [{"type": "web_search"}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["param"], "tools[0].type", "{}", r.text());
    assert_eq!(mock.requests(), before, "nothing went upstream");

    // A 404 of that provider that is not about the client's response id
    // (its upstream model unknown) is the deployment's fault, not the
    // client's: a 502 naming the configuration.
    let r = create(
        &gw,
        &json!({"model": "native", "input": "[mock-status:404] Anyone there?"}),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.api_error()["code"], "upstream_not_found", "{}", r.text());
    // A failure mid-answer passes on as the provider sent it: the `error`
    // event, then `response.failed` (sent apart, so the gateway reads them
    // apart).
    let r = create(
        &gw,
        &json!({"model": "native", "input": "[mock-fault:error-mid-stream] Tell a long story", "stream": true,
            "mock": {"chunk_delay_ms": 40}}),
    );
    let names: Vec<String> = named_events(&r).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[names.len() - 2..],
        ["error".to_string(), "response.failed".to_string()],
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "response.output_text.delta"));
    // An answer cut at max_output_tokens ends `response.incomplete`.
    let r = create(
        &gw,
        &json!({"model": "native", "input": "Cut it short", "max_output_tokens": 3, "stream": true}),
    );
    let evs = named_events(&r);
    let (last, v) = evs.last().unwrap();
    assert_eq!(last, "response.incomplete");
    assert_eq!(
        v["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

/// A provider's account keeps the conversations it answered: a follow-up
/// goes to a deployment of that provider, not round the model's others.
#[test]
fn a_follow_up_goes_to_the_provider_that_keeps_the_conversation() {
    let (mock, gw) = gateway();
    let account = |m: &Mock| m.last()["headers"]["authorization"].clone();
    // Both accounts answer the model in turn.
    let mut seen = std::collections::HashSet::new();
    let mut firsts = Vec::new();
    for i in 0..4 {
        let r = create(
            &gw,
            &json!({"model": "native2", "input": format!("Start {i}")}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        seen.insert(account(&mock).to_string());
        firsts.push((r.json()["id"].clone(), account(&mock)));
    }
    assert_eq!(seen.len(), 2, "both deployments serve: {seen:?}");
    for (id, first) in firsts {
        for _ in 0..2 {
            let r = create(
                &gw,
                &json!({"model": "native2", "previous_response_id": id, "input": "Go on"}),
            );
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(mock.last()["json"]["previous_response_id"], id);
            assert_eq!(
                account(&mock),
                first,
                "the follow-up of {id} changed account"
            );
        }
    }
}

#[test]
fn the_official_openai_sdk_uses_responses_through_the_gateway() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the openai package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let (_mock, gw) = gateway();
    let out = std::process::Command::new(python)
        .arg(workspace_root().join("tests/python/openai_responses.py"))
        .arg(format!("http://{}/v1", gw.addr))
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
        "previous ok",
        "input items ok",
        "errors ok",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
}

#[test]
fn the_same_question_through_the_three_apis_is_billed_the_same() {
    let (_mock, gw) = gateway();
    let q = "How deep is the Sognefjord?";
    let chat = call(
        &gw,
        "sk-resp-a",
        "POST",
        "/v1/chat/completions",
        &json!({"model": "small", "max_tokens": 50, "messages": [{"role": "user", "content": q}]}),
    );
    let usage = chat.json()["usage"].clone();
    let messages = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[("x-api-key", "sk-resp-a")],
        &serde_json::to_vec(
            &json!({"model": "small", "max_tokens": 50, "messages": [{"role": "user", "content": q}]}),
        )
        .unwrap(),
    )
    .unwrap();
    let responses = create(
        &gw,
        &json!({"model": "small", "max_output_tokens": 50, "input": q}),
    );
    let m = messages.json()["usage"].clone();
    let r = responses.json()["usage"].clone();
    assert_eq!(
        (m["input_tokens"].clone(), r["input_tokens"].clone()),
        (
            usage["prompt_tokens"].clone(),
            usage["prompt_tokens"].clone()
        )
    );
    assert_eq!(
        (m["output_tokens"].clone(), r["output_tokens"].clone()),
        (
            usage["completion_tokens"].clone(),
            usage["completion_tokens"].clone()
        )
    );
    assert!(wait_until(std::time::Duration::from_secs(5), || costs(
        &gw, "model"
    )["total"]["requests"]
        == 3));
    let c = costs(&gw, "model");
    let one = (usage["prompt_tokens"].as_f64().unwrap() * 1.0
        + usage["completion_tokens"].as_f64().unwrap() * 2.0)
        / 1e6;
    let total = c["total"]["cost_usd"].as_f64().unwrap();
    assert!(
        (total - 3.0 * one).abs() < 1e-12,
        "{total} vs 3 x {one}: {c}"
    );
}

/// Built-in tools (Codex sends `web_search` on every request by default)
/// reach a provider that does not speak Responses only when it is set to
/// drop them: the translation without them goes upstream, the answer says
/// which were dropped, and a per-request cost cap no longer refuses them
/// where nothing can run a search.
#[test]
fn built_in_tools_are_dropped_only_for_providers_set_to_drop_them() {
    let mock = Mock::start(&["--words", "8"]);
    let providers = format!(
        "providers:\n{}    drop_builtin_tools: true\n  strict:\n    kind: openai\n    base_url: http://{1}/v1\n  claude-mock:\n    kind: anthropic\n    base_url: http://{1}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n    drop_builtin_tools: true\n  resp-mock:\n    kind: openai\n    base_url: http://{1}/v1\n    responses: true\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = "models:\n  - name: small\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: strict\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: strict\n        model: mock-strict\n  - name: claude\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n  - name: native\n    pricing: { input: 1, output: 2 }\n    deployments:\n      - provider: resp-mock\n        model: gpt-native\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: a\n    tenant: acme\n    app: codex\n    sha256: {}\nbudgets:\n  - scope: tenant\n    name: acme\n    max_request_usd: 0.5\n",
            sha("sk-resp-a")
        ),
    );
    let gw = Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-provider-1234")]);
    let tools = json!([
        {"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
        {"type": "web_search", "external_web_access": false},
    ]);
    let body = |model: &str, stream: bool| json!({"model": model, "input": "List the files.", "tools": tools, "tool_choice": "auto", "stream": stream});
    let upstream_tools = || {
        let last = mock.last();
        let tools = last["json"]["tools"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        tools
            .iter()
            .map(|t| {
                t["function"]["name"]
                    .as_str()
                    .or(t["name"].as_str())
                    .unwrap_or("?")
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    for stream in [false, true] {
        let r = create(&gw, &body("small", stream));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-smartllm-dropped-tools"),
            Some("web_search"),
            "stream {stream}"
        );
        assert_eq!(mock.last()["path"], "/v1/chat/completions");
        assert_eq!(upstream_tools(), ["shell"]);
        if stream {
            assert_eq!(named_events(&r).last().unwrap().0, "response.completed");
        } else {
            // (The mock calls the first tool it is given.)
            let v = r.json();
            let call = v["output"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["type"] == "function_call")
                .cloned();
            assert_eq!(call.map(|c| c["name"].clone()), Some(json!("shell")), "{v}");
        }
    }
    // Through an Anthropic provider set to drop them too.
    let r = create(&gw, &body("claude", false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-smartllm-dropped-tools"), Some("web_search"));
    assert_eq!(mock.last()["path"], "/v1/messages");
    assert_eq!(upstream_tools(), ["shell"]);
    // A provider that speaks Responses runs them: sent as they are (and,
    // searches being billed per use, the per-request cap refuses them).
    let before = mock.requests();
    let r = create(&gw, &body("native", false));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "request_cost_cap_unbounded");
    // A provider not set to drop them refuses the request before it leaves.
    let r = create(&gw, &body("strict", false));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["param"], "tools[1].type", "{}", r.text());
    assert_eq!(r.header("x-smartllm-dropped-tools"), None);
    // A choice that demands the built-in tool cannot be met without it.
    let mut forced = body("small", false);
    forced["tool_choice"] = json!({"type": "web_search"});
    let r = create(&gw, &forced);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(mock.requests(), before, "nothing went upstream");
    // Without built-in tools, nothing is dropped.
    let r = create(
        &gw,
        &json!({"model": "small", "input": "Hi", "tools": [tools[0]]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-smartllm-dropped-tools"), None);
}
