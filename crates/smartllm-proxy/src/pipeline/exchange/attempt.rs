//! One attempt at one deployment: connect (pooled), send, read the answer's
//! header; shape the provider's errors (kept OpenAI-shaped, keys scrubbed);
//! then hand a successful answer to the buffered or the stream relay.

use super::{buffered, client_gone, is_timeout, stream, Attempt, Exchange, Translate};
use crate::ctx::Ctx;
use crate::drain::{response_body, BodyError};
use crate::{metrics, respond};
use bytes::Bytes;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::v1::client::HttpSession as Http1Session;
use pingora_core::upstreams::peer::Peer;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_protocol::ApiError;
use smartllm_protocol::{anthropic, messages};
use std::time::{Duration, Instant};

const MAX_ERROR_BODY: usize = 1 << 20;

/// A kept connection that fails this soon after the request went out was
/// closed by the provider before it saw the request (the idle-close race):
/// the request is sent again, uncounted. Later, the provider had it.
const STALE_WINDOW: Duration = Duration::from_secs(1);

/// Send a request whose body is complete: over HTTP/1.1 header and body in
/// one write (one syscall instead of two: 10% of the gateway's CPU per small
/// request), over h2 as header and data frames.
async fn send(
    up: &mut HttpSession,
    header: RequestHeader,
    body: Bytes,
) -> pingora_error::Result<()> {
    match up {
        HttpSession::H1(h1) => {
            h1.write_request_with_body(Box::new(header), &body).await?;
            h1.finish_body().await.map(|_| ())
        }
        _ => {
            up.write_request_header(Box::new(header)).await?;
            up.write_request_body(body, true).await?;
            up.finish_request_body().await
        }
    }
}

