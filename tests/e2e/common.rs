//! Helpers shared by several test files: the basic one-mock gateway, virtual
//! keys and their ledger, cache and cost look-ups, and a load worker's verdict.

use serde_json::Value;
use sha2::{Digest, Sha256};
use smartllm_e2e::*;
use std::time::Duration;

const ANTHROPIC_MODEL: &str =
    "  - name: claude\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n";

/// One gateway in front of one mock: models `small` (openai kind), `claude`
/// (anthropic kind), route alias `auto` -> small.
pub(crate) fn basic(server_extra: &str, mock_args: &[&str]) -> (Mock, Gateway) {
    let mock = Mock::start(mock_args);
    let providers = format!(
        "providers:\n{}  claude-mock:\n    kind: anthropic\n    base_url: http://{}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = format!(
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: embed\n    deployments:\n      - provider: mock\n        model: mock-embed\n{ANTHROPIC_MODEL}"
    );
    let cfg = ConfigDir::new(
        server_extra,
        "demo:\n  mode: off\n",
        &providers,
        &models,
        "routes:\n  auto:\n    model: small\n",
    );
    let gw = Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-secret-1234")]);
    (mock, gw)
}

pub(crate) fn ask(gw: &Gateway, key: &str, body: &Value) -> Response {
    request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &format!("Bearer {key}"))],
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap()
}

/// The text of a streamed chat answer: every chunk's `delta.content`, joined
/// (`[DONE]` and anything else that is not JSON is skipped).
pub(crate) fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub(crate) fn cache_header(r: &Response) -> &str {
    r.header("x-smartllm-cache").unwrap_or("none")
}

/// Inserts happen off the request path: wait until the entry is there.
pub(crate) fn wait_cached(gw: &Gateway, n: u64) {
    assert!(
        wait_until(Duration::from_secs(5), || get(
            &gw.admin,
            "/admin/cache/stats"
        )
        .json()["stats"]["l1_entries"]
            .as_u64()
            >= Some(n)),
        "entry not stored"
    );
}

pub(crate) fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(crate) fn ledger_gateway(mock: &Mock, extra_main: &str) -> ConfigDir {
    let providers = format!("providers:\n{}", mock_provider("mock", mock));
    // 1000 / 2000 USD per 1M tokens: 0.001 and 0.002 USD a token.
    let models = "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    deployments:\n      - provider: mock\n  - name: big\n    deployments:\n      - provider: mock\n";
    let cfg = ConfigDir::new(
        "",
        &format!("demo:\n  mode: off\n{extra_main}"),
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\n    models: [small, auto]\n",
            sha("sk-alice-1"),
            sha("sk-bob-2")
        ),
    );
    cfg
}

pub(crate) fn costs(gw: &Gateway, group_by: &str) -> Value {
    let r = get(
        &gw.admin,
        &format!("/admin/costs?since=1h&group_by={group_by}"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// A load worker's verdict on one chat completion: 200 and a whole answer (a
/// message, or a stream that ends with `[DONE]`), else why not.
pub(crate) fn complete_answer(res: std::io::Result<Response>, stream: bool) -> Result<(), String> {
    let r = res.map_err(|e| format!("io: {e}"))?;
    let whole = r.status == 200
        && if stream {
            r.sse_data().last().map(String::as_str) == Some("[DONE]")
        } else {
            serde_json::from_slice::<Value>(&r.body)
                .is_ok_and(|v| v["choices"][0]["message"].is_object())
        };
    if whole {
        Ok(())
    } else {
        Err(format!("{} {}", r.status, r.text()))
    }
}

/// Resident memory of a process (KiB), from /proc.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `(event name, data)` of each event of an SSE stream with named events
/// (Anthropic Messages, OpenAI Responses).
pub(crate) fn named_events(r: &Response) -> Vec<(String, Value)> {
    r.text()
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}
