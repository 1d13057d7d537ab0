//! The upstream request of an attempt: path, headers (host, key, trace
//! context when tracing is off, provider headers) and body, translated for the provider.

use super::Translate;
use crate::ctx::Ctx;
use crate::runtime::{DeploymentRuntime, ModelPool};
use bytes::Bytes;
use http::HeaderValue;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use smartllm_config::{ProviderKind, TokenLimitField};
use smartllm_protocol::anthropic;
use smartllm_protocol::{ApiError, Endpoint, ParsedRequest};

pub(super) struct Prepared {
    pub header: RequestHeader,
    pub body: Bytes,
    pub translate: Translate,
    /// The provider key sent, to scrub from anything the provider echoes back.
    pub key: Option<String>,
    /// The built-in tools left out for this provider (`drop_builtin_tools`),
    /// for `x-smartllm-dropped-tools`.
    pub dropped_tools: Option<String>,
}

pub(super) fn build(
    req: &ParsedRequest,
    dep: &DeploymentRuntime,
    pool: &ModelPool,
    key: Option<&str>,
    session: &Session,
    ctx: &Ctx,
) -> Result<Prepared, ApiError> {
    let p = &dep.provider;
    // A conversation the gateway does not keep goes only to a provider that
    // may (one that speaks Responses).
    let previous_unknown = req.responses.as_deref().and_then(|r| {
        r.previous_response_id
            .as_deref()
            .filter(|_| r.previous.is_none())
    });
    // A Responses feature no translation carries: only a provider that
    // speaks Responses may take the request.
    let untranslatable = req
        .responses
        .as_deref()
        .and_then(|r| r.untranslatable.as_ref());
    // Built-in tools alone stand in the way, and this provider drops them:
    // it is sent the translation without them.
    let dropped_tools = req
        .responses
        .as_deref()
        .filter(|r| {
            r.untranslatable.is_some() && !r.builtin_tools.is_empty() && p.cfg.drop_builtin_tools
        })
        .map(|r| r.builtin_tools.join(", "));
    let untranslatable = untranslatable.filter(|_| dropped_tools.is_none());
    // The token limit's name: the provider's, else `max_completion_tokens`
    // for a reasoning model (OpenAI's refuse `max_tokens` wherever they are
    // served), else as the client gave it.
    let limit_field = p
        .cfg
        .max_tokens_field
        .map(TokenLimitField::as_str)
        .or(
            (pool.reasoning || smartllm_config::openai_reasoning_model(&dep.upstream_model))
                .then_some("max_completion_tokens"),
        );
    let (path, body, translate) = match p.cfg.kind {
        ProviderKind::OpenAi
            if req.endpoint == Endpoint::Responses
                && p.cfg.responses
                && req.responses.as_deref().is_none_or(|r| {
                    // Another tenant's id (or none the gateway saw) never
                    // reaches the provider that keeps all tenants' answers.
                    r.previous.is_none() && (r.previous_response_id.is_none() || r.native_owned)
                }) =>
        {
            let raw = req.native.clone().unwrap_or_default();
            let mut body =
                smartllm_protocol::messages::splice_model_bytes(&raw, &dep.upstream_model)
                    .ok_or_else(|| ApiError::internal("the request body lost its model"))?;
            // `reasoning` to a model listed without the capability (it
            // would answer 400): left out, as `reasoning_effort` is in chat;
            // and the sampling settings a reasoning model refuses.
            let leave_out: &[&str] = match (
                pool.no_reasoning,
                smartllm_config::openai_reasoning_model(&dep.upstream_model),
            ) {
                (true, true) => &["reasoning", "temperature", "top_p"],
                (true, false) => &["reasoning"],
                (false, true) => REASONING_REFUSES,
                (false, false) => &[],
            };
            for k in leave_out {
                if let Some(b) = smartllm_protocol::messages::remove_top_level(&body, k) {
                    body = b.into();
                }
            }
            (
                format!("{}/responses", p.url.path),
                body,
                Translate::ResponsesNative,
            )
        }
        _ if previous_unknown.is_some() => {
            return Err(smartllm_protocol::responses::previous_response_not_found(
                previous_unknown.unwrap_or_default(),
            ));
        }
        _ if untranslatable.is_some() => {
            return Err(untranslatable.cloned().unwrap_or_else(|| {
                ApiError::internal("a Responses request that cannot be translated")
            }));
        }
        ProviderKind::OpenAi if req.endpoint.is_anthropic() => {
            if req.endpoint == Endpoint::MessagesCountTokens {
                return Err(ApiError::internal(
                    "count_tokens is answered by the gateway for OpenAI-compatible providers",
                ));
            }
            let only = &req.anthropic_only;
            if let Some(what) = &only.untranslatable {
                return Err(ApiError::invalid_request(
                    "unsupported_for_provider",
                    format!(
                        "Model '{}' is served by '{}', an OpenAI-compatible provider, which cannot take {what}: only Anthropic providers can.",
                        req.model, p.name()
                    ),
                ));
            }
            if only.thinking && !p.cfg.drop_thinking && !pool.reasoning {
                return Err(ApiError::invalid_request(
                    "thinking_unsupported",
                    format!(
                        "Model '{}' is served by '{}', an OpenAI-compatible provider, which does not take Anthropic thinking blocks. Remove `thinking` (and thinking blocks from the history), use an Anthropic model, or set `drop_thinking: true` on the provider to drop them.",
                        req.model, p.name()
                    ),
                ));
            }
            let mut body = req.upstream_body_without(
                &dep.upstream_model,
                p.cfg.stream_usage,
                limit_field,
                chat_leaves_out(pool, &dep.upstream_model),
            );
            // A reasoning model takes the thinking asked for as an effort
            // (the history's thinking blocks have no place in chat and are
            // left out, as with `drop_thinking`).
            if pool.reasoning {
                let effort = req
                    .native
                    .as_deref()
                    .and_then(|raw| smartllm_protocol::messages::top_level(raw, "thinking"))
                    .and_then(|t| smartllm_protocol::messages::effort_for_thinking(&t));
                if let Some(b) = effort.and_then(|e| {
                    smartllm_protocol::messages::set_top_level(
                        &body,
                        "reasoning_effort",
                        &serde_json::Value::from(e),
                    )
                }) {
                    body = b.into();
                }
            }
            (
                format!("{}{}", p.url.path, req.endpoint.upstream_suffix()),
                body,
                Translate::OpenAi,
            )
        }
        ProviderKind::OpenAi => (
            format!("{}{}", p.url.path, req.endpoint.upstream_suffix()),
            req.upstream_body_without(
                &dep.upstream_model,
                p.cfg.stream_usage,
                limit_field,
                chat_leaves_out(pool, &dep.upstream_model),
            ),
            Translate::OpenAi,
        ),
        ProviderKind::Anthropic if req.endpoint.is_anthropic() => {
            let raw = req.native.clone().unwrap_or_default();
            let mut body =
                smartllm_protocol::messages::splice_model_bytes(&raw, &dep.upstream_model)
                    .ok_or_else(|| ApiError::internal("the request body lost its model"))?;
            // Mid-conversation system messages: only models listed with
            // `system_messages` take them; for the others they join the
            // system prompt.
            if req.anthropic_only.system_messages && !pool.system_messages {
                if let Some(folded) = smartllm_protocol::messages::fold_system_messages(&body) {
                    body = folded.into();
                }
            }
            // A tool loop another model began (its tool call came back
            // without a thinking block): Claude refuses thinking there, so
            // this request goes without it.
            if req.anthropic_only.unsigned_tool_turn {
                if let Some(b) = smartllm_protocol::messages::remove_top_level(&body, "thinking") {
                    body = b.into();
                }
            }
            let suffix = if req.endpoint == Endpoint::MessagesCountTokens {
                "/messages/count_tokens"
            } else {
                "/messages"
            };
            (
                format!("{}{suffix}", p.url.path),
                body,
                Translate::AnthropicNative,
            )
        }
        ProviderKind::Anthropic => {
            if !req.endpoint.is_chat() {
                return Err(ApiError::invalid_request(
                    "unsupported_endpoint",
                    format!(
                        "Model '{}' is served by Anthropic, which has no {} endpoint; use /v1/chat/completions.",
                        req.model,
                        req.endpoint.upstream_suffix()
                    ),
                ));
            }
            let v = anthropic::request_to_anthropic(
                &req.body,
                &dep.upstream_model,
                req.stream,
                anthropic::Takes {
                    structured_outputs: pool.structured_outputs,
                    thinking: pool.thinking,
                    max_output_tokens: pool.max_output_tokens,
                },
                default_max_tokens(
                    pool.max_output_tokens,
                    pool.context_window,
                    ctx.prompt_tokens,
                ),
            )?;
            (
                format!("{}/messages", p.url.path),
                serde_json::to_vec(&v).unwrap_or_default().into(),
                Translate::Anthropic,
            )
        }
    };
    let body = match pool.max_output_tokens {
        Some(most) if asks_more_than(req, most) => clamp_limits(body, most),
        _ => body,
    };
    let internal = |e: pingora_error::BError| {
        ApiError::internal(format!("building the upstream request: {e}"))
    };
    let mut h = RequestHeader::build("POST", path.as_bytes(), Some(12)).map_err(internal)?;
    h.insert_header("host", p.url.host_header())
        .map_err(internal)?;
    // Static values and a number go in as they are (no copy, no check).
    const JSON: HeaderValue = HeaderValue::from_static("application/json");
    const SSE: HeaderValue = HeaderValue::from_static("text/event-stream");
    const AGENT: HeaderValue =
        HeaderValue::from_static(concat!("smartllm/", env!("CARGO_PKG_VERSION")));
    h.insert_header("content-type", JSON).map_err(internal)?;
    h.insert_header("content-length", HeaderValue::from(body.len()))
        .map_err(internal)?;
    h.insert_header("accept", if req.stream { SSE } else { JSON })
        .map_err(internal)?;
    h.insert_header("user-agent", AGENT).map_err(internal)?;
    h.insert_header("x-request-id", ctx.request_id.as_str())
        .map_err(internal)?;
    if ctx.trace.is_none() {
        // Tracing off: the client's trace context goes on as it came (with
        // tracing on, each attempt sends its own: see `otel`).
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = session.req_header().headers.get(name) {
                h.insert_header(name, v.clone()).map_err(internal)?;
            }
        }
    }
    match (p.cfg.kind, key) {
        (ProviderKind::OpenAi, Some(k)) => h
            .insert_header("authorization", format!("Bearer {k}"))
            .map_err(internal)?,
        (ProviderKind::Anthropic, Some(k)) => h.insert_header("x-api-key", k).map_err(internal)?,
        (_, None) => {}
    }
    if p.cfg.kind == ProviderKind::Anthropic {
        // An Anthropic client's own version and betas go through (Claude
        // Code's features depend on them); otherwise the provider's setting.
        let client = &session.req_header().headers;
        let version = client
            .get("anthropic-version")
            .filter(|_| translate == Translate::AnthropicNative);
        match version {
            Some(v) => h.insert_header("anthropic-version", v.clone()),
            None => h.insert_header("anthropic-version", p.cfg.anthropic_version.as_str()),
        }
        .map_err(internal)?;
        if translate == Translate::AnthropicNative {
            for v in client.get_all("anthropic-beta") {
                h.append_header("anthropic-beta", v.clone())
                    .map_err(internal)?;
            }
        }
    }
    for (k, v) in &p.cfg.headers {
        h.insert_header(k.clone(), v.as_str()).map_err(internal)?;
    }
    Ok(Prepared {
        header: h,
        body,
        translate,
        key: key.map(str::to_string),
        // (A provider that speaks Responses was sent them, and runs them.)
        dropped_tools: dropped_tools.filter(|_| translate != Translate::ResponsesNative),
    })
}

