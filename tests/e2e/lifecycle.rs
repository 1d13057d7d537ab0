//! The process's life: readiness, SIGTERM with streams in flight, a graceful
//! binary upgrade under load, and `kill -9` under write load.

use crate::common::*;
use serde_json::json;
use smartllm_e2e::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn readyz_reports_model_and_store_and_sigterm_stops_cleanly() {
    let (_mock, mut gw) = basic("", &[]);
    let r = get(&gw.admin, "/readyz");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["embedder"]["ready"], true);
    assert_eq!(v["embedder"]["dim"], 384);
    assert!(
        v["embedder"]["self_test"]["paraphrase_cosine"]
            .as_f64()
            .unwrap()
            > 0.8
    );
    assert_eq!(v["store"]["ready"], true);
    assert_eq!(get(&gw.admin, "/healthz").status, 200);
    assert_eq!(get(&gw.admin, "/nope").status, 404);
    gw.stop();
    assert!(
        gw.log_text().contains("smartllm stopped"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn sigterm_drains_in_flight_streams_and_flushes_state() {
    let (mock, mut gw) = basic("", &["--chunk-delay-ms", "100", "--words", "10"]);
    let addr = gw.addr.clone();
    let started = Instant::now();
    let client = std::thread::spawn(move || {
        request(&addr, "POST", "/v1/chat/completions", &[], &serde_json::to_vec(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "a slow stream"}]})).unwrap())
    });
    // SIGTERM once the stream is in flight: the mock has the request (its
    // answer takes a second, ten words 100 ms apart).
    assert!(
        wait_until(Duration::from_secs(5), || mock.requests() == 1),
        "the stream never reached the mock"
    );
    // An answer written once the drain began closes its connection: no
    // client sends its next request on a connection about to go.
    let late_addr = gw.addr.clone();
    let late = std::thread::spawn(move || {
        request(&late_addr, "POST", "/v1/chat/completions", &[], &serde_json::to_vec(&json!({"model": "small", "mock": {"latency_ms": 500}, "messages": [{"role": "user", "content": "an answer during the drain"}]})).unwrap())
    });
    assert!(
        wait_until(Duration::from_secs(5), || mock.requests() == 2),
        "the second request never reached the mock"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    let r = client.join().unwrap().expect("the stream survives SIGTERM");
    assert_eq!(r.status, 200);
    let late = late.join().unwrap().expect("answered during the drain");
    assert_eq!(late.status, 200, "{}", late.text());
    assert_eq!(
        late.header("connection"),
        Some("close"),
        "{:?}",
        late.headers
    );
    assert_eq!(
        r.sse_data().last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the stream ran to its end"
    );
    // New connections are refused while draining / after exit.
    assert!(wait_until(Duration::from_secs(10), || request(
        &gw.addr,
        "GET",
        "/v1/models",
        &[],
        b""
    )
    .is_err()));
    gw.stop();
    assert!(
        gw.log_text().contains("smartllm stopped"),
        "{}",
        gw.log_text()
    );
}

/// A SIGTERM while the gateway starts ends it at once, by its own handler
/// (it exits 143 rather than dying of the signal): as a container's PID 1,
/// with no default action for the signal, it would otherwise be lost.
#[test]
fn a_sigterm_while_starting_ends_the_process() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    let mut child = std::process::Command::new(bin("smartllm"))
        .arg("serve")
        .arg("--config")
        .arg(cfg.path())
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Well before it is ready (loading the model takes longer).
    std::thread::sleep(Duration::from_millis(150));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "{status:?}");
}

/// `server.drain_delay`: after SIGTERM `/readyz` says 503 at once, while
/// requests are still answered (each closing its connection) until the
/// delay has passed; then new requests are refused and the process ends.
#[test]
fn after_sigterm_the_drain_delay_keeps_serving_while_not_ready() {
    let (_mock, mut gw) = basic("  drain_delay: 3s\n", &[]);
    let body = serde_json::to_vec(&chat_body("small", "hello")).unwrap();
    assert_eq!(gw.metric("smartllm_draining", &[]), 0.0);
    assert_eq!(get(&gw.admin, "/readyz").status, 200);
    std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    let signalled = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || get(&gw.admin, "/readyz").status
            == 503),
        "/readyz still says ready"
    );
    assert_eq!(get(&gw.admin, "/readyz").json()["status"], "draining");
    assert_eq!(gw.metric("smartllm_draining", &[]), 1.0);
    let r = request(&gw.addr, "POST", "/v1/chat/completions", &[], &body).unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "too slow to tell"
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    // After the delay: refused (503, or the listener is gone), and stopped.
    assert!(wait_until(Duration::from_secs(10), || {
        request(&gw.addr, "POST", "/v1/chat/completions", &[], &body)
            .map_or(true, |r| r.status == 503)
    }));
    assert!(signalled.elapsed() >= Duration::from_secs(3));
    gw.stop();
    assert!(gw
        .log_text()
        .contains("still serving until server.drain_delay"));
}

