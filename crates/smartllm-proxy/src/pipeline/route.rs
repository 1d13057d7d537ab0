//! Routing: the model that serves the request and the models to fall back
//! to. A routed alias asks the router (with the cache's embedding when it made
//! one); a fixed model is classified for the ledger's traffic mix. Then the
//! budgets may degrade the choice or refuse the request, and the per-request
//! cost cap may drop models and lower max tokens.

use super::parse::Parsed;
use crate::ctx::Ctx;
use crate::routing::{decide_with, rule_headers};
use crate::runtime::Runtime;
use crate::{metrics, Shared};
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_config::RouteConfig;
use smartllm_protocol::{ApiError, ParsedRequest};
use smartllm_quota::{cost_cap::CostCap, BudgetDecision};
use smartllm_router::{Decision, RequestInfo};

/// The models to try, in order: the choice, then its fallbacks.
pub async fn plan(
    shared: &Shared,
    session: &Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    request: &mut Parsed<'_>,
) -> Result<Vec<String>, ApiError> {
    let cfg = &rt.config;
    let mut model = request.model;
    let mut fallbacks: Vec<String> = Vec::new();
    let want = mode_for(request.req.endpoint);
    // (model, why): candidates the router may not serve this request with.
    let mut ruled_out: Vec<(String, String)> = Vec::new();
    if let Some(r) = request.routed {
        let narrowed;
        let r = match for_endpoint(rt, r, request.req.endpoint)? {
            Some(n) => {
                narrowed = n;
                &narrowed
            }
            None => r,
        };
        let d = decide(shared, session, ctx, rt, &request.req, r).await;
        if d.refused {
            return Err(ApiError::new(
                403,
                "permission_error",
                "no_model_allowed",
                format!(
                    "Route '{}': the rules that match this request exclude every model it could use.",
                    r.name
                ),
            )
            .with_param("model"));
        }
        model = cfg.model(&d.model).ok_or_else(|| {
            ApiError::internal(format!("the router chose an unknown model {}", d.model))
        })?;
        fallbacks = d.fallbacks;
        // What the route ruled out for this request (a rule, its context
        // window, a capability): a budget's cheaper model is held to it too.
        ruled_out = d
            .candidates
            .iter()
            .filter_map(|c| {
                let why = c.excluded.as_deref()?;
                hard_exclusion(why).then(|| (c.model.clone(), why.to_string()))
            })
            .collect();
    } else {
        classify(shared, ctx, rt, &request.req);
        if let Some(r) = request.route {
            // Each model once, never the alias's own, then the cap: a list
            // that starts with the model itself still has its fallbacks.
            let fits = |m: &String| cfg.model(m).is_some_and(|m| m.serves(want));
            for m in r.fallback.iter().filter(|m| fits(m)) {
                if fallbacks.len() < r.max_fallbacks && *m != model.name && !fallbacks.contains(m) {
                    fallbacks.push(m.clone());
                }
            }
        }
    }
    ctx.set_model(&model.name);
    // Budgets: the estimated cost of this request (prompt at ~4 bytes a token
    // of text, images per image,
    // plus max_tokens of output when given, else a typical answer for its
    // task) must fit.
    if !cfg.keys.budgets.is_empty() {
        // The larger of the two names when a body carries both.
        let max_out = ["max_completion_tokens", "max_tokens"]
            .iter()
            .filter_map(|f| request.req.body.get(*f).and_then(Value::as_u64))
            .max();
        // Each answer written (`n`, `best_of`, each prompt of a batch) is billed.
        let choices = smartllm_protocol::openai::answers_written(&request.req.body);
        // Images per image, not per byte of their base64 (a screenshot
        // would hold dollars of a budget while in flight).
        let prompt_tokens = ctx.prompt_tokens;
        // An embedding or a token count has no answer; one of unknown length is
        // estimated as a typical one for the task (held against a burst,
        // see `smartllm_quota::budget::Estimate`).
        let answers = request.req.endpoint.is_chat()
            || request.req.endpoint == smartllm_protocol::Endpoint::Completions;
        let typical = if answers {
            let task = ctx
                .task
                .and_then(smartllm_router::Task::parse)
                .unwrap_or(smartllm_router::Task::Chat);
            smartllm_router::features::typical_output(task, prompt_tokens)
        } else {
            0
        };
        // Priority processing asked for: its tokens cost the model's
        // multiplier (the cost cap reads it too).
        let priority =
            request.req.body.get("service_tier").and_then(Value::as_str) == Some("priority");
        // A per-request cap (`max_request_usd`) lowers the answer's limit
        // to fit it after this (`apply_cost_cap`), or refuses: what the
        // request can cost is never more than the cap.
        let request_cap =
            smartllm_quota::cost_cap::request_cap(&cfg.keys.budgets, ctx.scope()).map(|c| c.0);
        // No model answers more than its own limit, whatever was asked.
        let estimate = |m: &smartllm_config::ModelConfig| {
            let cap = m.profile.max_output_tokens.unwrap_or(u64::MAX);
            // Output may be all reasoning, where that is priced apart.
            let mut pricing = m.pricing;
            if let Some(r) = cfg.price(&m.name).and_then(|p| p.reasoning_per_1m) {
                pricing.output_per_1m = pricing.output_per_1m.max(r);
            }
            let mut e = smartllm_quota::budget::estimate(
                &pricing,
                prompt_tokens,
                max_out.map(|t| t.min(cap).saturating_mul(choices)),
                typical.min(cap).saturating_mul(choices),
            );
            if priority {
                let x = cfg
                    .price(&m.name)
                    .map_or(1.0, |p| p.service_tiers.priority.max(1.0));
                e.firm = (e.firm - m.pricing.per_request) * x + m.pricing.per_request;
                e.expected *= x;
            }
            if let Some(c) = request_cap {
                e.firm = e.firm.min(c);
                e.expected = e.expected.min((c - e.firm).max(0.0));
            }
            e
        };
        match shared
            .quotas
            .budget(cfg, ctx.scope(), &model.name, estimate(model))
            .await
        {
            BudgetDecision::Within(hold) => ctx.budget_hold = hold,
            BudgetDecision::Degrade { model: to, budget } => {
                let to = cfg.model(&to).ok_or_else(|| {
                    ApiError::internal(format!("budget {budget} degrades to an unknown model {to}"))
                })?;
                // A cheaper model the route may not or cannot use for this
                // request (data a rule keeps from its provider, a prompt
                // beyond its window, images it cannot read): the budget
                // refuses rather than breaking the rule or the request.
                // Nor does a budget open a model the key may not use, or
                // serve a dearer one than was chosen.
                let why = ruled_out
                    .iter()
                    .find(|(m, _)| *m == to.name)
                    .map(|(_, why)| why.to_string())
                    .or_else(|| {
                        let vk = ctx.key.as_ref()?;
                        // The model itself, an alias that resolves to it,
                        // or a routed alias it is a candidate of.
                        let listed = |m: &String| {
                            *m == to.name
                                || cfg.resolve_model(m).is_some_and(|(x, r)| {
                                    x.name == to.name
                                        || r.is_some_and(|r| r.candidates.contains(&to.name))
                                })
                        };
                        (!vk.models.is_empty() && !vk.models.iter().any(listed))
                            .then(|| format!("key '{}' may not use it", vk.name))
                    })
                    .or_else(|| {
                        (estimate(to).total() > estimate(model).total())
                            .then(|| format!("it costs more than '{}'", model.name))
                    });
                if let Some(why) = why {
                    return Err(ApiError::new(
                        429,
                        "insufficient_quota",
                        "budget_exceeded",
                        format!(
                            "Budget '{budget}' is used up and serves '{}' instead, which this request cannot use ({why}).",
                            to.name
                        ),
                    ));
                }
                tracing::info!(request_id = %ctx.request_id, budget = %budget, from = %model.name, to = %to.name, "budget exhausted: serving a cheaper model");
                model = to;
                fallbacks.clear();
                if ctx.route.is_none() {
                    ctx.degraded_from = Some(request.req.model.clone());
                }
                ctx.route_reason = "budget".into();
                ctx.set_model(&model.name);
                // Not what the arm chose: its figures are its own model's.
                ctx.experiment = None;
                // The cheaper model still meets the scope's `reject`
                // budgets, and holds its own estimate (degrade budgets: one
                // step only).
                match shared
                    .quotas
                    .budget_degraded(cfg, ctx.scope(), &model.name, estimate(model))
                    .await
                {
                    BudgetDecision::Within(hold) => ctx.budget_hold = hold,
                    BudgetDecision::Reject(r) => return Err(super::refusal(r)),
                    BudgetDecision::Degrade { .. } => {}
                }
            }
            BudgetDecision::Reject(r) => return Err(super::refusal(r)),
        }
    }
    let mut chain = vec![model.name.clone()];
    for m in fallbacks {
        if !chain.contains(&m) {
            chain.push(m);
        }
    }
    // A key that lists models, and not this alias, is served only by those:
    // a fixed route's fallback is no way around the list. (A name a `match`
    // pattern took counts as its alias.)
    let named = match &request.route {
        Some(r) => &r.name,
        None => &request.req.model,
    };
    if let Some(vk) = ctx
        .key
        .as_ref()
        .filter(|k| !k.models.is_empty() && !k.models.contains(named))
    {
        let first = chain[0].clone();
        chain.retain(|m| *m == first || vk.models.contains(m));
    }
    if cfg.ledger.unpriced == smartllm_config::UnpricedPolicy::Reject {
        drop_unpriced(ctx, rt, &mut chain)?;
    }
    apply_cost_cap(ctx, rt, &mut request.req, &mut chain).await?;
    Ok(chain)
}

