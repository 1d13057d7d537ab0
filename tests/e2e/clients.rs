//! Misbehaving clients: malformed and abandoned requests, slow clients and
//! their deadlines, and HTTP/1.1 pipelining.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::time::{Duration, Instant};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raw bytes in, everything the server sends back until it closes.
fn raw(addr: &str, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_clients_get_clear_errors_and_leak_nothing() {
    use std::io::{Read, Write};
    let (mock, gw) = basic("", &["--chunk-delay-ms", "100", "--words", "20"]);
    let pid = gw.pid();
    // Warm up, then take the baseline.
    assert_eq!(gw.chat(&chat_body("small", "warm up")).status, 200);
    let (fd0, rss0) = (fds(pid), rss_kib(pid));
    let upstream0 = mock.requests();
    let ok = serde_json::to_vec(&chat_body("small", "hello")).unwrap();
    for round in 0..40 {
        // Oversize headers: 431.
        let big = "a".repeat(40 << 10);
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("X-Big", &big)],
            &ok,
        )
        .unwrap();
        assert_eq!(r.status, 431, "{}", r.text());
        assert_eq!(r.api_error()["code"], "request_header_too_large");
        // Deeply nested JSON: 400 without a stack overflow.
        let nested = format!(
            "{{\"model\":\"small\",\"messages\":[],\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            nested.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.api_error()["code"], "invalid_json");
        // Invalid UTF-8: 400.
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            b"{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
        )
        .unwrap();
        assert_eq!(r.status, 400);
        // A form post or plain text: 415, with the fix in the message.
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let r = request(
                &gw.addr,
                "POST",
                "/v1/chat/completions",
                &[("Content-Type", ct)],
                &ok,
            )
            .unwrap();
            assert_eq!(r.status, 415, "{ct}");
            assert!(r.api_error()["message"]
                .as_str()
                .unwrap()
                .contains("application/json"));
        }
        // HTTP/1.0 works, and the connection closes after the answer.
        let mut head = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            ok.len()
        )
        .into_bytes();
        head.extend_from_slice(&ok);
        let out = raw(&gw.addr, &head);
        assert!(out.starts_with("HTTP/1.") && out.contains(" 200 "), "{out}");
        assert!(out.contains("Mock reply to: hello"));
        // A client that leaves during its upload: nothing goes upstream.
        let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{\"model\":\"small\",")
            .unwrap();
        drop(s);
        if round == 0 {
            // ... and requests before and after these still work.
            assert_eq!(gw.chat(&chat_body("small", "still fine")).status, 200);
        }
    }
    // 40 HTTP/1.0 answers and one ordinary request went upstream; no aborted upload did.
    assert!(wait_until(Duration::from_secs(5), || mock.requests() == upstream0 + 41));

    // A client that leaves during a stream: the upstream request is cancelled
    // (mock-llm sees its stream cut), and the access log says so.
    let aborted = || {
        get(&mock.addr, "/_mock/stats").json()["streams_aborted"]
            .as_u64()
            .unwrap()
    };
    let before = aborted();
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    let body = serde_json::to_vec(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "a long stream to walk away from"}]})).unwrap();
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200"));
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    assert!(
        wait_until(Duration::from_secs(5), || aborted() > before),
        "the upstream stream was not cancelled"
    );
    let gone = || {
        gw.log_text()
            .lines()
            .filter(|l| l.contains("\"stream\":true") && l.contains("\"client_gone\":true"))
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    };
    assert!(wait_until(Duration::from_secs(5), || gone().is_some()));
    // Billed for what was generated before the client left (a few of the
    // answer's 20 one-token words), marked estimated.
    let line = gone().unwrap();
    let billed = line["completion_tokens"].as_u64().unwrap();
    assert!((1..20).contains(&billed), "{line}");
    assert_eq!(line["usage_estimated"], true, "{line}");

    // Nothing leaked: descriptors back to the baseline, memory steady.
    assert!(
        wait_until(Duration::from_secs(10), || fds(pid) <= fd0 + 4),
        "fds {} -> {}",
        fd0,
        fds(pid)
    );
    let rss1 = rss_kib(pid);
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body off a kept-alive
/// connection: (status line, body).
fn read_response(s: &mut std::io::BufReader<std::net::TcpStream>) -> (String, String) {
    use std::io::{BufRead, Read};
    let mut status = String::new();
    s.read_line(&mut status).unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        s.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Seconds until the server closes `s` (reads return 0), feeding it `trickle`
/// one byte every `every` meanwhile; None if still open after `give_up`.
fn closed_after(
    s: &mut std::net::TcpStream,
    trickle: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<f64> {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    s.set_read_timeout(Some(every)).unwrap();
    let mut fed = 0;
    let mut buf = [0u8; 4096];
    while t0.elapsed() < give_up {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed().as_secs_f64()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(t0.elapsed().as_secs_f64())
            }
            Err(_) => {
                if fed < trickle.len() {
                    if s.write_all(&trickle[fed..fed + 1]).is_err() {
                        return Some(t0.elapsed().as_secs_f64());
                    }
                    fed += 1;
                }
            }
        }
    }
    None
}