/// Connect, send the request, read the answer's header, and hand the body to
/// the relay that fits it (or shape the provider's error).
pub(super) async fn once(
    x: &mut Exchange<'_>,
    session: &mut Session,
    ctx: &mut Ctx,
    header: RequestHeader,
    body: Bytes,
    fresh: bool,
) -> Attempt {
    let dep = x.dep;
    let p = &dep.provider;
    // Borrowed, and the address formatted only for an error message: a
    // request that goes well allocates neither.
    let pname = p.name();
    let addr = x.peer._address.clone();
    let wait_start = Instant::now();
    // This attempt's provider id, or none: never an earlier attempt's.
    ctx.upstream_request_id = None;

    // `fresh`: the request is being sent again after a kept connection failed it.
    let kept = if fresh {
        None
    } else {
        crate::upstream_pool::take(x.peer.reuse_hash(), super::POOL_IDLE)
    };
    let connect = match kept {
        Some(stream) => Ok(Ok((
            HttpSession::H1(Http1Session::new_with_options(stream, &x.peer)),
            true,
        ))),
        None => {
            pingora_timeout::timeout(
                p.cfg.connect_timeout + Duration::from_millis(250),
                x.shared.connector.get_http_session(&x.peer),
            )
            .await
        }
    };
    let (mut up, reused) = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.upstream_wait += wait_start.elapsed();
            let reason = if is_timeout(&e) {
                "connect_timeout"
            } else {
                "connect"
            };
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), reason);
            // The address is the operator's to read, not the client's: a
            // self-hosted provider's is an internal one.
            tracing::warn!(request_id = %ctx.request_id, provider = pname, %addr, error = %e, "could not connect to the provider");
            return Attempt::Retry(ApiError::bad_gateway(
                "upstream_unreachable",
                format!(
                    "Could not connect to provider '{pname}': {}.",
                    e.etype().as_str()
                ),
            ));
        }
        Err(_) => {
            ctx.upstream_wait += wait_start.elapsed();
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "connect_timeout");
            tracing::warn!(request_id = %ctx.request_id, provider = pname, %addr, "connecting to the provider timed out");
            return Attempt::Retry(ApiError::gateway_timeout(format!(
                "Connecting to provider '{pname}' timed out after {:?}.",
                p.cfg.connect_timeout
            )));
        }
    };
    up.set_read_timeout(None);
    up.set_write_timeout(Some(Duration::from_secs(30)));

    let sent = send(&mut up, header, body).await;
    if let Err(e) = sent {
        ctx.upstream_wait += wait_start.elapsed();
        if reused {
            // Closed by the provider while it was kept: send again.
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "stale_connection");
            return Attempt::Stale(ApiError::bad_gateway(
                "upstream_reset",
                format!("Provider '{pname}' closed the connection."),
            ));
        }
        metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "write");
        return Attempt::Retry(ApiError::bad_gateway(
            "upstream_write_failed",
            format!(
                "Sending the request to provider '{pname}' failed: {}.",
                e.etype().as_str()
            ),
        ));
    }
    let sent_at = Instant::now();

    // The client may leave while the provider works (a non-streamed answer
    // can take minutes): the request is then cancelled, not left to run and
    // be billed in full.
    // The stop's drain timeout ends the wait too: the client gets a 503 it
    // may send again, not a closed connection.
    let mut drain = x.shared.drain_expired.subscribe();
    let header = tokio::select! {
        biased;
        r = pingora_timeout::timeout(p.cfg.first_byte_timeout, up.read_response_header()) => r,
        () = super::client_left(session, &mut ctx.client_unwatched) => {
            ctx.upstream_wait += wait_start.elapsed();
            return super::left_while_waiting(ctx, x.req, up, false).await;
        }
        () = stream::drain_over(&mut drain) => {
            ctx.upstream_wait += wait_start.elapsed();
            return super::stopped_while_waiting(ctx, x.req, up).await;
        }
    };
    match header {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            ctx.upstream_wait += wait_start.elapsed();
            if reused && !is_timeout(&e) && sent_at.elapsed() < STALE_WINDOW {
                // A kept connection the upstream had already closed: safe to
                // resend. (Closed only within a round trip of the request:
                // one reset after the provider worked on it is a failure.)
                metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "stale_connection");
                return Attempt::Stale(ApiError::bad_gateway(
                    "upstream_reset",
                    format!("Provider '{pname}' closed the connection."),
                ));
            }
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "reset");
            tracing::info!(request_id = %ctx.request_id, provider = pname, %addr, error = %e, "the provider closed or reset the connection before answering");
            let err = ApiError::bad_gateway(
                "upstream_reset",
                format!(
                    "Provider '{pname}' closed or reset the connection before answering ({}).",
                    e.etype().as_str()
                ),
            );
            // Nothing reached the client: another deployment or model may answer.
            return x.retry_or_fail(err);
        }
        Err(_) => {
            ctx.upstream_wait += wait_start.elapsed();
            up.shutdown().await;
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "timeout");
            let err = ApiError::gateway_timeout(format!(
                "Provider '{pname}' did not answer within {:?} (first_byte_timeout).",
                p.cfg.first_byte_timeout
            ));
            return x.retry_or_fail(err);
        }
    }
    // The time to the first token is taken where that token comes: a
    // stream's first generated event (many providers send their headers
    // before prefill or thinking), a buffered answer's header (the whole
    // answer); never an error's.
    ctx.ttft = None;
    ctx.upstream_wait += wait_start.elapsed();

    let Some(resp) = up.response_header() else {
        return Attempt::Fail(ApiError::bad_gateway(
            "upstream_protocol",
            format!("Provider '{pname}' sent no response header."),
        ));
    };
    let status = resp.status.as_u16();
    ctx.upstream_request_id = resp
        .headers
        .get("x-request-id")
        .or_else(|| resp.headers.get("request-id"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_string);
    let is_sse = resp.headers.get("content-type").is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
    });
    let mut passthrough: Vec<(String, String)> = Vec::new();
    // The provider's rate-limit headers describe the provider account, not
    // the key: under a key or app limit the gateway's own say what is left
    // (`respond::header`), and the provider's would overwrite them.
    let own = ctx.ratelimit != smartllm_quota::Headroom::default();
    for (name, value) in resp.headers.iter() {
        let n = name.as_str();
        if n == "retry-after"
            || (!own && (n.starts_with("x-ratelimit-") || n.starts_with("anthropic-ratelimit-")))
        {
            if let Ok(v) = value.to_str() {
                passthrough.push((n.to_string(), v.to_string()));
            }
        }
    }
    let idle = p.cfg.idle_timeout;

    if !(200..300).contains(&status) {
        let body = match response_body(&mut up, idle, MAX_ERROR_BODY, &mut ctx.upstream_wait).await
        {
            Ok(b) => b,
            Err(e) => return x.retry_or_fail(upstream_body_error(pname, e)),
        };
        x.release(up).await;
        metrics::upstream_error(
            pname,
            ctx.model().unwrap_or("-"),
            if status == 429 {
                "status_429"
            } else if status >= 500 {
                "status_5xx"
            } else {
                "status_4xx"
            },
        );
        let body = match x.translate {
            Translate::Anthropic => anthropic::error_to_openai(status, &body),
            Translate::AnthropicNative => anthropic_error_body(status, &body),
            Translate::OpenAi if x.req.endpoint.is_anthropic() => {
                messages::error_from_openai(status, &openai_error_body(status, pname, &body))
            }
            Translate::OpenAi | Translate::ResponsesNative => {
                openai_error_body(status, pname, &body)
            }
        };
        // Some providers quote the key they were sent in auth errors: that is
        // the gateway's secret, never the client's to see.
        let body = scrub(body, x.key.as_deref());
        // The deployment refused the gateway's own credentials, or does not
        // know its upstream model (a revoked key, an organisation without
        // access, a misspelt model): no fault of the client's, whose SDK
        // would read a 401 as its own key being wrong. Another deployment or
        // fallback may serve; the deployment's circuit counts a 401 or 403.
        // (A 404 about what the client named, a `previous_response_id`, a
        // file or another parameter, is passed on.)
        let refused = matches!(status, 401 | 403) || (status == 404 && !about_the_request(&body));
        if refused {
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            let (code, what) = if status == 404 {
                ("upstream_not_found", "its upstream model name")
            } else {
                ("upstream_auth", "its API key")
            };
            return x.retry_or_fail(ApiError::new(
                502,
                "upstream_error",
                code,
                format!("Provider '{pname}' refused the gateway's request ({status}: {msg}); check the deployment's configuration ({what})."),
            ));
        }
        // Anthropic's 529 (overloaded) is no status OpenAI's clients know:
        // theirs is 503, which their SDKs retry.
        let client_status = if status == 529 && !x.req.endpoint.is_anthropic() {
            503
        } else {
            status
        };
        if (status == 429 || status >= 500) && x.more_left {
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            let mut e = ApiError::new(
                client_status,
                "upstream_error",
                "upstream_status",
                format!("Provider '{pname}' answered {status}: {msg}"),
            );
            // Kept for the client should every deployment answer so.
            e.retry_after = passthrough
                .iter()
                .find(|(k, _)| k == "retry-after")
                .and_then(|(_, v)| retry_after_secs(v));
            return Attempt::Retry(e);
        }
        // Passed on as the provider sent it: still an error of the request,
        // for the access log, the trace and the ledger.
        ctx.error_code = Some(passed_on_code(status));
        return match respond::json(session, ctx, client_status, body, &passthrough).await {
            Ok(()) => Attempt::Done,
            Err(_) => client_gone(ctx),
        };
    }

    x.passthrough = passthrough;
    if x.req.stream && is_sse {
        stream::relay(x, session, ctx, up, sent_at).await
    } else {
        let ttft = sent_at.elapsed();
        ctx.ttft = Some(ttft);
        metrics::ttft(ctx.model().unwrap_or("-"), pname, ttft.as_secs_f64());
        buffered::relay(x, session, ctx, up).await
    }
}

