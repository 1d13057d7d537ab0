//! Cost and rate controls through the real server: rate limits and budgets
//! per key, app and tenant, the same shared by two gateway processes through a
//! real redis-server, and the per-request cost cap.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::time::Duration;

#[test]
fn rate_limits_per_key_and_app_answer_429_with_retry_after() {
    let mock = Mock::start(&[]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n    limits: {{ requests_per_minute: 3 }}\n  - name: carol\n    sha256: {}\n    tenant: acme\n    app: batch\n  - name: dave\n    sha256: {}\n    tenant: acme\n    app: vision\n    limits: {{ tokens_per_minute: 2000 }}\n  - name: erin\n    sha256: {}\n    tenant: acme\n    app: web\napps:\n  acme/batch:\n    limits: {{ tokens_per_minute: 2000 }}\n",
            sha("sk-alice-1"),
            sha("sk-carol-3"),
            sha("sk-dave-4"),
            sha("sk-erin-5")
        ),
    );
    let gw = Gateway::start(cfg);
    // No limit on the key or its app: the provider's account figures
    // (mock-llm sends them as OpenAI does) pass on.
    let r = ask(&gw, "sk-erin-5", &chat_body("small", "unlimited"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("10000"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9999"));
    let ok_id = r.header("x-request-id").unwrap().to_string();
    // What is left is on every answer, in OpenAI's headers; only the kinds
    // a limit applies to.
    for i in 0..3 {
        let r = ask(&gw, "sk-alice-1", &chat_body("small", &format!("q{i}")));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        let left = (2 - i).to_string();
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(&*left));
        let reset = r.header("x-ratelimit-reset-requests").unwrap();
        assert!(reset.ends_with('s') && reset.len() > 1, "{reset}");
        assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
    }
    // An Anthropic client gets Anthropic's, the reset as a time.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[
            ("x-api-key", "sk-dave-4"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
        ],
        json!({"model": "small", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("anthropic-ratelimit-tokens-limit"), Some("2000"));
    let left: u64 = r
        .header("anthropic-ratelimit-tokens-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1900..2000).contains(&left), "{left}");
    let reset = r.header("anthropic-ratelimit-tokens-reset").unwrap();
    assert!(reset.len() == 20 && reset.ends_with('Z'), "{reset}");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
    // Under a key limit the provider's account figures are not passed on
    // (they would say nothing about the key).
    assert_eq!(r.header("x-ratelimit-limit-requests"), None);
    let r = ask(&gw, "sk-alice-1", &chat_body("small", "one too many"));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.api_error()["code"], "rate_limit_exceeded");
    assert_eq!(r.api_error()["type"], "rate_limit_error");
    // Refused before it named a model: the access log gives it no route
    // reason (it said "alias"), while an answered request keeps its own.
    let line = gw.access_line(r.header("x-request-id").unwrap());
    assert_eq!(
        (&line["status"], &line["route_reason"]),
        (&json!(429), &json!("-")),
        "{line}"
    );
    let line = gw.access_line(ok_id.as_str());
    assert_eq!(line["route_reason"], "alias", "{line}");
    // The operator sees which limit refused it.
    assert_eq!(
        gw.metric(
            "smartllm_rate_limited_total",
            &[("scope", "key:alice"), ("kind", "requests")]
        ),
        1.0
    );
    assert_eq!(r.header("x-should-retry"), Some("true"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(r.api_error()["message"]
        .as_str()
        .unwrap()
        .contains("3 requests per minute for key 'alice'"));
    // The 429 says what the refusing limit holds, as OpenAI's does.
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let reset = r.header("x-ratelimit-reset-requests").unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    // A score is a request too: a key out of requests cannot flood feedback.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/feedback",
        &[
            ("Authorization", "Bearer sk-alice-1"),
            ("content-type", "application/json"),
        ],
        br#"{"request_id": "x", "thumbs": "down"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.api_error()["code"], "rate_limit_exceeded");
    // So is a look at its usage or a stored response: no polling loop.
    for (method, path) in [
        ("GET", "/v1/smartllm/usage"),
        ("GET", "/v1/responses/resp_0123"),
        ("DELETE", "/v1/responses/resp_0123"),
    ] {
        let r = request(
            &gw.addr,
            method,
            path,
            &[("Authorization", "Bearer sk-alice-1")],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 429, "{method} {path}: {}", r.text());
    }
    // Tokens per minute for an app: a 6,000-byte prompt (~1,500 tokens) fits once, not twice.
    let big = chat_body("small", &"word ".repeat(1200));
    assert_eq!(ask(&gw, "sk-carol-3", &big).status, 200);
    let r = ask(&gw, "sk-carol-3", &big);
    assert_eq!(r.status, 429);
    assert!(r.api_error()["message"]
        .as_str()
        .unwrap()
        .contains("tokens per minute for app 'acme/batch'"));
    let huge = chat_body("small", &"word ".repeat(3000));
    let r = ask(&gw, "sk-carol-3", &huge);
    assert_eq!(r.api_error()["code"], "request_too_large_for_limit");
    // An estimate above the real usage is given back: an inline image is
    // estimated at 1,600 tokens before it runs, the mock reports a few, so
    // two in a row fit dave's 2,000 a minute (before, the second got 429).
    // (The give-back runs as the answer's last byte leaves, so the next
    // request may come a moment before it; without it the bucket would
    // take 40 s to refill.)
    let image = |i: usize| {
        json!({"model": "small", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "text", "text": format!("What is in picture {i}?")},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "iVBORw0KGgo".repeat(200))}}]}]})
    };
    assert_eq!(ask(&gw, "sk-dave-4", &image(0)).status, 200);
    for i in 1..3 {
        assert!(
            wait_until(Duration::from_secs(2), || ask(&gw, "sk-dave-4", &image(i))
                .status
                == 200),
            "image request {i} refused: the estimate was not given back"
        );
    }
    // A request no provider answered (here a 500) gives all of its estimate
    // back: two ~1,500-token prompts that fail in a row are not refused.
    let mut failing = chat_body("small", &"word ".repeat(1200));
    failing["mock"] = json!({"status": 500});
    assert_ne!(ask(&gw, "sk-dave-4", &failing).status, 429);
    assert!(
        wait_until(Duration::from_secs(2), || ask(&gw, "sk-dave-4", &failing)
            .status
            != 429),
        "a failed request's estimate was not given back"
    );
    // Limits change with a reload: lift alice's.
    gw.config.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n",
            sha("sk-alice-1")
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || ask(
        &gw,
        "sk-alice-1",
        &chat_body("small", "free again")
    )
    .status
        == 200));
}