/// A model asked for by name serves only its own kind: a chat request to an
/// embedding model would reach its provider only to come back as a 404 the
/// gateway must blame on its own configuration. Checked before the cache
/// (a lookup would embed the prompt for nothing).
pub fn check_mode(request: &Parsed<'_>) -> Result<(), ApiError> {
    let model = request.model;
    if request.routed.is_none() && !model.serves(mode_for(request.req.endpoint)) {
        return Err(wrong_mode(&model.name, model.mode, request.req.endpoint));
    }
    Ok(())
}

/// The kind of model an endpoint needs: embedding models for
/// `/v1/embeddings`, chat models for the rest.
fn mode_for(endpoint: smartllm_protocol::Endpoint) -> smartllm_config::ModelMode {
    if endpoint == smartllm_protocol::Endpoint::Embeddings {
        smartllm_config::ModelMode::Embedding
    } else {
        smartllm_config::ModelMode::Chat
    }
}

/// 400 `model_not_supported`: `model` (of `mode`) asked for on an endpoint
/// that needs the other kind.
fn wrong_mode(
    model: &str,
    mode: smartllm_config::ModelMode,
    endpoint: smartllm_protocol::Endpoint,
) -> ApiError {
    use smartllm_config::ModelMode;
    let what = match mode {
        ModelMode::Chat => "a chat model",
        ModelMode::Embedding => "an embedding model",
        ModelMode::Image => "an image model",
        ModelMode::Audio => "an audio model",
        ModelMode::Rerank => "a rerank model",
    };
    let use_ = if endpoint == smartllm_protocol::Endpoint::Embeddings {
        "an embedding model"
    } else {
        "a chat model"
    };
    let hint = if mode == ModelMode::Embedding {
        " (embeddings: POST /v1/embeddings)"
    } else if mode == ModelMode::Chat {
        " (chat: POST /v1/chat/completions, /v1/responses or /v1/messages)"
    } else {
        ""
    };
    ApiError::invalid_request(
        "model_not_supported",
        format!("Model '{model}' is {what}{hint}; this endpoint needs {use_}."),
    )
    .with_param("model")
}

