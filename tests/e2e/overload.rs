//! Under pressure: load shedding beyond the concurrency limit, and upstream
//! faults under concurrent load.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `n` requests at once; returns the responses and how long each took.
fn burst(addr: &str, n: usize, body: impl Fn(usize) -> Value) -> Vec<(Response, Duration)> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (addr, b) = (addr.to_string(), serde_json::to_vec(&body(i)).unwrap());
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = request(&addr, "POST", "/v1/chat/completions", &[], &b).expect("request");
                (r, t.elapsed())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn overload_is_shed_with_503_and_retry_after_and_the_cache_steps_aside() {
    // Concurrency limit: beyond server.max_in_flight, 503 + Retry-After at once.
    let (_mock, gw) = basic("  max_in_flight: 3\n", &["--latency-ms", "400"]);
    let rs = burst(&gw.addr, 10, |i| chat_body("small", &format!("burst {i}")));
    let ok = rs.iter().filter(|(r, _)| r.status == 200).count();
    let shed: Vec<_> = rs.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(
        ok + shed.len(),
        10,
        "{:?}",
        rs.iter().map(|(r, _)| r.status).collect::<Vec<_>>()
    );
    assert!(ok >= 3 && shed.len() >= 5, "ok {ok}, shed {}", shed.len());
    for (r, took) in &shed {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.api_error()["code"], "server_overloaded");
        assert!(
            *took < Duration::from_millis(300),
            "shed at once, not queued: {took:?}"
        );
    }
    assert_eq!(
        gw.metric("smartllm_shed_total", &[("reason", "max_in_flight")]),
        shed.len() as f64
    );
    // Counted under their endpoint, where alerts on chat errors see them.
    assert!(
        wait_until(Duration::from_secs(5), || gw.metric(
            "smartllm_requests_total",
            &[("endpoint", "chat_completions"), ("status", "503")]
        ) == shed.len() as f64),
        "{}",
        gw.metrics()
    );
    // The limit reloads live.
    let main = std::fs::read_to_string(gw.config.path().join("smartllm.yaml")).unwrap();
    gw.config.write(
        "smartllm.yaml",
        &main.replace("max_in_flight: 3", "max_in_flight: 50"),
    );
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    let rs = burst(&gw.addr, 10, |i| chat_body("small", &format!("again {i}")));
    assert!(rs.iter().all(|(r, _)| r.status == 200));
    drop(gw);

    // Embedder overload (a queue of 1, 1 ms of patience): lookups that cannot
    // get an embedding in time skip the cache and are answered upstream; no
    // request fails, and the skips are counted.
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n",
        "routes: {}\n",
    );
    let main = std::fs::read_to_string(cfg.path().join("smartllm.yaml")).unwrap();
    cfg.write(
        "smartllm.yaml",
        &main.replace(
            "embedder:\n",
            "embedder:\n  queue_depth: 1\n  max_queue_wait: 1ms\n",
        ),
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    let gw = Gateway::start(cfg);
    let long = "please explain the difference between these two approaches in detail ".repeat(12);
    let rs = burst(&gw.addr, 24, |i| chat_body("small", &format!("{i} {long}")));
    assert!(rs.iter().all(|(r, _)| r.status == 200));
    let skipped = rs
        .iter()
        .filter(|(r, _)| cache_header(r) == "bypass")
        .count();
    assert!(skipped >= 1, "some lookups were shed");
    assert_eq!(
        gw.metric("smartllm_shed_total", &[("reason", "embedder")]),
        skipped as f64
    );
    assert!(gw.metric("smartllm_embed_shed_total", &[]) >= skipped as f64);
}

#[test]
fn upstream_faults_under_concurrent_load_keep_99_9_percent_success() {
    // One healthy deployment, one that fails half its requests in every way
    // that leaves nothing sent to the client yet (reset, close, stall,
    // malformed JSON, 5xx), one that refuses connections. (A 429 would put
    // it behind the others for its Retry-After: see
    // `a_rate_limited_model_cools_behind_its_fallback_for_its_retry_after`.)
    let healthy = Mock::start(&["--name", "healthy"]);
    let faulty = Mock::start(&[
        "--name",
        "faulty",
        "--fault-rate",
        "0.5",
        "--faults",
        "reset,close,hang,malformed-json,500,503",
    ]);
    let dead = free_port();
    let providers = format!(
        "providers:\n{}  faulty:\n    kind: openai\n    base_url: http://{}/v1\n    first_byte_timeout: 300ms\n    idle_timeout: 300ms\n    health_check: {{ kind: none }}\n    circuit_breaker: {{ failures: 1000, cooldown: 500ms }}\n  dead:\n    kind: openai\n    base_url: http://127.0.0.1:{dead}/v1\n    health_check: {{ kind: none }}\n    circuit_breaker: {{ failures: 3, cooldown: 500ms }}\n",
        mock_provider("healthy", &healthy),
        faulty.addr
    );
    let models = "models:\n  - name: multi\n    deployments:\n      - provider: faulty\n        model: mock-small\n      - provider: dead\n        model: mock-small\n      - provider: healthy\n        model: mock-small\n";
    let gw = Gateway::start(ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "",
    ));
    let (ok, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (addr, ok, failures) = (gw.addr.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                for n in 0..150 {
                    let stream = n % 3 == 0;
                    let body = json!({"model": "multi", "stream": stream,
                        "messages": [{"role": "user", "content": format!("fault load {w}-{n}")}]});
                    let res = request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        &serde_json::to_vec(&body).unwrap(),
                    );
                    match complete_answer(res, stream) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(why) => failures.lock().unwrap().push(why),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let ok = ok.load(Ordering::SeqCst);
    let failures = failures.lock().unwrap().clone();
    let total = ok + failures.len() as u64;
    assert_eq!(total, 1200);
    eprintln!(
        "upstream faults: {ok}/{total} succeeded, faulty mock saw {} requests",
        faulty.requests()
    );
    assert!(
        ok as f64 / total as f64 >= 0.999,
        "{} of {total} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The faults really happened, and every one is counted by reason.
    // Its breaker is set never to open, so the retries carry the whole load.
    assert!(
        faulty.requests() >= 100,
        "the faulty deployment was exercised ({} requests)",
        faulty.requests()
    );
    let m = |reason: &str| gw.metric("smartllm_upstream_errors_total", &[("reason", reason)]);
    assert!(m("connect") >= 1.0, "connection refused counted");
    assert!(m("status_5xx") >= 1.0);
    assert!(m("malformed_response") + m("body") + m("reset") >= 1.0);
    assert!(
        gw.metric(
            "smartllm_upstream_attempts_total",
            &[("outcome", "retried")]
        ) >= 10.0,
        "failed attempts moved on to the next deployment"
    );
}