#[test]
fn budgets_alert_reject_and_degrade() {
    let mock = Mock::start(&["--words", "12"]);
    let hook = Mock::start(&[]);
    let cfg = ledger_gateway(&mock, "");
    // small: 3 prompt + 12 completion tokens = 0.027 USD per "Hello there".
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\nbudgets:\n  - scope: tenant\n    name: acme\n    daily_usd: 0.05\n    alert_at: [50, 100]\n    webhook: http://{}/hook\n  - scope: key\n    name: bob\n    monthly_usd: 0.03\n    on_exceed: degrade\n    degrade_to: big\n",
            sha("sk-alice-1"),
            sha("sk-bob-2"),
            hook.addr
        ),
    );
    let mut gw = Gateway::start(cfg);
    let hello = chat_body("small", "Hello there");
    assert_eq!(ask(&gw, "sk-alice-1", &hello).status, 200); // 0.027: 54%, alert 50
    assert!(
        wait_until(Duration::from_secs(5), || hook.requests() >= 1),
        "50% alert webhook"
    );
    assert_eq!(hook.last()["json"]["threshold_pct"], 50.0);
    assert_eq!(hook.last()["json"]["budget"], "tenant:acme");
    assert_eq!(ask(&gw, "sk-alice-1", &hello).status, 200); // 0.054: 108%, alert 100
    assert!(
        wait_until(Duration::from_secs(5), || hook.requests() >= 2),
        "100% alert webhook"
    );
    assert_eq!(hook.last()["json"]["threshold_pct"], 100.0);
    let r = ask(&gw, "sk-alice-1", &hello);
    assert_eq!(r.status, 429, "{}", r.text());
    // An exhausted budget stays so: not worth a retry.
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let e = r.api_error();
    assert_eq!(e["code"], "budget_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("daily budget of $0.0500 for tenant 'acme'"),
        "{e}"
    );
    assert!(r.header("retry-after").is_some());
    assert!(gw.log_text().contains("budget alert"));
    assert!(gw
        .metrics()
        .contains("smartllm_budget_alerts_total{budget=\"tenant:acme\""));
    // bob degrades to the "big" model once his monthly budget is spent.
    let r = ask(&gw, "sk-bob-2", &hello);
    assert_eq!(r.header("x-smartllm-model"), Some("small"));
    assert!(wait_until(Duration::from_secs(5), || gw
        .metric("smartllm_budget_used_ratio", &[("budget", "key:bob")])
        > 0.8));
    let r = ask(&gw, "sk-bob-2", &hello);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-smartllm-model"), Some("big"), "{:?}", r.headers);
    assert!(r
        .header("x-smartllm-route")
        .unwrap()
        .starts_with("small; model=big; reason=budget"));
    // "small" was asked for by name: no route in the ledger (it is a model).
    assert!(
        wait_until(Duration::from_secs(5), || {
            let v = costs(&gw, "key,route");
            let rows = v["rows"].as_array().cloned().unwrap_or_default();
            let bob: Vec<&Value> = rows.iter().filter(|x| x["group"]["key"] == "bob").collect();
            bob.iter()
                .map(|x| x["requests"].as_u64().unwrap_or(0))
                .sum::<u64>()
                >= 2
                && bob.iter().all(|x| x["group"]["route"] != "small")
        }),
        "{}",
        costs(&gw, "key,route")
    );
    // After a restart the spend is read back from the ledger: still
    // exhausted, and the alerts it already sent are not sent again.
    let sent = hook.requests();
    gw.stop();
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let gw = Gateway::start(cfg);
    assert_eq!(ask(&gw, "sk-alice-1", &hello).status, 429);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.requests(), sent, "{}", hook.last());
}