/// A routed alias whose candidates are not all of the kind the endpoint
/// needs (embedding models for `/v1/embeddings`, chat models for the rest)
/// narrowed to those that are; None when all are. An embedding request is
/// never routed to a chat model, nor a chat request to an embedding model.
fn for_endpoint(
    rt: &Runtime,
    r: &RouteConfig,
    endpoint: smartllm_protocol::Endpoint,
) -> Result<Option<RouteConfig>, ApiError> {
    use smartllm_config::ModelMode;
    let want = mode_for(endpoint);
    let fits = |m: &String| rt.config.model(m).is_some_and(|m| m.mode == want);
    // A routed alias without candidates decides over its `model` alone.
    let candidates: Vec<&String> = if r.candidates.is_empty() {
        vec![&r.model]
    } else {
        r.candidates.iter().collect()
    };
    // Models rules and experiment arms pin or prefer.
    let named = r
        .rules
        .iter()
        .flat_map(|x| x.pin.iter().chain(&x.prefer))
        .chain(
            r.experiment
                .iter()
                .flat_map(|e| e.arms.iter().filter_map(|a| a.model.as_ref())),
        );
    if candidates
        .iter()
        .copied()
        .chain(&r.fallback)
        .chain(named)
        .all(fits)
    {
        return Ok(None);
    }
    if !candidates.iter().copied().any(fits) {
        let kind = if want == ModelMode::Embedding {
            "embedding"
        } else {
            "chat"
        };
        return Err(ApiError::invalid_request(
            "model_not_supported",
            format!(
                "Route '{}' has no {kind} model among its candidates: ask for a {kind} model by name, or add one to the route.",
                r.name
            ),
        )
        .with_param("model"));
    }
    let mut n = r.clone();
    n.candidates.retain(fits);
    n.fallback.retain(fits);
    // A pin of the other kind (a chat model pinned on a route that also
    // serves embeddings) does not apply to this request.
    for rule in &mut n.rules {
        if rule.pin.as_ref().is_some_and(|p| !fits(p)) {
            rule.pin = None;
        }
        rule.prefer.retain(fits);
    }
    // An experiment with an arm of the other kind does not run on this
    // request: that arm could not serve it, and whatever served instead
    // would be counted as the arm's.
    if n.experiment.as_ref().is_some_and(|e| {
        e.arms
            .iter()
            .any(|a| a.model.as_ref().is_some_and(|m| !fits(m)))
    }) {
        n.experiment = None;
    }
    if !fits(&n.model) {
        n.model = n.candidates[0].clone();
    }
    Ok(Some(n))
}

