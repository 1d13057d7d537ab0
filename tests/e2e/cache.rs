//! The response cache through the real server: exact and semantic hits,
//! streamed hits, TTL, version bumps and restarts, encryption key errors,
//! encryption over plaintext entries and key rotation, and the cache CLI.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::time::{Duration, Instant};

fn cached_gateway(cache_yaml: &str, mock_args: &[&str]) -> (Mock, Gateway) {
    let mock = Mock::start(mock_args);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let models = "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    deployments:\n      - provider: mock\n        model: mock-small\n";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write("cache.yaml", cache_yaml);
    (mock, Gateway::start(cfg))
}

const CACHE_ON: &str =
    "cache:\n  enabled: true\n  similarity_threshold: 0.95\n  exclude:\n    detectors: [email]\n";

/// The verifier: with a loose cosine threshold (0.80), a reworded question
/// is served, and a different question that reads alike (one word added, so
/// neither the cosine nor the guard's rules see it) is turned away; both
/// through the real server, with the verifier's score in the hit's headers,
/// the refusal in the metrics and `/admin/cache/explain` saying why.
#[test]
fn the_verifier_serves_rewordings_and_refuses_look_alikes() {
    let (mock, gw) = cached_gateway(
        "cache:\n  enabled: true\n  similarity_threshold: 0.80\n  verifier: true\n",
        &[],
    );
    let q = |text: &str| chat_body("auto", text);
    let stored = "How many yards longer was the longest touchdown compared to the shortest?";
    let alike = "How many yards longer was the longest rushing touchdown compared to the shortest?";
    let fact = "The element carbon is present in all organic molecules.";
    let reworded = "Organic molecules all contain carbon.";
    for text in [stored, fact] {
        assert_eq!(cache_header(&ask(&gw, "key-a", &q(text))), "miss");
    }
    wait_cached(&gw, 2);
    let before = mock.requests();
    let hit = ask(&gw, "key-a", &q(reworded));
    assert_eq!(cache_header(&hit), "hit-semantic", "{:?}", hit.headers);
    let sim: f64 = hit
        .header("x-smartllm-similarity")
        .unwrap()
        .parse()
        .unwrap();
    let score: f64 = hit.header("x-smartllm-verifier").unwrap().parse().unwrap();
    assert!(
        sim < 0.95 && score >= 0.6,
        "similarity {sim}, verifier {score}"
    );
    assert_eq!(mock.requests(), before);
    let miss = ask(&gw, "key-a", &q(alike));
    assert_eq!(cache_header(&miss), "miss", "{:?}", miss.headers);
    assert_eq!(mock.requests(), before + 1, "the look-alike went upstream");
    assert!(
        gw.metric("smartllm_cache_verifier_total", &[("result", "rejected")]) >= 1.0,
        "{}",
        gw.metrics()
    );
    // Counted as the verifier's refusal, not the guard's.
    assert!(
        gw.metric(
            "smartllm_cache_lookups_total",
            &[("result", "miss_verifier")]
        ) >= 1.0,
        "{}",
        gw.metrics()
    );
    let explain = post_json(
        &gw.admin,
        "/admin/cache/explain",
        &json!({"a": alike, "b": stored, "model": "auto"}),
    )
    .json();
    assert_eq!(explain["serve"], false, "{explain}");
    assert!(explain["similarity"].as_f64().unwrap() >= 0.80, "{explain}");
    assert_eq!(explain["guard"], Value::Null, "{explain}");
    assert!(explain["verifier"].as_f64().unwrap() < 0.6, "{explain}");
    assert!(
        explain["reason"]
            .as_str()
            .unwrap()
            .starts_with("the verifier refused"),
        "{explain}"
    );
}

