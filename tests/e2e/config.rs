//! Configuration: `smartllm check`, hot reload under load, and a reload the
//! gateway rejects while it keeps the running config.

use serde_json::{json, Value};
use smartllm_e2e::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn check_command_reports_every_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("smartllm.yaml"),
        "server:\n  listen: 127.0.0.1:1\n  lissen: x\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("smartllm.yaml:3") && err.contains("unknown field `lissen`"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("smartllm.yaml"),
        "server:\n  listen: 127.0.0.1:1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("models.yaml"),
        "models:\n  - name: a\n    deployments:\n      - provider: ghost\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("routes.yaml"),
        "routes:\n  r:\n    model: b\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "models.yaml:4: models[0].deployments[0].provider: unknown provider \"ghost\""
        ),
        "{err}"
    );
    assert!(err.contains("routes.yaml:3: routes.r.model"), "{err}");

    // The shipped conf/ is valid.
    let out = std::process::Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(workspace_root().join("conf"))
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An embedding model that is not there would stop `serve`: it fails
    // the check too (it passed, and systemd's restarts looped).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("smartllm.yaml"),
        "embedder:\n  model: nope.onnx\n",
    )
    .unwrap();
    let check = |local: bool| {
        let mut cmd = std::process::Command::new(bin("smartllm"));
        cmd.arg("check");
        if local {
            cmd.arg("--local");
        }
        cmd.arg("--config")
            .arg(dir.path())
            .env("SMARTLLM_ASSETS_DIR", assets_dir())
            .output()
            .unwrap()
    };
    let out = check(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("nope.onnx does not exist, so `smartllm serve` would not start"),
        "{err}"
    );
    // A config checked for another host (a container image) is warned.
    let out = check(false);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("warning: embedder: the model"), "{said}");

    // So does an admin token it cannot read (`serve` fails closed on it),
    // named by its setting.
    std::fs::write(
        dir.path().join("smartllm.yaml"),
        "admin:\n  token_file: nope.token\n",
    )
    .unwrap();
    let out = check(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("admin token (admin.token_file in smartllm.yaml): cannot read key file"),
        "{err}"
    );
    let out = check(false);
    assert!(out.status.success());
    std::fs::write(dir.path().join("nope.token"), "s3cret\n").unwrap();
    let out = check(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn routes_to(model: &str) -> String {
    format!("routes:\n  auto:\n    model: {model}\n")
}

#[test]
fn hot_reload_under_load_loses_no_request() {
    let m1 = Mock::start(&["--name", "one"]);
    let m2 = Mock::start(&["--name", "two"]);
    let providers = format!(
        "providers:\n{}{}",
        mock_provider("p1", &m1),
        mock_provider("p2", &m2)
    );
    let models = "models:\n  - name: a\n    deployments:\n      - provider: p1\n  - name: b\n    deployments:\n      - provider: p2\n";
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        &routes_to("a"),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), gw.addr.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 130 {
                let stream = i % 3 == 0;
                let r = request(&addr, "POST", "/v1/chat/completions", &[], &serde_json::to_vec(&json!({"model": "auto", "stream": stream, "messages": [{"role": "user", "content": format!("w{w} r{i}")}]})).unwrap());
                match r {
                    Ok(r) if r.status == 200 && (!stream || r.text().ends_with("data: [DONE]\n\n")) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }
    let reloads_before = gw.metric("smartllm_config_reloads_total", &[("result", "ok")]);
    let pid = gw.pid().to_string();
    for n in 0..24 {
        gw.config.write(
            "routes.yaml",
            &routes_to(if n % 2 == 0 { "b" } else { "a" }),
        );
        if n % 4 == 3 {
            // SIGHUP raises the same reload.
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap();
        }
        let want = reloads_before + n as f64 + 1.0;
        assert!(
            wait_until(Duration::from_secs(20), || gw
                .metric("smartllm_config_reloads_total", &[("result", "ok")])
                >= want),
            "reload {n} not applied"
        );
        std::thread::sleep(Duration::from_millis(40));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} requests failed during reloads");
    assert!(ok >= 1000, "only {ok} requests");
    assert!(
        m1.requests() > 100 && m2.requests() > 100,
        "both routes were used"
    );
    assert!(gw.metric("smartllm_config_version", &[]) >= 20.0);
}

#[test]
fn invalid_reload_is_rejected_and_the_running_config_stays() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("p1", &mock));
    let models = "models:\n  - name: a\n    deployments:\n      - provider: p1\n";
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        &routes_to("a"),
    ));
    let version = gw.metric("smartllm_config_version", &[]);
    assert_eq!(
        gw.metric("smartllm_config_last_reload_successful", &[]),
        1.0
    );
    // Every provider's attempt series exist from the start, at 0.
    assert!(gw
        .metrics()
        .contains(r#"smartllm_upstream_attempts_total{provider="p1",outcome="failed"} 0"#));
    gw.config.write(
        "routes.yaml",
        "routes:\n  auto:\n    model: a\n    colour: blue\n",
    );
    assert!(wait_until(Duration::from_secs(20), || gw.metric(
        "smartllm_config_reloads_total",
        &[("result", "error")]
    ) >= 1.0));
    assert_eq!(gw.metric("smartllm_config_version", &[]), version);
    // Stays 0 while the rejected files are on disk (an alert on it does
    // not clear itself).
    assert_eq!(
        gw.metric("smartllm_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(gw.chat(&chat_body("auto", "still routed")).status, 200);
    let cfg = get(&gw.admin, "/admin/config").json();
    let err = cfg["reload"]["last_error"].as_str().unwrap();
    assert!(
        err.contains("routes.yaml:4") && err.contains("colour"),
        "{err}"
    );
    assert!(gw.log_text().contains("config reload rejected"));
    // Admin reload reports the same error.
    let r = request(&gw.admin, "POST", "/admin/reload", &[], b"").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("colour"));
    // A restart-only change is applied for the rest and reported.
    gw.config.write("routes.yaml", &routes_to("a"));
    let main = std::fs::read_to_string(gw.config.path().join("smartllm.yaml")).unwrap();
    gw.config
        .write("smartllm.yaml", &main.replace("threads: 2", "threads: 3"));
    assert!(wait_until(Duration::from_secs(5), || get(
        &gw.admin,
        "/admin/config"
    )
    .json()["reload"]["restart_required"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c
            .as_str()
            .unwrap_or("")
            .starts_with("server.threads")))));
    assert_eq!(gw.metric("smartllm_config_restart_required", &[]), 1.0);
    assert_eq!(
        gw.metric("smartllm_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(gw.chat(&chat_body("auto", "ok")).status, 200);
    // The log says what changed, and what waits for a restart as text
    // (not JSON quoted in a string).
    let line = gw
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["needs_restart"].is_string())
        .expect("a reload line naming the restart-only change");
    assert_eq!(line["changed"], "server", "{line}");
    let needs = line["needs_restart"].as_str().unwrap();
    assert!(
        needs.starts_with("server.threads") && !needs.contains('"'),
        "{line}"
    );
}