/// A budget that degrades to a cheaper model does not break the route's
/// rules: where a rule keeps the request from that model (here data marked
/// `x-data: pii`), the exhausted budget refuses instead; other requests
/// are served by the cheaper model.
#[test]
fn a_budget_degrade_keeps_to_the_routes_rules() {
    let mock = Mock::start(&["--words", "12"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write(
        "models.yaml",
        "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    deployments:\n      - provider: mock\n  - name: big\n    pricing: { input: 3000, output: 6000 }\n    deployments:\n      - provider: mock\n",
    );
    cfg.write(
        "routes.yaml",
        "routes:\n  auto:\n    candidates: [small, big]\n    rules:\n      - name: pii\n        when: { headers: { x-data: pii } }\n        exclude: [small]\n",
    );
    // A budget no request fits: every one is degraded to small.
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\nbudgets:\n  - scope: key\n    name: bob\n    monthly_usd: 0.000000001\n    on_exceed: degrade\n    degrade_to: small\n",
            sha("sk-bob-2")
        ),
    );
    let gw = Gateway::start(cfg);
    let body = serde_json::to_vec(&chat_body("auto", "Hello there")).unwrap();
    let send = |headers: &[(&str, &str)]| {
        let mut h = vec![("Authorization", "Bearer sk-bob-2")];
        h.extend_from_slice(headers);
        request(&gw.addr, "POST", "/v1/chat/completions", &h, &body).unwrap()
    };
    let plain = send(&[]);
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.header("x-smartllm-model"), Some("small"));
    let before = mock.requests();
    let pii = send(&[("x-data", "pii")]);
    assert_eq!(pii.status, 429, "{}", pii.text());
    let e = pii.api_error();
    assert_eq!(e["code"], "budget_exceeded");
    assert!(e["message"].as_str().unwrap().contains("rule:pii"), "{e}");
    assert_eq!(mock.requests(), before, "nothing went upstream");
    // Nor does it open a model the key may not use, or serve a dearer one:
    // bob may use big only; carol's budget names the dearer big.
    gw.config.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\n    models: [big]\n  - name: carol\n    sha256: {}\n    tenant: gamma\n    app: web\nbudgets:\n  - scope: key\n    name: bob\n    monthly_usd: 0.000000001\n    on_exceed: degrade\n    degrade_to: small\n  - scope: key\n    name: carol\n    monthly_usd: 0.000000001\n    on_exceed: degrade\n    degrade_to: big\n",
            sha("sk-bob-2"),
            sha("sk-carol-3")
        ),
    );
    let ask_as = |key: &str, model: &str| {
        let body = serde_json::to_vec(&chat_body(model, "Hello there")).unwrap();
        let auth = format!("Bearer {key}");
        request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &auth)],
            &body,
        )
        .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(5), || ask_as("sk-carol-3", "small")
            .status
            == 429),
        "the reload took"
    );
    let before = mock.requests();
    let dear = ask_as("sk-carol-3", "small");
    assert!(
        dear.api_error()["message"]
            .as_str()
            .unwrap()
            .contains("it costs more than 'small'"),
        "{}",
        dear.text()
    );
    let barred = ask_as("sk-bob-2", "big");
    assert_eq!(barred.status, 429, "{}", barred.text());
    let e = barred.api_error();
    assert_eq!(e["code"], "budget_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("key 'bob' may not use it"),
        "{e}"
    );
    assert_eq!(mock.requests(), before, "nothing went upstream");
    // (Logged once the reload that took is done: a moment after.)
    assert!(wait_until(Duration::from_secs(5), || gw
        .log_text()
        .contains(
            r#"budgets[0].degrade_to: key \"bob\" may not use \"small\""#
        )));
}

