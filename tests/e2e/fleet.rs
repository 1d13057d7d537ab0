//! A fleet of gateways sharing one real redis-server (`fleet.share_cache`,
//! `fleet.share_costs`): an answer stored through one gateway is a hit
//! through the others, purges reach every gateway, a gateway started later
//! loads what the fleet holds, Redis going away fails no request and the
//! gateways catch up when it returns, and the fleet's cost view is the sum of
//! the gateways' own ledgers.

use crate::common::*;
use serde_json::Value;
use smartllm_e2e::*;
use std::time::{Duration, Instant};

fn node(mock: &Mock, redis_url: &str) -> Gateway {
    Gateway::start(node_config(mock, redis_url, ""))
}

/// `fleet_extra` goes under `fleet:`.
fn node_config(mock: &Mock, redis_url: &str, fleet_extra: &str) -> ConfigDir {
    let providers = format!("providers:\n{}", mock_provider("mock", mock));
    let models = "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    deployments:\n      - provider: mock\n        model: mock-small\n";
    let cfg = ConfigDir::new(
        "",
        &format!(
            "demo:\n  mode: off\nfleet:\n  redis: {redis_url}\n  key_prefix: e2e-fleet\n  timeout: 300ms\n  share_cache: true\n{fleet_extra}"
        ),
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    // Every gateway holds the fleet's cache key: entries travel sealed.
    std::fs::write(cfg.path().join("cache.key"), "5e".repeat(32)).unwrap();
    cfg.write(
        "cache.yaml",
        "cache:\n  enabled: true\n  similarity_threshold: 0.95\n  encryption_key_file: cache.key\n",
    );
    cfg
}

fn stats(gw: &Gateway) -> Value {
    get(&gw.admin, "/admin/cache/stats").json()["stats"].clone()
}

fn entries(gw: &Gateway) -> u64 {
    stats(gw)["l1_entries"].as_u64().unwrap_or(0)
}

fn vectors(gw: &Gateway) -> u64 {
    stats(gw)["index_vectors"].as_u64().unwrap_or(0)
}

fn q(text: &str) -> Value {
    chat_body("auto", text)
}

fn total(v: &Value) -> (u64, f64) {
    (
        v["total"]["requests"].as_u64().unwrap_or(0),
        v["total"]["cost_usd"].as_f64().unwrap_or(0.0),
    )
}

#[test]
fn three_gateways_share_one_cache_and_one_cost_view_through_redis() {
    let mut redis = Redis::start();
    let url = redis.url();
    let mock = Mock::start(&[]);
    let a = node(&mock, &url);
    let b = node(&mock, &url);
    let c = node(&mock, &url);

    // A question answered through A is a semantic hit through B and an exact
    // one through C, within a second, and never reaches the model again.
    let first = ask(&a, "key-1", &q("How do I reset my password?"));
    assert_eq!((first.status, cache_header(&first)), (200, "miss"));
    let answered = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || entries(&b) >= 1
            && entries(&c) >= 1),
        "the entry did not reach B and C within a second: {} {}",
        stats(&b),
        stats(&c)
    );
    let upstream = mock.requests();
    let para = ask(&b, "key-1", &q("What is the way to reset my password?"));
    assert_eq!(cache_header(&para), "hit-semantic", "{:?}", para.headers);
    assert_eq!(para.json()["choices"], first.json()["choices"]);
    let exact = ask(&c, "key-1", &q("How do I reset my password?"));
    assert_eq!(cache_header(&exact), "hit-exact");
    assert_eq!(mock.requests(), upstream, "hits never reach the upstream");
    eprintln!("replicated and served in {:?}", answered.elapsed());
    // The gateways hold the cache key: the vector travelled sealed as well
    // (a vector in the clear is a multiple of 4 bytes long).
    assert_eq!(
        redis.cmd(
            "EVAL \"local n, s = 0, 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do local l = redis.call('HSTRLEN', k, 'e') if l > 0 then n = n + 1 if l % 4 ~= 0 then s = s + 1 end end end return {ok = s .. '/' .. n}\" 0 e2e-fleet:cache:e:*"
        ),
        "+1/1",
        "vectors sealed / vectors in the fleet's snapshot"
    );
    // Tenants stay apart on every gateway: another key misses.
    assert_eq!(
        cache_header(&ask(&c, "key-2", &q("How do I reset my password?"))),
        "miss"
    );

    // The fleet's cost view: the same from every gateway, the sum of theirs.
    let own: Vec<(u64, f64)> = [&a, &b, &c]
        .iter()
        .map(|g| total(&get(&g.admin, "/admin/costs?since=1h").json()))
        .collect();
    let sum = own.iter().fold((0, 0.0), |s, t| (s.0 + t.0, s.1 + t.1));
    assert_eq!(sum.0, 4, "{own:?}");
    for g in [&a, &b, &c] {
        let mut fleet = (0, 0.0);
        assert!(
            wait_until(Duration::from_secs(5), || {
                fleet = total(&get(&g.admin, "/admin/costs?since=1h&scope=fleet").json());
                fleet.0 == sum.0
            }),
            "fleet view {fleet:?}, gateways {own:?}"
        );
        assert!((fleet.1 - sum.1).abs() < 1e-6, "{fleet:?} vs {sum:?}");
    }
    let by_model = get(
        &b.admin,
        "/admin/costs?since=1h&scope=fleet&group_by=model,tenant",
    );
    assert_eq!(by_model.status, 200);
    assert_eq!(by_model.json()["rows"].as_array().unwrap().len(), 2);
    let out = std::process::Command::new(bin("smartllm"))
        .args(["costs", "--config", c.config.path().to_str().unwrap()])
        .args(["--since", "1h", "--by", "tenant", "--csv", "--fleet"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    let requests: u64 = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse::<u64>().ok())
        .sum();
    assert_eq!(requests, sum.0, "{csv}");

    // A purge of key-1's tenant on B reaches every gateway and the fleet's
    // snapshot: key-1's entry goes, key-2's stays.
    assert!(
        wait_until(Duration::from_secs(2), || [&a, &b, &c]
            .iter()
            .all(|g| entries(g) == 2)),
        "{} {} {}",
        stats(&a),
        stats(&b),
        stats(&c)
    );
    let tenant_1 = format!("key:{}", &sha("key-1")[..32]);
    let purge = request(
        &b.admin,
        "POST",
        &format!("/admin/cache/purge?tenant={tenant_1}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(purge.status, 200, "{}", purge.text());
    assert_eq!(purge.json()["removed"], 1, "{}", purge.text());
    assert!(
        wait_until(Duration::from_secs(2), || entries(&a) == 1
            && entries(&c) == 1),
        "{} {}",
        stats(&a),
        stats(&c)
    );
    assert!(
        wait_until(Duration::from_secs(2), || redis.cmd(
            "EVAL \"return #redis.call('KEYS', ARGV[1])\" 0 e2e-fleet:cache:e:*"
        ) == ":1"),
        "the fleet's snapshot still holds the purged tenant's entry"
    );
    assert_eq!(
        cache_header(&ask(&a, "key-2", &q("How do I reset my password?"))),
        "hit-exact"
    );

    // A purge on B reaches every gateway.
    let purge = request(&b.admin, "POST", "/admin/cache/purge?all=true", &[], b"").unwrap();
    assert_eq!(purge.status, 200, "{}", purge.text());
    assert!(
        wait_until(Duration::from_secs(2), || entries(&a) == 0
            && entries(&c) == 0),
        "{} {}",
        stats(&a),
        stats(&c)
    );
    assert_eq!(
        cache_header(&ask(&a, "key-1", &q("How do I reset my password?"))),
        "miss"
    );

    // A gateway started later serves what the fleet stored before it.
    let stored = ask(&c, "key-1", &q("Which port does PostgreSQL listen on?"));
    assert_eq!(cache_header(&stored), "miss");
    assert!(wait_until(Duration::from_secs(2), || entries(&a) >= 2));
    let d = node(&mock, &url);
    assert!(
        wait_until(Duration::from_secs(5), || entries(&d) >= 2),
        "{}",
        stats(&d)
    );
    let late = ask(&d, "key-1", &q("What port does PostgreSQL listen on?"));
    assert_eq!(cache_header(&late), "hit-semantic", "{:?}", late.headers);
    assert_eq!(late.json()["choices"], stored.json()["choices"]);

    // A cache version bump reloaded on A removes the route's older entries
    // on every gateway, before their own configs catch up; then the rest of
    // the fleet gets the same config.
    let bumped = "cache:\n  enabled: true\n  similarity_threshold: 0.95\n  encryption_key_file: cache.key\n  routes:\n    auto:\n      version: 2\n";
    a.config.write("cache.yaml", bumped);
    let reloaded = request(&a.admin, "POST", "/admin/reload", &[], b"").unwrap();
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert!(
        wait_until(Duration::from_secs(3), || [&b, &c, &d]
            .iter()
            .all(|g| entries(g) == 0)),
        "{} {} {}",
        stats(&b),
        stats(&c),
        stats(&d)
    );
    for g in [&b, &c, &d] {
        g.config.write("cache.yaml", bumped);
        assert_eq!(
            request(&g.admin, "POST", "/admin/reload", &[], b"")
                .unwrap()
                .status,
            200
        );
    }

    // Redis killed under load: no request fails. Answers stored meanwhile
    // reach the others once it is back.
    let port = redis.port;
    let gateways = [a.addr.clone(), b.addr.clone(), c.addr.clone()];
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let addr = gateways[w % 3].clone();
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for i in 0..40 {
                    let body = q(&format!("Load question {} of worker {w}", i % 10));
                    let r = request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[("Authorization", "Bearer key-load")],
                        &serde_json::to_vec(&body).unwrap(),
                    );
                    match r {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                        Err(e) => failed.push(e.to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                failed
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    redis.stop();
    let failed: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let during = ask(&a, "key-1", &q("How many bytes are in a kibibyte?"));
    assert_eq!((during.status, cache_header(&during)), (200, "miss"));
    let applied = |g: &Gateway| {
        ["stored", "duplicate"]
            .iter()
            .map(|o| {
                g.metric(
                    "smartllm_fleet_sync_total",
                    &[("what", "cache_apply"), ("outcome", o)],
                )
            })
            .sum::<f64>()
    };
    let before = applied(&b);
    let _redis = Redis::start_on(port);
    // Asking B before the entry arrives would store B's own answer: wait
    // until B has applied what A queued while Redis was away, then ask once.
    let mut last = before;
    let mut steady = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let now = applied(&b);
            steady = if now == last && now > before {
                steady + 1
            } else {
                0
            };
            last = now;
            std::thread::sleep(Duration::from_millis(300));
            steady >= 3
        }),
        "B applied nothing after Redis returned ({before} -> {last})"
    );
    let caught_up = ask(&b, "key-1", &q("How many bytes are in a kibibyte?"));
    assert_eq!(
        cache_header(&caught_up),
        "hit-exact",
        "{:?}",
        caught_up.headers
    );
    assert_eq!(caught_up.json()["choices"], during.json()["choices"]);
}

/// A gateway stopped while the stream was trimmed past the point it had
/// reached loads the snapshot when it starts again.
/// A peer whose embedder makes another vector space (here another window,
/// `embedder.max_seq_len`; as in a rolling upgrade of the model file) shares
/// its entries but not its vectors: they are exact hits on this gateway, and
/// a paraphrase is not scored against a vector it cannot compare with.
#[test]
fn a_peer_of_another_embedder_shares_entries_not_vectors() {
    let redis = Redis::start();
    let url = redis.url();
    let mock = Mock::start(&[]);
    let a = node(&mock, &url);
    let cfg = node_config(&mock, &url, "");
    let main = std::fs::read_to_string(cfg.path().join("smartllm.yaml")).unwrap();
    assert!(main.contains("embedder:\n"), "{main}");
    cfg.write(
        "smartllm.yaml",
        &main.replace("embedder:\n", "embedder:\n  max_seq_len: 128\n"),
    );
    let b = Gateway::start(cfg);
    let first = ask(&a, "key-1", &q("How do I reset my password?"));
    assert_eq!((first.status, cache_header(&first)), (200, "miss"));
    assert!(
        wait_until(Duration::from_secs(5), || entries(&b) >= 1),
        "the entry did not reach B: {}",
        stats(&b)
    );
    assert_eq!(vectors(&b), 0, "{}", stats(&b));
    assert!(
        b.metric(
            "smartllm_fleet_sync_total",
            &[("what", "cache_apply"), ("outcome", "other_model")]
        ) >= 1.0,
        "{}",
        b.metrics()
    );
    let upstream = mock.requests();
    let exact = ask(&b, "key-1", &q("How do I reset my password?"));
    assert_eq!(cache_header(&exact), "hit-exact", "{:?}", exact.headers);
    assert_eq!(exact.json()["choices"], first.json()["choices"]);
    assert_eq!(mock.requests(), upstream);
    let para = ask(&b, "key-1", &q("What is the way to reset my password?"));
    assert_eq!(cache_header(&para), "miss", "{:?}", para.headers);
    // On A, whose vector it is, another paraphrase hits.
    let on_a = ask(&a, "key-1", &q("How can I reset my password?"));
    assert_eq!(cache_header(&on_a), "hit-semantic", "{:?}", on_a.headers);
}

#[test]
fn a_gateway_the_stream_left_behind_catches_up_from_the_snapshot() {
    let redis = Redis::start();
    let url = redis.url();
    let mock = Mock::start(&[]);
    let a = Gateway::start(node_config(&mock, &url, "  cache_stream_len: 100\n"));
    let mut b = Gateway::start(node_config(&mock, &url, "  cache_stream_len: 100\n"));
    let first = ask(&a, "key-1", &q("Which region hosts the audit bucket?"));
    assert_eq!(cache_header(&first), "miss");
    assert!(wait_until(Duration::from_secs(2), || entries(&b) >= 1));
    // B answers three requests and stops at once (SIGTERM): its last ledger
    // counters still reach the fleet's cost view.
    for i in 0..3 {
        let r = ask(&b, "key-2", &q(&format!("How tall is tower number {i}?")));
        assert_eq!(r.status, 200);
    }
    b.stop();
    // While B is away: a purge (which the trimming below takes out of the
    // stream again), then enough answers to trim the stream past B.
    let purge = request(&a.admin, "POST", "/admin/cache/purge?all=true", &[], b"").unwrap();
    assert_eq!(purge.status, 200, "{}", purge.text());
    let n = 400;
    for i in 0..n {
        let r = ask(
            &a,
            "key-1",
            &q(&format!("What is the retention of log bucket number {i}?")),
        );
        assert_eq!(r.status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(30), || vectors(&a) >= n),
        "{}",
        stats(&a)
    );
    let len: u64 = redis
        .cmd("XLEN e2e-fleet:cache:stream")
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(len < n, "the stream kept {len} entries");
    let cfg = std::mem::replace(&mut b.config, ConfigDir::new("", "", "", "", ""));
    let b = Gateway::start(cfg);
    // The snapshot is counted once its last entry is in: the count, not the
    // vectors (which reach n a moment before), says the load is over.
    let snapshots = || {
        b.metric(
            "smartllm_fleet_sync_total",
            &[("what", "cache_snapshot"), ("outcome", "loaded")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(30), || snapshots() >= 1.0),
        "B loaded no snapshot: {}",
        stats(&b)
    );
    assert_eq!(snapshots(), 1.0, "B loaded the snapshot more than once");
    assert!(vectors(&b) >= n, "{}", stats(&b));
    let early = ask(
        &b,
        "key-1",
        &q("What is the retention of log bucket number 0?"),
    );
    assert_eq!(cache_header(&early), "hit-exact", "{:?}", early.headers);
    // What the purge removed while B was away is gone from B too.
    assert_eq!(vectors(&b), n, "{}", stats(&b));
    let purged = ask(&b, "key-1", &q("Which region hosts the audit bucket?"));
    assert_eq!(cache_header(&purged), "miss");
    // The fleet's costs are the sum of both ledgers, B's last ones included.
    let own = |g: &Gateway| total(&get(&g.admin, "/admin/costs?since=1h").json());
    let mut fleet = (0, 0.0);
    let mut sum = (0, 0.0);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (ta, tb) = (own(&a), own(&b));
            sum = (ta.0 + tb.0, ta.1 + tb.1);
            fleet = total(&get(&b.admin, "/admin/costs?since=1h&scope=fleet").json());
            fleet.0 == sum.0 && (fleet.1 - sum.1).abs() < 1e-6
        }),
        "fleet {fleet:?}, gateways {sum:?}"
    );
    assert_eq!(sum.0, n + 6, "A's answers, B's three, its hit and its miss");
}