#[test]
fn graceful_upgrade_under_load_fails_no_request() {
    let (_mock, mut gw) = basic(
        "",
        &[
            "--latency-ms",
            "15",
            "--chunk-delay-ms",
            "15",
            "--words",
            "6",
        ],
    );
    gw.config.write("cache.yaml", "cache:\n  enabled: true\n");
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    // An answer the old process caches; the new one must serve it.
    let cached = chat_body("small", "What is the capital of France?");
    assert_eq!(gw.chat(&cached).status, 200);
    wait_cached(&gw, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let slowest_ms = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (addr, stop, ok, failures, slowest_ms) = (
                gw.addr.clone(),
                stop.clone(),
                ok.clone(),
                failures.clone(),
                slowest_ms.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let stream = n.is_multiple_of(3);
                    let body = json!({"model": "small", "stream": stream,
                        "messages": [{"role": "user", "content": format!("load {w}-{n}")}]});
                    let t = Instant::now();
                    let res = request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        &serde_json::to_vec(&body).unwrap(),
                    );
                    slowest_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::SeqCst);
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

    std::thread::sleep(Duration::from_millis(700));
    let before = ok.load(Ordering::SeqCst);
    let took = gw.upgrade();
    let at_upgrade = ok.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || ok
        .load(Ordering::SeqCst)
        >= at_upgrade + 60));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let served = ok.load(Ordering::SeqCst);
    eprintln!(
        "graceful upgrade: {served} requests ({before} before SIGQUIT), old process exited {took:?} after SIGQUIT, slowest request {} ms, {} failed",
        slowest_ms.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(before > 20, "the load was running before the upgrade");
    assert!(
        failures.is_empty(),
        "{} of {served} requests failed across the upgrade: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The old process drained, saved and flushed; the new one took the load.
    let old_log = gw.previous_log_text();
    assert!(
        old_log.contains("listeners closed and in-flight requests done"),
        "{old_log}"
    );
    assert!(old_log.contains("smartllm stopped"), "{old_log}");
    assert!(gw.metric("smartllm_requests_total", &[]) >= 60.0);
    assert!(gw.log_text().contains("RocksDB open"));
    // State carried over: the cache entry and every request's ledger record
    // (each answered request billed exactly once, none lost in the handover).
    assert_eq!(cache_header(&gw.chat(&cached)), "hit-exact");
    let want = served + 2;
    assert!(
        wait_until(Duration::from_secs(10), || get(
            &gw.admin,
            "/admin/costs?since=1h"
        )
        .json()["total"]["requests"]
            == want),
        "ledger {} requests, want {want}",
        get(&gw.admin, "/admin/costs?since=1h").json()["total"]
    );
}

#[test]
fn kill_9_under_write_load_loses_at_most_the_flush_window_and_serves_no_corrupt_entry() {
    let mock = Mock::start(&[]);
    let cfg = ledger_gateway(&mock, "ledger:\n  flush_interval: 200ms\n");
    std::fs::write(cfg.path().join("cache.key"), "7".repeat(64)).unwrap();
    cfg.write(
        "cache.yaml",
        "cache:\n  enabled: true\n  encryption_key_file: cache.key\n",
    );
    let mut gw = Gateway::start(cfg);
    // Four clients write as fast as they can: every miss is a cache insert and
    // a ledger record.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (addr, stop, done, sent) =
                (gw.addr.clone(), stop.clone(), done.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let prompt = format!("crash question {w}-{n} about topic {}", n * 7919 % 1000);
                    sent.fetch_add(1, Ordering::SeqCst);
                    let r = request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[("Authorization", "Bearer sk-alice-1")],
                        &serde_json::to_vec(&chat_body("small", &prompt)).unwrap(),
                    );
                    match r {
                        Ok(r) if r.status == 200 => {
                            done.lock().unwrap().push((prompt, Instant::now()))
                        }
                        _ => break, // the gateway was killed
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &gw.pid().to_string()])
        .status()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    gw.stop();
    let done = done.lock().unwrap().clone();
    let settled = done
        .iter()
        .filter(|(_, t)| *t + Duration::from_millis(400) < killed)
        .count() as u64;
    assert!(
        settled >= 50,
        "the load was running ({settled} settled requests)"
    );

    // Restart on the same data dir: RocksDB opens, the index comes back.
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let gw = Gateway::start(cfg);
    let log = gw.log_text();
    assert!(log.contains("RocksDB open"), "{log}");
    // The ledger lost at most the last flush window (200 ms, plus a margin).
    let billed = costs(&gw, "tenant")["total"]["requests"].as_u64().unwrap();
    assert!(
        billed >= settled && billed <= sent.load(Ordering::SeqCst),
        "ledger {billed}, settled {settled}, answered {}, sent {}",
        done.len(),
        sent.load(Ordering::SeqCst)
    );
    // Every entry served after the crash is the answer to its own question.
    let mut hits = 0;
    for (prompt, _) in done.iter().step_by(3) {
        let r = ask(&gw, "sk-alice-1", &chat_body("small", prompt));
        assert_eq!(r.status, 200);
        let content = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            content.starts_with(&format!("Mock reply to: {prompt}")),
            "{prompt:?} was answered {content:?} ({})",
            cache_header(&r)
        );
        if cache_header(&r).starts_with("hit") {
            hits += 1;
        }
    }
    eprintln!(
        "kill -9: {} answered, {settled} settled, {billed} billed after restart, {hits} cache hits of {} re-asked, none wrong",
        done.len(),
        done.len().div_ceil(3)
    );
    assert!(
        hits >= 10,
        "entries written before the kill are served ({hits} hits)"
    );
}

