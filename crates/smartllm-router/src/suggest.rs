//! Cost optimisation suggestions from the ledger's traffic mix (requests by
//! tenant, app, model, task, complexity tier and cache outcome) and the
//! router's model profiles:
//!
//! - **cheaper model**: simple and moderate requests served by a model when a
//!   cheaper one is expected (by the profiles, at that complexity) to answer
//!   them about as well; the saving reprices their actual tokens;
//! - **cache threshold**: misses whose best semantic match came within 0.05 of
//!   the similarity threshold; their cost is what a lower threshold would have
//!   saved at most;
//! - **cache coverage**: requests that never met the cache (it is off for
//!   their model or route), valued at the hit rate the same app gets where the
//!   cache is on.
//!
//! Figures are estimates from what was actually spent, over the window asked.

use crate::decide::profile_quality;
use serde::Serialize;
use smartllm_config::{Config, ModelConfig, Task};
use smartllm_ledger::MixRow;
use std::collections::{BTreeMap, BTreeSet};

/// A cheaper model may lose at most this much expected quality.
pub const QUALITY_TOLERANCE: f64 = 0.03;
/// A miss this close under the threshold counts as a near miss.
pub const NEAR_MISS_MARGIN: f32 = 0.05;

/// The tier of a router complexity score (0-1).
pub fn tier(complexity: f64) -> &'static str {
    if complexity < 0.35 {
        "simple"
    } else if complexity < 0.65 {
        "moderate"
    } else {
        "complex"
    }
}