/// A budget spent to just short of its limit refuses requests that would
/// fit an empty period: it says so once (`budget_refusing`), without
/// claiming a threshold spend has not reached; a request too dear for the
/// whole budget sends nothing.
#[test]
fn a_budget_that_refuses_short_of_its_limit_says_so_once() {
    let mock = Mock::start(&["--words", "12"]);
    let hook = Mock::start(&[]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: carol\n    sha256: {}\n    tenant: gamma\n    app: web\nbudgets:\n  - scope: tenant\n    name: gamma\n    daily_usd: 0.05\n    alert_at: [80, 100]\n    webhook: http://{}/hook\n",
            sha("sk-carol-1"),
            hook.addr
        ),
    );
    let gw = Gateway::start(cfg);
    // 0.027 of 0.05: no threshold crossed.
    assert_eq!(
        ask(&gw, "sk-carol-1", &chat_body("small", "Hello there")).status,
        200
    );
    // Up to 1,000 tokens out could cost $2, more than the whole budget:
    // refused, and no alert.
    let mut dear = chat_body("small", "Hello there");
    dear["max_tokens"] = json!(1000);
    let r = ask(&gw, "sk-carol-1", &dear);
    assert_eq!(r.status, 429, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hook.requests(), 0, "{}", hook.last());
    // Another answer like the first would fit an empty day, not what is
    // left: refused, and the budget says it is refusing, once.
    let mut again = chat_body("small", "Hello there");
    again["max_tokens"] = json!(12);
    for _ in 0..3 {
        let r = ask(&gw, "sk-carol-1", &again);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.api_error()["code"], "budget_exceeded");
    }
    assert!(
        wait_until(Duration::from_secs(5), || hook.requests() >= 1),
        "the refusing alert"
    );
    let alert = &hook.last()["json"];
    assert_eq!(alert["type"], "budget_refusing", "{alert}");
    assert_eq!(alert["budget"], "tenant:gamma", "{alert}");
    assert!(alert["used_pct"].as_f64().unwrap() < 80.0, "{alert}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hook.requests(), 1, "sent once");
    assert_eq!(
        gw.metric("smartllm_budget_alerts_total", &[("threshold", "refusing")]),
        1.0
    );
    // The admin API (and the dashboard) say it refuses, with no float noise.
    let day = |gw: &Gateway| {
        get(&gw.admin, "/admin/budgets").json()["budgets"][0]["periods"]["daily"].clone()
    };
    let d = day(&gw);
    assert_eq!(d["refusing"], true, "{d}");
    let spent = d["spent_usd"].as_f64().unwrap();
    assert_eq!(spent, (spent * 1e9).round() / 1e9, "{d}");
    // A restart does not send it again: spend read back cannot say it
    // was sent, the data dir does.
    let mut gw = gw;
    gw.stop();
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let gw = Gateway::start(cfg);
    assert_eq!(day(&gw)["refusing"], true, "kept across the restart");
    let r = ask(&gw, "sk-carol-1", &again);
    assert_eq!(r.status, 429, "{}", r.text());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hook.requests(),
        1,
        "not sent again after a restart: {}",
        hook.last()
    );
}

