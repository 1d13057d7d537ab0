//! End of request: one JSON access-log line and the request metrics. The line
//! carries no secrets: no headers, no bodies, no keys.

use crate::ctx::Ctx;
use crate::metrics;
use pingora_error::Error;
use pingora_proxy::Session;

/// The ledger's price for a model's resolved price (models.yaml or catalog).
pub fn price(p: &smartllm_config::ModelPrice) -> smartllm_ledger::Price {
    smartllm_ledger::Price {
        input_per_1m: p.input_per_1m,
        output_per_1m: p.output_per_1m,
        cached_input_per_1m: p.cache_read_per_1m,
        cache_write_5m_per_1m: p.cache_write_5m_per_1m,
        cache_write_1h_per_1m: p.cache_write_1h_per_1m,
        reasoning_per_1m: p.reasoning_per_1m,
        audio_input_per_1m: p.audio_input_per_1m,
        audio_output_per_1m: p.audio_output_per_1m,
        per_request: p.per_request,
        web_search_per_1k: p.web_search_per_1k,
        long_context: p.long_context.map(|l| smartllm_ledger::LongContext {
            above_tokens: l.above_tokens,
            input_per_1m: l.input_per_1m,
            output_per_1m: l.output_per_1m,
            cached_input_per_1m: l.cache_read_per_1m,
            cache_write_5m_per_1m: l.cache_write_5m_per_1m,
            cache_write_1h_per_1m: l.cache_write_1h_per_1m,
        }),
    }
}

/// The ledger's price for `u`, served on the tier it names: the model's
/// price scaled by that tier's multiplier.
pub fn price_for(
    p: &smartllm_config::ModelPrice,
    u: &smartllm_protocol::Usage,
) -> smartllm_ledger::Price {
    use smartllm_protocol::usage::ServiceTier;
    let base = price(p);
    match u.tier {
        ServiceTier::Standard => base,
        ServiceTier::Flex => base.scaled(p.service_tiers.flex),
        ServiceTier::Priority => base.scaled(p.service_tiers.priority),
    }
}

pub fn tokens(u: &smartllm_protocol::Usage) -> smartllm_ledger::Tokens {
    smartllm_ledger::Tokens {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
        cached: u.cached_tokens,
        cache_write: u.cache_write_tokens,
        cache_write_1h: u.cache_write_1h_tokens,
        reasoning: u.reasoning_tokens,
        audio_in: u.audio_prompt_tokens,
        audio_out: u.audio_completion_tokens,
        web_searches: u.web_searches,
    }
}

/// What the request's usage costs at `mp`, in nano-dollars (0 without usage).
fn usage_cost_nanos(ctx: &Ctx, mp: &smartllm_config::ModelPrice) -> u64 {
    let used = ctx.usage.as_ref().map(tokens).unwrap_or_default();
    ctx.usage
        .as_ref()
        .map_or(0, |u| price_for(mp, u).cost_nanos(used))
}

/// The cost the ledger records for this request, in dollars, as
/// [`finish`] computes it (0 without a ledger, for a token count, or for a
/// model without a price).
pub fn request_cost_usd(ctx: &Ctx, ledger: Option<&smartllm_ledger::Ledger>) -> f64 {
    let counted = !matches!(
        ctx.endpoint,
        "messages_count_tokens" | "responses_input_tokens"
    );
    match (ledger, ctx.rt.as_ref(), ctx.model().filter(|_| counted)) {
        (Some(_), Some(rt), Some(model)) => rt
            .config
            .price(model)
            .map_or(0.0, |mp| usage_cost_nanos(ctx, mp) as f64 / 1e9),
        _ => 0.0,
    }
}

