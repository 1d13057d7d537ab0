//! What clients send besides plain JSON: compressed bodies, `Expect:
//! 100-continue`, bodies cut off by a client that leaves, and the output a
//! stream without usage is billed for.

use crate::common::*;
use serde_json::{json, Value};
use smartllm_e2e::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The access-log line of a request.
fn log_line(gw: &Gateway, request_id: &str) -> Value {
    let find = || {
        gw.log_text()
            .lines()
            .filter(|l| l.contains(&format!("\"request_id\":\"{request_id}\"")))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "smartllm::access")
    };
    assert!(
        wait_until(Duration::from_secs(5), || find().is_some()),
        "no access-log line for {request_id}:\n{}",
        gw.log_text()
    );
    find().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// gzip and deflate bodies are decoded (and held to the body limit once
/// decoded); other codings get a 415 that names them, not a JSON error.
#[test]
fn compressed_request_bodies_are_decoded_or_refused_by_name() {
    let (_mock, gw) = basic("  max_body_size: 64KiB\n", &[]);
    let body = serde_json::to_vec(&chat_body("small", "What is the capital of France?")).unwrap();
    let post = |headers: &[(&str, &str)], body: &[u8]| {
        request(&gw.addr, "POST", "/v1/chat/completions", headers, body).unwrap()
    };
    let r = post(&[("Content-Encoding", "gzip")], &gzip(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("capital of France"));
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&body).unwrap();
    let r = post(&[("Content-Encoding", "deflate")], &z.finish().unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    // Anthropic's shape for Anthropic's clients.
    let messages = serde_json::to_vec(&json!({"model": "claude", "max_tokens": 32,
        "messages": [{"role": "user", "content": "Hello there"}]}))
    .unwrap();
    let r = request(
        &gw.addr,
        "POST",
        "/v1/messages",
        &[
            ("Content-Encoding", "x-gzip"),
            ("anthropic-version", "2023-06-01"),
        ],
        &gzip(&messages),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "message");
    // A coding the gateway does not decode: 415, by name.
    let r = post(&[("Content-Encoding", "br")], &body);
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.api_error()["code"], "unsupported_content_encoding");
    assert!(r.api_error()["message"]
        .as_str()
        .unwrap()
        .contains("\"br\""));
    // Not gzip at all: said so, not "invalid JSON".
    let r = post(&[("Content-Encoding", "gzip")], &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.api_error()["code"], "invalid_content_encoding");
    // A small body that decodes past the limit: 413 (a zip bomb stops there).
    let big = gzip(&vec![b' '; 200 * 1024]);
    assert!(big.len() < 2048);
    let r = post(&[("Content-Encoding", "gzip")], &big);
    assert_eq!(r.status, 413, "{}", r.text());
}

/// A client that waits for `100 Continue` before it sends its body gets it
/// at once (curl waits a second for it; others until their own timeout),
/// and keeps its connection for the next request.
#[test]
fn a_client_waiting_for_100_continue_is_told_to_go_on() {
    let (_mock, gw) = basic("", &[]);
    let body = serde_json::to_vec(&chat_body("small", "Hello")).unwrap();
    let mut s = TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first)
        .expect("no 100 Continue within 5 s");
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(&body).unwrap();
    // The answer, read to its Content-Length: the connection stays open.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut answer = vec![0u8; len];
    s.read_exact(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer).contains("chat.completion"));
    // The next request on the same connection.
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    // A request refused on its head gets its answer, not a 100.
    let mut s = TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// A client that leaves halfway through sending its body is logged as a
/// client that left (499, `client_gone`), not as a bad request or a server
/// error.
#[test]
fn a_client_leaving_mid_upload_is_logged_as_gone() {
    let (_mock, gw) = basic("", &[]);
    let mut s = TcpStream::connect(&gw.addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\nx-request-id: upload-cut-1\r\n\r\n{{\"model\": \"small\", \"messages\": ["
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let line = log_line(&gw, "upload-cut-1");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["client_gone"], true, "{line}");
    assert_eq!(line["error"], "client_closed_request", "{line}");
    assert!(
        !gw.metrics().contains("status=\"500\""),
        "counted as a server error"
    );
}

/// A stream from a provider that reports no usage is billed from its text:
/// about what the provider counts for the same answer, not the chunks'
/// size differences read as tokens (4.6x here before).
#[test]
fn a_stream_without_usage_is_billed_about_its_real_output() {
    let (_mock, gw) = basic("", &[]);
    let prompt = "Please describe the weather on a quiet autumn morning in the hills";
    let plain = gw.chat(&chat_body("small", prompt));
    assert_eq!(plain.status, 200, "{}", plain.text());
    let counted = plain.json()["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(counted >= 10, "{counted}");
    let mut body = chat_body("small", prompt);
    body["stream"] = json!(true);
    body["mock"] = json!({"no_usage": true});
    let r = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("x-request-id", "no-usage-stream-1"),
            ("Cache-Control", "no-store"),
        ],
        &serde_json::to_vec(&body).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let text = streamed_text(&r.sse_data());
    assert!(!text.is_empty());
    let line = log_line(&gw, "no-usage-stream-1");
    assert_eq!(line["usage_estimated"], true, "{line}");
    let billed = line["completion_tokens"].as_u64().unwrap();
    assert!(
        billed >= counted * 2 / 3 && billed <= counted * 3 / 2,
        "billed {billed} output tokens for an answer the provider counts as {counted}: {line}"
    );
}