/// Sampling settings OpenAI's reasoning models (o-series, GPT-5:
/// [`smartllm_config::openai_reasoning_model`]) answer 400 to, in chat and
/// in Responses. They only shape how tokens are drawn, so such a model gets
/// the request without them (what it cannot give at all, `stop`,
/// log-probabilities and `logit_bias`, keeps it out of a routed choice
/// instead: `reasoning_refuses:`). Other models that reason (gpt-oss,
/// Qwen3 behind vLLM) take them and get them.
const REASONING_REFUSES: &[&str] = &[
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
];

/// What a chat request to `pool`'s OpenAI-compatible deployment serving
/// `upstream` goes without: `reasoning_effort` for a model listed without
/// `reasoning` (it would answer 400; listed with nothing, sent as given),
/// the sampling settings for one of OpenAI's reasoning models.
fn chat_leaves_out(pool: &ModelPool, upstream: &str) -> &'static [&'static str] {
    match (
        pool.no_reasoning,
        smartllm_config::openai_reasoning_model(upstream),
    ) {
        // (An o-series model listed without `reasoning`: both.)
        (true, true) => &[
            "reasoning_effort",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
        ],
        (true, false) => &["reasoning_effort"],
        (false, true) => REASONING_REFUSES,
        (false, false) => &[],
    }
}