pub fn finish(
    session: &Session,
    e: Option<&Error>,
    ctx: &mut Ctx,
    ledger: Option<&smartllm_ledger::Ledger>,
) -> f64 {
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
    let model = ctx.model().unwrap_or("-");
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
    // The ledger: every API request that reached a model, upstream or cache
    // (token counts, which providers do not bill, are no requests of a model).
    let mut cost_usd = 0.0;
    let counted = !matches!(
        ctx.endpoint,
        "messages_count_tokens" | "responses_input_tokens"
    );
    let priced_model = ctx.model().filter(|_| counted);
    if let (Some(ledger), Some(rt), Some(model)) = (ledger, ctx.rt.as_ref(), priced_model) {
        if let Some(mp) = rt.config.price(model) {
            if !mp.is_priced() && ctx.usage.is_some() {
                metrics::unpriced(model);
            }
            let used = ctx.usage.as_ref().map(tokens).unwrap_or_default();
            let cost_nanos = usage_cost_nanos(ctx, mp);
            // What a fresh answer would have cost at the list price (the
            // stored answer's tier says nothing of this request's).
            let saved_nanos = ctx
                .saved_usage
                .as_ref()
                .map(|u| price(mp).cost_nanos(tokens(u)))
                .unwrap_or(0);
            cost_usd = cost_nanos as f64 / 1e9;
            ledger.record(smartllm_ledger::Record {
                unix_secs: smartllm_ledger::now_secs(),
                tenant: ctx.tenant.clone(),
                app: ctx.app.clone(),
                key: ctx.key_name.clone(),
                model: model.to_string(),
                provider: ctx.provider.clone().unwrap_or_default(),
                route: ctx.route.clone().unwrap_or_default(),
                tag: ctx.tag.clone().unwrap_or_default(),
                tokens: used,
                cost_nanos,
                saved_nanos,
                // A stream that failed after its 200 (error_code set) is an error too.
                error: status >= 400 || status == 0 || ctx.error_code.is_some(),
                estimated: ctx.usage_estimated,
                mix: Some(smartllm_ledger::Mix {
                    task: ctx.task.unwrap_or("-").to_string(),
                    tier: ctx
                        .complexity
                        .map_or("-", smartllm_router::suggest::tier)
                        .to_string(),
                    cache: match ctx.cache_status {
                        Some(s) if s.starts_with("hit") => "hit",
                        Some("miss") if ctx.cache_near => "near",
                        Some("miss") => "miss",
                        Some(_) => "bypass",
                        None if ctx.endpoint == "chat_completions" => "off",
                        None => "-",
                    }
                    .to_string(),
                    route: ctx.route.clone().unwrap_or_default(),
                }),
            });
        }
    }
    let log_enabled = ctx
        .rt
        .as_ref()
        .is_none_or(|rt| rt.config.logging.access_log);
    if !log_enabled {
        return cost_usd;
    }
    let req = session.req_header();
    let usage = ctx.usage.unwrap_or_default();
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string());
    let user_agent = req
        .headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        // (`to_str` takes visible ASCII only: any byte is a boundary.)
        .map(|v| &v[..v.len().min(200)]);
    tracing::info!(
        target: "smartllm::access",
        request_id = %ctx.request_id,
        method = %req.method,
        path = %req.uri.path(),
        status,
        endpoint = ctx.endpoint,
        route,
        route_reason = %ctx.route_reason,
        experiment = ctx.experiment.as_ref().map(|(e, a)| format!("{e}={a}")),
        model,
        provider,
        upstream_model = ctx.upstream_model.as_deref().unwrap_or("-"),
        upstream_request_id = ctx.upstream_request_id.as_deref(),
        stream = ctx.stream,
        attempts = ctx.attempts,
        latency_ms = total.as_secs_f64() * 1000.0,
        ttft_ms = ctx.ttft.map(|t| t.as_secs_f64() * 1000.0),
        overhead_ms = overhead.map(|o| o * 1000.0),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens,
        cache_write_tokens = usage.cache_write_tokens,
        reasoning_tokens = usage.reasoning_tokens,
        service_tier = (usage.tier != smartllm_protocol::usage::ServiceTier::Standard)
            .then(|| usage.tier.as_str()),
        web_searches = (usage.web_searches > 0).then_some(usage.web_searches),
        dropped_tools = ctx.dropped_tools.as_deref(),
        tag = ctx.tag.as_deref().unwrap_or("-"),
        request_bytes = ctx.request_bytes,
        error = ctx.error_code.or(e.map(|e| e.etype().as_str())),
        client_gone = ctx.client_gone,
        cache = ctx.cache_status.unwrap_or("-"),
        tenant = %ctx.tenant,
        app = %ctx.app,
        key = %ctx.key_name,
        key_sha256 = ctx.key_sha256.as_deref(),
        client,
        user_agent,
        cost_usd,
        usage_estimated = ctx.usage_estimated,
        similarity = ctx.cache_similarity,
        verifier = ctx.cache_verifier,
        cache_refused = ctx.cache_refused,
        cache_namespace = ctx.cache_namespace.as_deref(),
        "request"
    );
    cost_usd
}