/// `ledger.unpriced: reject`: no request goes to a model without a price;
/// a fallback with a price may serve instead, else 400 `model_unpriced`.
fn drop_unpriced(ctx: &mut Ctx, rt: &Runtime, chain: &mut Vec<String>) -> Result<(), ApiError> {
    let first = chain[0].clone();
    chain.retain(|m| rt.config.price(m).is_some_and(|p| p.is_priced()));
    match chain.first() {
        None => Err(ApiError::new(
            400,
            "invalid_request_error",
            "model_unpriced",
            format!(
                "The model '{first}' has no price (no pricing in models.yaml and no entry in the price catalog), and this gateway refuses unpriced requests (ledger.unpriced: reject)."
            ),
        )
        .with_param("model")),
        Some(m) if *m != first => {
            let m = m.clone();
            ctx.route_reason = format!("unpriced:{first}");
            ctx.set_model(&m);
            ctx.experiment = None;
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// A per-request cost cap: drop the models of the chain whose prompt alone
/// would pass it, and lower the request's max tokens so that the prompt (at an
/// upper bound of its tokens) plus the whole answer cannot cost more than the
/// cap on any model left. An answer the cap cut short is not cached.
async fn apply_cost_cap(
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &mut ParsedRequest,
    chain: &mut Vec<String>,
) -> Result<(), ApiError> {
    // A Responses follow-up whose conversation the provider keeps: the
    // body holds only the new turn, the bill the whole history.
    let provider_history = req.responses.as_deref().is_some_and(|r| r.native_owned);
    // Built-in tools (billed per use) run only where a provider speaks
    // Responses: along a chain with none, every provider that takes the
    // request drops them, and the canonical body (the translation without
    // them) is what is billed.
    let config = &rt.config;
    let speaks_responses = |m: &String| {
        config.model(m).is_some_and(|mc| {
            mc.deployments.iter().any(|d| {
                config
                    .providers
                    .get(&d.provider)
                    .is_some_and(|p| p.responses)
            })
        })
    };
    let dropped_everywhere = req
        .responses
        .as_deref()
        .is_some_and(|r| !r.builtin_tools.is_empty())
        && !chain.iter().any(speaks_responses);
    let raw = req.native.as_deref().filter(|_| !dropped_everywhere);
    let cap = smartllm_quota::cost_cap::plan(
        config,
        ctx.scope(),
        chain,
        &req.body,
        raw,
        ctx.prompt_bytes,
        provider_history,
    )
    .await;
    let (kept, max_output, cap, budget, bound) = match cap {
        CostCap::Uncapped => return Ok(()),
        CostCap::Reject(r) => return Err(super::refusal(r)),
        CostCap::HiddenHistory { message } => {
            return Err(
                ApiError::invalid_request("request_cost_cap_unbounded", message)
                    .with_param("previous_response_id"),
            )
        }
        CostCap::Fits {
            chain,
            max_output,
            cap,
            budget,
            prompt_bound,
        } => (chain, max_output, cap, budget, prompt_bound),
    };
    if kept.first() != chain.first() {
        ctx.route_reason = "cost_cap".into();
        ctx.set_model(&kept[0]);
        ctx.experiment = None;
    }
    *chain = kept;
    let Some(max_output) = max_output else {
        return Ok(());
    };
    // Every limit the client gave that passes the cap is lowered (a body
    // may carry both names; the provider takes one of them); none given,
    // max_tokens is set.
    let mut fields: Vec<&str> = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .filter(|f| req.body.contains_key(*f))
        .collect();
    if fields.is_empty() {
        fields.push("max_tokens");
    }
    fields.retain(|f| {
        req.body
            .get(*f)
            .and_then(Value::as_u64)
            .is_none_or(|a| a > max_output)
    });
    if !fields.is_empty() {
        tracing::debug!(request_id = %ctx.request_id, cap, max_output, prompt_bound = bound, "per-request cost cap lowers max tokens");
        smartllm_quota::metrics::cost_cap(&budget, "capped");
        let limit = serde_json::json!(max_output);
        for f in &fields {
            req.body.insert((*f).into(), limit.clone());
        }
        // A body passed through as the client sent it carries the cap too.
        if let Some(raw) = req.native.take() {
            if req.endpoint == smartllm_protocol::Endpoint::Responses {
                fields = vec!["max_output_tokens"];
            }
            let mut capped = Some(raw.to_vec());
            for f in &fields {
                capped =
                    capped.and_then(|b| smartllm_protocol::messages::set_top_level(&b, f, &limit));
            }
            req.native = Some(capped.map(bytes::Bytes::from).unwrap_or(raw));
        }
        if let Some(p) = ctx.cache_insert.as_mut() {
            p.cost_capped = true;
        }
    }
    Ok(())
}

async fn decide(
    shared: &Shared,
    session: &Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &ParsedRequest,
    route: &RouteConfig,
) -> Decision {
    // One embedding per request: the cache's when it made one.
    let embedding = ctx.cache_insert.as_ref().and_then(|p| p.embedding.clone());
    let (budget_pressure, budget_left_usd) = shared
        .quotas
        .budget_pressure_and_left(&rt.config.keys.budgets, ctx.scope());
    let info = RequestInfo {
        headers: rule_headers(session),
        tenant: &ctx.tenant,
        app: &ctx.app,
        key: &ctx.key_name,
        user: req.body.get("user").and_then(Value::as_str),
        budget_pressure,
        budget_left_usd,
    };
    let task_vector = ctx.task_vector.clone();
    let (d, features) = decide_with(
        shared,
        rt,
        &req.body,
        route,
        embedding,
        task_vector,
        &info,
        &req.anthropic_only,
        req.responses
            .as_deref()
            .map_or(&[][..], |r| r.builtin_tools.as_slice()),
    )
    .await;
    metrics::route_decision(&route.name, &d.model, &d.reason);
    tracing::debug!(request_id = %ctx.request_id, route = %route.name, model = %d.model, reason = %d.reason,
        task = %features.task, complexity = features.complexity, fallbacks = ?d.fallbacks, "route decision");
    ctx.route_reason = d.reason.clone();
    ctx.route_cost_rule = Some(d.cost_rule.clone());
    ctx.experiment = d.experiment.clone();
    ctx.task = Some(features.task.as_str());
    ctx.complexity = Some(features.complexity);
    d
}

/// Task and complexity of a request on a fixed model (no routing decision),
/// for the ledger's traffic mix: the features of the prompt, with the
/// cache's embedding when it made one (keywords otherwise). Microseconds.
fn classify(shared: &Shared, ctx: &mut Ctx, rt: &Runtime, req: &ParsedRequest) {
    if !req.endpoint.is_chat() {
        return;
    }
    // Without a task vector, the cache's embedding in the classifier's
    // whole-text view (through the model's task map, as the examples').
    let whole = match (&ctx.task_vector, &shared.components.embedder) {
        (None, Some(e)) => ctx
            .cache_insert
            .as_ref()
            .and_then(|p| p.embedding.as_deref())
            .map(|v| e.whole_task_view(v)),
        _ => None,
    };
    let embedding = ctx.task_vector.as_deref().or(whole.as_deref());
    let f = smartllm_router::extract_with(
        &req.body,
        embedding,
        rt.router.classifier.as_deref(),
        smartllm_router::Extraction::TrafficMix,
    );
    ctx.task = Some(f.task.as_str());
    ctx.complexity = Some(f.complexity);
}

/// A router exclusion no budget may override: a rule, the context window,
/// a capability, what only Anthropic providers take (the soft ones, budgets of latency, cost and quality, give
/// way to a budget's cheaper model).
fn hard_exclusion(why: &str) -> bool {
    [
        "rule:",
        "context_window:",
        "capability:",
        "anthropic_only:",
        "responses_only:",
        "openai_only:",
        "reasoning_refuses:",
    ]
    .iter()
    .any(|p| why.starts_with(p))
}