/// A `Retry-After` in seconds (a fraction rounds up; an HTTP date, which
/// providers do not send, is not read).
fn retry_after_secs(v: &str) -> Option<u64> {
    let secs = v.trim().parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| secs.ceil() as u64)
}

pub(super) fn upstream_body_error(pname: &str, e: BodyError) -> ApiError {
    match e {
        BodyError::TooLarge => ApiError::bad_gateway(
            "upstream_response_too_large",
            format!("Provider '{pname}' sent a response larger than the gateway accepts."),
        ),
        BodyError::Timeout => ApiError::gateway_timeout(format!(
            "Provider '{pname}' stalled while sending its response (idle_timeout)."
        )),
        BodyError::Broken(why) => ApiError::bad_gateway(
            "upstream_reset",
            format!("Provider '{pname}' broke off its response: {why}."),
        ),
    }
}

/// `body` with every occurrence of `secret` replaced by `[redacted]`.
pub(super) fn scrub(body: Vec<u8>, secret: Option<&str>) -> Vec<u8> {
    let Some(secret) = secret.filter(|s| s.len() >= 8) else {
        return body;
    };
    let needle = secret.as_bytes();
    if !body.windows(needle.len()).any(|w| w == needle) {
        return body;
    }
    String::from_utf8_lossy(&body)
        .replace(secret, "[redacted]")
        .into_bytes()
}

/// The access log's and the trace's error code of a provider's error
/// status passed on to the client (bounded: never the provider's own code).
fn passed_on_code(status: u16) -> &'static str {
    match status {
        429 => "upstream_rate_limited",
        400..=499 => "upstream_rejected",
        _ => "upstream_status",
    }
}

/// Keep Anthropic-shaped upstream errors as they are (for Anthropic
/// clients); wrap anything else.
fn anthropic_error_body(status: u16, body: &[u8]) -> Vec<u8> {
    let shaped = serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|v| v["type"] == "error" && v["error"]["message"].is_string());
    if shaped {
        body.to_vec()
    } else {
        messages::error_from_openai(status, body)
    }
}

