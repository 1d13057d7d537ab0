//! The buffered relay: a whole JSON answer, validated before anything
//! reaches the client (so a broken answer can still go to another deployment).

use super::attempt::upstream_body_error;
use super::usage::{completion_text, estimate_usage, record_usage};
use super::{client_gone, Attempt, Exchange, Translate};
use crate::ctx::Ctx;
use crate::drain::response_body;
use crate::{metrics, respond};
use pingora_core::protocols::http::client::HttpSession;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_protocol::answer::OpenAiAnswer;
use smartllm_protocol::{anthropic, messages, responses};
use smartllm_protocol::{ApiError, Endpoint, Usage};

const MAX_BUFFERED_RESPONSE: usize = 64 << 20;

/// Read the whole answer, validate it, translate it, record its usage, queue
/// it for the cache, and send it.
pub(super) async fn relay(
    x: &Exchange<'_>,
    session: &mut Session,
    ctx: &mut Ctx,
    mut up: HttpSession,
) -> Attempt {
    // Nothing has reached the client yet: a broken or unreadable answer moves
    // on to the next deployment like a refused connection does.
    let pname = x.provider();
    let retry_or_fail = |e: ApiError| x.retry_or_fail(e);
    let mut waited = std::time::Duration::ZERO;
    let mut drain = x.shared.drain_expired.subscribe();
    let read = tokio::select! {
        biased;
        r = response_body(&mut up, x.idle_timeout(), MAX_BUFFERED_RESPONSE, &mut waited) => r,
        () = super::client_left(session, &mut ctx.client_unwatched) => {
            ctx.upstream_wait += waited;
            return super::left_while_waiting(ctx, x.req, up, true).await;
        }
        // (The stop's drain time is up while the answer comes: a 503 the
        // client may send again.)
        () = super::stream::drain_over(&mut drain) => {
            ctx.upstream_wait += waited;
            return super::stopped_while_waiting(ctx, x.req, up).await;
        }
    };
    ctx.upstream_wait += waited;
    let body = match read {
        Ok(b) => b,
        Err(e) => {
            up.shutdown().await;
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "body");
            return retry_or_fail(upstream_body_error(pname, e));
        }
    };
    x.release(up).await;
    let malformed = |body: &[u8]| {
        metrics::upstream_error(pname, ctx.model().unwrap_or("-"), "malformed_response");
        retry_or_fail(ApiError::bad_gateway(
            "upstream_invalid_response",
            format!(
                "Provider '{pname}' returned a response that is not valid JSON ({} bytes).",
                body.len()
            ),
        ))
    };
    // An OpenAI answer going to an OpenAI client unchanged, and not to the
    // cache: read its figures from the bytes and send them as they came.
    if x.translate == Translate::OpenAi
        && matches!(
            x.req.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        )
        && ctx.cache_insert.is_none()
    {
        match OpenAiAnswer::read(&body) {
            Err(_) => return malformed(&body),
            Ok(a) if a.usage.is_some() => {
                ctx.cut_off = a.cut_at_length && !super::output_limited(x.req, ctx);
                record_usage(ctx, a.usage);
                crate::pipeline::finish::settle_budget(x.shared, ctx);
                return match respond::json(session, ctx, 200, body, &x.passthrough).await {
                    Ok(()) => Attempt::Done,
                    Err(_) => client_gone(ctx),
                };
            }
            // No usage: estimated below from the answer's text.
            Ok(_) => {}
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return malformed(&body);
    };
    if x.req.endpoint == Endpoint::MessagesCountTokens {
        // A count costs nothing and is no answer to cache.
        return match respond::json(session, ctx, 200, body, &x.passthrough).await {
            Ok(()) => Attempt::Done,
            Err(_) => client_gone(ctx),
        };
    }
    // Stopped at the token limit, in the provider's own words.
    let truncated = match x.translate {
        Translate::OpenAi => smartllm_protocol::usage::cut_at_length(&v),
        Translate::Anthropic | Translate::AnthropicNative => v["stop_reason"]
            .as_str()
            .is_some_and(anthropic::cut_at_limit),
        Translate::ResponsesNative => v["incomplete_details"]["reason"] == "max_output_tokens",
    };
    // Cut at the model's context window: not the limit the client asked for.
    let window_cut = matches!(
        x.translate,
        Translate::Anthropic | Translate::AnthropicNative
    ) && v["stop_reason"] == "model_context_window_exceeded";
    ctx.cut_off = truncated && (!super::output_limited(x.req, ctx) || window_cut);
    // What the client gets, its usage, and the answer in the canonical chat
    // shape (what the cache stores and the estimates read).
    let (mut out, usage, chat) = match x.translate {
        Translate::OpenAi => (body, Usage::from_openai(&v), v),
        Translate::Anthropic => {
            let (o, u) = anthropic::response_to_openai(&v, ctx.model().unwrap_or(""));
            (serde_json::to_vec(&o).unwrap_or_default(), Some(u), o)
        }
        Translate::AnthropicNative => {
            let usage = v.get("usage").map(anthropic::usage_of);
            let (o, _) = anthropic::response_to_openai(&v, ctx.model().unwrap_or(""));
            (body, usage, o)
        }
        // Not cached: the provider keeps its own state for these.
        Translate::ResponsesNative => {
            if let Some(id) = v["id"].as_str() {
                crate::pipeline::responses::own(x.shared, ctx, x.req, id);
            }
            (body, responses::usage_of(&v), Value::Null)
        }
    };
    // The client's shape, where the provider spoke another.
    match (x.req.endpoint, x.translate) {
        (Endpoint::Messages, Translate::OpenAi) => {
            let m = messages::response_from_chat(&chat, &x.req.model);
            out = serde_json::to_vec(&m).unwrap_or_default();
        }
        (Endpoint::Responses, Translate::OpenAi | Translate::Anthropic) => {
            if let Some(r) = x.req.responses.as_deref() {
                let resp = responses::response_from_chat(&chat, &r.id, r.created_at, &r.original);
                crate::pipeline::responses::keep(x.shared, ctx, x.req, &resp);
                out = serde_json::to_vec(&resp).unwrap_or_default();
            }
        }
        _ => {}
    }
    let usage = match usage {
        Some(u) => Some(u),
        None => {
            ctx.usage_estimated = true;
            Some(Usage {
                tier: smartllm_protocol::usage::ServiceTier::of(&chat, "service_tier"),
                ..estimate_usage(x.req, completion_text(&chat)).await
            })
        }
    };
    record_usage(ctx, usage);
    if let Some(pending) = ctx.cache_insert.take() {
        // An answer cut at the model's own limit (no max tokens asked for)
        // is not stored; one cut at the client's own limit is (it is keyed).
        if !ctx.cut_off && chat.get("choices").is_some_and(Value::is_array) {
            // The provider's own bytes where they are the chat answer (no
            // re-serialising); the canonical answer otherwise.
            let same =
                x.translate == Translate::OpenAi && x.req.endpoint == Endpoint::ChatCompletions;
            pending.spawn(if same {
                String::from_utf8_lossy(&out).into_owned()
            } else {
                chat.to_string()
            });
        }
    }
    crate::pipeline::finish::settle_budget(x.shared, ctx);
    match respond::json(session, ctx, 200, out, &x.passthrough).await {
        Ok(()) => Attempt::Done,
        Err(_) => client_gone(ctx),
    }
}
