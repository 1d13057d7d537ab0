//! The router's view of the gateway: live model state (health checks,
//! circuit breakers, EWMAs) and the decision on a prompt's features, shared by
//! the request path's route phase and the admin API's `route explain`.

use crate::runtime::{ModelPool, Runtime};
use crate::Shared;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_config::RouteConfig;
use smartllm_router::{Decision, LiveSnapshot, ModelState, RequestInfo};
use std::time::Instant;

/// Live view of models for the router: health checks, circuit breakers, EWMAs.
pub struct GatewayState<'a> {
    pub shared: &'a Shared,
    pub rt: &'a Runtime,
}

/// The circuit breaker id of a deployment: per model, provider and address,
/// so one model's overload (529) or rate limit does not open the circuit of
/// the provider's other models.
pub fn deployment_id(model: &str, provider: &str, addr: &impl std::fmt::Display) -> String {
    format!("{model}/{provider}/{addr}")
}

/// Any deployment of the pool is healthy (or unchecked) and its circuit lets traffic through.
pub fn pool_available(shared: &Shared, pool: &ModelPool) -> bool {
    let backends = pool.lb.backends();
    let all = backends.get_backend();
    all.iter().any(|b| {
        let healthy = backends.ready(b);
        healthy
            && pool.deployments_on(b, false).any(|(_, d, id)| {
                shared
                    .breakers
                    .is_available(id, &d.provider.cfg.circuit_breaker)
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
    fn quality(&self, tenant: &str, model: &str, task: smartllm_router::Task, prior: f64) -> f64 {
        self.shared.feedback.quality(tenant, model, task, prior)
    }
    fn votes(&self, tenant: &str, model: &str, task: smartllm_router::Task) -> f64 {
        // As the quality's mean counts them: faded outcome zeros weigh less.
        self.shared.feedback.weight_for(tenant, model, task)
    }
}

/// Headers the rules may look at (never credentials).
pub fn rule_headers(session: &Session) -> Vec<(String, String)> {
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
/// extract features and decide. `task_vector` is the prompt's view for the
/// task classifier when the cache's model run made one; without it the
/// classifier compares the embedding with its examples' whole-text views.
#[allow(clippy::too_many_arguments)]
pub async fn decide_with(
    shared: &Shared,
    rt: &Runtime,
    body: &serde_json::Map<String, Value>,
    route: &RouteConfig,
    mut embedding: Option<Vec<f32>>,
    mut task_vector: Option<Vec<f32>>,
    info: &RequestInfo<'_>,
    only: &smartllm_protocol::messages::AnthropicOnly,
    builtin_tools: &[String],
) -> (Decision, smartllm_router::Features) {
    if embedding.is_none() && rt.router.wants_embedding(&route.strategy) {
        let (last_user, _, _, _) = smartllm_router::features::prompt_texts(body);
        if let (Some(e), false) = (&shared.components.embedder, last_user.trim().is_empty()) {
            match e.embed_with_task(last_user, false).await {
                Ok((v, t, _)) => (embedding, task_vector) = (Some(v), Some(t)),
                Err(err) => {
                    tracing::warn!(error = %err, "embedding for routing failed; classifying by keywords")
                }
            }
        }
    }
    let t = Instant::now();
    // Without a task vector, the embedding's whole-text view (through the
    // model's task map, as the examples' views are).
    let whole = match (&task_vector, &embedding, &shared.components.embedder) {
        (None, Some(v), Some(e)) => Some(e.whole_task_view(v)),
        _ => None,
    };
    let mut features = smartllm_router::extract(
        body,
        task_vector
            .as_deref()
            .or(whole.as_deref())
            .or(embedding.as_deref()),
        rt.router.classifier.as_deref(),
    );
    // A Messages request with what only Anthropic providers take: models
    // served without one are no candidates (they would answer 400).
    features.thinking = only.thinking;
    features.anthropic_only = only.untranslatable.clone();
    // A Responses request whose built-in tools only a provider that speaks
    // Responses runs (or one set to drop them takes).
    features.builtin_tools = (!builtin_tools.is_empty()).then(|| builtin_tools.join(","));
    let d = smartllm_router::decide(
        &rt.config,
        route,
        &features,
        rt.router.learned_for(&route.strategy),
        embedding.as_deref(),
        info,
        &GatewayState { shared, rt },
    );
    crate::metrics::route_decision_seconds(t.elapsed().as_secs_f64());
    (d, features)
}
