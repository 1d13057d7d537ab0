//! Request handling: dispatch by path, read the bounded body, validate, resolve
//! the model, and hand over to the upstream exchange.

use crate::ctx::Ctx;
use crate::{respond, upstream, Shared};
use bytes::BytesMut;
use pingora_proxy::Session;
use serde_json::json;
use smartllm_protocol::{parse_request, ApiError, Endpoint};
use std::time::Duration;

pub async fn handle(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
) -> pingora_error::Result<()> {
    let method = session.req_header().method.as_str().to_string();
    let path = session.req_header().uri.path().to_string();
    let rt = ctx.runtime();
    let header_size = {
        let h = session.req_header();
        // Without allocating: the request line's parts, the header lines.
        method.len()
            + h.uri.authority().map_or(0, |a| a.as_str().len())
            + h.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + 12
            + h.headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
    };
    if header_size as u64 > rt.config.server.max_header_bytes {
        let err = ApiError::header_too_large(header_size, rt.config.server.max_header_bytes);
        ctx.status = err.status;
        session.set_keepalive(None);
        return respond::error(session, ctx, &err).await;
    }
    if let Err(err) = crate::auth::authenticate(session, ctx, &rt) {
        ctx.status = err.status;
        // Unread body: do not reuse the connection.
        session.set_keepalive(None);
        return respond::error(session, ctx, &err).await;
    }
    let result = match (method.as_str(), path.trim_end_matches('/')) {
        ("GET", "/v1/models") | ("GET", "/models") => {
            ctx.endpoint = "models";
            return models(session, ctx, None).await;
        }
        ("GET", p) if p.starts_with("/v1/models/") => {
            ctx.endpoint = "models";
            let id = p.trim_start_matches("/v1/models/").to_string();
            return models(session, ctx, Some(id)).await;
        }
        (m, p) => match Endpoint::from_path(p) {
            Some(endpoint) if m == "POST" => {
                ctx.endpoint = endpoint.as_str();
                api(shared, session, ctx, endpoint).await
            }
            Some(_) => Err(ApiError::method_not_allowed(m, p, "POST")),
            None if p == "/v1/models" || p == "/models" => {
                Err(ApiError::method_not_allowed(m, p, "GET"))
            }
            None => Err(ApiError::not_found_path(m, p)),
        },
    };
    match result {
        Ok(()) => Ok(()),
        Err(err) => {
            if ctx.status == 0 {
                ctx.status = err.status;
            }
            respond::error(session, ctx, &err).await
        }
    }
}

async fn models(
    session: &mut Session,
    ctx: &mut Ctx,
    id: Option<String>,
) -> pingora_error::Result<()> {
    let rt = ctx.runtime();
    let cfg = &rt.config;
    let mut data: Vec<serde_json::Value> = cfg
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}))
        .collect();
    data.extend(
        cfg.routes
            .values()
            .map(|r| json!({"id": r.name, "object": "model", "created": 0, "owned_by": "smartllm-route", "route_to": r.model})),
    );
    match id {
        None => {
            let body =
                serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
            respond::json(session, ctx, 200, body, &[]).await
        }
        Some(id) => match data.into_iter().find(|m| m["id"] == id.as_str()) {
            Some(m) => {
                respond::json(
                    session,
                    ctx,
                    200,
                    serde_json::to_vec(&m).unwrap_or_default(),
                    &[],
                )
                .await
            }
            None => {
                let err = ApiError::model_not_found(&id, &rt.known_models);
                respond::error(session, ctx, &err).await
            }
        },
    }
}

/// Read the request body, refusing more than `limit` bytes (413), bodies
/// that stall longer than `stall` between chunks, and bodies that take longer
/// than `total` however steadily they trickle (408: slowloris bodies).
async fn read_body(
    session: &mut Session,
    limit: u64,
    stall: Duration,
    total: Duration,
) -> Result<BytesMut, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(4096).min(limit) as usize);
    let deadline = tokio::time::Instant::now() + total;
    loop {
        let now = tokio::time::Instant::now();
        let (wait, key) = if deadline.saturating_duration_since(now) < stall {
            (
                deadline.saturating_duration_since(now),
                "server.client_body_deadline",
            )
        } else {
            (stall, "server.client_body_timeout")
        };
        match tokio::time::timeout(wait, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => {
                if body.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ApiError::payload_too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Ok(body),
            Ok(Err(e)) => {
                return Err(ApiError::invalid_request(
                    "body_read_error",
                    format!("The request body could not be read: {e}."),
                ))
            }
            Err(_) => {
                ::metrics::counter!(crate::metrics::CLIENT_TIMEOUTS, "phase" => "body")
                    .increment(1);
                // The rest of the body is still on the wire: no reuse.
                session.set_keepalive(None);
                let message = if key == "server.client_body_deadline" {
                    format!(
                        "The request body did not arrive within {} of its headers ({key}).",
                        humantime(total)
                    )
                } else {
                    format!(
                        "The request body stalled for more than {} ({key}).",
                        humantime(stall)
                    )
                };
                return Err(ApiError::new(
                    408,
                    "invalid_request_error",
                    "request_timeout",
                    message,
                ));
            }
        }
    }
}