#[test]
fn cache_exact_and_semantic_hits_with_guard_and_scoping() {
    let (mock, gw) = cached_gateway(CACHE_ON, &[]);
    let q = |text: &str| chat_body("auto", text);
    let first = ask(&gw, "key-a", &q("How do I reset my password?"));
    assert_eq!((first.status, cache_header(&first)), (200, "miss"));
    wait_cached(&gw, 1);
    let before = mock.requests();
    let exact = ask(&gw, "key-a", &q("How do I reset   my password?"));
    assert_eq!(cache_header(&exact), "hit-exact");
    assert_eq!(exact.json()["choices"], first.json()["choices"]);
    let para = ask(&gw, "key-a", &q("What is the way to reset my password?"));
    assert_eq!(cache_header(&para), "hit-semantic", "{:?}", para.headers);
    let sim: f64 = para
        .header("x-smartllm-similarity")
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.95..1.0).contains(&sim), "{sim}");
    // The verifier (on by default) judged it and said why it served.
    let verifier: f64 = para.header("x-smartllm-verifier").unwrap().parse().unwrap();
    assert!((0.6..=1.0).contains(&verifier), "{verifier}");
    assert!(exact.header("x-smartllm-verifier").is_none());
    assert_eq!(para.json()["choices"], first.json()["choices"]);
    assert_eq!(mock.requests(), before, "hits never reach the upstream");
    // The ledger records what the two hits saved (and charges nothing for them).
    assert!(wait_until(Duration::from_secs(5), || get(
        &gw.admin,
        "/admin/costs?since=1h&group_by=model"
    )
    .json()["total"]["requests"]
        == 3));
    let c = get(&gw.admin, "/admin/costs?since=1h&group_by=model").json();
    let saved = c["rows"][0]["saved_usd"].as_f64().unwrap();
    let spent = c["rows"][0]["cost_usd"].as_f64().unwrap();
    assert!(saved > 0.0 && (saved - 2.0 * spent).abs() < 1e-9, "{c}");

    // Near-misses go upstream: negation, other numbers.
    assert_eq!(
        cache_header(&ask(&gw, "key-a", &q("How do I not reset my password?"))),
        "miss"
    );
    let n5 = ask(&gw, "key-a", &q("Convert 5 miles to kilometers"));
    assert_eq!(cache_header(&n5), "miss");
    wait_cached(&gw, 3);
    assert_eq!(
        cache_header(&ask(&gw, "key-a", &q("Convert 50 miles to kilometers"))),
        "miss"
    );
    // Code: typed again (CRLF, trailing spaces) it hits exactly; with a line
    // moved out of the loop it is other code, and goes upstream.
    let code = "Why does this print only the first item?\nfor x in xs:\n    print(x)\n    break";
    assert_eq!(cache_header(&ask(&gw, "key-a", &q(code))), "miss");
    wait_cached(&gw, 5);
    let again = code.replace('\n', "  \r\n");
    assert_eq!(cache_header(&ask(&gw, "key-a", &q(&again))), "hit-exact");
    let moved = "Why does this print only the first item?\nfor x in xs:\n    print(x)\nbreak";
    assert_eq!(cache_header(&ask(&gw, "key-a", &q(moved))), "miss");
    // Another tenant never sees key-a's entries, not even exact ones.
    assert_eq!(
        cache_header(&ask(&gw, "key-b", &q("How do I reset my password?"))),
        "miss"
    );
    // A different system prompt or an earlier turn is another namespace.
    let sys = json!({"model": "auto", "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "How do I reset my password?"}]});
    assert_eq!(cache_header(&ask(&gw, "key-a", &sys)), "miss");
    let turn = json!({"model": "auto", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How do I reset my password?"}]});
    assert_eq!(cache_header(&ask(&gw, "key-a", &turn)), "miss");
    // Bypass: Cache-Control, temperature, PII.
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", "Bearer key-a"),
            ("Cache-Control", "no-store"),
        ],
        &serde_json::to_vec(&q("How do I reset my password?")).unwrap(),
    )
    .unwrap();
    assert_eq!(cache_header(&r), "bypass");
    // A fresh answer asked for as HTTP caches are asked: not served from
    // the cache (the stored question would be an exact hit otherwise).
    for fresh in [("Cache-Control", "max-age=0"), ("Pragma", "no-cache")] {
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer key-a"), fresh],
            &serde_json::to_vec(&q("How do I reset my password?")).unwrap(),
        )
        .unwrap();
        assert_eq!(cache_header(&r), "bypass", "{fresh:?}");
    }
    let mut hot = q("How do I reset my password?");
    hot["temperature"] = json!(1.5);
    assert_eq!(cache_header(&ask(&gw, "key-a", &hot)), "bypass");
    assert_eq!(
        cache_header(&ask(
            &gw,
            "key-a",
            &q("Email me at jane@example.com please")
        )),
        "bypass"
    );
    let m = gw.metrics();
    assert!(
        gw.metric(
            "smartllm_cache_lookups_total",
            &[("result", "hit_semantic")]
        ) >= 1.0,
        "{m}"
    );
    assert!(m.contains("smartllm_cache_similarity_bucket"));
    assert!(m.contains("smartllm_cache_index_vectors"));
    // A tenant's erasure: every entry stored for key-a's requests goes (on
    // a gateway without keys.yaml an unknown key's tenant is `key:` and the
    // first half of its hash), and key-b's stay.
    let password = q("How do I reset my password?");
    assert!(wait_until(Duration::from_secs(20), || cache_header(&ask(
        &gw, "key-b", &password
    )) == "hit-exact"));
    // A question of key-a's with a word found nowhere else, on disk (this
    // cache is not encrypted) until the purge.
    let marker = "Zorblaxian";
    assert_eq!(
        cache_header(&ask(&gw, "key-a", &q(&format!("What does {marker} mean?")))),
        "miss"
    );
    let on_disk = || {
        walk_files(gw.config.data.path())
            .iter()
            .any(|f| std::fs::read(f).is_ok_and(|b| b.windows(10).any(|w| w == marker.as_bytes())))
    };
    assert!(wait_until(Duration::from_secs(20), on_disk), "stored");
    let tenant_a = format!("key:{}", &sha("key-a")[..32]);
    let r = request(
        &gw.admin,
        "POST",
        &format!("/admin/cache/purge?tenant={tenant_a}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The password question, the miles question, the code and more.
    assert!(r.json()["removed"].as_u64().unwrap() >= 3, "{}", r.text());
    // (Each miss stores its answer: questions that do not match each other.)
    for text in [
        "What is the way to reset my password?",
        "Convert 5 miles to kilometers",
    ] {
        assert_eq!(cache_header(&ask(&gw, "key-a", &q(text))), "miss", "{text}");
    }
    assert_eq!(cache_header(&ask(&gw, "key-b", &password)), "hit-exact");
    // Erased from the data dir's files too (write-ahead log and SSTs), not
    // only made unreadable.
    assert_eq!(r.json()["disk"], "compacting", "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(20), || !on_disk()),
        "the purged question is still in a file of the data dir"
    );
    // A tenant no key has, with nothing stored for it: a 404, not a quiet
    // success (a typo).
    let r = request(
        &gw.admin,
        "POST",
        "/admin/cache/purge?tenant=acme",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unknown_tenant");
}

/// `cache.exclude.answers`: an answer carrying what the exclusions look for
/// (an address the prompt did not have) is not stored; others are.
#[test]
fn answers_the_exclusions_match_are_not_cached() {
    let (_mock, gw) = cached_gateway(
        "cache:\n  enabled: true\n  exclude:\n    detectors: [email, iban]\n    answers: true\n",
        &[],
    );
    let with_reply = |q: &str, reply: &str| json!({"model": "auto", "messages": [{"role": "user", "content": q}], "mock": {"reply": reply}});
    let leaky = with_reply(
        "Who runs payroll?",
        "Write to pay.roll@corp.example for that.",
    );
    let r = ask(&gw, "k", &leaky);
    assert_eq!(cache_header(&r), "miss");
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("pay.roll@corp.example"));
    let plain = with_reply("Who runs facilities?", "The facilities team does.");
    assert_eq!(cache_header(&ask(&gw, "k", &plain)), "miss");
    assert!(wait_until(Duration::from_secs(20), || cache_header(&ask(
        &gw, "k", &plain
    )) == "hit-exact"));
    // Stored in the same time: the other one would be by now.
    assert_eq!(cache_header(&ask(&gw, "k", &leaky)), "miss");
    assert!(
        gw.metric("smartllm_cache_answers_not_stored_total", &[]) >= 1.0,
        "{}",
        gw.metrics()
    );
}

/// `cache.isolation: app`: two apps of one tenant never share an answer,
/// while each app's keys do; `key` keeps every key apart.
#[test]
fn cache_isolation_by_app_or_key() {
    let (_mock, gw) = cached_gateway("cache:\n  enabled: true\n  isolation: app\n", &[]);
    gw.config.write(
        "keys.yaml",
        &format!(
            "require_key: true\nkeys:\n  - name: web-1\n    tenant: acme\n    app: web\n    sha256: {}\n  - name: web-2\n    tenant: acme\n    app: web\n    sha256: {}\n  - name: hr\n    tenant: acme\n    app: hr\n    sha256: {}\n",
            sha("sk-web-1"),
            sha("sk-web-2"),
            sha("sk-hr")
        ),
    );
    // (Until the keys load the gateway is open and would answer anyone.)
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    assert_eq!(
        ask(&gw, "sk-unknown", &chat_body("auto", "ping")).status,
        401
    );
    let question = chat_body("auto", "What is the salary band for level 3?");
    assert_eq!(cache_header(&ask(&gw, "sk-hr", &question)), "miss");
    assert!(wait_until(Duration::from_secs(20), || cache_header(&ask(
        &gw, "sk-hr", &question
    )) == "hit-exact"));
    assert_eq!(cache_header(&ask(&gw, "sk-web-1", &question)), "miss");
    assert!(wait_until(Duration::from_secs(20), || cache_header(&ask(
        &gw, "sk-web-2", &question
    )) == "hit-exact"));
    // Per key: web-2 no longer gets web-1's answer.
    gw.config
        .write("cache.yaml", "cache:\n  enabled: true\n  isolation: key\n");
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 2.0));
    let other = chat_body("auto", "Which holidays do we observe?");
    assert_eq!(cache_header(&ask(&gw, "sk-web-1", &other)), "miss");
    assert!(wait_until(Duration::from_secs(20), || cache_header(&ask(
        &gw, "sk-web-1", &other
    )) == "hit-exact"));
    assert_eq!(cache_header(&ask(&gw, "sk-web-2", &other)), "miss");
}