/// Requests in flight hold their estimated cost against the budget: of a
/// burst each of which fits alone, only as many pass as fit together, and
/// what they held is let go when they end (their real cost counts instead).
#[test]
fn a_burst_passes_a_budget_only_as_far_as_it_fits() {
    let mock = Mock::start(&["--words", "12", "--latency-ms", "1500"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write("keys.yaml", &alice_with_a_daily_budget("0.105"));
    let gw = Gateway::start(cfg);
    // Estimated at the prompt's ~20 tokens (0.001 each) plus 12 answer
    // tokens (0.002 each): ~0.044, two fit in 0.105. Each costs 0.027.
    let body = json!({"model": "small", "max_tokens": 12,
        "messages": [{"role": "user", "content": "Hello there"}]});
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let burst: Vec<_> = (0..3)
            .map(|_| s.spawn(|| ask(&gw, "sk-alice-1", &body).status))
            .collect();
        burst.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 200, 429], "{statuses:?}");
    // 0.054 spent, nothing held: one more fits.
    assert_eq!(ask(&gw, "sk-alice-1", &body).status, 200);
}

/// A screenshot is estimated per image (about 1,600 tokens), not per byte
/// of its base64: at $0.001 a token a 400 KB image read as 100k tokens
/// would be a $100 estimate, refused by a $3 budget it fits in.
#[test]
fn an_image_is_estimated_per_image_not_per_byte() {
    let mock = Mock::start(&["--words", "12"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write("keys.yaml", &alice_with_a_daily_budget("3"));
    let gw = Gateway::start(cfg);
    let image = format!("data:image/png;base64,{}", "A".repeat(400 << 10));
    let body = json!({"model": "small", "max_tokens": 12,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is on this screen?"},
            {"type": "image_url", "image_url": {"url": image}}]}]});
    let r = ask(&gw, "sk-alice-1", &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A request without `max_tokens` holds a typical answer's cost for its
/// task (chat: 200 tokens, $0.40 on "small"), not just its prompt's: near
/// the limit a burst of them passes one at a time (before, each held ~$0.02
/// and all three passed). Alone, such a request is not refused on the
/// guess: it fits what is spent.
#[test]
fn a_burst_without_max_tokens_holds_a_typical_answer() {
    let mock = Mock::start(&["--words", "12", "--latency-ms", "1500"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write("keys.yaml", &alice_with_a_daily_budget("0.105"));
    let gw = Gateway::start(cfg);
    let body = chat_body("small", "Hello there");
    assert!(body.get("max_tokens").is_none());
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let burst: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let r = ask(&gw, "sk-alice-1", &body);
                    (r.status, r.text())
                })
            })
            .collect();
        burst.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429, 429], "{answers:?}");
    for (_, text) in answers.iter().filter(|a| a.0 == 429) {
        assert!(text.contains("retry in a moment"), "{text}");
    }
    // $0.027 spent, nothing held: the next goes alone.
    assert_eq!(ask(&gw, "sk-alice-1", &body).status, 200);
}

/// Every answer a request has written is held against a budget (`n`
/// answers of up to `max_tokens` each), and so is priority processing's
/// price: a request that fits at the list price does not at the model's
/// priority multiplier.
#[test]
fn every_answer_a_request_writes_and_its_tier_count_against_a_budget() {
    let mock = Mock::start(&["--words", "12", "--latency-ms", "1500"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write(
        "models.yaml",
        "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    service_tiers: { priority: 3 }\n    deployments:\n      - provider: mock\n",
    );
    cfg.write("keys.yaml", &alice_with_a_daily_budget("0.105"));
    let gw = Gateway::start(cfg);
    // One answer: ~0.044 held, two fit in 0.105 (`a_burst_passes_...`).
    // Two answers each: ~0.068 held, only one fits.
    let body = json!({"model": "small", "max_tokens": 12, "n": 2,
        "messages": [{"role": "user", "content": "Hello there"}]});
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let burst: Vec<_> = (0..2)
            .map(|_| s.spawn(|| ask(&gw, "sk-alice-1", &body).status))
            .collect();
        burst.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 429], "{statuses:?}");
    // 0.027 spent (the mock wrote one answer). At 3x, ~0.132 does not fit
    // what is left; at the list price, ~0.044 does.
    let mut priority = json!({"model": "small", "max_tokens": 12, "service_tier": "priority",
        "messages": [{"role": "user", "content": "Hello there"}]});
    let r = ask(&gw, "sk-alice-1", &priority);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.api_error()["code"], "budget_exceeded");
    priority.as_object_mut().unwrap().remove("service_tier");
    assert_eq!(ask(&gw, "sk-alice-1", &priority).status, 200);
}

