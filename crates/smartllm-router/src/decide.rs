//! The decision: candidates of a routed alias scored on expected quality, cost
//! and latency, filtered by constraints, shaped by rules and experiments, with
//! the fallback chain and an explanation.

use crate::features::Features;
use crate::learned::LearnedRouter;
use crate::profiles::LiveSnapshot;
use serde::Serialize;
use sha2::{Digest, Sha256};
use smartllm_config::{
    Config, CostRule, ModelConfig, RouteConfig, RouteRule, StickyBy, Strategy, Task,
};

/// What the router needs to know about models right now.
pub trait ModelState {
    fn live(&self, model: &str) -> Option<LiveSnapshot>;
    /// A deployment is healthy and its circuit lets traffic through.
    fn available(&self, model: &str) -> bool;
    /// The expected quality of `model` on `task` for `tenant`'s requests,
    /// given `prior` (the profile's or the learned router's), moved by what
    /// the tenant's users reported (`POST /v1/feedback`).
    fn quality(&self, _tenant: &str, _model: &str, _task: Task, prior: f64) -> f64 {
        prior
    }
    /// How many scores (users' and outcomes') moved that quality.
    fn votes(&self, _tenant: &str, _model: &str, _task: Task) -> f64 {
        0.0
    }
}

/// No live data, everything available (for `route explain` and tests).
pub struct StaticState;

impl ModelState for StaticState {
    fn live(&self, _: &str) -> Option<LiveSnapshot> {
        None
    }
    fn available(&self, _: &str) -> bool {
        true
    }
}

/// Who asks, for rules and sticky experiments.
#[derive(Debug, Default, Clone)]
pub struct RequestInfo<'a> {
    /// (lower-case name, value)
    pub headers: Vec<(String, String)>,
    pub tenant: &'a str,
    pub app: &'a str,
    pub key: &'a str,
    pub user: Option<&'a str>,
    /// Highest share (0-1+) of any budget that applies to the request.
    pub budget_pressure: f64,
    /// The least USD left of any budget that applies (None: no budget). A
    /// candidate expected to cost more is kept out like one over the
    /// route's `max_cost_usd` (relaxed only when every candidate is).
    pub budget_left_usd: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub model: String,
    /// Expected quality for this prompt (0-1).
    pub quality: f64,
    pub expected_cost_usd: f64,
    pub expected_latency_ms: f64,
    pub utility: f64,
    /// Why it was not eligible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excluded: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub route: String,
    pub model: String,
    /// `utility`, `learned` (the learned router predicted the quality of
    /// a candidate), `rule:NAME`, `experiment:NAME/ARM`, `only_candidate`,
    /// `constraints_relaxed` (nothing met the latency, cost or quality
    /// budgets), `no_model_fits` (nothing fits the context or has the
    /// capability, or nothing is up), `no_model_allowed` (rules exclude
    /// every model: refused); `+budget` when budget pressure raised the
    /// cost weight.
    pub reason: String,
    pub strategy: &'static str,
    /// (experiment, arm)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<(String, String)>,
    /// Tried in order when the chosen model fails before any byte reached the client.
    pub fallbacks: Vec<String>,
    pub candidates: Vec<Candidate>,
    pub weights: (f64, f64, f64),
    /// How cost weighed (`log`, `linear`, `cheapest_within:2%`; the
    /// tolerance as widened by budget pressure).
    pub cost_rule: String,
    /// Every model the route could serve is excluded by a rule that
    /// matched: the request must be refused, not served by `model`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// The cheapest expected cost the log rule tells apart (a billionth of a dollar).
const MIN_COST: f64 = 1e-9;

/// A candidate's cost term in its utility: under `linear` its cost over the
/// dearest's; under `log` where its price lies between the cheapest (0) and
/// the dearest (1) on a log scale, so every doubling counts the same.
fn cost_term(rule: CostRule, cost: f64, min_cost: f64, max_cost: f64) -> f64 {
    match rule {
        CostRule::Linear => cost / max_cost,
        CostRule::Log | CostRule::CheapestWithin(_) => {
            let (lo, hi) = (min_cost.max(MIN_COST), max_cost.max(MIN_COST));
            if hi / lo < 1.000_001 {
                return 0.0;
            }
            ((cost.max(MIN_COST) / lo).ln() / (hi / lo).ln()).clamp(0.0, 1.0)
        }
    }
}

/// A candidate's exclusion the route's budgets make (expected latency, cost,
/// quality floor), which may be relaxed when nothing meets them; the others
/// (a rule, the context window, a capability, unavailability) are not.
fn soft_exclusion(why: &str) -> bool {
    [
        "latency_budget:",
        "max_cost:",
        "min_quality:",
        "budget_left:",
    ]
    .iter()
    .any(|p| why.starts_with(p))
}

/// Requests' worth of "no errors" an observed error rate is weighed
/// against: a rate from few requests says little.
const ERROR_RATE_PRIOR: f64 = 5.0;

/// How much a model's live error rate counts, by how many requests it
/// rests on: one failed request of one (an error rate of 0.175 after one
/// failure) moves the quality a sixth as much as it would with many, so a
/// request that failed everywhere (a fault of its own) does not move a
/// quiet model's routing for every tenant; a model failing steadily still
/// loses its traffic (and breakers take a dead one out).
fn error_evidence(requests: u64) -> f64 {
    let n = requests as f64;
    n / (n + ERROR_RATE_PRIOR)
}

/// How far a candidate misses the route's budgets and what is left of the
/// caller's spending budgets, each as a share of the budget (8.4 s against
/// 3 s is 1.8; $0.0075 against $0.002 is 2.75; a quality of 0.6 under a
/// floor of 0.8 is 0.25), summed.
fn shortfall(
    c: &Candidate,
    budgets: &smartllm_config::Constraints,
    budget_left: Option<f64>,
) -> f64 {
    let over = |value: f64, limit: f64| ((value - limit) / limit.max(1e-9)).max(0.0);
    budget_left.map_or(0.0, |l| over(c.expected_cost_usd, l))
        + budgets
            .latency_budget
            .map_or(0.0, |b| over(c.expected_latency_ms, b.as_secs_f64() * 1e3))
        + budgets
            .max_cost_usd
            .map_or(0.0, |x| over(c.expected_cost_usd, x))
        + budgets.min_quality.map_or(0.0, |x| {
            if x > 0.0 {
                ((x - c.quality) / x).max(0.0)
            } else {
                0.0
            }
        })
}

fn rule_matches(rule: &RouteRule, f: &Features, req: &RequestInfo<'_>) -> bool {
    let w = &rule.when;
    (w.tasks.is_empty() || w.tasks.contains(&f.task))
        && w.min_complexity.is_none_or(|x| f.complexity >= x)
        && w.max_complexity.is_none_or(|x| f.complexity <= x)
        && w.min_prompt_tokens.is_none_or(|x| f.prompt_tokens >= x)
        && w.max_prompt_tokens.is_none_or(|x| f.prompt_tokens <= x)
        && (w.languages.is_empty() || w.languages.iter().any(|l| l == f.language))
        && w.has_code.is_none_or(|x| x == f.has_code)
        && w.has_math.is_none_or(|x| x == f.has_math)
        && w.has_tools.is_none_or(|x| x == f.has_tools)
        && w.has_images.is_none_or(|x| x == f.has_images)
        && headers_and_apps_match(w, &req.headers, req.tenant, req.app)
        && (w.tenants.is_empty() || w.tenants.iter().any(|t| t == req.tenant))
}

/// A rule's conditions on the request's headers and app.
fn headers_and_apps_match(
    w: &smartllm_config::RuleWhen,
    headers: &[(String, String)],
    tenant: &str,
    app: &str,
) -> bool {
    w.headers.iter().all(|(name, want)| {
        headers
            .iter()
            .any(|(n, v)| n == name && (want == "*" || v == want))
    }) && (w.apps.is_empty()
        || w.apps
            .iter()
            .any(|a| a == app || *a == format!("{tenant}/{app}")))
}

