//! Billing to the micro-dollar: every token kind (OpenAI cached and
//! reasoning tokens, Anthropic cache reads and 5-minute / 1-hour writes,
//! long-context tiers) priced from what the provider reported, plain and
//! streamed, for both provider kinds and a model priced by the built-in
//! catalog; unpriced models (metric, `ledger.unpriced: reject`); spend by
//! provider, route and tag, as JSON and CSV; a key reading its own usage.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// USD per 1M tokens of one model, as configured below (or in the catalog).
#[derive(Clone, Copy)]
struct P {
    input: f64,
    output: f64,
    cache_read: f64,
    write_5m: f64,
    write_1h: f64,
}

const GPT: P = P {
    input: 2.0,
    output: 8.0,
    cache_read: 0.5,
    write_5m: 2.0,
    write_1h: 2.0,
};
/// Anthropic: writes default to 1.25x (5 minutes) and 2x (1 hour) input.
const CLAUDE: P = P {
    input: 3.0,
    output: 15.0,
    cache_read: 0.3,
    write_5m: 3.75,
    write_1h: 6.0,
};
/// The catalog's gpt-4o-mini (litellm list): 0.15 / 0.60, cache reads 0.075.
const MINI: P = P {
    input: 0.15,
    output: 0.6,
    cache_read: 0.075,
    write_5m: 0.15,
    write_1h: 0.15,
};

/// Hand-computed cost in USD: the prompt splits into cache reads, writes
/// (5-minute and 1-hour) and the rest; reasoning is part of the output.
fn cost(p: P, prompt: u64, cached: u64, w5: u64, w1: u64, completion: u64) -> f64 {
    let plain = prompt - cached - w5 - w1;
    (plain as f64 * p.input
        + cached as f64 * p.cache_read
        + w5 as f64 * p.write_5m
        + w1 as f64 * p.write_1h
        + completion as f64 * p.output)
        / 1e6
}

fn gateway(mock: &Mock, extra_main: &str) -> Gateway {
    let providers = format!(
        "providers:\n{}  claude-mock:\n    kind: anthropic\n    base_url: http://{}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n",
        mock_provider("mock", mock),
        mock.addr
    );
    let models = "models:
  - name: gpt
    pricing: { input: 2, output: 8, cached_input: 0.5 }
    service_tiers: { flex: 0.5, priority: 2 }
    deployments:
      - provider: mock
        model: mock-gpt
  - name: claude
    pricing: { input: 3, output: 15, cached_input: 0.3 }
    deployments:
      - provider: claude-mock
        model: claude-x
  - name: mini
    deployments:
      - provider: mock
        model: gpt-4o-mini
  - name: long
    pricing: { input: 1, output: 2, long_context: { above: 40, input: 10, output: 20 } }
    deployments:
      - provider: mock
        model: mock-long
  - name: free
    deployments:
      - provider: mock
        model: no-such-model-anywhere
  - name: voice
    pricing: { input: 2.5, output: 10, audio_input: 40, audio_output: 80 }
    deployments:
      - provider: mock
        model: mock-voice
  - name: voice-catalog
    deployments:
      - provider: mock
        model: gpt-4o-audio-preview-2024-12-17
";
    let cfg = ConfigDir::new(
        "",
        &format!("demo:\n  mode: off\n{extra_main}"),
        &providers,
        models,
        "routes:\n  auto:\n    model: gpt\n    fallback: [free]\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n    limits: {{ requests_per_minute: 1000 }}\n  - name: bob\n    sha256: {}\n    tenant: acme\n    app: batch\n  - name: carol\n    sha256: {}\n    tenant: vision\n    app: img\nbudgets:\n  - scope: key\n    name: carol\n    max_request_usd: 0.002\n  - scope: key\n    name: alice\n    daily_usd: 5\n  - scope: tenant\n    name: acme\n    monthly_usd: 100\n",
            sha("sk-alice-1"),
            sha("sk-bob-2"),
            sha("sk-carol-3")
        ),
    );
    Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-secret-1234")])
}