/// keys.yaml: alice (tenant acme) and a daily budget of `usd` on acme.
fn alice_with_a_daily_budget(usd: &str) -> String {
    format!(
        "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\nbudgets:\n  - scope: tenant\n    name: acme\n    daily_usd: {usd}\n",
        sha("sk-alice-1")
    )
}

fn fleet_gateway(mock: &Mock, redis: &Redis, keys: &str) -> Gateway {
    let cfg = ledger_gateway(
        mock,
        &format!(
            "fleet:\n  redis: {}\n  key_prefix: e2e\n  timeout: 500ms\n",
            redis.url()
        ),
    );
    cfg.write("keys.yaml", keys);
    Gateway::start(cfg)
}

/// With a fleet, requests in flight hold their estimate in Redis too: a
/// burst spread over two gateways passes a budget only as far as it fits
/// the fleet (alone, each gateway would let two of its own through), and
/// the holds go when the answers end.
#[test]
fn a_burst_over_two_gateways_passes_a_budget_only_as_far_as_it_fits() {
    let mock = Mock::start(&["--words", "12", "--latency-ms", "1500"]);
    let redis = Redis::start();
    let keys = alice_with_a_daily_budget("0.105");
    let a = fleet_gateway(&mock, &redis, &keys);
    let b = fleet_gateway(&mock, &redis, &keys);
    // Estimated at ~$0.044 each (see above): two fit in $0.105.
    let body = json!({"model": "small", "max_tokens": 12,
        "messages": [{"role": "user", "content": "Hello there"}]});
    let (statuses, held_meanwhile) = std::thread::scope(|s| {
        let burst: Vec<_> = [&a, &b, &a, &b]
            .into_iter()
            .map(|gw| {
                let body = &body;
                s.spawn(move || ask(gw, "sk-alice-1", body).status)
            })
            .collect();
        let probe = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(700));
            redis.cmd("KEYS e2e:held:*")
        });
        let statuses: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
        (statuses, probe.join().unwrap())
    });
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 200, 429, 429], "{statuses:?}");
    assert_eq!(held_meanwhile, "*1", "the day's holds live in Redis");
    // $0.054 spent and nothing held: one more fits, on either gateway.
    assert!(wait_until(Duration::from_secs(5), || redis
        .cmd("KEYS e2e:held:*")
        == "*0"));
    assert_eq!(ask(&b, "sk-alice-1", &body).status, 200);
}

#[test]
fn two_gateways_share_redis_backed_limits_budgets_and_alerts() {
    let mock = Mock::start(&["--words", "12"]);
    let hook = Mock::start(&[]);
    let mut redis = Redis::start();
    // alice: 4 requests a minute; tenant beta (bob): $0.05 a day, one alert
    // per threshold for the whole fleet.
    let keys = format!(
        "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n    limits: {{ requests_per_minute: 4 }}\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\nbudgets:\n  - scope: tenant\n    name: beta\n    daily_usd: 0.05\n    alert_at: [50, 100]\n    webhook: http://{}/hook\n",
        sha("sk-alice-1"),
        sha("sk-bob-2"),
        hook.addr
    );
    let a = fleet_gateway(&mock, &redis, &keys);
    let b = fleet_gateway(&mock, &redis, &keys);
    let hello = chat_body("small", "Hello there");

    // Rate limit: 2 + 2 requests through two gateways use up the 4 a minute;
    // per-process limits would have allowed 8.
    for (i, gw) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = ask(gw, "sk-alice-1", &hello);
        assert_eq!(r.status, 200, "{}", r.text());
        // What the fleet's bucket leaves, not this gateway's.
        let left = (3 - i).to_string();
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(&*left));
    }
    for gw in [&a, &b] {
        let r = ask(gw, "sk-alice-1", &hello);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.api_error()["code"], "rate_limit_exceeded");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=15).contains(&retry), "{retry}");
        // The fleet's bucket, refusing: its limit, nothing left.
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("4"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    }
    assert!(redis
        .cmd("EXISTS \"e2e:rl:key 'alice':requests\"")
        .ends_with('1'));

    // Budget: each "Hello there" on small costs $0.027. One on each gateway
    // spends $0.054 of the tenant's $0.05: the next is refused on either.
    assert_eq!(ask(&a, "sk-bob-2", &hello).status, 200);
    assert!(wait_until(Duration::from_secs(5), || a.metric(
        "smartllm_budget_used_ratio",
        &[("budget", "tenant:beta")]
    ) > 0.5));
    // The first request's hold left Redis with its cost (one
    // transaction): the second is not refused as `budget_in_flight`.
    let r = ask(&b, "sk-bob-2", &hello);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(wait_until(Duration::from_secs(5), || b.metric(
        "smartllm_budget_used_ratio",
        &[("budget", "tenant:beta")]
    ) >= 1.0));
    for gw in [&a, &b] {
        let r = ask(gw, "sk-bob-2", &hello);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.api_error()["code"], "budget_exceeded");
    }
    // Two thresholds crossed, two webhooks for the fleet (not one per gateway).
    assert!(wait_until(Duration::from_secs(5), || hook.requests() >= 2));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.requests(), 2, "one alert per threshold");

    // Redis goes away: with on_error: local the gateways keep serving and
    // enforce limits per process.
    redis.stop();
    let r = ask(&a, "sk-alice-1", &hello);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(a.metric("smartllm_fleet_errors_total", &[]) >= 1.0);
}