/// Whether a rule's conditions on the request itself beside the prompt
/// (its headers, its app) hold, read as the router reads them; `None` for
/// a rule that has none. What the cache key carries for a routed alias, so
/// an answer is replayed only to requests its rules treat alike.
pub fn request_conditions(
    rule: &RouteRule,
    headers: &[(String, String)],
    tenant: &str,
    app: &str,
) -> Option<bool> {
    let w = &rule.when;
    (!w.headers.is_empty() || !w.apps.is_empty())
        .then(|| headers_and_apps_match(w, headers, tenant, app))
}

/// A draw from Beta(a, b) (a, b > 0), from two Gamma draws.
fn beta_sample(a: f64, b: f64) -> f64 {
    let x = gamma_sample(a);
    let y = gamma_sample(b);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        a / (a + b)
    }
}

/// A draw from Gamma(shape, 1): Marsaglia and Tsang's method (shape < 1
/// through shape + 1 and a uniform power).
fn gamma_sample(shape: f64) -> f64 {
    if shape < 1.0 {
        return gamma_sample(shape + 1.0)
            * fastrand::f64().max(f64::MIN_POSITIVE).powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal draw (Box-Muller).
        let (u1, u2) = (fastrand::f64().max(f64::MIN_POSITIVE), fastrand::f64());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = fastrand::f64().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Sticky arm: a hash of the experiment, the tenant and the user (or key)
/// over the weights.
pub fn assign_arm<'e>(
    exp: &'e smartllm_config::Experiment,
    req: &RequestInfo<'_>,
) -> &'e smartllm_config::Arm {
    let who = match exp.sticky_by {
        StickyBy::User => req.user.unwrap_or(req.key),
        StickyBy::Key => req.key,
    };
    let mut h = Sha256::new();
    h.update(exp.name.as_bytes());
    h.update([0]);
    // The tenant too: on an open gateway an unknown key sets only the
    // tenant (its key name is "-"), and a body without `user` falls back
    // to that name, so without it every such caller would land in one arm.
    h.update(req.tenant.as_bytes());
    h.update([0]);
    h.update(who.as_bytes());
    let d = h.finalize();
    let x = u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8])) as f64 / u64::MAX as f64;
    let total: f64 = exp.arms.iter().map(|a| a.weight).sum();
    let mut acc = 0.0;
    for a in &exp.arms {
        acc += a.weight / total;
        if x < acc {
            return a;
        }
    }
    exp.arms.last().expect("validated: at least two arms")
}

/// Expected quality of a model on a prompt from its profile: the harder the
/// prompt, the more a model's shortfall on the task shows.
pub fn profile_quality(m: &ModelConfig, task: Task, complexity: f64) -> f64 {
    let q = m.profile.quality(task);
    (1.0 - (1.0 - q) * (0.5 + 2.5 * complexity)).clamp(0.0, 1.0)
}

pub fn expected_cost(m: &ModelConfig, f: &Features) -> f64 {
    let p = &m.pricing;
    (f.prompt_tokens as f64 * p.input_per_1m + f.expected_output_tokens as f64 * p.output_per_1m)
        / 1e6
        + p.per_request
}

fn expected_latency_ms(m: &ModelConfig, f: &Features, live: Option<&LiveSnapshot>) -> f64 {
    // Measured timings, faded into the profile's with their age.
    let profile_ttft = m.profile.latency.as_secs_f64() * 1e3;
    let ttft = live.map_or(profile_ttft, |l| l.blend(l.ttft_ms, profile_ttft));
    let tps = live
        .map_or(m.profile.tokens_per_second, |l| {
            l.blend(l.tokens_per_second, m.profile.tokens_per_second)
        })
        .max(1.0);
    ttft + f.expected_output_tokens as f64 / tps * 1e3
}

/// Why `m` cannot serve the request at all, whatever the budgets: the
/// prompt and output do not fit its context window, it lacks a capability
/// the request or the route needs, the request has what only Anthropic
/// providers take and it has none, or it is served only through Anthropic,
/// which takes a JSON schema only as structured outputs. None: it fits.
fn misfit(
    config: &Config,
    m: &ModelConfig,
    f: &Features,
    c: &smartllm_config::Constraints,
) -> Option<String> {
    // The gateway lowers a limit above the model's own upstream.
    let output = f
        .max_tokens
        .map_or(0, |t| m.profile.max_output_tokens.map_or(t, |c| t.min(c)));
    if f.prompt_tokens.saturating_add(output) > m.profile.context_window {
        return Some(format!("context_window:{}", m.profile.context_window));
    }
    if let Some(cap) = f
        .needs
        .iter()
        .copied()
        .chain(c.capabilities.iter().map(String::as_str))
        .find(|cap| !m.profile.has(cap))
    {
        return Some(format!("capability:{cap}"));
    }
    let anthropic = |d: &smartllm_config::DeploymentConfig| {
        config
            .providers
            .get(&d.provider)
            .is_some_and(|p| p.kind == smartllm_config::ProviderKind::Anthropic)
    };
    // What only an Anthropic provider takes: a model served only through
    // OpenAI-compatible ones would answer 400 (thinking: unless one of them
    // drops it, `drop_thinking`).
    if let Some(what) = &f.anthropic_only {
        if !m.deployments.iter().any(anthropic) {
            return Some(format!("anthropic_only:{what}"));
        }
    }
    // Thinking: Anthropic providers take it (unless the model lists its
    // capabilities without `thinking`: Claude 3.5 Haiku answers 400), a
    // reasoning model's others as `reasoning_effort`, any other only if it
    // drops it.
    let claude_thinks = m.profile.capabilities.is_none() || m.profile.has("thinking");
    let takes_thinking = |d: &smartllm_config::DeploymentConfig| {
        (anthropic(d) && claude_thinks)
            || m.profile.has("reasoning")
            || config
                .providers
                .get(&d.provider)
                .is_some_and(|p| p.drop_thinking)
    };
    if f.thinking && !m.deployments.iter().any(takes_thinking) {
        return Some(if m.deployments.iter().any(anthropic) {
            "capability:thinking".to_string()
        } else {
            "anthropic_only:thinking".to_string()
        });
    }
    // Built-in tools: a provider that speaks Responses runs them, one set
    // to drop them takes the request without them; any other answers 400.
    if let Some(tools) = &f.builtin_tools {
        let takes = |d: &smartllm_config::DeploymentConfig| {
            config
                .providers
                .get(&d.provider)
                .is_some_and(|p| p.responses || p.drop_builtin_tools)
        };
        if !m.deployments.iter().any(takes) {
            return Some(format!("responses_only:{tools}"));
        }
    }
    let anthropic_only = !m.deployments.is_empty() && m.deployments.iter().all(anthropic);
    if let Some(what) = f.openai_only.filter(|_| anthropic_only) {
        return Some(format!("openai_only:{what}"));
    }
    if f.json_schema && !m.profile.has("structured_outputs") && anthropic_only {
        return Some("capability:structured_outputs".to_string());
    }
    // One of OpenAI's reasoning models cannot give stop sequences,
    // log-probabilities or `logit_bias` (its 400).
    let reasoning = || {
        m.deployments
            .iter()
            .any(|d| smartllm_config::openai_reasoning_model(&d.upstream_model))
    };
    if let Some(what) = f.reasoning_refused.filter(|_| reasoning()) {
        return Some(format!("reasoning_refuses:{what}"));
    }
    None
}

