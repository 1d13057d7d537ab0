//! Writing responses to the client: JSON, OpenAI-shaped errors, and the headers
//! every answer carries (request id, model, provider, route).

use crate::ctx::Ctx;
use bytes::Bytes;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, Session};
use smartllm_protocol::ApiError;

/// Frames a body whose length is not known up front (a stream). HTTP/1.1
/// clients get chunked encoding, so the connection stays reusable (keep-alive,
/// pipelining); without it Pingora sends the body close-delimited. HTTP/1.0
/// clients get the close-delimited body they understand, and HTTP/2 frames
/// bodies itself.
pub fn frame_unsized(session: &Session, h: &mut ResponseHeader) -> pingora_error::Result<()> {
    if !session.is_http2() && session.req_header().version == http::Version::HTTP_11 {
        h.insert_header("transfer-encoding", "chunked")?;
    }
    Ok(())
}

/// A response header with the gateway's own headers set.
pub fn header(
    status: u16,
    ctx: &Ctx,
    content_type: &str,
    len: Option<usize>,
) -> pingora_error::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(8))?;
    if content_type == "application/json" {
        // The common case goes in as a static value (no copy, no check).
        h.insert_header(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        )?;
    } else {
        h.insert_header("content-type", content_type)?;
    }
    if let Some(len) = len {
        h.insert_header("content-length", http::HeaderValue::from(len))?;
    }
    h.insert_header("x-request-id", ctx.request_id.as_str())?;
    if ctx.anthropic {
        // Where Anthropic's SDKs read a request's id (`_request_id`, and
        // errors' `request_id`): the gateway's, which its logs carry (the
        // provider's is `x-smartllm-upstream-request-id`).
        h.insert_header("request-id", ctx.request_id.as_str())?;
    }
    if let Some(m) = ctx.model() {
        h.insert_header("x-smartllm-model", m)?;
    }
    if let Some(p) = &ctx.provider {
        h.insert_header("x-smartllm-provider", p.as_str())?;
    }
    if let Some(id) = &ctx.upstream_request_id {
        h.insert_header("x-smartllm-upstream-request-id", id.as_str())?;
    }
    if let Some(c) = ctx.cache_status {
        h.insert_header("x-smartllm-cache", c)?;
    }
    if let Some(sim) = ctx.cache_similarity {
        h.insert_header("x-smartllm-similarity", format!("{sim:.4}"))?;
    }
    if let Some(v) = ctx.cache_verifier {
        h.insert_header("x-smartllm-verifier", format!("{v:.4}"))?;
    }
    if let Some(r) = ctx.route.as_ref().or(ctx.degraded_from.as_ref()) {
        let model = ctx.model().unwrap_or("-");
        let rule = ctx
            .route_cost_rule
            .as_deref()
            .map(|c| format!("; cost_rule={c}"))
            .unwrap_or_default();
        h.insert_header(
            "x-smartllm-route",
            format!("{r}; model={model}; reason={}{rule}", ctx.route_reason),
        )?;
    }
    // What the router read in the prompt, where it decided: the task and
    // how complex (so a caller can see why a prompt went where it went).
    if let (Some(_), Some(task), Some(c)) = (&ctx.route_cost_rule, ctx.task, ctx.complexity) {
        h.insert_header("x-smartllm-task", format!("{task}; complexity={c:.2}"))?;
    }
    if let Some((e, arm)) = &ctx.experiment {
        h.insert_header("x-smartllm-experiment", format!("{e}={arm}"))?;
    }
    if let Some(t) = &ctx.dropped_tools {
        h.insert_header("x-smartllm-dropped-tools", t.as_str())?;
    }
    ratelimit_headers(&mut h, &ctx.ratelimit, ctx.anthropic)?;
    Ok(h)
}

/// What the key's rate limits leave it, in the headers its provider's own
/// API sends: OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
/// (the reset as a duration, `1s`, `6m0s`), or Anthropic's
/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (the reset
/// as an RFC 3339 time). The tightest of the key's and its app's limits;
/// nothing for a kind no limit applies to.
fn ratelimit_headers(
    h: &mut ResponseHeader,
    r: &smartllm_quota::Headroom,
    anthropic: bool,
) -> pingora_error::Result<()> {
    // (limit, remaining, reset) names, per family and kind.
    const OPENAI: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    const ANTHROPIC: [[&str; 3]; 2] = [
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    ];
    let names = if anthropic { &ANTHROPIC } else { &OPENAI };
    for ([limit, remaining, reset], left) in names.iter().zip([r.requests, r.tokens]) {
        let Some(left) = left else { continue };
        let reset_at = if anthropic {
            let at = smartllm_protocol::time::now_secs() + left.reset_secs.ceil() as u64;
            smartllm_ledger::format_rfc3339(at)
        } else {
            go_duration(left.reset_secs)
        };
        h.insert_header(*limit, http::HeaderValue::from(left.limit))?;
        h.insert_header(*remaining, http::HeaderValue::from(left.remaining))?;
        h.insert_header(*reset, reset_at)?;
    }
    Ok(())
}

/// A duration as OpenAI's rate-limit headers write it (Go's): `0s`,
/// `120ms`, `1.5s`, `6m0s`.
fn go_duration(secs: f64) -> String {
    let ms = (secs.max(0.0) * 1000.0).round() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, rest) = (ms / 3_600_000, ms % 3_600_000 / 60_000, ms % 60_000);
    let s = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let frac = format!("{:03}", rest % 1000);
        format!("{}.{}s", rest / 1000, frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{s}")
    } else if m > 0 {
        format!("{m}m{s}")
    } else {
        s
    }
}