#[test]
fn spend_counted_while_redis_refuses_writes_reaches_the_fleet_afterwards() {
    let mock = Mock::start(&["--words", "12"]);
    let redis = Redis::start();
    // Each "Hello there" costs $0.027: two fit the $0.08 a day, three do not.
    let keys = format!(
        "keys:\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\nbudgets:\n  - scope: tenant\n    name: beta\n    daily_usd: 0.08\n",
        sha("sk-bob-2")
    );
    let a = fleet_gateway(&mock, &redis, &keys);
    let b = fleet_gateway(&mock, &redis, &keys);
    let hello = chat_body("small", "Hello there");
    let ratio =
        |gw: &Gateway| gw.metric("smartllm_budget_used_ratio", &[("budget", "tenant:beta")]);
    assert_eq!(ask(&a, "sk-bob-2", &hello).status, 200);
    assert!(wait_until(Duration::from_secs(5), || ratio(&a) > 0.3));
    // Redis refuses the spend counters' writes for a while (a failover, a
    // full disk, ...): a serves and counts the spend locally. (A stalled
    // Redis would apply the queued write once back; a refused one never does.)
    assert_eq!(redis.cmd("ACL SETUSER default -incrbyfloat"), "+OK");
    let errors = a.metric("smartllm_fleet_errors_total", &[]);
    assert_eq!(ask(&a, "sk-bob-2", &hello).status, 200);
    assert!(wait_until(Duration::from_secs(5), || a
        .metric("smartllm_fleet_errors_total", &[])
        > errors));
    assert_eq!(redis.cmd("ACL SETUSER default +incrbyfloat"), "+OK");
    // A failed call keeps the gateway off Redis for a second.
    std::thread::sleep(Duration::from_millis(1500));
    // Back: a's next request brings the fleet's figure up to both ($0.054)
    // and adds its own ($0.081) ...
    assert_eq!(ask(&a, "sk-bob-2", &hello).status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || ratio(&a) >= 1.0),
        "the spend counted while Redis refused it was lost: {}",
        ratio(&a)
    );
    // ... so b, which saw none of them, refuses the next one.
    let r = ask(&b, "sk-bob-2", &hello);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.api_error()["code"], "budget_exceeded");
}

#[test]
fn fleet_on_error_reject_refuses_when_redis_is_down() {
    let mock = Mock::start(&[]);
    let mut redis = Redis::start();
    let url = redis.url();
    redis.stop();
    let cfg = ledger_gateway(
        &mock,
        &format!("fleet:\n  redis: {url}\n  timeout: 200ms\n  on_error: reject\n"),
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n    limits: {{ requests_per_minute: 100 }}\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\n",
            sha("sk-alice-1"),
            sha("sk-bob-2")
        ),
    );
    let gw = Gateway::start(cfg);
    let r = ask(&gw, "sk-alice-1", &chat_body("small", "hi"));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.api_error()["code"], "fleet_state_unavailable");
    assert!(r.header("retry-after").is_some());
    // A key without limits or budgets does not need Redis.
    assert_eq!(ask(&gw, "sk-bob-2", &chat_body("small", "hi")).status, 200);
}