/// SIGHUP from the first moments of start-up (a config manager reloading
/// everything it manages) never kills the gateway: it is caught before the
/// slow part of the start (model load, self-test), and the gateway comes up.
#[test]
fn sighup_during_start_up_is_harmless() {
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "",
    );
    let admin = format!("127.0.0.1:{}", cfg.admin_port);
    let mut child = std::process::Command::new(bin("smartllm"))
        .arg("serve")
        .arg("--config")
        .arg(cfg.path())
        .env_remove("SMARTLLM_DATA_DIR")
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Before `main` installs its handler the signal's default action is not
    // the gateway's to change: wait until the process catches SIGHUP (bit 0
    // of SigCgt), which the gateway does before its slow start.
    let catches_hup = || {
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("SigCgt:"))?.to_string();
                u64::from_str_radix(line.trim_start_matches("SigCgt:").trim(), 16).ok()
            })
            .is_some_and(|mask| mask & 1 == 1)
    };
    assert!(
        wait_until(Duration::from_secs(10), catches_hup),
        "the gateway never caught SIGHUP"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ready, mut sent) = (false, 0);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the gateway died after {sent} SIGHUPs: {status}");
        }
        if request(&admin, "GET", "/readyz", &[], b"").is_ok_and(|r| r.status == 200) {
            ready = true;
            break;
        }
        std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "not ready after {sent} SIGHUPs");
    // Caught from the start, not only once the reload service runs: many
    // signals arrived while the model loaded.
    assert!(sent >= 5, "only {sent} SIGHUPs before ready");
}