#[test]
fn slow_clients_meet_their_deadlines_and_pipelined_requests_are_answered_in_order() {
    use std::io::{Read, Write};
    let (_mock, gw) = basic(
        "  client_header_timeout: 1s\n  client_body_timeout: 1s\n  client_body_deadline: 2s\n  keepalive_timeout: 2s\n",
        &[],
    );
    let ok = serde_json::to_vec(&chat_body("small", "hello")).unwrap();
    let head = |len: usize| {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };

    // Slowloris headers: a byte every 100 ms keeps every read alive, but the
    // whole head must arrive within client_header_timeout (1 s).
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .unwrap();
    let trickle = "X-Slow: ".to_string() + &"a".repeat(200);
    let t = closed_after(
        &mut s,
        trickle.as_bytes(),
        Duration::from_millis(100),
        Duration::from_secs(8),
    )
    .expect("a trickled request head held its connection open for 8 s");
    assert!((0.9..4.0).contains(&t), "closed after {t:.2}s");
    assert_eq!(
        gw.metric("smartllm_client_timeouts_total", &[("phase", "header")]),
        1.0
    );

    // Keep-alive: idle longer than the header deadline but within
    // keepalive_timeout, and the next request is still served; idle past
    // keepalive_timeout and the gateway closes the connection.
    let c = std::net::TcpStream::connect(&gw.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    for pause in [0, 1500] {
        std::thread::sleep(Duration::from_millis(pause));
        w.write_all(head(ok.len()).as_bytes()).unwrap();
        w.write_all(&ok).unwrap();
        let (status, body) = read_response(&mut r);
        assert!(status.contains(" 200 "), "after {pause} ms idle: {status}");
        assert!(body.contains("Mock reply to: hello"));
    }
    let t = closed_after(
        r.get_mut(),
        b"",
        Duration::from_millis(100),
        Duration::from_secs(8),
    )
    .expect("an idle keep-alive connection stayed open");
    assert!(
        (1.5..4.0).contains(&t),
        "idle connection closed after {t:.2}s"
    );

    // Slowloris body: 10 bytes every 300 ms never stalls for 1 s, but the
    // body must be complete within client_body_deadline (2 s): 408.
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s.write_all(head(100_000).as_bytes()).unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(8) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => {
                if s.write_all(&[b' '; 10]).is_err() {
                    break;
                }
            }
        }
    }
    let out = String::from_utf8_lossy(&out);
    let t = t0.elapsed().as_secs_f64();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("client_body_deadline"), "{out}");
    assert!((1.8..5.0).contains(&t), "408 after {t:.2}s");
    // A body that stops: 408 after client_body_timeout (1 s), naming it.
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    s.write_all(head(100).as_bytes()).unwrap();
    s.write_all(b"{\"model\":").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("(server.client_body_timeout)"), "{out}");
    assert_eq!(
        gw.metric("smartllm_client_timeouts_total", &[("phase", "body")]),
        2.0
    );

    // Pipelining: four requests in one write (JSON, a stream, a GET, JSON
    // with Connection: close) get four answers, in order.
    let stream = serde_json::to_vec(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "two"}]})).unwrap();
    let last = serde_json::to_vec(&chat_body("small", "four")).unwrap();
    let mut batch = head(ok.len()).into_bytes();
    batch.extend_from_slice(&ok);
    batch.extend_from_slice(head(stream.len()).as_bytes());
    batch.extend_from_slice(&stream);
    batch.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
    batch.extend_from_slice(
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", last.len()).as_bytes(),
    );
    batch.extend_from_slice(&last);
    let out = raw(&gw.addr, &batch);
    assert_eq!(out.matches("HTTP/1.1 200 ").count(), 4, "{out}");
    let at = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from {out}"))
    };
    let order = [
        at("Mock reply to: hello"),
        at("data: [DONE]"),
        at("\"object\":\"list\""),
        at("Mock reply to: four"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}: {out}");
}
