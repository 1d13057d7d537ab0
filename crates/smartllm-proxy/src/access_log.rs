//! End of request: one JSON access-log line and the request metrics. The line
//! carries no secrets: no headers, no bodies, no keys.

use crate::ctx::Ctx;
use crate::metrics;
use pingora_error::Error;
use pingora_proxy::Session;

pub fn finish(session: &Session, e: Option<&Error>, ctx: &mut Ctx) {
    if ctx.counted {
        metrics::inflight(-1.0);
        ctx.counted = false;
    }
    let status = if ctx.status != 0 {
        ctx.status
    } else {
        session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if e.is_some() { 499 } else { 0 })
    };
    let total = ctx.start.elapsed();
    let overhead =
        (ctx.attempts > 0).then(|| total.saturating_sub(ctx.upstream_wait).as_secs_f64());
    let route = ctx.route.as_deref().unwrap_or("-");
    let model = ctx.model.as_deref().unwrap_or("-");
    let provider = ctx.provider.as_deref().unwrap_or("-");
    metrics::request(&metrics::RequestRecord {
        endpoint: ctx.endpoint,
        route,
        model,
        provider,
        status,
        duration: total.as_secs_f64(),
        overhead,
    });
    let log_enabled = ctx
        .rt
        .as_ref()
        .is_none_or(|rt| rt.config.logging.access_log);
    if !log_enabled {
        return;
    }
    let req = session.req_header();
    let usage = ctx.usage.unwrap_or_default();
    tracing::info!(
        target: "smartllm::access",
        request_id = %ctx.request_id,
        method = %req.method,
        path = %req.uri.path(),
        status,
        endpoint = ctx.endpoint,
        route,
        model,
        provider,
        upstream_model = ctx.upstream_model.as_deref().unwrap_or("-"),
        stream = ctx.stream,
        attempts = ctx.attempts,
        latency_ms = total.as_secs_f64() * 1000.0,
        ttft_ms = ctx.ttft.map(|t| t.as_secs_f64() * 1000.0),
        overhead_ms = overhead.map(|o| o * 1000.0),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens,
        request_bytes = ctx.request_bytes,
        error = ctx.error_code.or(e.map(|e| e.etype().as_str())),
        client_gone = ctx.client_gone,
        cache = ctx.cache_status.unwrap_or("-"),
        similarity = ctx.cache_similarity,
        "request"
    );
}