/// The limit a Chat Completions request without one is sent to Anthropic
/// with (which needs one): as long as the model writes, as on OpenAI, but
/// within what its context window leaves the prompt, counted at twice its
/// estimate (two bytes a token of text, as a bound: Anthropic refuses
/// prompt + max_tokens over the window; images per image, not per byte of
/// their base64); never under [`anthropic::DEFAULT_MAX_TOKENS`], the limit
/// before the model's own was known.
fn default_max_tokens(most: Option<u64>, context_window: u64, prompt_tokens: u64) -> u64 {
    let Some(most) = most else {
        return anthropic::DEFAULT_MAX_TOKENS;
    };
    let left = context_window.saturating_sub(prompt_tokens.saturating_mul(2));
    most.min(left).max(anthropic::DEFAULT_MAX_TOKENS.min(most))
}

/// The output-limit fields of every API (Chat Completions' two, Messages'
/// `max_tokens`, Responses' `max_output_tokens`).
const LIMIT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Whether the request asks for more output tokens than `most` (read from the
/// parsed body; the raw body is scanned only then).
pub(super) fn asks_more_than(req: &ParsedRequest, most: u64) -> bool {
    let over = |b: &serde_json::Map<String, serde_json::Value>| {
        LIMIT_FIELDS.iter().any(|f| {
            b.get(*f)
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|n| n > most)
        })
    };
    over(&req.body)
}