fn post(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let r = request(
        &gw.addr,
        "POST",
        path,
        headers,
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// A chat completion (streamed with the usage chunk, or not): its usage.
fn chat(gw: &Gateway, model: &str, prompt: &str, mock: Value, stream: bool) -> Value {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": prompt}], "mock": mock});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = post(
        gw,
        "/v1/chat/completions",
        &[
            ("Authorization", "Bearer sk-alice-1"),
            ("x-smartllm-tag", "billing"),
        ],
        &body,
    );
    if !stream {
        return r.json()["usage"].clone();
    }
    r.sse_data()
        .iter()
        .rev()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk: {}", r.text()))
}

/// An Anthropic Messages call (passed through to the Anthropic provider):
/// its usage, from the message or from message_start + message_delta.
fn messages(gw: &Gateway, mock: Value, stream: bool) -> Value {
    let body = json!({"model": "claude", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": "Tell me about prompt caches"}], "mock": mock});
    let r = post(
        gw,
        "/v1/messages",
        &[
            ("x-api-key", "sk-alice-1"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    );
    if !stream {
        return r.json()["usage"].clone();
    }
    let mut usage = Value::Null;
    for v in r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        match v["type"].as_str() {
            Some("message_start") => usage = v["message"]["usage"].clone(),
            Some("message_delta") => {
                // The current API's delta usage is cumulative: the input
                // figures it repeats are message_start's.
                let d = &v["usage"];
                for k in [
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ] {
                    if let Some(x) = d.get(k) {
                        assert_eq!(x, &usage[k], "message_delta's {k}: {}", r.text());
                    }
                }
                usage["output_tokens"] = d["output_tokens"].clone();
            }
            _ => {}
        }
    }
    assert!(usage.is_object(), "{}", r.text());
    usage
}

fn n(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_else(|| panic!("no {path:?} in {v}"))
}

/// Ledger cost per model, once `requests` requests are recorded.
fn ledger_costs(gw: &Gateway, requests: u64) -> BTreeMap<String, (u64, f64)> {
    assert!(
        wait_until(Duration::from_secs(5), || costs(gw, "model")["total"]
            ["requests"]
            == requests),
        "{}",
        costs(gw, "model")
    );
    costs(gw, "model")["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["group"]["model"].as_str().unwrap().to_string(),
                (
                    r["requests"].as_u64().unwrap(),
                    r["cost_usd"].as_f64().unwrap(),
                ),
            )
        })
        .collect()
}

fn assert_usd(what: &str, got: f64, want: f64) {
    // To the micro-dollar (and in fact to the nano-dollar the ledger keeps).
    assert!(
        (got - want).abs() < 1e-9,
        "{what}: ledger ${got:.9}, hand-computed ${want:.9}"
    );
}

#[test]
fn every_token_kind_is_billed_exactly_plain_and_streamed() {
    // Every answer is WORDS words: the mock's completion count, pinned below
    // so that usage the gateway misreports (to the client and the ledger
    // alike) cannot pass. No request sets a token limit under it (the
    // Anthropic translation asks for the model's own most, at least 4096,
    // by default).
    const WORDS: u64 = 9;
    let mock = Mock::start(&["--words", "9"]);
    let gw = gateway(&mock, "");
    let mut want: BTreeMap<&str, f64> = BTreeMap::new();
    let mut requests = 0;

    // OpenAI chat: cached prompt tokens and reasoning tokens (part of the
    // completion, billed once, at the output price).
    let kinds = json!({"cached_tokens": 5, "reasoning_tokens": 3});
    for stream in [false, true] {
        let u = chat(
            &gw,
            "gpt",
            "What is a prompt cache for?",
            kinds.clone(),
            stream,
        );
        assert_eq!(
            (
                n(&u, &["prompt_tokens_details", "cached_tokens"]),
                n(&u, &["completion_tokens_details", "reasoning_tokens"])
            ),
            (5, 3),
            "{u}"
        );
        let (p, c) = (n(&u, &["prompt_tokens"]), n(&u, &["completion_tokens"]));
        assert_eq!(c, WORDS + 3, "reasoning is part of the completion: {u}");
        *want.entry("gpt").or_default() += cost(GPT, p, 5, 0, 0, c);
        requests += 1;
    }
    // The Responses API (translated to chat for this provider): the same
    // kinds, read from input_tokens_details / output_tokens_details.
    let r = post(
        &gw,
        "/v1/responses",
        &[("Authorization", "Bearer sk-alice-1")],
        &json!({"model": "gpt", "input": "Why reason? [mock-usage:cached_tokens=5,reasoning_tokens=3]"}),
    );
    let u = r.json()["usage"].clone();
    assert_eq!(
        (
            n(&u, &["input_tokens_details", "cached_tokens"]),
            n(&u, &["output_tokens_details", "reasoning_tokens"])
        ),
        (5, 3),
        "{u}"
    );
    assert_eq!(n(&u, &["output_tokens"]), WORDS + 3, "{u}");
    *want.entry("gpt").or_default() += cost(
        GPT,
        n(&u, &["input_tokens"]),
        5,
        0,
        0,
        n(&u, &["output_tokens"]),
    );
    requests += 1;
    // Anthropic through Chat Completions (translated): reads, 5-minute and
    // 1-hour writes, which the canonical usage counts in the prompt. (The
    // `mock` object does not survive translation; a prompt marker does.)
    let kinds = json!({"cached_tokens": 5, "cache_write_5m": 4, "cache_write_1h": 2});
    let marked =
        "Explain cache writes [mock-usage:cached_tokens=5,cache_write_5m=4,cache_write_1h=2]";
    for stream in [false, true] {
        let u = chat(&gw, "claude", marked, json!({}), stream);
        let (p, c) = (n(&u, &["prompt_tokens"]), n(&u, &["completion_tokens"]));
        assert_eq!(n(&u, &["prompt_tokens_details", "cached_tokens"]), 5);
        assert_eq!(c, WORDS, "stream {stream}: {u}");
        *want.entry("claude").or_default() += cost(CLAUDE, p, 5, 4, 2, c);
        requests += 1;
    }
    // Anthropic Messages passed through: the provider's own usage object.
    for stream in [false, true] {
        let u = messages(&gw, kinds.clone(), stream);
        assert_eq!(
            (
                n(&u, &["cache_read_input_tokens"]),
                n(&u, &["cache_creation_input_tokens"]),
                n(&u, &["cache_creation", "ephemeral_5m_input_tokens"]),
                n(&u, &["cache_creation", "ephemeral_1h_input_tokens"])
            ),
            (5, 6, 4, 2),
            "{u}"
        );
        assert_eq!(n(&u, &["output_tokens"]), WORDS, "stream {stream}: {u}");
        let prompt = n(&u, &["input_tokens"]) + 5 + 6;
        *want.entry("claude").or_default() +=
            cost(CLAUDE, prompt, 5, 4, 2, n(&u, &["output_tokens"]));
        requests += 1;
    }
    // A model without pricing, priced by the catalog (gpt-4o-mini upstream).
    for stream in [false, true] {
        let u = chat(
            &gw,
            "mini",
            "Catalog prices please",
            json!({"cached_tokens": 4}),
            stream,
        );
        let (p, c) = (n(&u, &["prompt_tokens"]), n(&u, &["completion_tokens"]));
        assert_eq!(c, WORDS, "stream {stream}: {u}");
        *want.entry("mini").or_default() += cost(MINI, p, 4, 0, 0, c);
        requests += 1;
    }
    // Long context: a prompt above 40 tokens bills every token at the tier.
    let short = chat(&gw, "long", "A short prompt", json!({}), false);
    let long_prompt = "word ".repeat(60);
    let long = chat(&gw, "long", &long_prompt, json!({}), true);
    assert!(n(&short, &["prompt_tokens"]) <= 40 && n(&long, &["prompt_tokens"]) > 40);
    assert_eq!(
        (
            n(&short, &["completion_tokens"]),
            n(&long, &["completion_tokens"])
        ),
        (WORDS, WORDS),
        "{short} {long}"
    );
    want.insert(
        "long",
        (n(&short, &["prompt_tokens"]) as f64 * 1.0
            + n(&short, &["completion_tokens"]) as f64 * 2.0
            + n(&long, &["prompt_tokens"]) as f64 * 10.0
            + n(&long, &["completion_tokens"]) as f64 * 20.0)
            / 1e6,
    );
    requests += 2;
    // Audio tokens (part of the prompt and the answer) at the audio prices,
    // from models.yaml and from the catalog (gpt-4o-audio-preview: text
    // 2.5 / 10, audio 40 / 80).
    for model in ["voice", "voice-catalog"] {
        for stream in [false, true] {
            let kinds = json!({"audio_input_tokens": 20, "audio_output_tokens": 30});
            let u = chat(&gw, model, "Say it aloud", kinds, stream);
            assert_eq!(
                (
                    n(&u, &["prompt_tokens_details", "audio_tokens"]),
                    n(&u, &["completion_tokens_details", "audio_tokens"])
                ),
                (20, 30),
                "{u}"
            );
            let (p, c) = (n(&u, &["prompt_tokens"]), n(&u, &["completion_tokens"]));
            assert_eq!(c, WORDS + 30, "{model}, stream {stream}: {u}");
            *want.entry(model).or_default() +=
                ((p - 20) as f64 * 2.5 + 20.0 * 40.0 + (c - 30) as f64 * 10.0 + 30.0 * 80.0) / 1e6;
            requests += 1;
        }
    }

    let got = ledger_costs(&gw, requests);
    for (model, usd) in &want {
        assert_usd(model, got[*model].1, *usd);
    }
    assert_eq!(got["claude"].0, 4);
    // The token kinds are counted too.
    let v = costs(&gw, "model");
    let claude = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["model"] == "claude")
        .unwrap();
    assert_eq!(
        (
            claude["cached_tokens"].as_u64(),
            claude["cache_write_tokens"].as_u64()
        ),
        (Some(20), Some(24)),
        "{claude}"
    );
    let gpt = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["model"] == "gpt")
        .unwrap();
    assert_eq!(gpt["reasoning_tokens"].as_u64(), Some(9), "{gpt}");
    assert_eq!(
        gw.metric("smartllm_unpriced_requests_total", &[]),
        0.0,
        "nothing unpriced yet"
    );
}

