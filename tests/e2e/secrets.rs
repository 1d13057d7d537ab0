//! Secrets: the admin API's token, and no key (provider, virtual or admin)
//! ever reaching a client, a log, the metrics or the admin API.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::time::Duration;

/// Admin tokens cannot be guessed at speed: ten wrong ones a minute from
/// an address, then 429 with Retry-After (the right token too, for the rest
/// of the minute); the dashboard's sign-in form counts the same.
#[test]
fn admin_token_guesses_are_limited() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\nadmin:\n  token_env: TEST_ADMIN_TOKEN\n",
        &providers,
        models,
        "",
    );
    let gw = Gateway::start_with_env(cfg, &[("TEST_ADMIN_TOKEN", "adm-secret-42")]);
    let with = |token: &str| {
        request(
            &gw.admin,
            "GET",
            "/admin/config",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .unwrap()
    };
    // No token at all is no guess.
    for _ in 0..20 {
        assert_eq!(get(&gw.admin, "/admin/config").status, 401);
    }
    assert_eq!(with("adm-secret-42").status, 200);
    for i in 0..5 {
        assert_eq!(with(&format!("guess-{i}")).status, 401);
    }
    for i in 0..5 {
        let r = request(
            &gw.admin,
            "POST",
            "/ui/login",
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("token=form-guess-{i}").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 401, "{}", r.text());
    }
    for token in ["guess-11", "adm-secret-42"] {
        let r = with(token);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "admin_token_guesses");
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
}

#[test]
fn admin_api_requires_its_token_when_configured() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\nadmin:\n  token_env: TEST_ADMIN_TOKEN\n",
        &providers,
        models,
        "",
    );
    // Configured but missing: the gateway refuses to start (fail closed).
    let out = std::process::Command::new(bin("smartllm"))
        .args(["serve", "--config"])
        .arg(cfg.path())
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .env_remove("TEST_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("admin token (admin.token_env in smartllm.yaml): environment variable TEST_ADMIN_TOKEN is not set"));
    let gw = Gateway::start_with_env(cfg, &[("TEST_ADMIN_TOKEN", "adm-secret-42")]);
    for path in ["/admin/config", "/admin/costs", "/admin/cache/stats"] {
        let r = get(&gw.admin, path);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_admin_token");
        let r = request(
            &gw.admin,
            "GET",
            path,
            &[("Authorization", "Bearer wrong")],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 401);
        let r = request(
            &gw.admin,
            "GET",
            path,
            &[("Authorization", "Bearer adm-secret-42")],
            b"",
        )
        .unwrap();
        assert_ne!(r.status, 401, "{path}");
    }
    assert_eq!(
        request(&gw.admin, "POST", "/admin/reload", &[], b"")
            .unwrap()
            .status,
        401
    );
    // Authentication comes before the body: a caller without the token
    // announcing 64 MiB gets its 401 at once, nothing of the body read.
    let head_only = |auth: &str, len: usize| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&gw.admin).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "POST /admin/cache/purge HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let started = std::time::Instant::now();
    let r = head_only("", 64 << 20);
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // With the token, a body over 1 MiB is refused by its length (413).
    let r = head_only("Authorization: Bearer adm-secret-42\r\n", 2 << 20);
    assert!(
        r.starts_with("HTTP/1.1 413") && r.contains("admin_body_too_large"),
        "{r}"
    );
    // Probes and metrics stay open for orchestrators and Prometheus; the
    // readiness details (paths, addresses, the config's digest) need the
    // token.
    assert_eq!(get(&gw.admin, "/healthz").status, 200);
    let ready = get(&gw.admin, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), json!({"status": "ready"}));
    let r = request(
        &gw.admin,
        "GET",
        "/readyz",
        &[("Authorization", "Bearer adm-secret-42")],
        b"",
    )
    .unwrap();
    assert!(r.json()["config"].is_object(), "{}", r.text());
    assert_eq!(get(&gw.admin, "/metrics").status, 200);
    // The CLI picks the token up from the config's source.
    let out = std::process::Command::new(bin("smartllm"))
        .args(["costs", "--config"])
        .arg(gw.config.path())
        .env("TEST_ADMIN_TOKEN", "adm-secret-42")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin("smartllm"))
        .args(["costs", "--admin", &gw.admin])
        .env_remove("SMARTLLM_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("401"));
    assert!(
        !gw.log_text().contains("adm-secret-42")
            && !get(&gw.admin, "/metrics").text().contains("adm-secret-42")
    );
}