#[test]
fn cache_streams_hits_stores_streamed_misses_and_purges() {
    let (mock, gw) = cached_gateway(CACHE_ON, &["--words", "6"]);
    let body = json!({"model": "auto", "stream": true, "messages": [{"role": "user", "content": "Name three primary colours"}]});
    let miss = ask(&gw, "k", &body);
    assert_eq!(cache_header(&miss), "miss");
    wait_cached(&gw, 1);
    // The streamed answer was stored and is replayed as a stream...
    let hit = ask(&gw, "k", &body);
    assert_eq!(cache_header(&hit), "hit-exact");
    assert!(hit
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = |r: &Response| streamed_text(&r.sse_data());
    assert_eq!(text(&hit), text(&miss));
    assert_eq!(hit.sse_data().last().map(String::as_str), Some("[DONE]"));
    // ...or as JSON, with the usage the upstream reported.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let j = ask(&gw, "k", &plain);
    assert_eq!(cache_header(&j), "hit-exact");
    assert_eq!(
        j.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        text(&miss)
    );
    assert_eq!(j.json()["usage"]["completion_tokens"], 6);
    // A stream that broke is never stored.
    let broken = json!({"model": "auto", "stream": true, "mock": {"fault": "drop-mid-stream"}, "messages": [{"role": "user", "content": "A broken answer"}]});
    ask(&gw, "k", &broken);
    std::thread::sleep(Duration::from_millis(300));
    let again = ask(
        &gw,
        "k",
        &json!({"model": "auto", "messages": [{"role": "user", "content": "A broken answer"}], "mock": {"fault": "drop-mid-stream"}}),
    );
    assert_ne!(cache_header(&again), "hit-exact");
    // Purge by route empties it.
    let before = mock.requests();
    let r = request(&gw.admin, "POST", "/admin/cache/purge?route=auto", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["removed"].as_u64().unwrap() >= 1);
    let refill = ask(&gw, "k", &plain);
    assert_eq!(cache_header(&refill), "miss");
    assert_eq!(mock.requests(), before + 1);
    // Purge by namespace, as after a complaint: the access log names the
    // request's namespace.
    wait_cached(&gw, 1);
    assert_eq!(cache_header(&ask(&gw, "k", &plain)), "hit-exact");
    let line = gw.access_line(refill.header("x-request-id").unwrap());
    let ns = line["cache_namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(ns.len(), 64, "{line}");
    let r = request(
        &gw.admin,
        "POST",
        &format!("/admin/cache/purge?namespace={ns}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["removed"].as_u64().unwrap() >= 1, "{}", r.text());
    assert_eq!(cache_header(&ask(&gw, "k", &plain)), "miss");
    let r = request(&gw.admin, "POST", "/admin/cache/purge", &[], b"").unwrap();
    assert_eq!(r.status, 400);
    // A name the running config does not know purges nothing, and says so.
    let r = request(&gw.admin, "POST", "/admin/cache/purge?route=autp", &[], b"").unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unknown_route");
}

#[test]
fn cache_ttl_version_bump_and_restart() {
    // A TTL long enough that a loaded 2-core machine still serves the hit
    // before it expires (1 s flaked when the whole suite ran in parallel).
    let ttl = "cache:\n  enabled: true\n  ttl: 3s\n";
    let (_mock, gw) = cached_gateway(ttl, &[]);
    let q = chat_body("auto", "What is the speed of light?");
    ask(&gw, "k", &q);
    wait_cached(&gw, 1);
    // Stored before this instant, so expired 3 s after it at the latest.
    let stored = Instant::now();
    assert_eq!(cache_header(&ask(&gw, "k", &q)), "hit-exact");
    std::thread::sleep(Duration::from_millis(3100).saturating_sub(stored.elapsed()));
    assert_eq!(
        cache_header(&ask(&gw, "k", &q)),
        "miss",
        "expired entries are not served"
    );
    drop(gw);

    // Version bump by hot reload invalidates; a restart keeps entries.
    let (_mock, mut gw) = cached_gateway(CACHE_ON, &[]);
    ask(&gw, "k", &q);
    wait_cached(&gw, 1);
    gw.stop();
    let data_dir = gw.config.data.path().to_path_buf();
    // A corrupt index file must not stop the gateway or lose entries.
    std::fs::write(data_dir.join("cache.ivf"), b"corrupt").unwrap();
    let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
    let gw2 = Gateway::start(cfg);
    assert_eq!(gw2.config.data.path(), data_dir);
    assert!(
        gw2.log_text().contains("the cache index file is unusable"),
        "{}",
        gw2.log_text()
    );
    assert_eq!(
        cache_header(&ask(&gw2, "k", &q)),
        "hit-exact",
        "cache survives a restart"
    );
    assert_eq!(
        cache_header(&ask(
            &gw2,
            "k",
            &chat_body("auto", "what is the speed of light")
        )),
        "hit-semantic"
    );
    gw2.config
        .write("cache.yaml", "cache:\n  enabled: true\n  version: 2\n");
    assert!(wait_until(Duration::from_secs(20), || gw2
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 1.0));
    assert_eq!(
        cache_header(&ask(&gw2, "k", &q)),
        "miss",
        "a version bump invalidates"
    );
    // Off by reload: no lookups at all.
    gw2.config.write("cache.yaml", "cache:\n  enabled: false\n");
    assert!(wait_until(Duration::from_secs(20), || gw2
        .metric("smartllm_config_reloads_total", &[("result", "ok")])
        >= 2.0));
    assert_eq!(cache_header(&ask(&gw2, "k", &q)), "none");
}

#[test]
fn cache_encryption_key_file_errors_are_clear() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, "");
    let key = cfg.path().join("cache.key");
    std::fs::write(&key, "not a key").unwrap();
    cfg.write(
        "cache.yaml",
        &format!(
            "cache:\n  enabled: true\n  encryption_key_file: {}\n",
            key.display()
        ),
    );
    let out = std::process::Command::new(bin("smartllm"))
        .args(["serve", "--config"])
        .arg(cfg.path())
        .env("SMARTLLM_ASSETS_DIR", assets_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cache.encryption_key_file") && err.contains("64 hex characters"),
        "{err}"
    );

    // With a good key the cache works and nothing is stored in the clear.
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let data = cfg.data.path().to_path_buf();
    let mut gw = Gateway::start(cfg);
    let q = chat_body("small", "A very particular secret question about zebras");
    ask(&gw, "k", &q);
    wait_cached(&gw, 1);
    assert_eq!(cache_header(&ask(&gw, "k", &q)), "hit-exact");
    assert!(get(&gw.admin, "/admin/cache/stats").json()["stats"]["encrypted"] == true);
    gw.stop();
    let mut plaintext = false;
    for f in std::fs::read_dir(data.join("db")).unwrap().flatten() {
        if let Ok(bytes) = std::fs::read(f.path()) {
            plaintext |= bytes.windows(6).any(|w| w == b"zebras");
        }
    }
    assert!(!plaintext, "a cached prompt was found in the clear on disk");
}

/// Encryption turned on over a plaintext cache, then a key rotation, each by
/// a restart: entries stored in the clear are never served once a key is set;
/// with the new key current and the old one in `encryption_old_key_files`, the
/// old key's entries are served (and re-sealed with the new key when read);
/// with the old key gone, what it alone sealed is a plain miss.
#[test]
fn cache_encryption_over_plaintext_and_key_rotation_across_restarts() {
    let (_mock, mut gw) = cached_gateway(CACHE_ON, &[]);
    let restart = |gw: &mut Gateway, cache_yaml: &str| {
        gw.stop();
        let cfg = std::mem::replace(&mut gw.config, ConfigDir::new("", "", "", "", ""));
        cfg.write("cache.yaml", cache_yaml);
        Gateway::start(cfg)
    };
    let read = chat_body("auto", "Which river flows through Vienna?");
    let unread = chat_body("auto", "How many moons does Neptune have?");

    // No key: stored in the clear.
    assert_eq!(cache_header(&ask(&gw, "k", &read)), "miss");
    wait_cached(&gw, 1);
    assert_eq!(cache_header(&ask(&gw, "k", &read)), "hit-exact");
    assert!(get(&gw.admin, "/admin/cache/stats").json()["stats"]["encrypted"] == false);

    // Key A: the plaintext entry is refused (a miss, not an error) and
    // removed; the fresh answer is sealed with A and served.
    std::fs::write(gw.config.path().join("a.key"), "a1".repeat(32)).unwrap();
    std::fs::write(gw.config.path().join("b.key"), "b2".repeat(32)).unwrap();
    let mut gw = restart(
        &mut gw,
        "cache:\n  enabled: true\n  encryption_key_file: a.key\n",
    );
    assert!(get(&gw.admin, "/admin/cache/stats").json()["stats"]["encrypted"] == true);
    let r = ask(&gw, "k", &read);
    assert_eq!((r.status, cache_header(&r)), (200, "miss"));
    assert!(
        gw.log_text().contains("stored unencrypted"),
        "{}",
        gw.log_text()
    );
    assert!(gw.metric("smartllm_cache_removed_total", &[("reason", "unreadable")]) >= 1.0);
    wait_cached(&gw, 1);
    let answer = ask(&gw, "k", &read);
    assert_eq!(cache_header(&answer), "hit-exact");
    assert_eq!(cache_header(&ask(&gw, "k", &unread)), "miss");
    wait_cached(&gw, 2);

    // Rotation: B current, A old. A's entry is served (and re-sealed with B).
    let mut gw = restart(
        &mut gw,
        "cache:\n  enabled: true\n  encryption_key_file: b.key\n  encryption_old_key_files: [a.key]\n",
    );
    let hit = ask(&gw, "k", &read);
    assert_eq!(
        cache_header(&hit),
        "hit-exact",
        "an old key's entry is served"
    );
    assert_eq!(hit.json()["choices"], answer.json()["choices"]);
    let rotation_log = gw.log_text();

    // B alone: the entry read during the rotation was re-sealed with B and is
    // served; the one nobody asked for (the 30 s sweep had no time to re-seal
    // it) is sealed with A only: a miss, answered by the upstream.
    let gw = restart(
        &mut gw,
        "cache:\n  enabled: true\n  encryption_key_file: b.key\n",
    );
    let hit = ask(&gw, "k", &read);
    assert_eq!(
        cache_header(&hit),
        "hit-exact",
        "re-sealed with the new key"
    );
    assert_eq!(hit.json()["choices"], answer.json()["choices"]);
    let r = ask(&gw, "k", &unread);
    assert_eq!(
        (r.status, cache_header(&r)),
        (200, "miss"),
        "sealed with a key that is gone (did the sweep re-seal it during the rotation? {})",
        rotation_log.contains("were re-sealed with the current key")
    );
    assert!(r.json()["choices"][0]["message"]["content"].is_string());
}

#[test]
fn cache_cli_stats_purge_rebuild_and_eval() {
    let (_mock, gw) = cached_gateway(CACHE_ON, &[]);
    ask(&gw, "k", &chat_body("auto", "What is a monad?"));
    wait_cached(&gw, 1);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin("smartllm"))
            .args(args)
            .env("SMARTLLM_ASSETS_DIR", assets_dir())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = gw.config.path().to_str().unwrap().to_string();
    let (ok, out, err) = cli(&["cache", "stats", "--config", &cfg]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stats"]["index_vectors"], 1);
    let (ok, out, err) = cli(&["cache", "rebuild", "--admin", &gw.admin]);
    assert!(ok && out.contains("\"vectors\": 1"), "{out}{err}");
    let (ok, _, err) = cli(&["cache", "purge", "--config", &cfg]);
    assert!(!ok && err.contains("--all"), "{err}");
    let (ok, out, err) = cli(&["cache", "purge", "--all", "--config", &cfg]);
    assert!(ok && out.contains("\"removed\": 1"), "{out}{err}");
    assert_eq!(
        cache_header(&ask(&gw, "k", &chat_body("auto", "What is a monad?"))),
        "miss"
    );
    let pairs = workspace_root().join("crates/smartllm-cache/testdata/pairs.tsv");
    let (ok, out, err) = cli(&[
        "cache",
        "eval",
        "--pairs",
        pairs.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    assert!(ok, "{err}");
    let column = out
        .lines()
        .find(|l| l.trim_start().starts_with("threshold"))
        .and_then(|h| h.split_whitespace().position(|c| c == "precision"))
        .unwrap_or_else(|| panic!("no precision column: {out}"));
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("0.95"))
        .unwrap();
    let precision: f64 = row.split_whitespace().nth(column).unwrap().parse().unwrap();
    assert!(precision >= 0.98, "{out}");
    let (ok, _, err) = cli(&["cache", "stats", "--admin", "127.0.0.1:1"]);
    assert!(!ok && err.contains("is smartllm running"), "{err}");

    // POST /admin/cache/explain: similarity, the route's threshold, the guard, the decision.
    let explain = |a: &str, b: &str| {
        let r = post_json(
            &gw.admin,
            "/admin/cache/explain",
            &json!({"a": a, "b": b, "model": "auto"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let same = explain(
        "How do I reset my password?",
        "How can I reset my password?",
    );
    assert_eq!(same["serve"], true, "{same}");
    assert_eq!(same["threshold"].as_f64().unwrap(), 0.95f32 as f64);
    assert!(same["similarity"].as_f64().unwrap() >= 0.95, "{same}");
    assert_eq!(same["guard"], Value::Null);
    let negated = explain(
        "Should I restart the server?",
        "Should I not restart the server?",
    );
    assert_eq!(negated["serve"], false, "{negated}");
    let far = explain("What is a monad?", "How tall is Mount Everest?");
    assert_eq!(
        (far["serve"].as_bool(), far["reason"].as_str()),
        (Some(false), Some("similarity below the threshold")),
        "{far}"
    );
    assert!(far["similarity"].as_f64().unwrap() < 0.5, "{far}");
    let bad = post_json(&gw.admin, "/admin/cache/explain", &json!({"a": "only one"}));
    assert_eq!(bad.status, 400);
    let message = bad.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("\"b\""), "{message}");
    // A model or route name the config does not know: 404 naming it, not a
    // verdict by the default policy.
    let typo = post_json(
        &gw.admin,
        "/admin/cache/explain",
        &json!({"a": "x", "b": "y", "model": "smrt"}),
    );
    assert_eq!(typo.status, 404, "{}", typo.text());
    assert_eq!(typo.json()["error"]["code"], "unknown_route");

    // `cache calibrate` on the yardstick's tuning split: the loosest
    // threshold keeping its traps served at or under the target, written for
    // the route into cache.yaml (other keys kept); the gateway reloads it.
    let tuning = workspace_root().join("data/cache-eval/tuning.tsv");
    // `cache calibrate --pairs TUNING --config CFG --json ARGS...`, its JSON.
    let calibrate_json = |args: &[&str]| -> Value {
        let mut all = vec![
            "cache",
            "calibrate",
            "--pairs",
            tuning.to_str().unwrap(),
            "--config",
            &cfg,
            "--json",
        ];
        all.extend_from_slice(args);
        let (ok, out, err) = cli(&all);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let calibrate = |max_trap_rate: &str| {
        let v = calibrate_json(&[
            "--route",
            "auto",
            "--max-trap-rate",
            max_trap_rate,
            "--write",
        ]);
        assert!(
            v["trap_rate"].as_f64().unwrap() <= max_trap_rate.parse().unwrap(),
            "{v}"
        );
        assert_eq!(v["key"], "cache.routes.auto.similarity_threshold");
        // The route's verifier (on by default) takes part, as in the gateway.
        let pass = v["verifier_threshold"].as_f64().unwrap();
        assert!((pass - 0.70).abs() < 1e-6, "{v}");
        v["threshold"].as_f64().unwrap()
    };
    let strict = calibrate("0");
    let loose = calibrate("0.01");
    assert!(
        loose <= strict,
        "1% of traps allowed: {loose}, none: {strict}"
    );
    let text = std::fs::read_to_string(gw.config.path().join("cache.yaml")).unwrap();
    assert!(
        text.contains("detectors: [email]")
            && text.contains(&format!("auto: {{ similarity_threshold: {loose:.2} }}")),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = explain("What is a monad?", "What's a monad?")["threshold"]
            .as_f64()
            .unwrap();
        if (t - loose).abs() < 1e-6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway still uses {t}, not {loose}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // With --verifier the pass score is chosen too: at the same target it
    // serves at least as many duplicates, and both keys are written and
    // reloaded.
    let joint = calibrate_json(&[
        "--route",
        "auto",
        "--max-trap-rate",
        "0.01",
        "--verifier",
        "--write",
    ]);
    assert!(joint["trap_rate"].as_f64().unwrap() <= 0.01, "{joint}");
    let current = joint["current_verifier_threshold"].as_f64().unwrap();
    assert!((current - 0.70).abs() < 1e-6, "{joint}");
    let (t, pass) = (
        joint["threshold"].as_f64().unwrap(),
        joint["verifier_threshold"].as_f64().unwrap(),
    );
    assert!((0.05..=0.95).contains(&pass), "{joint}");
    let single_recall = calibrate_json(&["--max-trap-rate", "0.01"])["duplicates_served"]
        .as_f64()
        .unwrap();
    assert!(
        joint["duplicates_served"].as_f64().unwrap() >= single_recall,
        "{joint} vs {single_recall}"
    );
    let text = std::fs::read_to_string(gw.config.path().join("cache.yaml")).unwrap();
    assert!(
        text.contains(&format!(
            "auto: {{ similarity_threshold: {t:.2}, verifier_threshold: {pass:.2} }}"
        )),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = explain("What is a monad?", "What's a monad?");
        let (now_t, now_pass) = (
            e["threshold"].as_f64().unwrap(),
            e["verifier_threshold"].as_f64().unwrap_or(-1.0),
        );
        if (now_t - t).abs() < 1e-6 && (now_pass - pass).abs() < 1e-6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway still uses {now_t} / {now_pass}, not {t} / {pass}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, _, err) = cli(&[
        "cache",
        "calibrate",
        "--pairs",
        pairs.to_str().unwrap(),
        "--config",
        &cfg,
        "--route",
        "ghost",
    ]);
    assert!(
        !ok && err.contains("no route or model named \"ghost\""),
        "{err}"
    );
}

/// Only answers worth serving again are stored (not one a content filter
/// stopped, streamed or not); answers with parts an entry does not keep
/// (log-probabilities) bypass the cache; and what changes an answer beside
/// the question's text keys it: who asks (the last turn's `name`), a
/// Messages field the chat translation does not carry (`output_format`),
/// the `anthropic-beta` header.
#[test]
fn cache_stores_only_answers_to_serve_again_and_keys_what_changes_them() {
    let (mock, gw) = cached_gateway(CACHE_ON, &["--words", "6"]);
    let not_stored = || gw.metric("smartllm_cache_answers_not_stored_total", &[]);
    // Stopped by a content filter: answered, never stored.
    for stream in [false, true] {
        let body = json!({"model": "auto", "stream": stream, "messages": [
            {"role": "user", "content": format!("[mock-filter] Describe the plot, stream {stream}")}]});
        let before = not_stored();
        let first = ask(&gw, "k", &body);
        assert_eq!(first.status, 200, "{}", first.text());
        assert!(wait_until(Duration::from_secs(5), || not_stored() > before));
        assert_eq!(cache_header(&ask(&gw, "k", &body)), "miss");
    }
    // Log-probabilities are not kept: such requests bypass the cache.
    let logprobs = json!({"model": "auto", "logprobs": true, "messages": [
        {"role": "user", "content": "Name a prime number"}]});
    assert_eq!(cache_header(&ask(&gw, "k", &logprobs)), "bypass");
    // Who asks keys the answer: Bob does not get Alice's.
    let named = |name: &str| {
        json!({"model": "auto", "messages": [
            {"role": "user", "name": name, "content": "What is my name and role?"}]})
    };
    assert_eq!(cache_header(&ask(&gw, "k", &named("alice"))), "miss");
    wait_cached(&gw, 1);
    assert_eq!(cache_header(&ask(&gw, "k", &named("alice"))), "hit-exact");
    assert_eq!(cache_header(&ask(&gw, "k", &named("bob"))), "miss");
    // Messages: a field only the raw body carries, and the beta header.
    let messages = |extra: Value, beta: Option<&str>| {
        let mut body = json!({"model": "auto", "max_tokens": 50, "messages": [
            {"role": "user", "content": "List the planets of the solar system"}]});
        if let (Some(o), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let mut h = vec![("x-api-key", "k"), ("anthropic-version", "2023-06-01")];
        if let Some(b) = beta {
            h.push(("anthropic-beta", b));
        }
        request(
            &gw.addr,
            "POST",
            "/v1/messages",
            &h,
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap()
    };
    let first = messages(json!({}), None);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(cache_header(&first), "miss");
    assert!(wait_until(Duration::from_secs(5), || cache_header(
        &messages(json!({}), None)
    ) == "hit-exact"));
    let schema = json!({"output_format": {"type": "json_schema", "schema": {"type": "object"}}});
    assert_eq!(cache_header(&messages(schema, None)), "miss");
    assert_eq!(
        cache_header(&messages(json!({}), Some("output-128k-2025-02-19"))),
        "miss"
    );
    assert!(mock.requests() >= 7);
}

/// A routed alias whose rules read a header or the app: what they read is
/// part of the cache key, so an answer a rule sent to one model is never
/// replayed to a request the rules send to another (a premium tier pinned
/// to the stronger model), while requests alike still share their answers.
#[test]
fn what_a_routes_rules_read_is_part_of_the_cache_key() {
    let mock = Mock::start(&[]);
    let providers = format!("providers:\n{}", mock_provider("mock", &mock));
    let models = "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: big\n    deployments:\n      - provider: mock\n        model: mock-big\n";
    let routes = "routes:\n  auto:\n    candidates: [small, big]\n    rules:\n      - name: premium\n        when: { headers: { x-tier: premium } }\n        pin: big\n      - name: cheap\n        pin: small\n";
    let cfg = ConfigDir::new("", "demo:\n  mode: off\n", &providers, models, routes);
    cfg.write("cache.yaml", CACHE_ON);
    let gw = Gateway::start(cfg);
    let body = serde_json::to_vec(&chat_body("auto", "Which river flows through Vienna?")).unwrap();
    let ask_with = |headers: &[(&str, &str)]| {
        request(&gw.addr, "POST", "/v1/chat/completions", headers, &body).unwrap()
    };
    let plain = ask_with(&[]);
    assert_eq!(
        (cache_header(&plain), plain.header("x-smartllm-model")),
        ("miss", Some("small"))
    );
    wait_cached(&gw, 1);
    assert_eq!(cache_header(&ask_with(&[])), "hit-exact");
    // The premium tier is not served small's answer: big answers, and its
    // answer is served to the premium tier after.
    let premium = ask_with(&[("x-tier", "premium")]);
    assert_eq!(
        (cache_header(&premium), premium.header("x-smartllm-model")),
        ("miss", Some("big")),
        "{:?}",
        premium.headers
    );
    wait_cached(&gw, 2);
    let again = ask_with(&[("x-tier", "premium")]);
    assert_eq!(cache_header(&again), "hit-exact");
    assert_eq!(again.json()["model"], premium.json()["model"]);
    // What the rules read is whether they hold: another value that no rule
    // asks for is treated like none, and served the plain answer.
    let basic = ask_with(&[("x-tier", "basic")]);
    assert_eq!(cache_header(&basic), "hit-exact");
    assert_eq!(basic.json()["model"], plain.json()["model"]);
}

/// Every file under `dir`, recursively.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