/// Anthropic's streamed usage comes in two parts: `message_start` (the
/// input, a placeholder output count) and `message_delta`. The current API's
/// `message_delta` is cumulative (it repeats the input, cache write and
/// read figures beside the output); the older one carried the output
/// tokens alone (the mock's `--anthropic-delta-output-only`). Both shapes
/// are billed the same, and as computed by hand: a Messages stream passed
/// through, a plain message, and a Chat Completions stream translated.
#[test]
fn anthropic_stream_usage_is_billed_the_same_cumulative_or_output_only() {
    const WORDS: u64 = 9;
    let kinds = json!({"cached_tokens": 5, "cache_write_5m": 4, "cache_write_1h": 2});
    let marked =
        "Explain cache writes [mock-usage:cached_tokens=5,cache_write_5m=4,cache_write_1h=2]";
    // Per shape: the translated stream's usage and the ledger's cost.
    let mut billed: Vec<(Value, f64)> = Vec::new();
    for output_only in [false, true] {
        let mut flags = vec!["--words", "9"];
        if output_only {
            flags.push("--anthropic-delta-output-only");
        }
        let mock = Mock::start(&flags);
        let gw = gateway(&mock, "");

        // Passed through, streamed: the provider's own events.
        let r = post(
            &gw,
            "/v1/messages",
            &[
                ("x-api-key", "sk-alice-1"),
                ("anthropic-version", "2023-06-01"),
            ],
            &json!({"model": "claude", "max_tokens": 100, "stream": true, "mock": kinds,
                "messages": [{"role": "user", "content": "How is a stream's usage counted?"}]}),
        );
        let evs: Vec<Value> = r
            .sse_data()
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        let event = |kind: &str| {
            evs.iter()
                .find(|v| v["type"] == kind)
                .unwrap_or_else(|| panic!("no {kind}: {}", r.text()))
                .clone()
        };
        let start = event("message_start")["message"]["usage"].clone();
        let delta = event("message_delta")["usage"].clone();
        assert_eq!(n(&delta, &["output_tokens"]), WORDS, "{delta}");
        assert_eq!(
            (
                n(&start, &["cache_read_input_tokens"]),
                n(&start, &["cache_creation_input_tokens"])
            ),
            (5, 6),
            "{start}"
        );
        for k in [
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ] {
            if output_only {
                assert!(delta.get(k).is_none(), "output tokens only: {delta}");
            } else {
                assert_eq!(delta[k], start[k], "cumulative: {delta}");
            }
        }
        let mut want = cost(CLAUDE, n(&start, &["input_tokens"]) + 5 + 6, 5, 4, 2, WORDS);

        // The same question, plain: the same figures.
        let plain = messages(&gw, kinds.clone(), false);
        assert_eq!(n(&plain, &["output_tokens"]), WORDS, "{plain}");
        want += cost(CLAUDE, n(&plain, &["input_tokens"]) + 5 + 6, 5, 4, 2, WORDS);

        // Translated for a Chat Completions client, streamed with usage.
        let u = chat(&gw, "claude", marked, json!({}), true);
        assert_eq!(n(&u, &["completion_tokens"]), WORDS, "{u}");
        assert_eq!(n(&u, &["prompt_tokens_details", "cached_tokens"]), 5, "{u}");
        want += cost(CLAUDE, n(&u, &["prompt_tokens"]), 5, 4, 2, WORDS);

        let (requests, usd) = ledger_costs(&gw, 3)["claude"];
        assert_eq!(requests, 3);
        let shape = if output_only {
            "output-only message_delta"
        } else {
            "cumulative message_delta"
        };
        assert_usd(shape, usd, want);
        billed.push((u, usd));
    }
    assert_eq!(
        billed[0].0, billed[1].0,
        "the translated stream's usage, cumulative and output-only"
    );
    assert_usd("both message_delta shapes", billed[1].1, billed[0].1);
}