/// Decide a routed alias. `learned` is the route's trained file (strategy
/// learned) and `embedding` the prompt's embedding.
pub fn decide(
    config: &Config,
    route: &RouteConfig,
    f: &Features,
    learned: Option<&LearnedRouter>,
    embedding: Option<&[f32]>,
    req: &RequestInfo<'_>,
    state: &dyn ModelState,
) -> Decision {
    let names: Vec<&str> = if route.candidates.is_empty() {
        vec![route.model.as_str()]
    } else {
        route.candidates.iter().map(String::as_str).collect()
    };
    // Budget pressure: beyond the route's threshold, cost weighs up to 4x more.
    let mut w = route.weights;
    let over = if route.budget_pressure_at < 1.0 {
        ((req.budget_pressure - route.budget_pressure_at) / (1.0 - route.budget_pressure_at))
            .clamp(0.0, 1.0)
    } else {
        0.0
    };
    if over > 0.0 {
        w.cost *= 1.0 + 3.0 * over;
        let s = w.quality + w.cost + w.latency;
        w.quality /= s;
        w.cost /= s;
        w.latency /= s;
    }
    let use_learned =
        matches!(route.strategy, Strategy::Learned(_)) && learned.is_some() && embedding.is_some();

    let mut pinned: Option<(String, String)> = None; // (model, reason)
    let mut preferred: Vec<&str> = Vec::new();
    let mut rule_excluded: Vec<(&str, String)> = Vec::new();
    let mut experiment = None;
    if let Some(exp) = &route.experiment {
        let arm = assign_arm(exp, req);
        experiment = Some((exp.name.clone(), arm.name.clone()));
        if let Some(m) = &arm.model {
            pinned = Some((m.clone(), format!("experiment:{}/{}", exp.name, arm.name)));
        }
    }
    for rule in &route.rules {
        if !rule_matches(rule, f, req) {
            continue;
        }
        for m in &rule.exclude {
            rule_excluded.push((m.as_str(), format!("rule:{}", rule.name)));
        }
        if pinned.is_none() {
            if let Some(p) = &rule.pin {
                pinned = Some((p.clone(), format!("rule:{}", rule.name)));
            }
        }
        if preferred.is_empty() && !rule.prefer.is_empty() {
            preferred = rule.prefer.iter().map(String::as_str).collect();
        }
    }

    let mut cands: Vec<Candidate> = Vec::with_capacity(names.len());
    // Whether the learned router predicted a candidate's quality (not
    // trained on it, or an embedding of another dimension: the profile's).
    let mut learned_predicted = false;
    for name in &names {
        let Some(m) = config.model(name) else {
            continue;
        };
        let live = state.live(name);
        let predicted = match (use_learned, learned, embedding) {
            (true, Some(l), Some(e)) => l.predict(name, e),
            _ => None,
        };
        learned_predicted |= predicted.is_some();
        let mut quality = predicted.unwrap_or_else(|| profile_quality(m, f.task, f.complexity));
        quality = state.quality(req.tenant, name, f.task, quality);
        // A model that fails often delivers less.
        if let Some(l) = &live {
            quality *= 1.0 - l.error_rate.clamp(0.0, 1.0) * 0.5 * error_evidence(l.requests);
        }
        let cost = expected_cost(m, f);
        let latency = expected_latency_ms(m, f, live.as_ref());
        let c = &route.constraints;
        let excluded = if let Some((_, why)) = rule_excluded.iter().find(|(x, _)| x == name) {
            Some(why.clone())
        } else if !state.available(name) {
            Some("unavailable".to_string())
        } else if let Some(why) = misfit(config, m, f, c) {
            Some(why)
        } else {
            // Every budget it misses, not only the first: relaxing them
            // (below) weighs them all.
            let mut missed = Vec::new();
            if c.latency_budget
                .is_some_and(|b| latency > b.as_secs_f64() * 1e3)
            {
                missed.push(format!("latency_budget:{latency:.0}ms"));
            }
            if c.max_cost_usd.is_some_and(|x| cost > x) {
                missed.push(format!("max_cost:{cost:.5}"));
            }
            if c.min_quality.is_some_and(|x| quality < x) {
                missed.push(format!("min_quality:{quality:.2}"));
            }
            if let Some(left) = req.budget_left_usd.filter(|l| cost > *l) {
                missed.push(format!("budget_left:{left:.5}"));
            }
            (!missed.is_empty()).then(|| missed.join(","))
        };
        cands.push(Candidate {
            model: name.to_string(),
            quality,
            expected_cost_usd: cost,
            expected_latency_ms: latency,
            utility: 0.0,
            excluded,
        });
    }
    // Exploration (Thompson sampling): on `explore` of the requests, every
    // eligible candidate whose expected quality clears the floor is scored
    // with a quality drawn from its posterior (the profile worth
    // PRIOR_VOTES scores, plus the tenant's scores and outcomes) instead of
    // its mean, so a model that looks worse than it is gets traffic to
    // prove it, in proportion to the chance that it is the best. Never in
    // an experiment (its arms stay as assigned) or when a rule pins the model.
    let explore = route.explore > 0.0
        && route.experiment.is_none()
        && pinned.is_none()
        && fastrand::f64() < route.explore;
    // The means, for the floor (a draw may sink a strong model's score
    // below a cheap one's that never cleared it).
    let mean_quality: Vec<f64> = cands.iter().map(|c| c.quality).collect();
    if explore {
        for c in cands
            .iter_mut()
            .filter(|c| c.excluded.is_none() && c.quality >= route.explore_floor)
        {
            let n = crate::feedback::PRIOR_VOTES + state.votes(req.tenant, &c.model, f.task);
            let q = c.quality.clamp(1e-3, 1.0 - 1e-3);
            // A draw is never under the floor: exploring never hands the
            // request to a model the floor keeps out.
            c.quality = beta_sample(q * n, (1.0 - q) * n).max(route.explore_floor);
        }
    }
    // Cost per the route's rule; latency relative to the slowest candidate.
    let max_cost = cands
        .iter()
        .map(|c| c.expected_cost_usd)
        .fold(0.0, f64::max)
        .max(1e-12);
    let min_cost = cands
        .iter()
        .map(|c| c.expected_cost_usd)
        .fold(f64::INFINITY, f64::min);
    let max_lat = cands
        .iter()
        .map(|c| c.expected_latency_ms)
        .fold(0.0, f64::max)
        .max(1e-9);
    for c in &mut cands {
        c.utility = w.quality * c.quality
            - w.cost * cost_term(route.cost_rule, c.expected_cost_usd, min_cost, max_cost)
            - w.latency * c.expected_latency_ms / max_lat;
    }
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|a, b| cands[*b].utility.total_cmp(&cands[*a].utility));
    let mut feasible: Vec<usize> = order
        .iter()
        .copied()
        .filter(|i| cands[*i].excluded.is_none())
        .collect();
    let mut cost_rule = route.cost_rule;
    if let CostRule::CheapestWithin(tolerance) = route.cost_rule {
        // Budget pressure accepts up to 15 more points of expected quality loss.
        let tolerance = (tolerance + 0.15 * over).min(0.5);
        cost_rule = CostRule::CheapestWithin(tolerance);
        let best = feasible
            .iter()
            .map(|i| cands[*i].quality)
            .fold(f64::NEG_INFINITY, f64::max);
        // The cheapest near-best first (utility breaks ties), the rest by utility.
        if let Some(pick) = feasible
            .iter()
            .copied()
            .filter(|i| cands[*i].quality >= best * (1.0 - tolerance))
            .min_by(|a, b| {
                cands[*a]
                    .expected_cost_usd
                    .total_cmp(&cands[*b].expected_cost_usd)
                    .then(cands[*b].utility.total_cmp(&cands[*a].utility))
            })
        {
            feasible.retain(|i| *i != pick);
            feasible.insert(0, pick);
        }
    }
    // Exploring never hands the request to a model under the floor: when
    // the draws let one win (a low draw of a dear model, beaten by a cheap
    // one below the floor), the request is decided without exploring, as
    // it would have been.
    if explore
        && feasible
            .first()
            .is_some_and(|&i| mean_quality[i] < route.explore_floor)
    {
        let mut plain = route.clone();
        plain.explore = 0.0;
        return decide(config, &plain, f, learned, embedding, req, state);
    }

    let base = if learned_predicted {
        "learned"
    } else {
        "utility"
    };
    // A rule's exclusion holds whatever else happens (data that must not
    // reach a provider); a model is usable as a way out when no rule
    // excludes it, if it is a candidate nothing hard does either, and it
    // can serve the request at all: a fallback that is no candidate was
    // never checked, and one whose context window the prompt overflows, or
    // that lacks the vision or tools it needs, only fails upstream.
    let ruled_out = |m: &str| rule_excluded.iter().any(|(x, _)| *x == m);
    let usable_way_out = |m: &str| {
        !ruled_out(m)
            && cands
                .iter()
                .find(|c| c.model == m)
                .is_none_or(|c| c.excluded.as_deref().is_none_or(soft_exclusion))
            && config
                .model(m)
                .is_none_or(|mc| misfit(config, mc, f, &route.constraints).is_none())
    };
    // A pin holds only where its model can serve the request (a prompt
    // over its context window, or tools it lacks, go the usual way) and is up.
    let pin_fits = |m: &str| state.available(m) && usable_way_out(m);
    // An arm whose model cannot serve this request does not count it: its
    // figures are the arm's model's, not whichever served instead.
    if pinned
        .as_ref()
        .is_some_and(|(m, why)| why.starts_with("experiment:") && !pin_fits(m))
    {
        experiment = None;
    }
    let (model, mut reason) = if let Some((m, why)) = pinned.clone().filter(|(m, _)| pin_fits(m)) {
        (m, why)
    } else if let Some(i) = feasible
        .iter()
        .copied()
        .find(|i| preferred.contains(&cands[*i].model.as_str()))
    {
        let rule = route
            .rules
            .iter()
            .find(|r| !r.prefer.is_empty() && rule_matches(r, f, req))
            .map_or("prefer", |r| r.name.as_str());
        (cands[i].model.clone(), format!("rule:{rule}"))
    } else if let Some(i) = feasible.first() {
        let why = if cands.len() == 1 {
            "only_candidate"
        } else {
            base
        };
        (cands[*i].model.clone(), why.to_string())
    } else if let Some(i) =
        order
            .iter()
            .copied()
            .filter(|i| cands[*i].excluded.as_deref().is_some_and(soft_exclusion))
            // (`order` is by utility: the first of the least missing wins ties.)
            .min_by(|a, b| {
                shortfall(&cands[*a], &route.constraints, req.budget_left_usd).total_cmp(
                    &shortfall(&cands[*b], &route.constraints, req.budget_left_usd),
                )
            })
    {
        // Nothing meets the budgets (latency, cost, quality floor): serve
        // the model that fits otherwise and misses them by the least, rather
        // than fail (a model within the cost cap and a little slow, not the
        // dearest and slowest).
        (cands[i].model.clone(), "constraints_relaxed".to_string())
    } else if let Some(m) = route
        .fallback
        .iter()
        .find(|m| state.available(m) && usable_way_out(m))
    {
        // No candidate can serve it (a rule, its context window or a
        // capability, or down): the route's fallback, where it can.
        (m.clone(), "constraints_relaxed".to_string())
    } else {
        // No model fits the request (context window, capability) or is up:
        // the best one no rule excludes, available first; its provider's
        // answer says what is wrong.
        // A prompt no context window holds goes to the largest window
        // (the one most likely to take it once trimmed, and the provider's
        // 400 names the limit).
        let window = |i: &usize| {
            config
                .model(&cands[*i].model)
                .map_or(0, |m| m.profile.context_window)
        };
        // (Among the candidates that are up and no rule excludes: those
        // are excluded for that first.)
        let overflows = order
            .iter()
            .filter(|i| state.available(&cands[**i].model) && !ruled_out(&cands[**i].model))
            .all(|i| {
                cands[*i]
                    .excluded
                    .as_deref()
                    .is_some_and(|w| w.starts_with("context_window:"))
            });
        let mut order = order.clone();
        if overflows {
            order.sort_by_key(|i| std::cmp::Reverse(window(i)));
        }
        let i = order
            .iter()
            .copied()
            .filter(|i| !ruled_out(&cands[*i].model))
            .find(|i| state.available(&cands[*i].model))
            .or_else(|| order.iter().copied().find(|i| !ruled_out(&cands[*i].model)));
        // Failing a candidate: the route's model, a fallback or the pin,
        // whichever no rule excludes, up or not (the exchange tries an
        // unhealthy one when nothing else is left).
        let way_out = std::iter::once(&route.model)
            .chain(&route.fallback)
            .chain(pinned.as_ref().map(|(m, _)| m))
            .find(|m| !ruled_out(m));
        match (i, way_out) {
            (Some(i), _) => (cands[i].model.clone(), "no_model_fits".to_string()),
            (None, Some(m)) => (m.clone(), "no_model_fits".to_string()),
            // Every model is ruled out: refused (see `refused`).
            (None, None) => (route.model.clone(), "no_model_allowed".to_string()),
        }
    };
    let refused = reason == "no_model_allowed";
    if over > 0.0 {
        reason.push_str("+budget");
    }
    if explore {
        reason.push_str("+explore");
    }
    let mut fallbacks: Vec<String> = Vec::new();
    for m in feasible.iter().map(|i| cands[*i].model.as_str()).chain(
        route
            .fallback
            .iter()
            .map(String::as_str)
            .filter(|m| usable_way_out(m)),
    ) {
        if m != model && !fallbacks.iter().any(|x| x == m) && fallbacks.len() < route.max_fallbacks
        {
            fallbacks.push(m.to_string());
        }
    }
    Decision {
        route: route.name.clone(),
        model,
        reason,
        strategy: route.strategy.as_str(),
        experiment,
        fallbacks,
        candidates: cands,
        weights: (w.quality, w.cost, w.latency),
        cost_rule: cost_rule.as_str(),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::extract;
    use serde_json::json;
    use smartllm_config::{Arm, Experiment, ModelProfile, Pricing, RouteRule, RuleWhen, Weights};
    use std::time::Duration;

    fn model(name: &str, q: f64, input: f64, output: f64) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            owned_by: "test".into(),
            deployments: Vec::new(),
            pricing: Pricing {
                input_per_1m: input,
                output_per_1m: output,
                cached_input_per_1m: input,
                per_request: 0.0,
            },
            profile: ModelProfile {
                quality: [q; 8],
                ..ModelProfile::default()
            },
            mode: smartllm_config::ModelMode::infer([name]),
            mode_explicit: false,
        }
    }

    fn setup() -> (Config, RouteConfig) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
        cfg.models = vec![
            model("cheap", 0.6, 0.1, 0.4),
            model("strong", 0.95, 5.0, 15.0),
        ];
        let mut r = RouteConfig::fixed("r", "cheap");
        r.candidates = vec!["cheap".into(), "strong".into()];
        r.strategy = Strategy::Utility;
        r.weights = Weights {
            quality: 0.75,
            cost: 0.15,
            latency: 0.10,
        };
        (cfg, r)
    }

    fn features(prompt: &str) -> Features {
        let b = json!({"messages": [{"role": "user", "content": prompt}]});
        extract(b.as_object().unwrap(), None, None)
    }

    #[test]
    fn beta_draws_have_the_right_mean_and_spread() {
        fastrand::seed(7);
        for (a, b) in [(16.0, 4.0), (0.5, 0.5), (2.0, 18.0)] {
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|_| beta_sample(a, b)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let (m, v) = (a / (a + b), a * b / ((a + b).powi(2) * (a + b + 1.0)));
            assert!((mean - m).abs() < 0.01, "Beta({a},{b}) mean {mean} vs {m}");
            assert!(
                (var - v).abs() < v * 0.1,
                "Beta({a},{b}) variance {var} vs {v}"
            );
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    /// Exploration draws qualities from the posterior on a share of the
    /// requests: the runner-up gets some of them (and the reason says so),
    /// a candidate under the floor none, and never inside an experiment.
    #[test]
    fn exploration_tries_the_runner_up_above_the_floor_only() {
        let (mut cfg, mut r) = setup();
        cfg.models = vec![
            model("best", 0.80, 1.0, 1.0),
            model("close", 0.76, 1.0, 1.0),
            model("weak", 0.30, 1.0, 1.0),
        ];
        r.candidates = vec!["best".into(), "close".into(), "weak".into()];
        let f = features("Hello, how are you?");
        let run = |r: &RouteConfig| {
            let mut picks = std::collections::BTreeMap::new();
            for _ in 0..2000 {
                let d = decide(
                    &cfg,
                    r,
                    &f,
                    None,
                    None,
                    &RequestInfo::default(),
                    &StaticState,
                );
                *picks
                    .entry((d.model, d.reason.ends_with("+explore")))
                    .or_insert(0) += 1;
            }
            picks
        };
        fastrand::seed(11);
        let never = run(&r);
        assert_eq!(
            never.get(&("best".to_string(), false)),
            Some(&2000),
            "{never:?}"
        );
        r.explore = 0.5;
        // For this simple prompt: best 0.88, close 0.85, weak 0.56 expected.
        r.explore_floor = 0.7;
        let some = run(&r);
        let explored: i32 = some.iter().filter(|((_, e), _)| *e).map(|(_, n)| n).sum();
        assert!((850..1150).contains(&explored), "{some:?}");
        assert!(
            some.get(&("close".to_string(), true))
                .is_some_and(|n| *n > 100),
            "{some:?}"
        );
        assert!(some.keys().all(|(m, _)| m != "weak"), "{some:?}");
        r.experiment = Some(Experiment {
            name: "e".into(),
            sticky_by: StickyBy::Key,
            arms: vec![Arm {
                name: "all".into(),
                weight: 1.0,
                model: None,
            }],
        });
        let within = run(&r);
        assert!(within.keys().all(|(_, e)| !e), "{within:?}");
    }

    /// A cheap model under the floor that a low draw of the dear one would
    /// let win: never while exploring (about one explored request in ten
    /// went to it before).
    #[test]
    fn exploring_never_serves_a_model_under_the_floor() {
        let (mut cfg, mut r) = setup();
        cfg.models = vec![
            model("strong", 0.80, 5.0, 15.0),
            model("cheap", 0.40, 0.1, 0.4),
        ];
        r.candidates = vec!["strong".into(), "cheap".into()];
        r.cost_rule = CostRule::Log;
        r.explore_floor = 0.7;
        let f = features("Hello, how are you?");
        let run = |r: &RouteConfig| {
            let mut picks = std::collections::BTreeMap::new();
            for _ in 0..2000 {
                let d = decide(
                    &cfg,
                    r,
                    &f,
                    None,
                    None,
                    &RequestInfo::default(),
                    &StaticState,
                );
                *picks
                    .entry((d.model, d.reason.ends_with("+explore")))
                    .or_insert(0) += 1;
            }
            picks
        };
        fastrand::seed(5);
        let plain = run(&r);
        assert_eq!(
            plain.get(&("strong".to_string(), false)),
            Some(&2000),
            "{plain:?}"
        );
        r.explore = 0.5;
        let explored = run(&r);
        assert!(explored.keys().all(|(m, _)| m == "strong"), "{explored:?}");
        assert!(
            explored.contains_key(&("strong".to_string(), true)),
            "{explored:?}"
        );
    }

    struct Down(&'static str);
    /// Live figures for one model, the others unmeasured.
    struct Measured(&'static str, LiveSnapshot);
    impl ModelState for Measured {
        fn live(&self, m: &str) -> Option<LiveSnapshot> {
            (m == self.0).then_some(self.1)
        }
        fn available(&self, _: &str) -> bool {
            true
        }
    }

    /// One failed request does not move a model's routing: its error rate
    /// counts by the requests it rests on. A steady failure still does.
    #[test]
    fn an_error_rate_counts_by_the_requests_it_rests_on() {
        let (cfg, r) = setup();
        let f = features("Prove that there are infinitely many primes, step by step.");
        let info = RequestInfo::default();
        let quality = |state: &dyn ModelState| {
            decide(&cfg, &r, &f, None, None, &info, state)
                .candidates
                .iter()
                .find(|c| c.model == "strong")
                .unwrap()
                .quality
        };
        let base = quality(&StaticState);
        let once = LiveSnapshot {
            requests: 1,
            errors: 1,
            error_rate: 0.175,
            weight: 1.0,
            ..LiveSnapshot::default()
        };
        let q1 = quality(&Measured("strong", once));
        assert!(q1 < base && q1 > base * 0.98, "{q1} against {base}");
        let steady = LiveSnapshot {
            requests: 200,
            errors: 120,
            error_rate: 0.6,
            weight: 1.0,
            ..LiveSnapshot::default()
        };
        let q2 = quality(&Measured("strong", steady));
        assert!(q2 < base * 0.75, "{q2} against {base}");
    }

    impl ModelState for Down {
        fn live(&self, _: &str) -> Option<LiveSnapshot> {
            None
        }
        fn available(&self, m: &str) -> bool {
            m != self.0
        }
    }

    /// Two cheap models a price doubling apart, one slightly better, and a
    /// dear one: under the linear rule the dear candidate flattens the cheap
    /// ones' price difference to nothing; under the log rule a doubling
    /// counts the same whatever else is a candidate.
    #[test]
    fn price_differences_count_at_every_scale() {
        let (mut cfg, mut r) = setup();
        cfg.models = vec![
            model("cheap-a", 0.700, 0.1, 0.4),
            model("cheap-b", 0.75, 0.2, 0.8),
            model("dear", 0.99, 15.0, 75.0),
        ];
        r.candidates = vec!["cheap-a".into(), "cheap-b".into(), "dear".into()];
        // Quality matters less than usual here, so the dear model does not win outright.
        r.weights = Weights {
            quality: 0.3,
            cost: 0.6,
            latency: 0.1,
        };
        let f = features("Hello, how are you?");
        let pick = |r: &RouteConfig, cfg: &Config| {
            decide(
                cfg,
                r,
                &f,
                None,
                None,
                &RequestInfo::default(),
                &StaticState,
            )
        };
        r.cost_rule = CostRule::Linear;
        let d = pick(&r, &cfg);
        assert_eq!(d.model, "cheap-b", "{:?}", d.candidates);
        r.cost_rule = CostRule::Log;
        let d = pick(&r, &cfg);
        assert_eq!(d.model, "cheap-a", "{:?}", d.candidates);
        assert_eq!(d.cost_rule, "log");
        // Without the dear candidate the log rule decides the same.
        let mut without = r.clone();
        without.candidates.pop();
        assert_eq!(pick(&without, &cfg).model, "cheap-a");

        // The cheapest within a share of the best expected quality: the
        // cheap ones are well below the dear one for this prompt.
        let q = |d: &Decision, m: &str| d.candidates.iter().find(|c| c.model == m).unwrap().quality;
        let gap = 1.0 - q(&d, "cheap-a") / q(&d, "dear");
        assert!(gap > 0.1, "{gap}");
        r.cost_rule = CostRule::CheapestWithin(0.02);
        let d = pick(&r, &cfg);
        assert_eq!(
            (d.model.as_str(), d.cost_rule.as_str()),
            ("dear", "cheapest_within:2%")
        );
        r.cost_rule = CostRule::CheapestWithin(gap + 0.01);
        assert_eq!(pick(&r, &cfg).model, "cheap-a");
        // Budget pressure widens the tolerance (by up to 15 points).
        r.cost_rule = CostRule::CheapestWithin(gap - 0.05);
        assert_eq!(pick(&r, &cfg).model, "dear");
        let pressed = RequestInfo {
            budget_pressure: 1.0,
            ..RequestInfo::default()
        };
        let d = decide(&cfg, &r, &f, None, None, &pressed, &StaticState);
        assert_eq!(d.model, "cheap-a", "{}", d.cost_rule);
        assert!(d.reason.ends_with("+budget"));
    }

    #[test]
    fn simple_goes_cheap_hard_goes_strong_and_budget_pressure_shifts_cheaper() {
        let (cfg, r) = setup();
        let info = RequestInfo::default();
        let d = decide(
            &cfg,
            &r,
            &features("Hello, how are you?"),
            None,
            None,
            &info,
            &StaticState,
        );
        assert_eq!((d.model.as_str(), d.reason.as_str()), ("cheap", "utility"));
        let hard = features("Implement a lock-free concurrent hash map in Rust, prove its invariants and analyse the memory ordering step by step.");
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(d.model, "strong");
        assert_eq!(d.fallbacks, vec!["cheap"]);
        // A budget nearly spent: cost weighs more, the cheap model wins, and the reason says so.
        let pressed = RequestInfo {
            budget_pressure: 0.99,
            ..RequestInfo::default()
        };
        let d = decide(&cfg, &r, &hard, None, None, &pressed, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "utility+budget")
        );
    }

    #[test]
    fn constraints_rules_and_availability() {
        let (cfg, mut r) = setup();
        let info = RequestInfo {
            headers: vec![("x-tier".into(), "gold".into())],
            ..RequestInfo::default()
        };
        let hard =
            features("Design a distributed consensus protocol and prove its safety step by step.");
        r.constraints.max_cost_usd = Some(0.001);
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(d.model, "cheap");
        assert!(d.candidates[1]
            .excluded
            .as_deref()
            .unwrap()
            .starts_with("max_cost:"));
        r.constraints.max_cost_usd = None;
        r.constraints.latency_budget = Some(Duration::from_millis(1));
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(
            d.reason, "constraints_relaxed",
            "nothing fits: served anyway, and said so"
        );
        r.constraints.latency_budget = None;
        r.rules = vec![RouteRule {
            name: "gold".into(),
            when: RuleWhen {
                headers: vec![("x-tier".into(), "gold".into())],
                ..RuleWhen::default()
            },
            pin: Some("cheap".into()),
            exclude: vec![],
            prefer: vec![],
        }];
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "rule:gold")
        );
        r.rules.clear();
        let d = decide(&cfg, &r, &hard, None, None, &info, &Down("strong"));
        assert_eq!(d.model, "cheap");
        assert_eq!(d.candidates[1].excluded.as_deref(), Some("unavailable"));
        // Tools need the capability.
        let mut cfg2 = cfg.clone();
        cfg2.models[1].profile.capabilities = Some(vec!["json".into()]);
        let b = json!({"messages": [{"role": "user", "content": "prove it step by step"}], "tools": [{"type": "function", "function": {"name": "f"}}]});
        let f = extract(b.as_object().unwrap(), None, None);
        let d = decide(&cfg2, &r, &f, None, None, &info, &StaticState);
        assert_eq!(
            d.candidates[1].excluded.as_deref(),
            Some("capability:tools")
        );
        // So does streaming: a model listed without it is no candidate for a
        // streamed request (and still one for the same request unstreamed).
        let mut no_stream = cfg.clone();
        no_stream.models[1].profile.capabilities = Some(vec!["tools".into(), "json".into()]);
        let hard_text =
            "Design a distributed consensus protocol and prove its safety step by step.";
        let streamed =
            json!({"stream": true, "messages": [{"role": "user", "content": hard_text}]});
        let fs = extract(streamed.as_object().unwrap(), None, None);
        let d = decide(&no_stream, &r, &fs, None, None, &info, &StaticState);
        assert_eq!(d.model, "cheap");
        assert_eq!(
            d.candidates[1].excluded.as_deref(),
            Some("capability:streaming")
        );
        let unstreamed = json!({"messages": [{"role": "user", "content": hard_text}]});
        let fu = extract(unstreamed.as_object().unwrap(), None, None);
        let d = decide(&no_stream, &r, &fu, None, None, &info, &StaticState);
        assert_eq!(d.candidates[1].excluded, None);
        // A pin holds only where its model can serve the request: tools
        // pinned to a model without them go the usual way.
        let mut pinned = r.clone();
        pinned.rules = vec![RouteRule {
            name: "p".into(),
            when: RuleWhen::default(),
            pin: Some("strong".into()),
            exclude: vec![],
            prefer: vec![],
        }];
        let d = decide(&cfg, &pinned, &f, None, None, &info, &StaticState);
        assert_eq!((d.model.as_str(), d.reason.as_str()), ("strong", "rule:p"));
        let d = decide(&cfg2, &pinned, &f, None, None, &info, &StaticState);
        assert_eq!(d.model, "cheap", "{:?}", d.candidates);
        assert_ne!(d.reason, "rule:p");
        // An experiment arm pinning it: the request does not count as the
        // arm's.
        let mut arm = r.clone();
        arm.experiment = Some(Experiment {
            name: "e".into(),
            sticky_by: StickyBy::Key,
            arms: vec![Arm {
                name: "strong-arm".into(),
                weight: 1.0,
                model: Some("strong".into()),
            }],
        });
        let d = decide(&cfg, &arm, &f, None, None, &info, &StaticState);
        assert_eq!(d.model, "strong");
        assert!(d.experiment.is_some());
        let d = decide(&cfg2, &arm, &f, None, None, &info, &StaticState);
        assert_eq!(d.model, "cheap");
        assert_eq!(d.experiment, None);
    }

    /// A `json_schema` request does not go to a model served only through
    /// Anthropic unless it is listed as taking structured outputs.
    #[test]
    fn a_schema_goes_only_to_models_that_can_take_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        std::fs::write(
            dir.path().join("providers.yaml"),
            "providers:\n  claude-p:\n    kind: anthropic\n    base_url: http://127.0.0.1:9/v1\n  openai-p:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n",
        )
        .unwrap();
        let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
        let (_, r) = setup();
        let on = |provider: &str| {
            vec![smartllm_config::DeploymentConfig {
                provider: provider.into(),
                upstream_model: "x".into(),
                weight: 1,
            }]
        };
        let (mut cheap, mut strong) = (
            model("cheap", 0.6, 0.1, 0.4),
            model("strong", 0.95, 5.0, 15.0),
        );
        cheap.deployments = on("openai-p");
        strong.deployments = on("claude-p");
        cfg.models = vec![cheap, strong];
        let b = json!({"messages": [{"role": "user", "content": "prove it step by step"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}});
        let f = extract(b.as_object().unwrap(), None, None);
        let d = decide(
            &cfg,
            &r,
            &f,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(d.candidates[1].model, "strong");
        assert_eq!(
            d.candidates[1].excluded.as_deref(),
            Some("capability:structured_outputs")
        );
        assert_eq!(d.candidates[0].excluded, None);
        cfg.models[1].profile.capabilities = Some(vec!["json".into(), "structured_outputs".into()]);
        let d = decide(
            &cfg,
            &r,
            &f,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(d.candidates[1].excluded, None);
        // JSON mode needs no schema support.
        cfg.models[1].profile.capabilities = None;
        let b = json!({"messages": [{"role": "user", "content": "prove it step by step"}],
            "response_format": {"type": "json_object"}});
        let f = extract(b.as_object().unwrap(), None, None);
        let d = decide(
            &cfg,
            &r,
            &f,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(d.candidates[1].excluded, None);

        // Extended thinking (an Anthropic Messages request): a model served
        // only by OpenAI-compatible providers would answer 400, unless its
        // provider drops thinking; a server tool or document needs Anthropic.
        let hard = json!({"messages": [{"role": "user", "content": "Design a distributed consensus protocol and prove its safety step by step."}]});
        let mut f = extract(hard.as_object().unwrap(), None, None);
        f.thinking = true;
        let decided = |cfg: &Config, f: &Features| {
            decide(
                cfg,
                &r,
                f,
                None,
                None,
                &RequestInfo::default(),
                &StaticState,
            )
        };
        let d = decided(&cfg, &f);
        assert_eq!(
            d.candidates[0].excluded.as_deref(),
            Some("anthropic_only:thinking")
        );
        assert_eq!(d.candidates[1].excluded, None);
        assert_eq!(d.model, "strong");
        // A reasoning model takes it as `reasoning_effort`.
        cfg.models[0].profile.capabilities = Some(vec!["tools".into(), "reasoning".into()]);
        assert_eq!(decided(&cfg, &f).candidates[0].excluded, None);
        cfg.models[0].profile.capabilities = None;
        assert_eq!(
            decided(&cfg, &f).candidates[0].excluded.as_deref(),
            Some("anthropic_only:thinking"),
            "never assumed"
        );
        // A Claude model listed without `thinking` cannot take it either.
        cfg.models[1].profile.capabilities = Some(vec!["tools".into()]);
        assert_eq!(
            decided(&cfg, &f).candidates[1].excluded.as_deref(),
            Some("capability:thinking")
        );
        cfg.models[1].profile.capabilities = Some(vec!["tools".into(), "thinking".into()]);
        assert_eq!(decided(&cfg, &f).candidates[1].excluded, None);
        cfg.models[1].profile.capabilities = None;
        cfg.providers.get_mut("openai-p").unwrap().drop_thinking = true;
        assert_eq!(decided(&cfg, &f).candidates[0].excluded, None);
        f.thinking = false;
        f.anthropic_only = Some("tools[0] (web_search_20250305)".into());
        let d = decided(&cfg, &f);
        assert_eq!(
            d.candidates[0].excluded.as_deref(),
            Some("anthropic_only:tools[0] (web_search_20250305)")
        );
        assert_eq!(d.model, "strong");

        // Built-in tools of a Responses request: only a provider that
        // speaks Responses or drops them takes it.
        f.anthropic_only = None;
        f.builtin_tools = Some("web_search".into());
        let d = decided(&cfg, &f);
        let why = |d: &Decision, i: usize| d.candidates[i].excluded.clone();
        assert_eq!(why(&d, 0).as_deref(), Some("responses_only:web_search"));
        assert_eq!(why(&d, 1).as_deref(), Some("responses_only:web_search"));
        cfg.providers.get_mut("openai-p").unwrap().responses = true;
        let d = decided(&cfg, &f);
        assert_eq!((why(&d, 0), d.model.as_str()), (None, "cheap"));
        assert_eq!(why(&d, 1).as_deref(), Some("responses_only:web_search"));
        cfg.providers.get_mut("openai-p").unwrap().responses = false;
        cfg.providers
            .get_mut("claude-p")
            .unwrap()
            .drop_builtin_tools = true;
        let d = decided(&cfg, &f);
        assert_eq!(why(&d, 0).as_deref(), Some("responses_only:web_search"));
        assert_eq!((why(&d, 1), d.model.as_str()), (None, "strong"));

        // Log-probabilities: Claude gives none.
        f.builtin_tools = None;
        f.openai_only = Some("logprobs");
        let d = decided(&cfg, &f);
        assert_eq!(why(&d, 0), None);
        assert_eq!(why(&d, 1).as_deref(), Some("openai_only:logprobs"));
        let b =
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50256": -100}});
        assert_eq!(
            extract(b.as_object().unwrap(), None, None).openai_only,
            Some("logit_bias")
        );
        let b = json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": false, "logit_bias": {}});
        assert_eq!(
            extract(b.as_object().unwrap(), None, None).openai_only,
            None
        );

        // What a reasoning model refuses (stop sequences, log-probabilities,
        // logit_bias) keeps it out; the others stay candidates.
        f.openai_only = None;
        cfg.models[0].deployments[0].upstream_model = "o3-2025-04-16".into();
        let refused =
            |b: serde_json::Value| extract(b.as_object().unwrap(), None, None).reasoning_refused;
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            refused(json!({"messages": msgs, "stop": ["END"]})),
            Some("stop")
        );
        assert_eq!(
            refused(json!({"messages": msgs, "stop": "END"})),
            Some("stop")
        );
        assert_eq!(
            refused(json!({"messages": msgs, "logprobs": true})),
            Some("logprobs")
        );
        assert_eq!(
            refused(json!({"messages": msgs, "stop": [], "temperature": 0.2})),
            None
        );
        assert_eq!(refused(json!({"messages": msgs, "stop": null})), None);
        f.reasoning_refused = Some("stop");
        let d = decided(&cfg, &f);
        assert_eq!(why(&d, 0).as_deref(), Some("reasoning_refuses:stop"));
        assert_eq!((why(&d, 1), d.model.as_str()), (None, "strong"));
        f.reasoning_refused = None;
        assert_eq!(why(&decided(&cfg, &f), 0), None);
        // Other models that reason (gpt-oss) give them.
        f.reasoning_refused = Some("stop");
        cfg.models[0].deployments[0].upstream_model = "gpt-oss-120b".into();
        assert_eq!(why(&decided(&cfg, &f), 0), None);
    }

    /// When nothing meets the route's constraints, only the budgets are
    /// relaxed: a model a matching rule excludes is never served (not as the
    /// way out, a pin or a fallback), and one the request does not fit comes
    /// last and says so.
    #[test]
    fn only_budgets_are_relaxed_never_a_rule_or_the_context() {
        let (mut cfg, mut r) = setup();
        let info = RequestInfo {
            headers: vec![("x-data".into(), "pii".into())],
            ..RequestInfo::default()
        };
        let hard =
            features("Design a distributed consensus protocol and prove its safety step by step.");
        r.rules = vec![RouteRule {
            name: "pii".into(),
            when: RuleWhen {
                headers: vec![("x-data".into(), "pii".into())],
                ..RuleWhen::default()
            },
            pin: Some("strong".into()),
            exclude: vec!["strong".into()],
            prefer: vec![],
        }];
        r.fallback = vec!["strong".into()];
        // The cheap model misses the latency budget, the strong one is ruled out.
        r.constraints.latency_budget = Some(Duration::from_millis(1));
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "constraints_relaxed"),
            "{:?}",
            d.candidates
        );
        assert!(d.fallbacks.is_empty(), "{:?}", d.fallbacks);
        // Even when the cheap model is down, the excluded one is not served.
        let d = decide(&cfg, &r, &hard, None, None, &info, &Down("cheap"));
        assert_eq!(d.model, "cheap");
        assert_eq!(d.reason, "no_model_fits");
        assert!(!d.refused);
        // Rules that exclude every model refuse the request.
        r.rules[0].exclude.push("cheap".into());
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(d.reason, "no_model_allowed");
        assert!(d.refused);
        r.rules[0].exclude.pop();
        // A budget-relaxed model before one the request does not fit.
        r.rules.clear();
        r.fallback.clear();
        r.constraints.latency_budget = None;
        r.constraints.max_cost_usd = Some(1e-9);
        cfg.models[0].profile.context_window = 4;
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("strong", "constraints_relaxed"),
            "{:?}",
            d.candidates
        );
        // Nothing fits the context: the best one, said so.
        cfg.models[1].profile.context_window = 4;
        let d = decide(&cfg, &r, &hard, None, None, &info, &StaticState);
        assert_eq!(d.reason, "no_model_fits");
        // A limit near the integer's end excludes rather than wraps.
        let mut huge = hard.clone();
        huge.max_tokens = Some(u64::MAX as _);
        let d = decide(&cfg, &r, &huge, None, None, &info, &StaticState);
        assert!(d.candidates.iter().all(|c| c
            .excluded
            .as_deref()
            .is_some_and(|w| w.starts_with("context_window:"))));
        // A limit above a model's own output limit is lowered upstream, so
        // the context is judged with the lowered one (Claude Code's 32,000).
        cfg.models[0].profile.context_window = 128_000;
        cfg.models[0].profile.max_output_tokens = Some(16_384);
        cfg.models[1].profile.context_window = 128_000;
        let mut long = hard.clone();
        long.prompt_tokens = 100_000;
        long.max_tokens = Some(32_000);
        let d = decide(&cfg, &r, &long, None, None, &info, &StaticState);
        let why = |m: &str| {
            d.candidates
                .iter()
                .find(|c| c.model == m)
                .unwrap()
                .excluded
                .clone()
        };
        assert!(
            why("cheap").is_none_or(|w| !w.starts_with("context_window")),
            "{:?}",
            d.candidates
        );
        assert!(why("strong").is_some_and(|w| w.starts_with("context_window")));
    }

    /// When no candidate meets every budget, the one that misses them by
    /// least is served: a model within the cost cap and a little slow, not
    /// the dearest and slowest (which used to win on utility); the
    /// explanation names every budget a candidate misses.
    #[test]
    fn relaxed_budgets_serve_the_least_missing_candidate() {
        let (mut cfg, mut r) = setup();
        cfg.models[0].profile.latency = Duration::from_millis(1500);
        cfg.models[0].profile.tokens_per_second = 1e6;
        cfg.models[1].profile.latency = Duration::from_millis(8000);
        cfg.models[1].profile.tokens_per_second = 1e6;
        r.constraints.latency_budget = Some(Duration::from_secs(1));
        let f = features("Write a Python function to merge two sorted lists.");
        let info = RequestInfo::default();
        let strong_cost = decide(&cfg, &r, &f, None, None, &info, &StaticState)
            .candidates
            .iter()
            .find(|c| c.model == "strong")
            .unwrap()
            .expected_cost_usd;
        r.constraints.max_cost_usd = Some(strong_cost / 2.0);
        let d = decide(&cfg, &r, &f, None, None, &info, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "constraints_relaxed"),
            "{:?}",
            d.candidates
        );
        // A route's fallback is no way around that: the least missing
        // candidate still goes first.
        let mut with_fallback = r.clone();
        with_fallback.fallback = vec!["strong".into()];
        let f2 = decide(&cfg, &with_fallback, &f, None, None, &info, &StaticState);
        assert_eq!(f2.model, "cheap", "{:?}", f2.candidates);
        let strong = d.candidates.iter().find(|c| c.model == "strong").unwrap();
        let why = strong.excluded.as_deref().unwrap();
        assert!(
            why.contains("latency_budget:") && why.contains("max_cost:"),
            "{why}"
        );
        // The strong model is the nearer miss when only its latency is a
        // little over and the cheap one is far under the quality floor.
        r.constraints.max_cost_usd = None;
        r.constraints.latency_budget = Some(Duration::from_millis(7000));
        r.constraints.min_quality = Some(0.9);
        cfg.models[0].profile.quality = [0.3; 8];
        let d = decide(&cfg, &r, &f, None, None, &info, &StaticState);
        assert_eq!(d.model, "strong", "{:?}", d.candidates);
    }

    /// A candidate expected to cost more than the caller's budgets have
    /// left is kept out while another fits; when none does, the cheapest
    /// (the least over) is served.
    #[test]
    fn what_a_budget_has_left_keeps_dearer_candidates_out() {
        let (cfg, r) = setup();
        let f = features("Prove that there are infinitely many primes, step by step.");
        let info = RequestInfo::default();
        let d = decide(&cfg, &r, &f, None, None, &info, &StaticState);
        assert_eq!(d.model, "strong", "{:?}", d.candidates);
        let cost = |m: &str| {
            d.candidates
                .iter()
                .find(|c| c.model == m)
                .unwrap()
                .expected_cost_usd
        };
        let left = RequestInfo {
            budget_left_usd: Some((cost("cheap") + cost("strong")) / 2.0),
            ..RequestInfo::default()
        };
        let d = decide(&cfg, &r, &f, None, None, &left, &StaticState);
        assert_eq!((d.model.as_str(), d.reason.as_str()), ("cheap", "utility"));
        let strong = d.candidates.iter().find(|c| c.model == "strong").unwrap();
        assert!(
            strong
                .excluded
                .as_deref()
                .is_some_and(|w| w.starts_with("budget_left:")),
            "{strong:?}"
        );
        let none = RequestInfo {
            budget_left_usd: Some(0.0),
            ..RequestInfo::default()
        };
        let d = decide(&cfg, &r, &f, None, None, &none, &StaticState);
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "constraints_relaxed")
        );
    }

    /// A prompt no candidate's context window holds goes to the largest.
    #[test]
    fn a_prompt_no_window_holds_goes_to_the_largest() {
        let (mut cfg, r) = setup();
        cfg.models[0].profile.context_window = 200_000;
        cfg.models[1].profile.context_window = 128_000;
        let mut f = features("Summarise this.");
        f.prompt_tokens = 300_000;
        let d = decide(
            &cfg,
            &r,
            &f,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "no_model_fits")
        );
        // (By utility alone the strong model would have been served.)
        cfg.models[0].profile.context_window = 128_000;
        let d = decide(
            &cfg,
            &r,
            &f,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(d.model, "strong");
    }

    /// A fallback that is no candidate is a way out only where it can serve
    /// the request: one whose context window the prompt overflows is neither
    /// served as `constraints_relaxed` ahead of a budget-relaxed candidate
    /// nor put in the fallback chain.
    #[test]
    fn a_fallback_the_request_does_not_fit_is_no_way_out() {
        let (mut cfg, mut r) = setup();
        let mut small = model("small", 0.5, 0.05, 0.1);
        small.profile.context_window = 16_385;
        cfg.models.push(small);
        r.fallback = vec!["small".into()];
        // Neither candidate meets the cost budget: only budgets to relax.
        r.constraints.max_cost_usd = Some(1e-12);
        let mut long = features("Summarise this document.");
        long.prompt_tokens = 60_000;
        let d = decide(
            &cfg,
            &r,
            &long,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_ne!(d.model, "small", "{:?}", d.candidates);
        assert_eq!(d.reason, "constraints_relaxed");
        assert!(
            !d.fallbacks.iter().any(|m| m == "small"),
            "{:?}",
            d.fallbacks
        );
        // A prompt it fits: the candidate that misses the budgets by least
        // still goes before the fallback (which misses them too), and the
        // fallback stays in the chain.
        let short = features("Summarise this document.");
        let d = decide(
            &cfg,
            &r,
            &short,
            None,
            None,
            &RequestInfo::default(),
            &StaticState,
        );
        assert_eq!(
            (d.model.as_str(), d.reason.as_str()),
            ("cheap", "constraints_relaxed")
        );
        assert!(
            d.fallbacks.iter().any(|m| m == "small"),
            "{:?}",
            d.fallbacks
        );
    }

    #[test]
    fn experiment_arms_follow_weights_and_stick() {
        let exp = Experiment {
            name: "e".into(),
            sticky_by: StickyBy::User,
            arms: vec![
                Arm {
                    name: "a".into(),
                    weight: 80.0,
                    model: None,
                },
                Arm {
                    name: "b".into(),
                    weight: 20.0,
                    model: Some("strong".into()),
                },
            ],
        };
        let users: Vec<String> = (0..20_000).map(|i| format!("user{i}")).collect();
        let b = users
            .iter()
            .filter(|u| {
                assign_arm(
                    &exp,
                    &RequestInfo {
                        user: Some(u),
                        ..RequestInfo::default()
                    },
                )
                .name
                    == "b"
            })
            .count();
        let share = b as f64 / users.len() as f64;
        assert!((share - 0.2).abs() < 0.015, "{share}");
        let one = RequestInfo {
            user: Some("alice"),
            ..RequestInfo::default()
        };
        let first = assign_arm(&exp, &one).name.clone();
        assert!((0..10).all(|_| assign_arm(&exp, &one).name == first));
    }

    /// Callers an open gateway knows only by tenant (key name "-", no
    /// `user` in the body) are spread over the arms, not all put in one.
    #[test]
    fn experiment_arms_spread_callers_known_only_by_tenant() {
        let exp = Experiment {
            name: "e".into(),
            sticky_by: StickyBy::User,
            arms: vec![
                Arm {
                    name: "a".into(),
                    weight: 50.0,
                    model: None,
                },
                Arm {
                    name: "b".into(),
                    weight: 50.0,
                    model: Some("strong".into()),
                },
            ],
        };
        let tenants: Vec<String> = (0..1_000).map(|i| format!("tenant{i}")).collect();
        let b = tenants
            .iter()
            .filter(|t| {
                assign_arm(
                    &exp,
                    &RequestInfo {
                        tenant: t,
                        key: "-",
                        ..RequestInfo::default()
                    },
                )
                .name
                    == "b"
            })
            .count();
        assert!((300..700).contains(&b), "{b} of 1000 in arm b");
    }

    /// The reason says `learned` only when the learned router predicted:
    /// not for an embedding of another dimension, nor for candidates it was
    /// not trained on (their profile qualities are used).
    #[test]
    fn the_reason_is_learned_only_when_the_router_predicted() {
        let (cfg, mut r) = setup();
        r.strategy = Strategy::Learned("learned.json".into());
        let router = |model: &str| LearnedRouter {
            format: crate::learned::FORMAT.into(),
            embedder: "test".into(),
            dim: 2,
            lambda: 1.0,
            models: [(
                model.to_string(),
                crate::learned::Linear {
                    weights: vec![0.0, 0.0],
                    bias: 1.0,
                    samples: 8,
                    train_rmse: 0.0,
                },
            )]
            .into(),
        };
        let f = features("Hello, how are you?");
        let pick = |l: &LearnedRouter, e: &[f32]| {
            decide(
                &cfg,
                &r,
                &f,
                Some(l),
                Some(e),
                &RequestInfo::default(),
                &StaticState,
            )
        };
        let trained = router("cheap");
        let d = pick(&trained, &[0.5, 0.5]);
        assert_eq!((d.model.as_str(), d.reason.as_str()), ("cheap", "learned"));
        assert_eq!(d.candidates[0].quality, 1.0);
        // Another dimension: no prediction, the profiles decide.
        let d = pick(&trained, &[0.5, 0.5, 0.5]);
        assert_eq!(d.reason, "utility", "{:?}", d.candidates);
        // Trained on no candidate: the profiles decide.
        let d = pick(&router("other"), &[0.5, 0.5]);
        assert_eq!(d.reason, "utility", "{:?}", d.candidates);
    }
}