/// A port another process holds is an error after a short wait, naming the
/// setting: a gateway that stayed up with nothing to serve would look
/// healthy to its supervisor.
#[test]
fn a_taken_port_stops_the_start_at_once() {
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n",
        "models:\n  - name: small\n    deployments:\n      - provider: p\n",
        "",
    );
    let _held = std::net::TcpListener::bind(format!("127.0.0.1:{}", cfg.port)).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(bin("smartllm"))
        .arg("serve")
        .arg("--config")
        .arg(cfg.path())
        .env_remove("SMARTLLM_DATA_DIR")
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started on a taken port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "server.listen: cannot listen on 127.0.0.1:{}",
            cfg.port
        )),
        "{err}"
    );
    assert!(err.contains("waited 10 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A stream still running when the drain time is up ends with the
/// gateway's error event and the stream's end, in the client's shape,
/// rather than being cut mid-chunk; and the stop goes on.
#[test]
fn a_stream_the_drain_timeout_ends_gets_an_error_event() {
    let (mock, mut gw) = basic(
        "  graceful_shutdown_timeout: 1s\n",
        &["--chunk-delay-ms", "300", "--words", "40"],
    );
    let addr = gw.addr.clone();
    let client = std::thread::spawn(move || {
        request(&addr, "POST", "/v1/chat/completions", &[], &serde_json::to_vec(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "a stream too slow for the drain"}]})).unwrap())
    });
    assert!(
        wait_until(Duration::from_secs(5), || mock.requests() == 1),
        "the stream never reached the mock"
    );
    // A request still waiting for the provider's answer when the drain time
    // is up gets a 503 it may send again, not a closed connection.
    let waiting_addr = gw.addr.clone();
    let waiting = std::thread::spawn(move || {
        request(&waiting_addr, "POST", "/v1/chat/completions", &[], &serde_json::to_vec(&json!({"model": "small", "mock": {"latency_ms": 8000}, "messages": [{"role": "user", "content": "an answer too slow for the drain"}]})).unwrap())
    });
    assert!(
        wait_until(Duration::from_secs(5), || mock.requests() == 2),
        "the waiting request never reached the mock"
    );
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    let w = waiting
        .join()
        .unwrap()
        .expect("the waiting request is answered");
    assert_eq!(w.status, 503, "{}", w.text());
    assert_eq!(w.json()["error"]["code"], "server_shutting_down");
    assert_eq!(w.header("connection"), Some("close"), "{:?}", w.headers);
    let r = client.join().unwrap().expect("the stream ends cleanly");
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let err: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "server_shutting_down", "{}", r.text());
    // Ended by the drain's second, not by the 12 s answer.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    gw.stop();
    let log = gw.log_text();
    assert!(log.contains("smartllm stopped"), "{log}");
    assert!(log.contains("ending the streams still in flight"), "{log}");
}

/// An HTTP/2 client is told of a drain at once: GOAWAY while its stream
/// is still open (which then finishes), so its next requests open a new
/// connection (another instance) instead of meeting this one's 503 on the
/// connection it keeps. Before, the GOAWAY came only as the process exited.
#[test]
fn an_h2_client_gets_goaway_when_the_drain_begins() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the h2 package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let (_mock, gw) = basic(
        "  h2c: true\n",
        &["--words", "20", "--chunk-delay-ms", "100"],
    );
    let out = std::process::Command::new(&python)
        .arg(workspace_root().join("tests/python/h2_drain.py"))
        .arg(&gw.addr)
        .arg(gw.pid().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    assert!(stdout.contains("goaway ok"), "{stdout}");
    assert!(stdout.contains("stream ok"), "{stdout}");
}

/// A stop while the cache index trains in the background (here: the saved
/// index is damaged, so each start trains it again) ends at once, with
/// everything saved: OpenBLAS's exit handler used to wait on its busy
/// workers for ever (a storage trial's hang, 2 stops in 3).
#[test]
fn a_stop_while_the_cache_index_trains_ends_at_once() {
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n",
        "",
    );
    cfg.write(
        "cache.yaml",
        "cache:\n  enabled: true\n  ivf_threshold: 1000\n",
    );
    let mut gw = Gateway::start(cfg);
    let n = 4000;
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let addr = gw.addr.clone();
            std::thread::spawn(move || {
                for i in (w..n).step_by(16) {
                    let body = chat_body("small", &format!("Tell me fact number {i} about rivers"));
                    let r = request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        &serde_json::to_vec(&body).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let stats = || get(&gw.admin, "/admin/cache/stats").json()["stats"].clone();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = stats();
            s["index_vectors"].as_u64() >= Some(n as u64 * 9 / 10) && s["index_building"] == false
        }),
        "{}",
        stats()
    );
    gw.stop();
    let mut cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    for round in 0..3 {
        // Damaged (the first round), or not saved at all (a stop while it
        // trained drops it): either way the start trains it again.
        let file = cfg.data.path().join("cache.ivf");
        if let Ok(mut bytes) = std::fs::read(&file) {
            for b in &mut bytes[..64] {
                *b ^= 0x5a;
            }
            std::fs::write(&file, bytes).unwrap();
        } else {
            assert!(round > 0, "the first stop saved the index");
        }
        let mut gw = Gateway::start(cfg);
        let stopping = Instant::now();
        gw.stop();
        let took = stopping.elapsed();
        let log = gw.log_text();
        assert!(
            took < Duration::from_secs(5),
            "round {round}: the stop took {took:?}\n{log}"
        );
        assert!(log.contains("smartllm stopped"), "round {round}: {log}");
        cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    }
}