#[test]
fn unpriced_models_are_counted_or_refused() {
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, "");
    chat(&gw, "free", "hello", json!({}), false);
    assert!(wait_until(Duration::from_secs(5), || gw.metric(
        "smartllm_unpriced_requests_total",
        &[("model", "free")]
    ) == 1.0));
    // `smartllm check` names it.
    let out = std::process::Command::new(bin("smartllm"))
        .args(["check", "--config", gw.config.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("warning: model free has no price")
            && text.contains("no-such-model-anywhere")
            && !text.contains("model mini has no price")
            && text.contains("2 models take their prices from the built-in catalog"),
        "{text}"
    );

    // /admin/models says where each price comes from.
    let models = get(&gw.admin, "/admin/models").json();
    let source = |name: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["static"]["pricing"]["source"].clone())
            .unwrap_or_else(|| panic!("no {name}: {models}"))
    };
    assert_eq!(source("mini"), "catalog:gpt-4o-mini");
    assert_eq!(source("free"), "unpriced");
    assert_eq!(source("claude"), "models.yaml");

    let gw = gateway(&mock, "ledger:\n  unpriced: reject\n");
    let r = ask(&gw, "sk-alice-1", &chat_body("free", "hello"));
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.api_error();
    assert_eq!(e["code"], "model_unpriced");
    assert!(e["message"].as_str().unwrap().contains("'free'"), "{e}");
    // A routed or fallback chain keeps its priced models.
    assert_eq!(
        ask(&gw, "sk-alice-1", &chat_body("auto", "hello")).status,
        200
    );
    assert_eq!(
        ask(&gw, "sk-alice-1", &chat_body("mini", "hello")).status,
        200
    );
}