#[test]
fn the_fleet_cost_view_needs_the_fleet() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(ledger_gateway(&mock, ""));
    let r = get(&gw.admin, "/admin/costs?scope=fleet");
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "fleet_unavailable");
}

/// A Redis password rotated under the fleet (`requirepass` set, clients
/// cut off) is a refusal that passes: a purge made meanwhile waits and
/// reaches the other gateways once the password works again (it was given
/// up after three NOAUTH answers, and they kept serving the purged answer).
#[test]
fn a_purge_made_while_redis_wants_a_password_reaches_the_fleet_after() {
    let redis = Redis::start();
    let url = redis.url();
    let mock = Mock::start(&[]);
    let a = node(&mock, &url);
    let b = node(&mock, &url);
    let question = "Which bucket holds the nightly backups?";
    assert_eq!(cache_header(&ask(&a, "key-1", &q(question))), "miss");
    assert!(wait_until(Duration::from_secs(2), || entries(&b) >= 1));
    // Commands on one connection (inline), their replies.
    let session = |lines: &[&str]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for l in lines {
            s.write_all(format!("{l}\r\n").as_bytes()).unwrap();
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    };
    let set = session(&["CONFIG SET requirepass rotated", "CLIENT KILL TYPE normal"]);
    assert!(set.starts_with("+OK"), "{set}");
    let purge = request(&a.admin, "POST", "/admin/cache/purge?all=true", &[], b"").unwrap();
    assert_eq!(purge.status, 200, "{}", purge.text());
    // Long enough for three refusals, and for the log to say so once.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(entries(&b), 1, "nothing reached B while Redis refused");
    let back = session(&["AUTH rotated", "CONFIG SET requirepass \"\""]);
    assert!(back.contains("+OK\r\n+OK"), "{back}");
    assert!(
        wait_until(Duration::from_secs(15), || entries(&b) == 0),
        "the purge did not reach B after the rotation: {}\n{}",
        stats(&b),
        a.log_text()
    );
    assert_eq!(cache_header(&ask(&b, "key-1", &q(question))), "miss");
    let log = a.log_text();
    assert!(!log.contains("it is not shared"), "{log}");
    assert!(log.contains("hint"), "the log says what to look at: {log}");
    assert_eq!(
        log.matches("publishing a cache change to the fleet failed")
            .count(),
        1,
        "said once: {log}"
    );
}