#[test]
fn a_per_request_cost_cap_is_never_exceeded() {
    // 200-word answers at $0.002 an output token would cost $0.40.
    let mock = Mock::start(&["--words", "200"]);
    let cfg = ledger_gateway(&mock, "");
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: web\nbudgets:\n  - scope: tenant\n    name: acme\n    max_request_usd: 0.1\n  - scope: tenant\n    name: beta\n    daily_usd: 0.5\n    max_request_usd: 0.1\n",
            sha("sk-alice-1"),
            sha("sk-bob-2")
        ),
    );
    let gw = Gateway::start(cfg);
    // With a daily budget too: a max_tokens that alone would cost $200 is
    // lowered to the cap, so the request can cost $0.10 at most and fits
    // the day's $0.50 (it was refused as "less than this request could cost").
    let mut dear = chat_body("small", "Tell me a long story");
    dear["max_tokens"] = json!(100_000);
    let r = ask(&gw, "sk-bob-2", &dear);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(mock.last()["json"]["max_tokens"].as_u64().unwrap() < 50);
    let cost = |u: &Value| {
        u["prompt_tokens"].as_f64().unwrap() * 0.001
            + u["completion_tokens"].as_f64().unwrap() * 0.002
    };
    // Plain: max_tokens is lowered so the answer cannot pass $0.10.
    let r = ask(
        &gw,
        "sk-alice-1",
        &chat_body("small", "Tell me a long story"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let asked = mock.last()["json"]["max_tokens"].as_u64().unwrap();
    assert!(
        (1..50).contains(&asked),
        "max_tokens sent upstream: {asked}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(cost(&v["usage"]) <= 0.1, "{}", v["usage"]);
    // A smaller max_tokens from the client is kept.
    let mut small = chat_body("small", "Tell me a short story");
    small["max_tokens"] = json!(5);
    assert_eq!(ask(&gw, "sk-alice-1", &small).status, 200);
    assert_eq!(mock.last()["json"]["max_tokens"], 5);
    // Streamed too, and max_completion_tokens is the field lowered when used.
    let mut s = chat_body("small", "Stream me a long story");
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    s["max_completion_tokens"] = json!(10_000);
    let r = ask(&gw, "sk-alice-1", &s);
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = &mock.last()["json"];
    assert!(
        sent["max_completion_tokens"].as_u64().unwrap() < 50,
        "{sent}"
    );
    let usage = r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|c| c["usage"].is_object())
        .expect("usage chunk")["usage"]
        .clone();
    assert!(cost(&usage) <= 0.1, "{usage}");
    // The ledger agrees: no request above the cap.
    let costs = get(&gw.admin, "/admin/costs?since=1h&group_by=model").json();
    let total = costs["total"]["cost_usd"].as_f64().unwrap();
    assert!(total > 0.0 && total <= 0.3, "{costs}");
    // A body with both names has both lowered: the provider takes one.
    let mut both = chat_body("small", "Tell me another long story");
    both["max_tokens"] = json!(100_000);
    both["max_completion_tokens"] = json!(100_000);
    assert_eq!(ask(&gw, "sk-alice-1", &both).status, 200);
    let sent = &mock.last()["json"];
    for name in ["max_tokens", "max_completion_tokens"] {
        assert!(sent[name].as_u64().unwrap() < 50, "{sent}");
    }
    // A prompt that alone would pass the cap is refused before any upstream call.
    let before = mock.requests();
    let r = ask(&gw, "sk-alice-1", &chat_body("small", &"word ".repeat(200)));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "request_cost_cap_exceeded");
    assert_eq!(mock.requests(), before);
    assert!(gw.metric("smartllm_request_cost_cap_total", &[("action", "capped")]) >= 2.0);
    // A tool the provider runs and bills per use cannot be bounded: refused
    // in the client's own API shape, before any upstream call.
    let mut search = chat_body("small", "What happened today?");
    search["web_search_options"] = json!({});
    let r = ask(&gw, "sk-alice-1", &search);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "request_cost_cap_unbounded");
    assert_eq!(r.api_error()["param"], "tools");
    let body = json!({"model": "small", "max_tokens": 100,
        "messages": [{"role": "user", "content": "What happened today?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 20}]});
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[
            ("x-api-key", "sk-alice-1"),
            ("anthropic-version", "2023-06-01"),
        ],
        &serde_json::to_vec(&body).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["type"], "error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'web_search_20250305'"),
        "{e}"
    );
    assert_eq!(mock.requests(), before);
}