#[test]
fn spend_by_provider_route_and_tag_as_json_and_csv_and_a_key_reads_its_own() {
    let mock = Mock::start(&["--words", "5"]);
    let gw = gateway(&mock, "");
    chat(&gw, "auto", "routed request", json!({}), false);
    chat(&gw, "claude", "tagged by header", json!({}), false);
    // Tag from the body's metadata; bob spends in another app.
    let r = post(
        &gw,
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-bob-2")],
        &json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "metadata": {"tag": "nightly-batch"}}),
    );
    let bob_usage = r.json()["usage"].clone();
    // The mock's answer is 5 words (--words 5): its completion count.
    assert_eq!(n(&bob_usage, &["completion_tokens"]), 5, "{bob_usage}");
    assert!(wait_until(Duration::from_secs(5), || costs(&gw, "tag")
        ["total"]["requests"]
        == 3));
    let v = costs(&gw, "provider,route,tag");
    let rows = v["rows"].as_array().unwrap();
    let find = |p: &str, route: &str, tag: &str| {
        rows.iter().find(|r| {
            r["group"]["provider"] == p && r["group"]["route"] == route && r["group"]["tag"] == tag
        })
    };
    assert!(find("mock", "auto", "billing").is_some(), "{v}");
    assert!(find("claude-mock", "-", "billing").is_some(), "{v}");
    assert!(find("mock", "-", "nightly-batch").is_some(), "{v}");
    // CSV from the admin API and the CLI.
    let r = get(
        &gw.admin,
        "/admin/costs?since=1h&group_by=tag,model&format=csv",
    );
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    let csv = r.text();
    assert!(
        csv.starts_with("tag,model,requests,input_tokens,output_tokens,cached_tokens,cost_usd,saved_usd,errors,estimated,cache_write_tokens,reasoning_tokens\r\n"),
        "{csv}"
    );
    assert!(csv.contains("\r\nnightly-batch,gpt,1,"), "{csv}");
    // Percent-encoded as HTTP libraries send it (`params={"group_by": "tag,model"}`).
    let encoded = get(
        &gw.admin,
        "/admin/costs?since=1h&group_by=tag%2Cmodel&format=csv",
    );
    assert_eq!(encoded.text(), csv);
    let backwards = get(&gw.admin, "/admin/costs?from=1800000000&to=1700000000");
    assert_eq!(backwards.status, 400);
    assert_eq!(backwards.json()["error"]["param"], "to");
    let out = std::process::Command::new(bin("smartllm"))
        .args([
            "costs",
            "--config",
            gw.config.path().to_str().unwrap(),
            "--since",
            "1h",
            "--by",
            "provider,route",
            "--csv",
        ])
        .output()
        .unwrap();
    let cli = String::from_utf8_lossy(&out.stdout);
    assert!(cli.contains("claude-mock,-,1,"), "{cli}");
    assert_eq!(
        get(&gw.admin, "/admin/costs?group_by=tag&format=xml").status,
        400
    );

    // A key reads its own spend, limits and budgets on the API listener.
    let me = |key: &str| {
        request(
            &gw.addr,
            "GET",
            "/v1/smartllm/usage",
            &[("Authorization", &format!("Bearer {key}"))],
            b"",
        )
        .unwrap()
    };
    let r = me("sk-bob-2");
    assert_eq!(r.status, 200, "{}", r.text());
    let bob = r.json();
    let bob_cost = cost(
        GPT,
        n(&bob_usage, &["prompt_tokens"]),
        0,
        0,
        0,
        n(&bob_usage, &["completion_tokens"]),
    );
    assert_eq!(
        (bob["key"].as_str(), bob["app"].as_str()),
        (Some("bob"), Some("batch"))
    );
    assert_usd(
        "bob today",
        bob["spend"]["today"]["cost_usd"].as_f64().unwrap(),
        bob_cost,
    );
    assert_eq!(bob["spend"]["today"]["requests"], 1);
    let alice = me("sk-alice-1").json();
    assert_eq!(alice["spend"]["this_month"]["requests"], 2);
    assert_eq!(alice["spend"]["tenant_this_month"]["requests"], 3);
    assert_eq!(alice["limits"]["key"]["requests_per_minute"], 1000);
    let spent = alice["spend"]["today"]["cost_usd"].as_f64().unwrap();
    let budgets = alice["budgets"].as_array().unwrap();
    let daily = budgets.iter().find(|b| b["budget"] == "key:alice").unwrap();
    assert_usd(
        "alice's daily budget",
        daily["spent_usd"].as_f64().unwrap(),
        spent,
    );
    assert_usd(
        "left",
        daily["remaining_usd"].as_f64().unwrap(),
        5.0 - spent,
    );
    assert!(budgets
        .iter()
        .any(|b| b["budget"] == "tenant:acme" && b["period"] == "monthly"));
    assert_usd(
        "remaining",
        alice["remaining_usd"].as_f64().unwrap(),
        5.0 - spent,
    );
    assert!(bob["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["budget"] != "key:alice"));
    let r = me("sk-nobody");
    assert_eq!(r.status, 401);
    // `smartllm prices` searches the catalog.
    let out = std::process::Command::new(bin("smartllm"))
        .args(["prices", "gpt-4o-mini", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["source"].as_str().unwrap().starts_with("litellm=="));
    assert!(v["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["model"] == "gpt-4o-mini" && m["input"] == 0.15));
}

#[test]
fn images_count_in_the_per_request_cost_cap() {
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, "");
    // carol may spend $0.002 a request; gpt's input is $2 per 1M tokens. An
    // image by URL at high detail is bounded at OpenAI's costliest 1445
    // tokens ($0.00289): refused; at low detail it is 85 tokens: served.
    let img = |detail: &str| {
        json!({"model": "gpt", "max_tokens": 20, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": detail}}]}]})
    };
    let r = ask(&gw, "sk-carol-3", &img("high"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "request_cost_cap_exceeded");
    assert_eq!(mock.requests(), 0, "refused before any upstream call");
    let r = ask(&gw, "sk-carol-3", &img("low"));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A request the provider served on its flex tier is billed at the model's
/// `service_tiers.flex` (0.5, set in models.yaml for this OpenAI-compatible
/// mock), on priority at its `service_tiers.priority` (2x) or else at
/// OpenAI's default 1.75x (the catalog's gpt-4o-mini); plain and streamed,
/// as the provider's `service_tier` says. The access log names it.
#[test]
fn processing_tiers_scale_the_price() {
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, "");
    let ask = |model: &str, tier: Option<&str>, stream: bool, prompt: &str| -> Value {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
        if let Some(t) = tier {
            body["service_tier"] = json!(t);
        }
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = post(
            &gw,
            "/v1/chat/completions",
            &[("Authorization", "Bearer sk-bob-2")],
            &body,
        );
        if !stream {
            return r.json()["usage"].clone();
        }
        r.sse_data()
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .map(|v| v["usage"].clone())
            .unwrap_or_else(|| panic!("no usage chunk: {}", r.text()))
    };
    let plain = |p: P, u: &Value| {
        // The mock's default answer: 12 words, its completion count.
        assert_eq!(n(u, &["completion_tokens"]), 12, "{u}");
        cost(
            p,
            n(u, &["prompt_tokens"]),
            0,
            0,
            0,
            n(u, &["completion_tokens"]),
        )
    };
    let standard = ask("gpt", None, false, "What is a processing tier?");
    let flex = ask(
        "gpt",
        Some("flex"),
        false,
        "What is the flex tier, plainly?",
    );
    let priority = ask(
        "gpt",
        Some("priority"),
        true,
        "And the priority tier, streamed?",
    );
    let mini = ask(
        "mini",
        Some("priority"),
        false,
        "Priority on a catalog model?",
    );
    let costs = ledger_costs(&gw, 4);
    assert_usd(
        "gpt: standard + flex at 0.5x + priority at 2x",
        costs["gpt"].1,
        plain(GPT, &standard) + 0.5 * plain(GPT, &flex) + 2.0 * plain(GPT, &priority),
    );
    assert_usd(
        "mini: priority at 1.75x",
        costs["mini"].1,
        1.75 * plain(MINI, &mini),
    );
    // Each request's line is written after its answer went out, so two
    // may land in either order: compared as a set.
    let mut tiers: Vec<String> = gw
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "smartllm::access")
        .map(|v| v["service_tier"].as_str().unwrap_or("-").to_string())
        .collect();
    tiers.sort();
    assert_eq!(tiers, ["-", "flex", "priority", "priority"]);
}

/// Web searches an Anthropic model ran server-side
/// (`usage.server_tool_use.web_search_requests`) are billed by the search,
/// $10 per 1,000 unless `pricing.web_search` says otherwise, on top of the
/// tokens; plain and streamed.
#[test]
fn server_side_web_searches_are_billed_per_search() {
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, "");
    let plain = messages(&gw, json!({"web_search_requests": 2}), false);
    let streamed = messages(&gw, json!({"web_search_requests": 3}), true);
    // The mock's default answer: 12 words, its output count.
    assert_eq!(
        (
            n(&plain, &["output_tokens"]),
            n(&streamed, &["output_tokens"])
        ),
        (12, 12),
        "{plain} {streamed}"
    );
    let tokens = |u: &Value| {
        cost(
            CLAUDE,
            n(u, &["input_tokens"]),
            0,
            0,
            0,
            n(u, &["output_tokens"]),
        )
    };
    let costs = ledger_costs(&gw, 2);
    assert_usd(
        "claude: tokens and 5 searches at $0.01",
        costs["claude"].1,
        tokens(&plain) + tokens(&streamed) + 5.0 * 0.01,
    );
    assert!(
        gw.log_text().contains("\"web_searches\":3"),
        "{}",
        gw.log_text()
    );
}

/// A Chat Completions request with `web_search_options` (OpenAI's search
/// models) counts the one search OpenAI bills per call; sent to Claude it
/// is refused rather than answered without searching.
#[test]
fn a_chat_web_search_is_billed_per_call_and_not_dropped_on_claude() {
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, "");
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "news?"}],
        "web_search_options": {}});
    let r = post(
        &gw,
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-alice-1")],
        &body,
    );
    let u = r.json()["usage"].clone();
    let costs = ledger_costs(&gw, 1);
    assert_usd(
        "gpt: tokens and one search at $0.01",
        costs["gpt"].1,
        cost(
            GPT,
            n(&u, &["prompt_tokens"]),
            0,
            0,
            0,
            n(&u, &["completion_tokens"]),
        ) + 0.01,
    );
    let mut claude = body.clone();
    claude["model"] = json!("claude");
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-alice-1")],
        &serde_json::to_vec(&claude).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "unsupported_for_provider");
    assert_eq!(r.api_error()["param"], "web_search_options");
}