pub async fn json(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    body: Vec<u8>,
    extra: &[(String, String)],
) -> pingora_error::Result<()> {
    let mut h = header(status, ctx, "application/json", Some(body.len()))?;
    for (k, v) in extra {
        h.insert_header(k.clone(), v.as_str())?;
    }
    ctx.status = status;
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}

pub async fn error(
    session: &mut Session,
    ctx: &mut Ctx,
    err: &ApiError,
) -> pingora_error::Result<()> {
    ctx.error_code = Some(err.code);
    let mut extra = Vec::new();
    if let Some(s) = err.retry_after {
        extra.push(("retry-after".to_string(), s.to_string()));
    }
    if let Some(a) = err.allow {
        extra.push(("allow".to_string(), a.to_string()));
    }
    // The official SDKs (and Claude Code) obey it before their own rules:
    // without it Claude Code retries a refused key for minutes.
    extra.push(("x-should-retry".to_string(), should_retry(err).to_string()));
    if err.status == 413 || err.status == 408 {
        // The rest of the body was not read: the connection cannot be reused.
        session.set_keepalive(None);
        extra.push(("connection".to_string(), "close".to_string()));
    }
    let body = if ctx.anthropic {
        smartllm_protocol::messages::error_body_with_id(err, &ctx.request_id)
    } else {
        err.body()
    };
    json(session, ctx, err.status, body, &extra).await
}

/// Whether the same request may succeed if sent again: a timeout, a
/// conflict, a rate limit or a server-side failure, but not an exhausted
/// budget (it stays exhausted until its period ends), a request larger
/// than a whole rate-limit window or a provider refusing the gateway's own
/// key or model name (until an operator fixes it), nor anything the client must change
/// (a bad key, body or model).
pub fn should_retry(err: &ApiError) -> bool {
    match err.status {
        408 | 409 | 429 | 500..=599 => {
            err.kind != "insufficient_quota"
                && !matches!(
                    err.code,
                    "request_too_large_for_limit" | "upstream_auth" | "upstream_not_found"
                )
        }
        _ => false,
    }
}

/// Errors that escape `request_filter` (mostly the client going away): answer
/// with an OpenAI-shaped error if nothing was written yet.
pub async fn fail_to_proxy(session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
    let code = match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                ErrorType::ReadTimedout => 408,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    };
    if code == 0 {
        ctx.client_gone = true;
        ctx.status = 499;
        return FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
    }
    if session.response_written().is_none() {
        let err = match code {
            408 => ApiError::new(
                408,
                "invalid_request_error",
                "request_timeout",
                "The request body was not received in time (server.client_body_timeout).",
            ),
            400 => ApiError::invalid_request(
                "bad_request",
                format!("The request could not be read: {}.", e.etype().as_str()),
            ),
            502 => ApiError::bad_gateway("upstream_error", "The upstream failed."),
            _ => ApiError::internal(format!(
                "Internal gateway error ({}). Request id: {}.",
                e.etype().as_str(),
                ctx.request_id
            )),
        };
        if error(session, ctx, &err).await.is_err() {
            ctx.client_gone = true;
        }
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        for (secs, want) in [
            (0.0, "0s"),
            (0.0004, "0s"),
            (0.12, "120ms"),
            (1.0, "1s"),
            (1.5, "1.5s"),
            (59.999, "59.999s"),
            (360.0, "6m0s"),
            (61.25, "1m1.25s"),
            (6000.0, "1h40m0s"),
        ] {
            assert_eq!(go_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn only_what_may_succeed_again_is_worth_a_retry() {
        let e = |status, kind| ApiError::new(status, kind, "c", "m");
        let too_large = ApiError::new(429, "rate_limit_error", "request_too_large_for_limit", "m");
        assert!(!should_retry(&too_large));
        let provider_key = ApiError::new(502, "authentication_error", "upstream_auth", "m");
        assert!(!should_retry(&provider_key));
        for (status, kind, retry) in [
            (400, "invalid_request_error", false),
            (401, "invalid_request_error", false),
            (403, "permission_error", false),
            (404, "invalid_request_error", false),
            (413, "invalid_request_error", false),
            (408, "invalid_request_error", true),
            (429, "rate_limit_exceeded", true),
            (429, "insufficient_quota", false),
            (429, "rate_limit_error", true),
            (502, "upstream_error", true),
            (503, "overloaded_error", true),
        ] {
            assert_eq!(should_retry(&e(status, kind)), retry, "{status} {kind}");
        }
    }
}
