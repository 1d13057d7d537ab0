//! Bounded state whatever clients send (#19 item 2): an open gateway
//! (`require_key: false`, where every distinct bearer token is a tenant of its
//! own) takes 100,000 requests from 10,000 random bearer tokens; `/metrics`
//! stays under a fixed number of series (tenant labels capped at
//! `metrics.max_label_values`, the rest `__overflow__`, names hashed) and the
//! process's RSS grows by less than a fixed bound. The cache is off: every
//! request goes through admission, routing, the upstream exchange, the ledger
//! and the budgets, which is where per-tenant state would pile up.

use crate::common::*;
use smartllm_e2e::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REQUESTS: usize = 100_000;
const TENANTS: usize = 10_000;
const CONNECTIONS: usize = 32;
/// At most this many samples in `/metrics` (lines not starting with '#').
const MAX_SERIES: usize = 1_500;
/// RSS may grow by at most this much over the run (after a warm-up).
const MAX_RSS_GROWTH_KIB: u64 = 96 * 1024;

/// One keep-alive HTTP/1.1 connection: send a request, read one response
/// (Content-Length or chunked); the status code.
fn exchange(conn: &mut BufReader<TcpStream>, request: &[u8]) -> u16 {
    conn.get_mut().write_all(request).expect("send");
    let mut line = String::new();
    conn.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        conn.read_line(&mut line).expect("header");
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((h, ""));
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .expect("chunk size");
            let mut chunk = vec![0u8; size + 2];
            conn.read_exact(&mut chunk).expect("chunk");
            if size == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).expect("body");
    }
    status
}

#[test]
fn an_open_gateway_keeps_metrics_and_memory_bounded_under_random_tokens() {
    let mock = Mock::start(&[]);
    let cfg = ledger_gateway(&mock, "metrics:\n  label_names: hashed\n");
    cfg.write("keys.yaml", "require_key: false\n");
    cfg.write("cache.yaml", "cache:\n  enabled: false\n");
    let gw = Gateway::start(cfg);
    let pid = gw.pid();
    let addr = gw.addr.clone();
    // 10,000 random bearer tokens (each a tenant of its own).
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..TENANTS)
            .map(|_| format!("sk-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)))
            .collect(),
    );
    let body = r#"{"model":"small","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
    let run = |from: usize, to: usize| {
        let next = Arc::new(AtomicUsize::new(from));
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (next, tokens, addr) = (next.clone(), tokens.clone(), addr.clone());
                std::thread::spawn(move || {
                    let s = TcpStream::connect(&addr).expect("connect");
                    s.set_nodelay(true).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut conn = BufReader::new(s);
                    let mut bad = 0usize;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            return bad;
                        }
                        let req = format!(
                            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            tokens[i % TENANTS],
                            body.len()
                        );
                        if exchange(&mut conn, req.as_bytes()) != 200 {
                            bad += 1;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .sum::<usize>()
    };
    let started = Instant::now();
    // Warm-up: the first 2,000 tenants, so allocator arenas, connection
    // pools and the first thousand label values are in place.
    let warm = 2 * TENANTS / 10;
    assert_eq!(run(0, warm), 0, "every request is answered 200");
    let rss_before = rss_kib(pid);
    assert_eq!(run(warm, REQUESTS), 0, "every request is answered 200");
    let elapsed = started.elapsed();
    // Let the ledger flush and the upkeep run before looking.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(pid);
    let metrics = gw.metrics();
    let series = metrics.lines().filter(|l| !l.starts_with('#')).count();
    let tenants: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("smartllm_cost_usd_total{"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    eprintln!(
        "bounded: {REQUESTS} requests, {TENANTS} tenants, {CONNECTIONS} connections in {:.1}s; {series} series, {} tenant label values; RSS {rss_before} -> {rss_after} KiB",
        elapsed.as_secs_f64(),
        tenants.len()
    );
    assert!(series < MAX_SERIES, "{series} series:\n{metrics}");
    assert!(
        tenants.len() <= 1001 && tenants.contains("__overflow__"),
        "{} tenant values",
        tenants.len()
    );
    // Hashed names: no tenant of an open gateway (`key:<hex>`) is spelled out.
    assert!(!metrics.contains("tenant=\"key:"), "names are hashed");
    assert!(
        rss_after.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Every request still counted, overflow included.
    let cost = gw.metric("smartllm_cost_usd_total", &[]);
    assert!(cost > 0.0, "cost gauges carry the spend");
}