#[test]
fn secrets_never_reach_clients_logs_metrics_or_the_admin_api() {
    let mock = Mock::start(&["--chunk-delay-ms", "1"]);
    let providers = format!(
        "providers:\n  mock:\n    kind: openai\n    base_url: http://{0}/v1\n    api_key_env: TEST_OPENAI_KEY\n  claude:\n    kind: anthropic\n    base_url: http://{0}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n",
        mock.addr
    );
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: sonnet\n    deployments:\n      - provider: claude\n        model: claude-mock\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\nadmin:\n  token_env: TEST_ADMIN_TOKEN\n",
        &providers,
        models,
        "",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n",
            sha("sk-alice-virtual-4242")
        ),
    );
    let (provider_key, anthropic_key, admin_token) = (
        "sk-provider-secret-5150",
        "sk-ant-provider-secret-6160",
        "admin-token-secret-7170",
    );
    let gw = Gateway::start_with_env(
        cfg,
        &[
            ("TEST_OPENAI_KEY", provider_key),
            ("TEST_ANTHROPIC_KEY", anthropic_key),
            ("TEST_ADMIN_TOKEN", admin_token),
        ],
    );
    let secrets = [
        provider_key,
        anthropic_key,
        admin_token,
        "sk-alice-virtual-4242",
        "sk-wrong-key-8080",
    ];
    let call = |key: &str, body: &Value| {
        request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &format!("Bearer {key}"))],
            &serde_json::to_vec(body).unwrap(),
        )
        .unwrap()
    };
    let mut seen = Vec::new();
    // Success, plain and streamed, both provider kinds.
    for model in ["small", "sonnet"] {
        let r = call("sk-alice-virtual-4242", &chat_body(model, "hello"));
        assert_eq!(r.status, 200, "{}", r.text());
        seen.push(r.text());
        let r = call(
            "sk-alice-virtual-4242",
            &json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(r.status, 200);
        seen.push(r.text());
    }
    // A wrong key: 401 that does not quote it.
    let r = call("sk-wrong-key-8080", &chat_body("small", "hello"));
    assert_eq!(r.status, 401);
    seen.push(r.text());
    // A provider that quotes the key it was sent: scrubbed before the client
    // sees it. (The `mock` object reaches OpenAI-kind providers only; the
    // Anthropic translation drops unknown fields, and both kinds' error bodies
    // pass the same scrub.) The provider refused the gateway's key, not the
    // client's: 502 upstream_auth, not a 401 the client's SDK would blame on
    // its own key.
    let r = call(
        "sk-alice-virtual-4242",
        &json!({"model": "small", "messages": [{"role": "user", "content": "x"}], "mock": {"status": 401}}),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_auth", "{}", r.text());
    assert!(r.text().contains("[redacted]"), "{}", r.text());
    seen.push(r.text());
    // The admin API refuses requests without its token, and with it shows no secret.
    for path in [
        "/admin/config",
        "/admin/models",
        "/admin/costs?since=1h&group_by=key",
    ] {
        assert_eq!(get(&gw.admin, path).status, 401, "{path}");
        let r = request(
            &gw.admin,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {admin_token}"))],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        seen.push(r.text());
    }
    let ready = request(
        &gw.admin,
        "GET",
        "/readyz",
        &[("Authorization", &format!("Bearer {admin_token}"))],
        b"",
    )
    .unwrap();
    assert!(ready.json()["config"].is_object(), "{}", ready.text());
    seen.push(ready.text());
    seen.push(gw.metrics());
    seen.push(gw.log_text());
    for text in &seen {
        for s in secrets {
            assert!(
                !text.contains(s),
                "{s} leaked in: {}",
                &text[..text.len().min(400)]
            );
        }
    }
    // The provider did get its key (the gateway injected it).
    assert!(mock.last()["headers"].to_string().contains(provider_key));
}

/// A reload applies rotated key and token files, and never opens what the
/// running gateway keeps closed: an admin listener beyond loopback keeps
/// needing its token even when the file moves it to loopback (a restart-only
/// setting) and drops the token; an emptied `keys.yaml` keeps keys required
/// (an explicit `require_key: false` opens it); a provider key that cannot
/// be read does not swap real answers for the demo mock's.
#[test]
fn a_reload_never_opens_the_gateway_or_its_admin_api() {
    let real = Mock::start(&["--name", "real"]);
    let demo = Mock::start(&["--name", "demo"]);
    let providers = format!(
        "providers:\n  p:\n    kind: openai\n    base_url: http://{}/v1\n    api_key_file: provider.key\n    health_check: {{ kind: none }}\n",
        real.addr
    );
    let models = "models:\n  - name: small\n    deployments:\n      - provider: p\n";
    let cfg = ConfigDir::new(
        "",
        &format!(
            "demo:\n  upstream: http://{}/v1\nadmin:\n  token_file: admin.token\n",
            demo.addr
        ),
        &providers,
        models,
        "",
    );
    cfg.write("provider.key", "sk-provider-1\n");
    cfg.write("admin.token", "adm-1\n");
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n",
            sha("vk-alice")
        ),
    );
    let main_path = cfg.path().join("smartllm.yaml");
    let open_main = std::fs::read_to_string(&main_path)
        .unwrap()
        .replace("admin_listen: 127.0.0.1:", "admin_listen: 0.0.0.0:");
    cfg.write("smartllm.yaml", &open_main);
    let gw = Gateway::start(cfg);
    let admin = |token: &str, method: &str, path: &str| {
        request(
            &gw.admin,
            method,
            path,
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .unwrap()
    };
    let version = || gw.metric("smartllm_config_version", &[]);
    let rejected = || gw.metric("smartllm_config_reloads_total", &[("result", "error")]);
    let answered_by = |r: &Response| r.json()["system_fingerprint"].as_str().map(str::to_string);
    let r = ask(&gw, "vk-alice", &chat_body("small", "hello"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r).as_deref(), Some("real"));
    assert_eq!(gw.chat(&chat_body("small", "no key")).status, 401);

    // A provider key rotated in its file is a new config.
    let v = version();
    gw.config.write("provider.key", "sk-provider-2\n");
    assert!(
        wait_until(Duration::from_secs(10), || version() > v),
        "the rotated provider key was not reloaded:\n{}",
        gw.log_text()
    );
    // So is the admin token: the old one stops working.
    gw.config.write("admin.token", "adm-2\n");
    assert!(
        wait_until(Duration::from_secs(10), || admin(
            "adm-2",
            "GET",
            "/admin/config"
        )
        .status
            == 200),
        "{}",
        gw.log_text()
    );
    assert_eq!(admin("adm-1", "GET", "/admin/config").status, 401);

    // The file moves the admin API to loopback and drops its token; the
    // listener that runs is still on 0.0.0.0: refused.
    let e = rejected();
    gw.config.write(
        "smartllm.yaml",
        &open_main
            .replace("admin_listen: 0.0.0.0:", "admin_listen: 127.0.0.1:")
            .replace("admin:\n  token_file: admin.token\n", ""),
    );
    assert!(wait_until(Duration::from_secs(10), || rejected() > e));
    let r = admin("adm-2", "POST", "/admin/reload");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("beyond loopback"), "{}", r.text());
    assert_eq!(get(&gw.admin, "/admin/config").status, 401);
    gw.config.write("smartllm.yaml", &open_main);

    // keys.yaml emptied: the key it listed stops working, and keys stay
    // required.
    let v = version();
    gw.config.write("keys.yaml", "keys: []\n");
    assert!(wait_until(Duration::from_secs(10), || version() > v));
    let cfg = admin("adm-2", "GET", "/admin/config").json();
    assert!(
        cfg["reload"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("keys stay required")),
        "{cfg}"
    );
    assert_eq!(gw.chat(&chat_body("small", "no key")).status, 401);
    assert_eq!(
        ask(&gw, "vk-alice", &chat_body("small", "removed")).status,
        401
    );
    // Said explicitly, the gateway opens.
    let v = version();
    gw.config
        .write("keys.yaml", "require_key: false\nkeys: []\n");
    assert!(wait_until(Duration::from_secs(10), || version() > v));
    let r = gw.chat(&chat_body("small", "open now"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r).as_deref(), Some("real"));

    // The provider key file goes missing: no demo mode on a reload.
    let e = rejected();
    std::fs::remove_file(gw.config.path().join("provider.key")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || rejected() > e));
    let err = admin("adm-2", "GET", "/admin/config").json()["reload"]["last_error"].clone();
    assert!(
        err.as_str().is_some_and(|e| e.contains("demo mock")),
        "{err}"
    );
    let r = gw.chat(&chat_body("small", "still real"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answered_by(&r).as_deref(), Some("real"));
}

/// `SMARTLLM_REQUIRE_KEY=true` (the systemd unit and the Kubernetes
/// manifest set it): a directory without keys.yaml refuses every request
/// at a start too, as a reload does (without it, such a start was open).
#[test]
fn a_start_without_keys_yaml_stays_closed_when_the_environment_requires_keys() {
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "routes:\n  auto:\n    model: small\n",
    );
    assert!(!cfg.path().join("keys.yaml").exists());
    let gw = Gateway::start_with_env(cfg, &[("SMARTLLM_REQUIRE_KEY", "true")]);
    let r = gw.chat(&chat_body("small", "who am I?"));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.api_error()["code"], "missing_api_key");
}