/// Keep OpenAI-shaped upstream errors as they are; wrap anything else.
fn openai_error_body(status: u16, pname: &str, body: &[u8]) -> Vec<u8> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if v.get("error")
            .is_some_and(|e| e.is_object() && e.get("message").is_some())
        {
            return body.to_vec();
        }
    }
    let snippet = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string();
    let (kind, code) = match status {
        401 | 403 => ("authentication_error", "upstream_auth"),
        404 => ("invalid_request_error", "upstream_not_found"),
        429 => ("rate_limit_error", "upstream_rate_limited"),
        400..=499 => ("invalid_request_error", "upstream_rejected"),
        _ => ("upstream_error", "upstream_status"),
    };
    let mut e = ApiError::new(
        status,
        kind,
        code,
        format!("Provider '{pname}' answered HTTP {status}: {snippet}"),
    );
    e.status = status;
    e.body()
}

/// Whether an OpenAI 404 body is about something the request named (a
/// parameter, or an error code other than an unknown model): the client's,
/// not the deployment's configuration. A 404 without either (an unknown
/// model, a wrong base URL's page) is the deployment's.
fn about_the_request(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        let e = &v["error"];
        e["param"]
            .as_str()
            .is_some_and(|p| !p.is_empty() && p != "model")
            || e["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty() && c != "model_not_found")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::http::v1::client::HttpSession as H1Session;
    use pingora_core::protocols::l4::stream::Stream;
    use std::io::Read;

    /// Over HTTP/1.1 the request leaves in one write: the upstream's first
    /// read, made as soon as bytes arrive, holds the header and the whole
    /// body (with a header write and a body write it would often hold the
    /// header alone). The session then reads the answer and can be reused.
    #[tokio::test]
    async fn an_h1_request_leaves_in_one_write() {
        let body = Bytes::from(vec![b'x'; 1000]);
        for _ in 0..20 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                let (mut c, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 65536];
                let n = c.read(&mut buf).unwrap();
                std::io::Write::write_all(
                    &mut c,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                )
                .unwrap();
                buf.truncate(n);
                buf
            });
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut up = HttpSession::H1(H1Session::new(Box::new(Stream::from(tcp))));
            let mut header = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
            header.insert_header("host", "upstream").unwrap();
            header
                .insert_header("content-length", body.len().to_string())
                .unwrap();
            send(&mut up, header, body.clone()).await.unwrap();
            let first_read = server.join().unwrap();
            let text = String::from_utf8_lossy(&first_read);
            assert!(
                text.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
                "{text}"
            );
            assert!(
                first_read.ends_with(&body),
                "the first read held {} bytes, not the header and the {}-byte body",
                first_read.len(),
                body.len()
            );
            up.read_response_header().await.unwrap();
            assert_eq!(up.response_header().unwrap().status.as_u16(), 200);
            assert_eq!(
                up.read_response_body().await.unwrap().unwrap(),
                Bytes::from_static(b"ok")
            );
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(retry_after_secs("20"), Some(20));
        assert_eq!(retry_after_secs(" 1.2 "), Some(2));
        assert_eq!(retry_after_secs("0"), Some(0));
        assert_eq!(retry_after_secs("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(retry_after_secs("-3"), None);
    }

    #[test]
    fn provider_keys_are_scrubbed_from_what_providers_echo() {
        let body =
            br#"{"error":{"message":"bad key sk-live-0123456789 (sk-live-0123456789)"}}"#.to_vec();
        let out = String::from_utf8(super::scrub(body, Some("sk-live-0123456789"))).unwrap();
        assert_eq!(
            out,
            r#"{"error":{"message":"bad key [redacted] ([redacted])"}}"#
        );
        let clean = b"nothing here".to_vec();
        assert_eq!(
            super::scrub(clean.clone(), Some("sk-live-0123456789")),
            clean
        );
        // No key, or one too short to be a secret: untouched.
        assert_eq!(super::scrub(clean.clone(), None), clean);
        assert_eq!(super::scrub(b"abc".to_vec(), Some("abc")), b"abc".to_vec());
    }

    #[test]
    fn only_a_404_about_what_the_request_named_is_the_clients() {
        assert!(super::about_the_request(
            br#"{"error":{"code":"previous_response_not_found","param":"previous_response_id"}}"#
        ));
        assert!(super::about_the_request(
            br#"{"error":{"message":"No such File object: file-x","param":"file_id","code":null}}"#
        ));
        assert!(!super::about_the_request(
            br#"{"error":{"code":"model_not_found","param":null,"message":"The model does not exist"}}"#
        ));
        assert!(!super::about_the_request(
            br#"{"error":{"message":"mock-llm injected status 404","param":null,"code":null}}"#
        ));
        assert!(!super::about_the_request(b"<html>Not Found</html>"));
    }
}