/// `body` with each output limit above `most` lowered to it. Every API reads
/// its limit as a cap, so the answer is what the model would write anyway;
/// the model's own limit is never a 400.
fn clamp_limits(body: Bytes, most: u64) -> Bytes {
    use smartllm_protocol::messages::{clamp_top_level, set_top_level, top_level};
    let mut out = body;
    for field in LIMIT_FIELDS {
        if let Some(b) = clamp_top_level(&out, field, most) {
            out = b.into();
        }
    }
    // Anthropic's thinking budget must stay under the limit (and at or
    // above its minimum, 1,024: below that the request goes as it was).
    if let Some(mut thinking) = top_level(&out, "thinking") {
        let budget = thinking
            .get("budget_tokens")
            .and_then(serde_json::Value::as_u64);
        if budget.is_some_and(|b| b >= most) && most > 1024 {
            thinking["budget_tokens"] = serde_json::Value::from(most.saturating_sub(1));
            if let Some(b) = set_top_level(&out, "thinking", &thinking) {
                out = b.into();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::default_max_tokens;

    #[test]
    fn no_limit_asked_is_the_models_own_within_its_window() {
        // Unknown: the old default.
        assert_eq!(default_max_tokens(None, 200_000, 100), 4096);
        // A short prompt: the model's most.
        assert_eq!(default_max_tokens(Some(64_000), 200_000, 1_000), 64_000);
        // A long one (estimated 75k tokens, counted twice as a bound): what
        // the window leaves, never under 4096.
        assert_eq!(default_max_tokens(Some(64_000), 200_000, 75_000), 50_000);
        assert_eq!(default_max_tokens(Some(64_000), 200_000, 100_000), 4096);
        // A model whose own most is under 4096 keeps it.
        assert_eq!(default_max_tokens(Some(1_024), 200_000, 100_000), 1_024);
        // A screenshot (estimated per image) leaves the model its most.
        let shot = format!("{{\"image\": \"{}\"}}", "A".repeat(4 << 20));
        let tokens = smartllm_quota::images::estimate_body_tokens(shot.as_bytes());
        assert_eq!(default_max_tokens(Some(64_000), 200_000, tokens), 64_000);
    }
}