/// The complexity a tier stands for when scoring models.
fn tier_complexity(tier: &str) -> Option<f64> {
    match tier {
        "simple" => Some(0.2),
        "moderate" => Some(0.5),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suggestion {
    /// `cheaper_model`, `cache_threshold` or `cache_coverage`.
    pub kind: &'static str,
    pub tenant: String,
    pub app: String,
    pub model: String,
    /// The cheaper model (cheaper_model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_model: Option<String>,
    /// The tasks and tier the suggestion covers (cheaper_model only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub requests: u64,
    /// What those requests cost.
    pub cost_usd: f64,
    /// What following the suggestion would have saved.
    pub saving_usd: f64,
    /// Expected quality before and after (cheaper_model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<(f64, f64)>,
    /// What to do, in a sentence.
    pub action: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub requests: u64,
    pub cost_usd: f64,
    /// Already saved by cache hits.
    pub saved_by_cache_usd: f64,
    /// Sum of the suggestions' savings.
    pub potential_saving_usd: f64,
    pub suggestions: Vec<Suggestion>,
}

/// Whether `model` has a price (models.yaml `pricing` or a catalog entry).
/// An unpriced model is billed $0, which says nothing about what it would
/// cost: it is never proposed as the cheaper model.
fn priced(config: &Config, model: &str) -> bool {
    config
        .price(model)
        .is_some_and(smartllm_config::ModelPrice::is_priced)
}

fn reprice(config: &Config, model: &str, r: &MixRow) -> Option<f64> {
    let p = &config.model(model)?.pricing;
    let cached = r.cached_tokens.min(r.input_tokens);
    Some(
        (r.input_tokens - cached) as f64 * p.input_per_1m / 1e6
            + cached as f64 * p.cached_input_per_1m / 1e6
            + r.output_tokens as f64 * p.output_per_1m / 1e6
            + r.requests as f64 * p.per_request,
    )
}

/// Can `to` serve what `from` serves: the same kind of model (a chat
/// request never goes to an embedding or image model), and every capability
/// `from` declares (tools, vision, json, ...) unless `to` declares none.
fn can_stand_in(from: &ModelConfig, to: &ModelConfig) -> bool {
    if from.mode != to.mode {
        return false;
    }
    match (&from.profile.capabilities, &to.profile.capabilities) {
        (Some(need), Some(have)) => need.iter().all(|c| have.contains(c)),
        _ => true,
    }
}

/// Routed aliases that can choose between two models (to name in the advice).
fn routes_with(config: &Config, a: &str, b: &str) -> Vec<String> {
    config
        .routes
        .values()
        .filter(|r| r.candidates.iter().any(|c| c == a) && r.candidates.iter().any(|c| c == b))
        .map(|r| r.name.clone())
        .collect()
}

pub fn suggest(config: &Config, rows: &[MixRow]) -> Report {
    let mut report = Report {
        requests: 0,
        cost_usd: 0.0,
        saved_by_cache_usd: 0.0,
        potential_saving_usd: 0.0,
        suggestions: Vec::new(),
    };
    // (tenant, app, from, to, tier) -> (requests, cost, saving, tasks, quality)
    type Key = (String, String, String, String, String);
    type Acc = (u64, f64, f64, BTreeSet<String>, (f64, f64));
    let mut cheaper: BTreeMap<Key, Acc> = BTreeMap::new();
    // (tenant, app, model, route) -> (requests, cost)
    let mut near: BTreeMap<(String, String, String, String), (u64, f64)> = BTreeMap::new();
    let mut off: BTreeMap<(String, String, String), (u64, f64)> = BTreeMap::new();
    // (tenant, app) -> (hits, lookups)
    let mut hit_rate: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for r in rows {
        report.requests += r.requests;
        report.cost_usd += r.cost_usd;
        report.saved_by_cache_usd += r.saved_usd;
        let app = (r.tenant.clone(), r.app.clone());
        let looked_up = matches!(r.mix.cache.as_str(), "hit" | "near" | "miss");
        if looked_up {
            let h = hit_rate.entry(app.clone()).or_default();
            h.1 += r.requests;
            if r.mix.cache == "hit" {
                h.0 += r.requests;
            }
        }
        if r.mix.cache == "hit" || r.cost_usd <= 0.0 {
            continue;
        }
        let group = (r.tenant.clone(), r.app.clone(), r.model.clone());
        match r.mix.cache.as_str() {
            "near" => {
                let (t, a, m) = group.clone();
                let e = near.entry((t, a, m, r.mix.route.clone())).or_default();
                e.0 += r.requests;
                e.1 += r.cost_usd;
            }
            "off" => {
                let e = off.entry(group.clone()).or_default();
                e.0 += r.requests;
                e.1 += r.cost_usd;
            }
            _ => {}
        }
        // A cheaper model for the simple and moderate share.
        let (Some(task), Some(c), Some(current)) = (
            Task::parse(&r.mix.task),
            tier_complexity(&r.mix.tier),
            config.model(&r.model),
        ) else {
            continue;
        };
        let q_now = profile_quality(current, task, c);
        let best = config
            .models
            .iter()
            .filter(|m| m.name != r.model && !m.deployments.is_empty())
            .filter(|m| priced(config, &m.name))
            .filter(|m| can_stand_in(current, m))
            .filter_map(|m| {
                let q = profile_quality(m, task, c);
                let cost = reprice(config, &m.name, r)?;
                (q >= q_now - QUALITY_TOLERANCE && cost < r.cost_usd)
                    .then(|| (m.name.clone(), q, r.cost_usd - cost))
            })
            .max_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((to, q, saving)) = best {
            let e = cheaper
                .entry((
                    r.tenant.clone(),
                    r.app.clone(),
                    r.model.clone(),
                    to,
                    r.mix.tier.clone(),
                ))
                .or_insert((0, 0.0, 0.0, BTreeSet::new(), (q_now, q)));
            e.0 += r.requests;
            e.1 += r.cost_usd;
            e.2 += saving;
            e.3.insert(task.as_str().to_string());
            // Report the weakest pair seen.
            if q - q_now < e.4 .1 - e.4 .0 {
                e.4 = (q_now, q);
            }
        }
    }
    for ((tenant, app, from, to, tier), (requests, cost, saving, tasks, quality)) in cheaper {
        let routes = routes_with(config, &from, &to);
        let via = if routes.is_empty() {
            String::new()
        } else {
            format!(
                " A routed alias ({}) makes this choice per request.",
                routes.join(", ")
            )
        };
        let tasks: Vec<String> = tasks.into_iter().collect();
        report.suggestions.push(Suggestion {
            kind: "cheaper_model",
            action: format!(
                "Send {tier} {} requests of {tenant}/{app} to {to} instead of {from} (expected quality {:.2} -> {:.2}): ${saving:.4} of ${cost:.4} saved on {requests} requests.{via}",
                tasks.join("/"),
                quality.0,
                quality.1
            ),
            tenant,
            app,
            model: from,
            to_model: Some(to),
            tasks,
            tier: Some(tier),
            requests,
            cost_usd: cost,
            saving_usd: saving,
            quality: Some(quality),
        });
    }
    for ((tenant, app, model, route), (requests, cost)) in near {
        // The policy that applied: the route's (or the model's) own, else
        // the default; the advice names the one to change.
        let route = (!route.is_empty()).then_some(route);
        let policy = config.cache.policy(route.as_deref(), &model);
        let threshold = policy.similarity_threshold;
        let (via, setting) = match &route {
            Some(r) if config.cache.routes.contains_key(r) => (
                format!(" through route {r}"),
                format!("routes.{r}.similarity_threshold"),
            ),
            _ if config.cache.routes.contains_key(&model) => (
                route
                    .as_ref()
                    .map(|r| format!(" through route {r}"))
                    .unwrap_or_default(),
                format!("routes.{model}.similarity_threshold"),
            ),
            _ => (
                route
                    .as_ref()
                    .map(|r| format!(" through route {r}"))
                    .unwrap_or_default(),
                "similarity_threshold".to_string(),
            ),
        };
        report.suggestions.push(Suggestion {
            kind: "cache_threshold",
            action: format!(
                "{requests} requests of {tenant}/{app} on {model}{via} missed the cache by less than {NEAR_MISS_MARGIN} of similarity: lowering {setting} from {threshold:.2} to {:.2} (cache.yaml) would have answered them from the cache, saving up to ${cost:.4}. Check with `smartllm cache eval` that the answers stay equivalent.",
                (threshold - NEAR_MISS_MARGIN).max(0.0)
            ),
            tenant,
            app,
            model,
            to_model: None,
            tasks: Vec::new(),
            tier: None,
            requests,
            cost_usd: cost,
            saving_usd: cost,
            quality: None,
        });
    }
    let overall = hit_rate
        .values()
        .fold((0u64, 0u64), |a, h| (a.0 + h.0, a.1 + h.1));
    for ((tenant, app, model), (requests, cost)) in off {
        let (hits, lookups) = hit_rate
            .get(&(tenant.clone(), app.clone()))
            .copied()
            .filter(|h| h.1 > 0)
            .unwrap_or(overall);
        if hits == 0 || lookups == 0 {
            continue;
        }
        let rate = hits as f64 / lookups as f64;
        let saving = cost * rate;
        report.suggestions.push(Suggestion {
            kind: "cache_coverage",
            action: format!(
                "{requests} requests of {tenant}/{app} on {model} (${cost:.4}) never reached the cache (it is off for that model or route in cache.yaml); at the {:.0}% hit rate this traffic sees where the cache is on, turning it on would save about ${saving:.4}.",
                rate * 100.0
            ),
            tenant,
            app,
            model,
            to_model: None,
            tasks: Vec::new(),
            tier: None,
            requests,
            cost_usd: cost,
            saving_usd: saving,
            quality: None,
        });
    }
    report
        .suggestions
        .sort_by(|a, b| b.saving_usd.total_cmp(&a.saving_usd));
    report.potential_saving_usd = report.suggestions.iter().map(|s| s.saving_usd).sum();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartllm_config::{
        DeploymentConfig, ModelConfig, ModelPrice, ModelProfile, PriceSource, Pricing,
    };
    use smartllm_ledger::Mix;

    fn model(name: &str, q: f64, input: f64, output: f64) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            owned_by: "test".into(),
            // Suggestions only name models that have somewhere to run.
            deployments: vec![DeploymentConfig {
                provider: "p".into(),
                upstream_model: name.into(),
                weight: 1,
            }],
            pricing: Pricing {
                input_per_1m: input,
                output_per_1m: output,
                cached_input_per_1m: input / 2.0,
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

    fn config() -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
        cfg.models = vec![
            model("big", 0.92, 2.5, 10.0),
            model("small", 0.90, 0.15, 0.6),
            model("weak", 0.5, 0.01, 0.01),
        ];
        for name in ["big", "small", "weak"] {
            price(&mut cfg, name, PriceSource::Configured);
        }
        cfg
    }

    /// Registers `model`'s price (from its `pricing`) as the config's
    /// resolution does, with its source.
    fn price(cfg: &mut Config, model: &str, source: PriceSource) {
        let p = cfg.model(model).unwrap().pricing;
        cfg.prices.insert(
            model.to_string(),
            ModelPrice {
                input_per_1m: p.input_per_1m,
                output_per_1m: p.output_per_1m,
                cache_read_per_1m: p.cached_input_per_1m,
                per_request: p.per_request,
                source,
                ..ModelPrice::default()
            },
        );
    }

    fn row(model: &str, task: &str, tier: &str, cache: &str, n: u64, cost: f64) -> MixRow {
        MixRow {
            tenant: "acme".into(),
            app: "web".into(),
            model: model.into(),
            mix: Mix {
                task: task.into(),
                tier: tier.into(),
                cache: cache.into(),
                route: String::new(),
            },
            requests: n,
            input_tokens: n * 1000,
            output_tokens: n * 200,
            cost_usd: cost,
            ..Default::default()
        }
    }

    #[test]
    fn simple_traffic_on_a_dear_model_gets_a_cheaper_one() {
        let cfg = config();
        // 10 simple chat requests on big: 10k in, 2k out = $0.045.
        let rows = vec![
            row("big", "chat", "simple", "miss", 10, 0.045),
            // Complex traffic is left where it is.
            row("big", "code", "complex", "miss", 5, 0.0225),
        ];
        let r = suggest(&cfg, &rows);
        assert_eq!(r.requests, 15);
        assert_eq!(r.suggestions.len(), 1, "{:#?}", r.suggestions);
        let s = &r.suggestions[0];
        assert_eq!(s.kind, "cheaper_model");
        assert_eq!(s.to_model.as_deref(), Some("small"), "weak is too weak");
        // small costs 10k*0.15/1M + 2k*0.6/1M = $0.0027.
        assert!((s.saving_usd - (0.045 - 0.0027)).abs() < 1e-9, "{s:?}");
        assert_eq!(s.tasks, vec!["chat".to_string()]);
        assert!(s.action.contains("small instead of big"), "{}", s.action);
    }

    #[test]
    fn only_models_of_the_same_kind_and_capabilities_are_suggested() {
        let mut cfg = config();
        // Far cheaper, and (undeclared) as good on paper: an embedding model
        // and an image model never answer a chat.
        cfg.models
            .push(model("text-embedding-3-small", 0.95, 0.02, 0.0));
        cfg.models.push(model("dall-e-3", 0.95, 0.01, 0.0));
        let mut explicit = model("cheap-embedder", 0.95, 0.01, 0.0);
        explicit.mode = smartllm_config::ModelMode::Embedding;
        cfg.models.push(explicit);
        let rows = vec![row("big", "chat", "simple", "miss", 10, 0.045)];
        let r = suggest(&cfg, &rows);
        assert_eq!(r.suggestions.len(), 1, "{:#?}", r.suggestions);
        assert_eq!(r.suggestions[0].to_model.as_deref(), Some("small"));
        assert!(
            r.suggestions[0]
                .action
                .contains("expected quality 0.92 -> 0.90"),
            "{}",
            r.suggestions[0].action
        );
        // A model lacking a capability the current one declares is no stand-in.
        let mut cfg = config();
        cfg.models[0].profile.capabilities = Some(vec!["tools".into(), "vision".into()]);
        cfg.models[1].profile.capabilities = Some(vec!["tools".into()]);
        let r = suggest(&cfg, &rows);
        assert!(r.suggestions.is_empty(), "{:#?}", r.suggestions);
    }

    #[test]
    fn an_unpriced_model_is_never_the_cheaper_one() {
        // As good as big on paper and billed $0 because nobody priced it:
        // its saving would read 100%, and mean nothing.
        let mut cfg = config();
        cfg.models.push(model("mystery", 0.95, 0.0, 0.0));
        price(&mut cfg, "mystery", PriceSource::Unpriced);
        let rows = vec![row("big", "chat", "simple", "miss", 10, 0.045)];
        let r = suggest(&cfg, &rows);
        assert_eq!(r.suggestions.len(), 1, "{:#?}", r.suggestions);
        assert_eq!(r.suggestions[0].to_model.as_deref(), Some("small"));
        // A model with no price at all (not in the config's prices) neither.
        cfg.prices.remove("mystery");
        let r = suggest(&cfg, &rows);
        assert_eq!(r.suggestions[0].to_model.as_deref(), Some("small"));
        // Priced at $0 on purpose (models.yaml `pricing`, a local model): a
        // real saving.
        price(&mut cfg, "mystery", PriceSource::Configured);
        let r = suggest(&cfg, &rows);
        let s = &r.suggestions[0];
        assert_eq!(s.to_model.as_deref(), Some("mystery"));
        assert!((s.saving_usd - 0.045).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn model_modes_are_inferred_from_names() {
        use smartllm_config::ModelMode;
        assert_eq!(
            ModelMode::infer(["text-embedding-3-small"]),
            ModelMode::Embedding
        );
        assert_eq!(ModelMode::infer(["img", "dall-e-3"]), ModelMode::Image);
        assert_eq!(ModelMode::infer(["whisper-1"]), ModelMode::Audio);
        assert_eq!(
            ModelMode::infer(["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]),
            ModelMode::Chat
        );
    }

    #[test]
    fn near_misses_and_uncached_traffic_become_cache_suggestions() {
        let cfg = config();
        let rows = vec![
            row("small", "-", "-", "hit", 30, 0.0),
            row("small", "-", "-", "miss", 60, 0.02),
            row("small", "-", "-", "near", 10, 0.004),
            row("small", "-", "-", "off", 50, 0.01),
            // Deliberate bypasses (no-store, exclusions) are never suggested.
            row("small", "-", "-", "bypass", 50, 0.5),
        ];
        let r = suggest(&cfg, &rows);
        let kinds: Vec<&str> = r.suggestions.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec!["cache_threshold", "cache_coverage"]);
        let cov = &r.suggestions[1];
        // 30 hits of 100 lookups: 30% of $0.01.
        assert!((cov.saving_usd - 0.003).abs() < 1e-12, "{cov:?}");
        assert!((r.suggestions[0].saving_usd - 0.004).abs() < 1e-12);
        assert!((r.potential_saving_usd - 0.007).abs() < 1e-12);
        assert!(
            r.suggestions[0]
                .action
                .contains("lowering similarity_threshold from 0.70 to 0.65"),
            "{}",
            r.suggestions[0].action
        );
    }

    /// Near misses of a route with its own threshold name that route's
    /// setting and value, not the default's.
    #[test]
    fn a_near_miss_suggestion_names_the_threshold_that_applied() {
        let mut cfg = config();
        let mut strict = cfg.cache.defaults.clone();
        strict.similarity_threshold = 0.97;
        cfg.cache.routes.insert("smart".into(), strict);
        let mut via_route = row("small", "-", "-", "near", 10, 0.004);
        via_route.mix.route = "smart".into();
        let mut via_other = row("small", "-", "-", "near", 5, 0.002);
        via_other.mix.route = "fast".into();
        let r = suggest(&cfg, &[via_route, via_other]);
        let actions: Vec<&str> = r.suggestions.iter().map(|s| s.action.as_str()).collect();
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(
            actions[1].contains("on small through route fast")
                && actions[1].contains("lowering similarity_threshold from 0.70 to 0.65"),
            "{actions:?}"
        );
        assert!(
            actions[0].contains("on small through route smart")
                && actions[0]
                    .contains("lowering routes.smart.similarity_threshold from 0.97 to 0.92"),
            "{actions:?}"
        );
    }

    #[test]
    fn tiers() {
        assert_eq!(tier(0.1), "simple");
        assert_eq!(tier(0.5), "moderate");
        assert_eq!(tier(0.9), "complex");
    }
}