/// `rediss://`: two gateways share their cache through a Redis that speaks
/// only TLS on the port they are given, trusting its CA through
/// `fleet.tls_ca_file`; a gateway without that CA (the public roots) cannot
/// connect, and says so.
#[test]
fn a_fleet_shares_its_cache_through_redis_over_tls() {
    let redis = Redis::start_tls();
    let (tls_port, certs) = redis.tls.as_ref().unwrap();
    let url = format!("rediss://localhost:{tls_port}/0");
    let ca = certs.path().join("ca.pem");
    let mock = Mock::start(&[]);
    let tls_node = |ca_line: &str| {
        let cfg = node_config(&mock, &url, ca_line);
        Gateway::start(cfg)
    };
    let ca_line = format!("  tls_ca_file: {}\n", ca.display());
    let a = tls_node(&ca_line);
    let b = tls_node(&ca_line);
    let first = ask(&a, "key-1", &q("How do I reset my password?"));
    assert_eq!(cache_header(&first), "miss");
    assert!(
        wait_until(Duration::from_secs(5), || entries(&b) >= 1),
        "the entry did not reach B over TLS: {}",
        stats(&b)
    );
    assert_eq!(
        cache_header(&ask(&b, "key-1", &q("How do I reset my password?"))),
        "hit-exact"
    );
    assert_eq!(b.metric("smartllm_fleet_redis_up", &[]), 1.0);
    // Without the CA: the server's certificate is not trusted, and
    // nothing is shared.
    let c = tls_node("");
    assert_eq!(
        cache_header(&ask(&c, "key-1", &q("How do I reset my password?"))),
        "miss"
    );
    assert!(
        wait_until(Duration::from_secs(10), || c
            .log_text()
            .contains("UnknownIssuer")),
        "{}",
        c.log_text()
    );
    assert!(c.metrics().contains("smartllm_fleet_redis_up 0"));
}
