//! Virtual keys and the ledger: exact costs per tenant, app and model for
//! plain, streamed and estimated requests, what survives a restart or a kill,
//! and cost suggestions from real traffic.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::process::Command;
use std::time::Duration;

fn row<'a>(v: &'a Value, tenant: &str) -> &'a Value {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["tenant"] == tenant)
        .unwrap_or_else(|| panic!("no row for {tenant}: {v}"))
}

#[test]
fn virtual_keys_and_exact_costs_for_plain_streamed_and_estimated_requests() {
    let mock = Mock::start(&["--words", "12"]);
    let gw = Gateway::start(ledger_gateway(&mock, ""));
    let hello = chat_body("small", "Hello there");
    // Keys: missing, wrong, not allowed.
    let r = gw.chat(&hello);
    assert_eq!(r.status, 401);
    assert_eq!(r.api_error()["code"], "missing_api_key");
    let r = ask(&gw, "sk-wrong", &hello);
    assert_eq!(r.status, 401);
    assert_eq!(r.api_error()["code"], "invalid_api_key");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = ask(&gw, "sk-bob-2", &chat_body("big", "hi"));
    assert_eq!(r.status, 403);
    assert_eq!(r.api_error()["code"], "model_not_allowed");
    // A name the gateway does not know: bob is told his own models, not
    // every model of the gateway.
    let r = ask(&gw, "sk-bob-2", &chat_body("gpt-17", "hi"));
    assert_eq!(r.status, 404);
    let msg = r.api_error()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("small") && !msg.contains("big"), "{msg}");
    assert_eq!(get(&gw.addr, "/v1/models").status, 401);
    // A key's model list is what it is shown; an unrestricted key sees all.
    let listed = |key: &str| -> Vec<String> {
        let r = request(
            &gw.addr,
            "GET",
            "/v1/models",
            &[("Authorization", &format!("Bearer {key}"))],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let mut ids: Vec<String> = r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(listed("sk-bob-2"), ["auto", "small"]);
    assert_eq!(listed("sk-alice-1"), ["auto", "big", "small"]);
    let r = request(
        &gw.addr,
        "GET",
        "/v1/models/big",
        &[("Authorization", "Bearer sk-bob-2")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let msg = r.api_error()["message"].as_str().unwrap().to_string();
    let available = msg.split("Available").nth(1).unwrap_or_default();
    assert!(
        available.contains("small") && !available.contains("big"),
        "{msg}"
    );
    // Mock usage for "Hello there": 3 prompt tokens, 12 completion tokens
    // = 3 * 0.001 + 12 * 0.002 = 0.027 USD, plain or streamed.
    let r = ask(&gw, "sk-alice-1", &hello);
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            r.json()["usage"]["prompt_tokens"].as_u64(),
            r.json()["usage"]["completion_tokens"].as_u64()
        ),
        (Some(3), Some(12))
    );
    let mut streamed = hello.clone();
    streamed["stream"] = json!(true);
    let r = ask(&gw, "sk-alice-1", &streamed);
    assert_eq!(r.status, 200);
    assert!(
        !r.text().contains("\"usage\":{"),
        "usage chunk not asked for"
    );
    // No usage from the upstream: estimated with tiktoken, and marked so.
    let r = ask(
        &gw,
        "sk-bob-2",
        &json!({"model": "auto", "messages": [{"role": "user", "content": "Count these words please"}], "mock": {"no_usage": true}}),
    );
    assert_eq!(r.status, 200);
    assert!(r.json().get("usage").is_none());

    // Records are written in the logging phase, just after the response: wait for them.
    assert!(wait_until(Duration::from_secs(5), || {
        let v = costs(&gw, "tenant");
        v["rows"].as_array().is_some_and(|r| r.len() == 2) && v["total"]["requests"] == 4
    }));
    let v = costs(&gw, "tenant,app,model");
    let acme = row(&v, "acme");
    assert_eq!(
        (
            acme["requests"].as_u64(),
            acme["input_tokens"].as_u64(),
            acme["output_tokens"].as_u64()
        ),
        (Some(2), Some(6), Some(24))
    );
    assert!(
        (acme["cost_usd"].as_f64().unwrap() - 0.054).abs() < 1e-9,
        "{acme}"
    );
    assert_eq!(acme["group"]["app"], "web");
    let beta = row(&v, "beta");
    assert_eq!(beta["estimated"], 1);
    assert!(
        beta["input_tokens"].as_u64().unwrap() >= 4
            && beta["output_tokens"].as_u64().unwrap() >= 12,
        "{beta}"
    );
    assert!(beta["cost_usd"].as_f64().unwrap() > 0.0);
    // Unauthenticated requests never reach the ledger; errors of a known key do
    // (bob's 403 above, alice's upstream 500 here).
    let r = ask(
        &gw,
        "sk-alice-1",
        &json!({"model": "small", "messages": [{"role": "user", "content": "x"}], "mock": {"status": 500}}),
    );
    assert_eq!(r.status, 500);
    // Passed on as the provider sent it, and still named an error in the
    // access log (it had no `error` field, so log queries missed outages).
    let line = gw.access_line(r.header("x-request-id").unwrap());
    assert_eq!(line["error"], "upstream_status", "{line}");
    assert!(wait_until(Duration::from_secs(5), || row(
        &costs(&gw, "tenant"),
        "acme"
    )["errors"]
        == 1));
    // The provider's 500, passed on, is a failed attempt (it was counted
    // "ok" while its error counters and the circuit counted a failure).
    assert_eq!(
        gw.metric("smartllm_upstream_attempts_total", &[("outcome", "failed")]),
        1.0,
        "{}",
        gw.metrics()
    );
    assert!(
        gw.metrics().contains("smartllm_cost_usd_total{"),
        "{}",
        gw.metrics()
    );
    // The CLI: table and CSV.
    let cfg = gw.config.path().to_str().unwrap().to_string();
    let out = std::process::Command::new(bin("smartllm"))
        .args([
            "costs",
            "--config",
            &cfg,
            "--since",
            "1h",
            "--by",
            "tenant,model",
            "--csv",
        ])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(csv.starts_with("tenant,model,requests,input_tokens,output_tokens,cached_tokens,cost_usd,saved_usd,errors"), "{csv}");
    assert!(csv.contains("acme,small,3,"), "{csv}");
    let out = std::process::Command::new(bin("smartllm"))
        .args(["costs", "--config", &cfg, "--by", "app"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("web") && table.contains("total: 5 requests"),
        "{table}"
    );
    assert_eq!(hash_on_stdin("sk-alice-1"), sha("sk-alice-1"));
    assert_eq!(get(&gw.admin, "/admin/costs?group_by=planet").status, 400);
    // One tenant's, app's or key's rows: what a team's own view needs.
    let only = |q: &str| {
        let r = get(
            &gw.admin,
            &format!("/admin/costs?since=1h&group_by=tenant,app,key&{q}"),
        );
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        let v = r.json();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["group"]["tenant"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    for q in ["tenant=acme", "app=acme%2Fweb", "key=alice"] {
        let tenants = only(q);
        assert!(
            !tenants.is_empty() && tenants.iter().all(|t| t == "acme"),
            "{q}: {tenants:?}"
        );
    }
    assert!(only("tenant=nobody").is_empty());
    assert_eq!(
        get(&gw.admin, "/admin/costs?tenant=beta&app=acme%2Fweb").status,
        400
    );
    let out = std::process::Command::new(bin("smartllm"))
        .args([
            "costs", "--config", &cfg, "--by", "tenant", "--tenant", "beta", "--csv",
        ])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.contains("\nbeta,") && !csv.contains("acme"), "{csv}");
    // No key material anywhere.
    assert!(!gw.log_text().contains("sk-alice-1") && !gw.metrics().contains("sk-alice-1"));
}

#[test]
fn ledger_survives_restart_and_kill_loses_at_most_the_flush_window() {
    let mock = Mock::start(&[]);
    let mut gw = Gateway::start(ledger_gateway(&mock, "ledger:\n  flush_interval: 200ms\n"));
    for i in 0..3 {
        assert_eq!(
            ask(&gw, "sk-alice-1", &chat_body("small", &format!("q{i}"))).status,
            200
        );
    }
    assert!(wait_until(Duration::from_secs(5), || costs(&gw, "tenant")
        ["total"]["requests"]
        == 3));
    let before = row(&costs(&gw, "tenant"), "acme").clone();
    // Graceful restart: everything kept.
    gw.stop();
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let mut gw = Gateway::start(cfg);
    assert_eq!(row(&costs(&gw, "tenant"), "acme"), &before);
    // kill -9 after the flush window: nothing lost.
    for i in 0..2 {
        assert_eq!(
            ask(
                &gw,
                "sk-alice-1",
                &chat_body("small", &format!("later {i}"))
            )
            .status,
            200
        );
    }
    std::thread::sleep(Duration::from_millis(600));
    std::process::Command::new("kill")
        .args(["-9", &gw.pid().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    gw.stop();
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let gw = Gateway::start(cfg);
    assert_eq!(row(&costs(&gw, "tenant"), "acme")["requests"], 5);
}

#[test]
fn suggestions_from_real_traffic() {
    let mock = Mock::start(&["--words", "20"]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    // A dear model and a cheap one the profiles rate about as good at chat.
    let models = "models:\n  - name: dear\n    pricing: { input: 2.5, output: 10 }\n    profile: { quality: { chat: 0.93 } }\n    deployments: [{ provider: mock }]\n  - name: cheap\n    pricing: { input: 0.15, output: 0.6 }\n    profile: { quality: { chat: 0.92 } }\n    deployments: [{ provider: mock }]\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "routes:\n  auto:\n    candidates: [dear, cheap]\n",
    );
    let gw = Gateway::start(cfg);
    for i in 0..6 {
        let r = gw.chat(&chat_body("dear", &format!("hi, how are you today? ({i})")));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The ledger records a request after its answer is sent: wait for the sixth.
    let mut r = get(&gw.admin, "/admin/suggestions?since=1h");
    assert!(
        wait_until(Duration::from_secs(5), || {
            r = get(&gw.admin, "/admin/suggestions?since=1h");
            r.status == 200 && r.json()["report"]["requests"] == 6
        }),
        "{}",
        r.text()
    );
    let report = &r.json()["report"];
    let s = &report["suggestions"][0];
    assert_eq!(s["kind"], "cheaper_model", "{report}");
    assert_eq!(
        (s["model"].as_str(), s["to_model"].as_str()),
        (Some("dear"), Some("cheap"))
    );
    assert_eq!(s["tier"], "simple");
    let saving = s["saving_usd"].as_f64().unwrap();
    let cost = report["cost_usd"].as_f64().unwrap();
    // cheap costs 0.06 of dear on the same tokens.
    assert!((saving / cost - 0.94).abs() < 0.01, "{saving} of {cost}");
    assert!(s["action"].as_str().unwrap().contains("(auto)"), "{s}");
    // The CLI shows the same.
    let out = Command::new(bin("smartllm"))
        .args(["costs", "suggest", "--since", "1h", "--admin", &gw.admin])
        .args(["--config", &gw.config.path().display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("cheaper_model") && text.contains("cheap instead of dear"),
        "{text}"
    );
    // Bad parameters get a clear 400.
    let r = get(&gw.admin, "/admin/suggestions?since=yesterday");
    assert_eq!(r.status, 400);
}

/// `smartllm keys hash` with the key on standard input.
fn hash_on_stdin(key: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(bin("smartllm"))
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn keys_create_prints_a_key_once_that_a_running_gateway_accepts() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(ledger_gateway(&mock, ""));
    let dir = gw.config.path().to_path_buf();
    let out = smartllm_cli(
        &[
            "keys", "create", "ci-bot", "--tenant", "acme", "--app", "ci", "--model", "small",
        ],
        &dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("sk-smartllm-") && key.len() > 40, "{key}");
    assert!(err.contains("only time the key is shown"), "{err}");
    // Only the hash is stored; the other keys are still there.
    let yaml = std::fs::read_to_string(dir.join("keys.yaml")).unwrap();
    assert!(!yaml.contains(&key), "{yaml}");
    assert!(
        yaml.contains(&sha(&key)) && yaml.contains(&sha("sk-alice-1")),
        "{yaml}"
    );
    // The running gateway reloads the file and takes the key, for the models it allows.
    assert!(answers_within(&gw, &key, 200), "{}", gw.log_text());
    assert_eq!(ask(&gw, &key, &chat_body("big", "hi")).status, 403);
    assert_eq!(
        ask(&gw, "sk-alice-1", &chat_body("small", "hi")).status,
        200
    );
    // A second key of the same name would make the config invalid: refused, file unchanged.
    let out = smartllm_cli(&["keys", "create", "ci-bot"], &dir);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no key printed for a refused create");
    assert_eq!(
        std::fs::read_to_string(dir.join("keys.yaml")).unwrap(),
        yaml
    );
    // A key on the command line is refused (it would stay in shell history and ps).
    let out = Command::new(bin("smartllm"))
        .args(["keys", "hash", "sk-alice-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("standard input"));
    // Listed with the start of its sha256, never the key.
    let out = smartllm_cli(&["keys", "list"], &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.lines().any(|l| l.starts_with("ci-bot ")), "{table}");
    assert!(
        table.contains(&sha(&key)[..12]) && !table.contains(&key),
        "{table}"
    );
    // Rotated: a new key, same name (and so the same tenant, models and
    // ledger rows); both work while the rotation is under way, then only
    // the new one.
    let out = smartllm_cli(&["keys", "rotate", "ci-bot"], &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(rotated.starts_with("sk-smartllm-") && rotated != key);
    assert!(answers_within(&gw, &rotated, 200), "{}", gw.log_text());
    assert_eq!(ask(&gw, &key, &chat_body("small", "hi")).status, 200);
    let out = smartllm_cli(&["keys", "rotate", "ci-bot", "--finish"], &dir);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(answers_within(&gw, &key, 401), "{}", gw.log_text());
    assert_eq!(ask(&gw, &rotated, &chat_body("small", "hi")).status, 200);
    let key = rotated;
    // Revoked during an incident in which another file is broken (a typo
    // in models.yaml, so the directory is rejected): keys.yaml is written
    // all the same and the running gateway applies it on its own.
    let models = std::fs::read_to_string(dir.join("models.yaml")).unwrap();
    std::fs::write(
        dir.join("models.yaml"),
        models.replace("provider: mock", "provider: mocq"),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_last_reload_successful", &[])
        == 0.0));
    // Revoked: gone from the file (the rest kept) and refused after the reload.
    let out = smartllm_cli(&["keys", "revoke", "ci-bot"], &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("other files"));
    let after = std::fs::read_to_string(dir.join("keys.yaml")).unwrap();
    assert!(
        !after.contains("ci-bot") && after.contains("alice"),
        "{after}"
    );
    assert!(answers_within(&gw, &key, 401), "{}", gw.log_text());
    assert_eq!(
        ask(&gw, "sk-alice-1", &chat_body("small", "hi")).status,
        200
    );
    assert!(gw.log_text().contains("keys.yaml applied on its own"));
    // Who still uses the revoked key: its 401s carry the start of its
    // sha256 (as keys list shows it), the client's address and agent.
    let refused = ask(&gw, &key, &chat_body("small", "hi"));
    assert_eq!(refused.status, 401);
    let line = gw.access_line(refused.header("x-request-id").unwrap());
    assert_eq!(line["key_sha256"], sha(&key)[..12], "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    // The rest stays rejected until fixed.
    assert_eq!(
        gw.metric("smartllm_config_last_reload_successful", &[]),
        0.0
    );
    std::fs::write(dir.join("models.yaml"), &models).unwrap();
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_last_reload_successful", &[])
        == 1.0));
    // A name that is not there: an error, the file unchanged.
    let out = smartllm_cli(&["keys", "revoke", "ci-bot"], &dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key named 'ci-bot'"));
    assert_eq!(
        std::fs::read_to_string(dir.join("keys.yaml")).unwrap(),
        after
    );
    // No key material in the gateway's log.
    assert!(!gw.log_text().contains(&key));
}

/// `smartllm ARGS --config DIR`.
fn smartllm_cli(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(bin("smartllm"))
        .args(args)
        .arg("--config")
        .arg(dir)
        .output()
        .unwrap()
}

/// Whether `key`'s chat gets `status` within 15 s (a reload applied).
fn answers_within(gw: &Gateway, key: &str, status: u16) -> bool {
    wait_until(Duration::from_secs(15), || {
        ask(gw, key, &chat_body("small", "hi")).status == status
    })
}

/// A key that lists a model, not the fixed route that leads to it, is never
/// served by the route's fallback: the list is no way around.
#[test]
fn a_fixed_routes_fallback_serves_only_models_the_key_lists() {
    let mock = Mock::start(&["--model-status", "mock-small=503"]);
    let providers = format!(
        "providers:\n  mock:\n    kind: openai\n    base_url: http://{}/v1\n    health_check: {{ kind: none }}\n",
        mock.addr
    );
    let models = "models:\n  - name: small\n    deployments: [ { provider: mock, model: mock-small } ]\n  - name: big\n    deployments: [ { provider: mock, model: mock-big } ]\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "routes:\n  r:\n    model: small\n    fallback: [big]\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: narrow\n    sha256: {}\n    tenant: t\n    models: [small]\n  - name: routed\n    sha256: {}\n    tenant: t\n    models: [r]\n",
            sha("sk-narrow"),
            sha("sk-routed")
        ),
    );
    let gw = Gateway::start(cfg);
    // small answers 503: the key listing the route gets big's answer...
    let r = ask(&gw, "sk-routed", &chat_body("r", "hello"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-smartllm-model"), Some("big"));
    // ...the key listing only small gets small's failure, not big.
    let r = ask(&gw, "sk-narrow", &chat_body("r", "hello again"));
    assert!(r.status >= 500, "{}: {}", r.status, r.text());
    assert_ne!(r.header("x-smartllm-model"), Some("big"));
}