async fn api(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    endpoint: Endpoint,
) -> Result<(), ApiError> {
    let rt = ctx.runtime();
    let cfg = &rt.config;
    if let Some(ct) = session
        .req_header()
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
    {
        let ct = ct.to_ascii_lowercase();
        // JSON is what every endpoint here takes (a request without a
        // Content-Type is read as JSON too). Anything else, form posts and
        // multipart (the audio and files APIs) included, gets a clear 415
        // rather than a confusing parse error.
        let media = ct.split(';').next().unwrap_or("").trim();
        let json = media.is_empty()
            || media == "application/json"
            || media == "text/json"
            || media.ends_with("+json");
        if !json {
            // The body is not read: the connection cannot be reused.
            session.set_keepalive(None);
            return Err(ApiError::unsupported_media_type(&ct));
        }
    }
    let body = read_body(
        session,
        cfg.server.max_body_bytes,
        cfg.server.client_body_timeout,
        cfg.server.client_body_deadline,
    )
    .await?;
    ctx.request_bytes = body.len();
    // Rate limits: one request and the estimated prompt (about 4 bytes a token).
    let scopes = crate::limits_for(&rt, ctx);
    if !scopes.is_empty() {
        let estimate = (body.len() as u64).div_ceil(4);
        let scopes: Vec<(&str, smartllm_config::Limits)> =
            scopes.iter().map(|(s, l)| (s.as_str(), *l)).collect();
        let admitted = crate::limits::admit(shared, &cfg.fleet, &scopes, estimate).await;
        tracing::debug!(request_id = %ctx.request_id, ?scopes, estimate, admitted = admitted.is_ok(), "rate limit decision");
        admitted?;
        ctx.precharged_tokens = estimate;
    }
    let mut req = parse_request(endpoint, &body)?;
    drop(body);
    ctx.stream = req.stream;
    let Some((mut model, route)) = cfg.resolve_model(&req.model) else {
        return Err(ApiError::model_not_found(&req.model, &rt.known_models));
    };
    ctx.route = route.map(|r| r.name.clone());
    let routed = route.filter(|r| r.is_routed());
    if routed.is_none() {
        ctx.model = Some(model.name.clone());
    }
    crate::auth::authorize_model(
        ctx,
        &req.model,
        if routed.is_some() {
            &req.model
        } else {
            &model.name
        },
    )?;
    // The cache first: a hit costs nothing, whatever the budget. A routed alias
    // is cached under its own name (the model is chosen only on a miss).
    if routed.is_some() {
        ctx.route_reason = "cache".into();
    }
    let served = crate::cache::phase(
        shared,
        session,
        ctx,
        &rt,
        &req,
        routed.map_or(model.name.as_str(), |r| r.name.as_str()),
        route.map(|r| r.name.as_str()),
    )
    .await
    .map_err(|e| ApiError::internal(format!("answering from the cache: {e}")))?;
    if served {
        return Ok(());
    }
    // Models to try in order: the choice, then its fallbacks.
    let mut fallbacks: Vec<String> = Vec::new();
    if let Some(r) = routed {
        let d = crate::routing::decide(shared, session, ctx, &rt, &req, r).await;
        model = cfg.model(&d.model).ok_or_else(|| {
            ApiError::internal(format!("the router chose an unknown model {}", d.model))
        })?;
        fallbacks = d.fallbacks;
    } else {
        crate::routing::classify(ctx, &rt, &req);
        if let Some(r) = route {
            fallbacks = r.fallback.iter().take(r.max_fallbacks).cloned().collect();
        }
    }
    ctx.model = Some(model.name.clone());
    if let Some(p) = ctx.cache_insert.as_mut() {
        p.model = model.name.clone();
    }
    // Budgets: the estimated cost of this request (prompt at ~4 bytes a token,
    // plus max_tokens of output when given) must fit.
    if !cfg.keys.budgets.is_empty() {
        let p = &model.pricing;
        let max_out = req
            .body
            .get("max_completion_tokens")
            .or_else(|| req.body.get("max_tokens"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let estimate = (ctx.request_bytes as f64 / 4.0) * p.input_per_1m / 1e6
            + max_out as f64 * p.output_per_1m / 1e6
            + p.per_request;
        shared
            .budgets
            .refresh(shared, &cfg.fleet, &cfg.keys.budgets, ctx)
            .await?;
        if let Some(ex) = shared.budgets.check(&cfg.keys.budgets, ctx, estimate) {
            match &ex.budget.on_exceed {
                smartllm_config::OnExceed::Degrade(target)
                    if cfg
                        .resolve_model(target)
                        .is_some_and(|(m, _)| m.name != model.name) =>
                {
                    let (m, _) = cfg.resolve_model(target).expect("checked above");
                    metrics::counter!(crate::budget::METRIC_EXCEEDED, "budget" => ex.budget.id(), "action" => "degrade").increment(1);
                    tracing::info!(request_id = %ctx.request_id, budget = %ex.budget.id(), from = %model.name, to = %m.name, "budget exhausted: serving a cheaper model");
                    model = m;
                    fallbacks.clear();
                    ctx.route = Some(ctx.route.clone().unwrap_or_else(|| req.model.clone()));
                    ctx.route_reason = "budget".into();
                    ctx.model = Some(model.name.clone());
                    if let Some(p) = ctx.cache_insert.as_mut() {
                        p.model = model.name.clone();
                    }
                }
                smartllm_config::OnExceed::Degrade(_) => {}
                smartllm_config::OnExceed::Reject => {
                    metrics::counter!(crate::budget::METRIC_EXCEEDED, "budget" => ex.budget.id(), "action" => "reject").increment(1);
                    return Err(crate::budget::exceeded_error(&ex));
                }
            }
        }
    }
    let mut chain = vec![model.name.clone()];
    chain.extend(fallbacks.into_iter().filter(|m| *m != model.name));
    if let Some((cap, budget)) = crate::budget::request_cap(&cfg.keys.budgets, ctx) {
        apply_cost_cap(ctx, cfg, &mut req, &mut chain, cap, budget).await?;
    }
    upstream::forward(shared, session, ctx, &rt, &req, &chain).await
}

/// A per-request cost cap: drop the models of the chain whose prompt alone
/// would pass it, and lower the request's max tokens so that the prompt (at an
/// upper bound of its tokens) plus the whole answer cannot cost more than the
/// cap on any model left. An answer the cap cut short is not cached.
async fn apply_cost_cap(
    ctx: &mut Ctx,
    cfg: &smartllm_config::Config,
    req: &mut smartllm_protocol::ParsedRequest,
    chain: &mut Vec<String>,
    cap: f64,
    budget: &smartllm_config::Budget,
) -> Result<(), ApiError> {
    let bound = crate::budget::prompt_token_bound(req, ctx.request_bytes).await;
    match crate::budget::fit_cap(cfg, chain, bound, cap) {
        crate::budget::CapFit::TooExpensive { cheapest } => {
            metrics::counter!(crate::budget::METRIC_COST_CAP, "budget" => budget.id(), "action" => "reject").increment(1);
            Err(ApiError::invalid_request(
                "request_cost_cap_exceeded",
                format!(
                    "This request's prompt (up to {bound} tokens) alone would cost up to ${cheapest:.6} on '{}', more than the ${cap} per-request cap of {} '{}'. Send a shorter prompt.",
                    chain.first().map_or("-", String::as_str),
                    budget.scope.as_str(),
                    budget.name
                ),
            ))
        }
        crate::budget::CapFit::Fits {
            chain: kept,
            max_output,
        } => {
            if kept.first() != chain.first() {
                ctx.route_reason = "cost_cap".into();
                ctx.model = kept.first().cloned();
                if let Some(p) = ctx.cache_insert.as_mut() {
                    p.model = kept[0].clone();
                }
            }
            *chain = kept;
            let field = if req.body.contains_key("max_completion_tokens") {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            let asked = req.body.get(field).and_then(serde_json::Value::as_u64);
            let Some(max_output) = max_output else {
                return Ok(());
            };
            if asked.is_none_or(|a| a > max_output) {
                tracing::debug!(request_id = %ctx.request_id, cap, asked, max_output, prompt_bound = bound, "per-request cost cap lowers max tokens");
                metrics::counter!(crate::budget::METRIC_COST_CAP, "budget" => budget.id(), "action" => "capped").increment(1);
                req.body.insert(field.into(), serde_json::json!(max_output));
                if let Some(p) = ctx.cache_insert.as_mut() {
                    p.cost_capped = true;
                }
            }
            Ok(())
        }
    }
}

/// `1.5s`, `30s`, `250ms`: durations as a person reads them in an error.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
