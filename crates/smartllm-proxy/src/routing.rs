//! The routing phase of a request on a routed alias: the prompt's embedding
//! (the cache's, when it computed one), features, live model state, budget
//! pressure, and the router's decision, recorded in the context and metrics.

use crate::ctx::Ctx;
use crate::runtime::{ModelPool, Runtime};
use crate::Shared;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_config::RouteConfig;
use smartllm_protocol::ParsedRequest;
use smartllm_router::metric_names as m;
use smartllm_router::{Decision, LiveSnapshot, ModelState, RequestInfo};
use std::time::Instant;

/// Live view of models for the router: health checks, circuit breakers, EWMAs.
pub struct GatewayState<'a> {
    pub shared: &'a Shared,
    pub rt: &'a Runtime,
}

/// The circuit breaker id of a deployment.
pub fn deployment_id(provider: &str, addr: &impl std::fmt::Display) -> String {
    format!("{provider}/{addr}")
}

/// Any deployment of the pool is healthy (or unchecked) and its circuit lets traffic through.
pub fn pool_available(shared: &Shared, pool: &ModelPool) -> bool {
    let backends = pool.lb.backends();
    let all = backends.get_backend();
    all.iter().any(|b| {
        let healthy = backends.ready(b);
        healthy
            && pool.deployment_for(b).is_none_or(|d| {
                shared.breakers.is_available(
                    &deployment_id(d.provider.name(), &b.addr),
                    &d.provider.cfg.circuit_breaker,
                )
            })
    })
}

impl ModelState for GatewayState<'_> {
    fn live(&self, model: &str) -> Option<LiveSnapshot> {
        self.shared.profiles.get(model)
    }
    fn available(&self, model: &str) -> bool {
        self.rt
            .pool(model)
            .is_some_and(|p| pool_available(self.shared, p))
    }
}

/// Headers the rules may look at (never credentials).
fn rule_headers(session: &Session) -> Vec<(String, String)> {
    session
        .req_header()
        .headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            n != "authorization" && n != "x-api-key" && n != "cookie" && n != "proxy-authorization"
        })
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Embed the prompt unless `embedding` is given (and the route can use one),
/// extract features and decide.
pub async fn decide_with(
    shared: &Shared,
    rt: &Runtime,
    body: &serde_json::Map<String, Value>,
    route: &RouteConfig,
    mut embedding: Option<Vec<f32>>,
    info: &RequestInfo<'_>,
) -> (Decision, smartllm_router::Features) {
    if embedding.is_none() && rt.router.wants_embedding(&route.strategy) {
        let (last_user, _, _, _) = smartllm_router::features::prompt_texts(body);
        if let (Some(e), false) = (&shared.components.embedder, last_user.trim().is_empty()) {
            match e.embed(vec![last_user]).await {
                Ok(mut v) => embedding = v.pop(),
                Err(err) => {
                    tracing::warn!(error = %err, "embedding for routing failed; classifying by keywords")
                }
            }
        }
    }
    let t = Instant::now();
    let features =
        smartllm_router::extract(body, embedding.as_deref(), rt.router.classifier.as_deref());
    let d = smartllm_router::decide(
        &rt.config,
        route,
        &features,
        rt.router.learned_for(&route.strategy),
        embedding.as_deref(),
        info,
        &GatewayState { shared, rt },
    );
    metrics::histogram!(m::DECISION_SECONDS).record(t.elapsed().as_secs_f64());
    (d, features)
}

pub async fn decide(
    shared: &Shared,
    session: &Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &ParsedRequest,
    route: &RouteConfig,
) -> Decision {
    // One embedding per request: the cache's when it made one.
    let embedding = ctx.cache_insert.as_ref().and_then(|p| p.embedding.clone());
    let info = RequestInfo {
        headers: rule_headers(session),
        tenant: &ctx.tenant,
        app: &ctx.app,
        key: &ctx.key_name,
        user: req.body.get("user").and_then(Value::as_str),
        budget_pressure: shared.budgets.pressure(&rt.config.keys.budgets, ctx),
    };
    let (d, features) = decide_with(shared, rt, &req.body, route, embedding, &info).await;
    metrics::counter!(m::DECISIONS, "route" => route.name.clone(), "model" => d.model.clone(), "reason" => d.reason.clone()).increment(1);
    tracing::debug!(request_id = %ctx.request_id, route = %route.name, model = %d.model, reason = %d.reason,
        task = %features.task, complexity = features.complexity, fallbacks = ?d.fallbacks, "route decision");
    ctx.route_reason = d.reason.clone();
    ctx.experiment = d.experiment.clone();
    ctx.task = Some(features.task.as_str());
    ctx.complexity = Some(features.complexity);
    d
}

/// Task and complexity of a request on a fixed model (no routing decision),
/// for the ledger's traffic mix: the features of the prompt, with the
/// cache's embedding when it made one (keywords otherwise). Microseconds.
pub fn classify(ctx: &mut Ctx, rt: &Runtime, req: &ParsedRequest) {
    if req.endpoint != smartllm_protocol::Endpoint::ChatCompletions {
        return;
    }
    let embedding = ctx
        .cache_insert
        .as_ref()
        .and_then(|p| p.embedding.as_deref());
    let f = smartllm_router::extract(&req.body, embedding, rt.router.classifier.as_deref());
    ctx.task = Some(f.task.as_str());
    ctx.complexity = Some(f.complexity);
}
