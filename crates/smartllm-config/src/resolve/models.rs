//! `models.yaml`: each model's deployments (on providers defined in
//! `providers.yaml`), pricing and routing profile.

use super::{profiles, valid_name};
use crate::catalog::catalog;
use crate::raw::{RawModels, RawPricing, RawProfile};
use crate::{
    DeploymentConfig, Issues, ModelConfig, ModelMode, ModelProfile, Pricing, ProviderConfig, Task,
    CAPABILITIES, MODELS_FILE, PROVIDERS_FILE,
};
use crate::{LongContextPrice, ModelPrice, PriceSource, ProviderKind};
use std::collections::{BTreeMap, BTreeSet};

pub(super) fn resolve_models(
    models: RawModels,
    providers: &BTreeMap<String, ProviderConfig>,
    v: &mut Issues<'_>,
) -> (Vec<ModelConfig>, BTreeMap<String, ModelPrice>) {
    let mut seen = BTreeSet::new();
    let mut resolved = Vec::new();
    let mut prices = BTreeMap::new();
    let mapping = profiles::benchmark_mapping(&models.benchmark_tasks, v);
    for (i, m) in models.models.into_iter().enumerate() {
        let at = format!("models[{i}]");
        if !valid_name(&m.name) {
            v.push(
                MODELS_FILE,
                format!("{at}.name"),
                "model names may only use letters, digits, '-', '_', ':', '/' and '.'",
            );
        }
        if !seen.insert(m.name.clone()) {
            v.push(
                MODELS_FILE,
                format!("{at}.name"),
                format!("model {:?} is defined twice", m.name),
            );
        }
        if m.deployments.is_empty() {
            v.push(
                MODELS_FILE,
                format!("{at}.deployments"),
                "a model needs at least one deployment",
            );
        }
        let mut deployments = Vec::new();
        for (j, d) in m.deployments.into_iter().enumerate() {
            let dat = format!("{at}.deployments[{j}]");
            // A provider defined but refused has its own error: no second
            // one here saying it does not exist.
            let refused = v.has_issue_under(PROVIDERS_FILE, &format!("providers.{}", d.provider));
            if !providers.contains_key(&d.provider) && !refused {
                let known: Vec<_> = providers.keys().cloned().collect();
                v.push(
                    MODELS_FILE,
                    format!("{dat}.provider"),
                    format!(
                        "unknown provider {:?} (providers.yaml defines: {})",
                        d.provider,
                        known.join(", ")
                    ),
                );
            }
            let weight = d.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                v.push(
                    MODELS_FILE,
                    format!("{dat}.weight"),
                    "must be between 1 and 1000",
                );
            }
            deployments.push(DeploymentConfig {
                provider: d.provider,
                upstream_model: d.model.unwrap_or_else(|| m.name.clone()),
                weight: weight.clamp(1, 1000),
            });
        }
        let owned_by = m.owned_by.unwrap_or_else(|| {
            deployments
                .first()
                .map(|d| d.provider.clone())
                .unwrap_or_else(|| "smartllm".into())
        });
        let anthropic = deployments.iter().any(|d| {
            providers
                .get(&d.provider)
                .is_some_and(|p| p.kind == ProviderKind::Anthropic)
        });
        let mode = match m.mode.as_deref() {
            Some(s) => ModelMode::parse(s).unwrap_or_else(|| {
                v.push(
                    MODELS_FILE,
                    format!("{at}.mode"),
                    "must be one of chat, embedding, image, audio, rerank",
                );
                ModelMode::Chat
            }),
            None => ModelMode::infer(
                std::iter::once(m.name.as_str())
                    .chain(deployments.iter().map(|d| d.upstream_model.as_str())),
            ),
        };
        let (price, openai_listed) = match &m.pricing {
            Some(p) => (configured_price(&at, p, anthropic, mode, v), false),
            // The catalog, by the first deployment's upstream name it knows.
            None => deployments
                .iter()
                .find_map(|d| {
                    let kind = providers.get(&d.provider).map_or("", |p| p.kind.as_str());
                    catalog().lookup(&d.provider, kind, &d.upstream_model)
                })
                .map(|e| (e.price(), matches!(e.provider.as_str(), "openai" | "azure")))
                .unwrap_or_default(),
        };
        let mut price = price;
        // The tier defaults are OpenAI's (its own API or Azure's): other
        // providers' tiers are billed at their list price unless set.
        let openai_served = openai_listed
            || deployments.iter().any(|d| {
                providers.get(&d.provider).is_some_and(|p| {
                    let host = p.base_url.host.to_ascii_lowercase();
                    host == "api.openai.com" || host.ends_with(".openai.azure.com")
                })
            });
        if !openai_served {
            price.service_tiers = crate::ServiceTiers {
                flex: 1.0,
                priority: 1.0,
            };
        }
        if let Some(t) = &m.service_tiers {
            for (field, value, slot) in [
                ("flex", t.flex, &mut price.service_tiers.flex),
                ("priority", t.priority, &mut price.service_tiers.priority),
            ] {
                let Some(x) = value else { continue };
                if x.is_finite() && x > 0.0 && x <= 10.0 {
                    *slot = x;
                } else {
                    v.push(
                        MODELS_FILE,
                        format!("{at}.service_tiers.{field}"),
                        "must be a multiplier above 0 and at most 10 (0.5: half the list price)",
                    );
                }
            }
        }
        let pricing = Pricing {
            input_per_1m: price.input_per_1m,
            output_per_1m: price.output_per_1m,
            cached_input_per_1m: price.cache_read_per_1m,
            per_request: price.per_request,
        };
        prices.insert(m.name.clone(), price);
        let profile = resolve_profile(&at, m.profile.as_ref(), &mapping, v);
        resolved.push(ModelConfig {
            name: m.name,
            owned_by,
            deployments,
            pricing,
            profile,
            mode,
            mode_explicit: m.mode.is_some(),
        });
    }
    (resolved, prices)
}

/// `pricing:` as written, with defaults: cache reads at the input price,
/// cache writes at Anthropic's 1.25x (5 minutes) and 2x (1 hour) of input on
/// Anthropic providers, at the input price elsewhere.
fn configured_price(
    at: &str,
    p: &RawPricing,
    anthropic: bool,
    mode: ModelMode,
    v: &mut Issues<'_>,
) -> ModelPrice {
    let input = p.input.unwrap_or(0.0);
    let (w5, w1) = if anthropic { (1.25, 2.0) } else { (1.0, 1.0) };
    let cache_write_5m = p.cache_write.unwrap_or(input * w5);
    let cache_write_1h = p.cache_write_1h.unwrap_or(if anthropic {
        input * w1
    } else {
        cache_write_5m
    });
    let long_context = p.long_context.as_ref().map(|l| {
        let li = l.input.unwrap_or(input);
        // A cache price not given for the tier keeps its ratio to the input
        // price (a 90% cache-read discount stays 90% above the tier).
        let scaled = |base: f64, ratio: f64| {
            if input > 0.0 {
                base * li / input
            } else {
                li * ratio
            }
        };
        LongContextPrice {
            above_tokens: l.above,
            input_per_1m: li,
            output_per_1m: l.output.or(p.output).unwrap_or(0.0),
            cache_read_per_1m: l
                .cached_input
                .unwrap_or_else(|| scaled(p.cached_input.unwrap_or(input), 1.0)),
            cache_write_5m_per_1m: l.cache_write.unwrap_or_else(|| scaled(cache_write_5m, w5)),
            cache_write_1h_per_1m: l
                .cache_write_1h
                .unwrap_or_else(|| scaled(cache_write_1h, w1)),
        }
    });
    let price = ModelPrice {
        input_per_1m: input,
        output_per_1m: p.output.unwrap_or(0.0),
        cache_read_per_1m: p.cached_input.unwrap_or(input),
        cache_write_5m_per_1m: cache_write_5m,
        cache_write_1h_per_1m: cache_write_1h,
        reasoning_per_1m: p.reasoning,
        audio_input_per_1m: p.audio_input,
        audio_output_per_1m: p.audio_output,
        per_request: p.per_request.unwrap_or(0.0),
        web_search_per_1k: p.web_search.unwrap_or(crate::DEFAULT_WEB_SEARCH_PER_1K),
        long_context,
        service_tiers: Default::default(),
        source: PriceSource::Configured,
    };
    // Each price as written: one derived from another (a cache price from
    // the input price) is wrong only where its source is, which has its
    // own error.
    let mut fields = vec![
        ("input", price.input_per_1m, true),
        ("output", price.output_per_1m, true),
        (
            "cached_input",
            price.cache_read_per_1m,
            p.cached_input.is_some(),
        ),
        (
            "cache_write",
            price.cache_write_5m_per_1m,
            p.cache_write.is_some(),
        ),
        (
            "cache_write_1h",
            price.cache_write_1h_per_1m,
            p.cache_write_1h.is_some(),
        ),
        ("reasoning", price.reasoning_per_1m.unwrap_or(0.0), true),
        ("audio_input", price.audio_input_per_1m.unwrap_or(0.0), true),
        (
            "audio_output",
            price.audio_output_per_1m.unwrap_or(0.0),
            true,
        ),
        ("per_request", price.per_request, true),
        ("web_search", price.web_search_per_1k, true),
    ];
    if let (Some(l), Some(raw)) = (&price.long_context, &p.long_context) {
        fields.extend([
            ("long_context.input", l.input_per_1m, raw.input.is_some()),
            ("long_context.output", l.output_per_1m, raw.output.is_some()),
            (
                "long_context.cached_input",
                l.cache_read_per_1m,
                raw.cached_input.is_some(),
            ),
            (
                "long_context.cache_write",
                l.cache_write_5m_per_1m,
                raw.cache_write.is_some(),
            ),
            (
                "long_context.cache_write_1h",
                l.cache_write_1h_per_1m,
                raw.cache_write_1h.is_some(),
            ),
        ]);
    }
    for (field, value, written) in fields {
        if written && (!value.is_finite() || !(0.0..=10_000.0).contains(&value)) {
            v.push(
                MODELS_FILE,
                format!("{at}.pricing.{field}"),
                "must be between 0 and 10000 (USD per 1M tokens, or per request)",
            );
        }
    }
    // No silent $0: a price left out of a `pricing` block is not taken
    // from the catalog, so it would bill its tokens at nothing. (A model
    // priced by the call, `per_request`, needs neither; an embedding model
    // writes no answer.)
    if p.per_request.is_none() {
        let answers = mode != ModelMode::Embedding;
        for (field, given) in [
            ("input", p.input.is_some()),
            ("output", p.output.is_some() || !answers),
        ] {
            if !given {
                v.push(
                    MODELS_FILE,
                    format!("{at}.pricing"),
                    format!("gives no `{field}` price, so its {field} tokens would be billed at $0 (write `{field}: 0` if they are free, or leave `pricing` out for the price catalog)"),
                );
            }
        }
    }
    price
}

fn resolve_profile(
    at: &str,
    raw: Option<&RawProfile>,
    mapping: &BTreeMap<String, Vec<Task>>,
    v: &mut Issues<'_>,
) -> ModelProfile {
    let mut p = ModelProfile::default();
    let Some(raw) = raw else { return p };
    if let Some(c) = raw.context_window {
        if c < 256 {
            v.push(
                MODELS_FILE,
                format!("{at}.profile.context_window"),
                "must be at least 256 tokens",
            );
        }
        p.context_window = c;
    }
    if let Some(m) = raw.max_output_tokens {
        if m == 0 || m > p.context_window {
            v.push(
                MODELS_FILE,
                format!("{at}.profile.max_output_tokens"),
                "must be between 1 and the context window",
            );
        }
        p.max_output_tokens = Some(m);
    }
    if let Some(caps) = &raw.capabilities {
        for (i, c) in caps.iter().enumerate() {
            if !CAPABILITIES.contains(&c.as_str()) {
                v.push(
                    MODELS_FILE,
                    format!("{at}.profile.capabilities[{i}]"),
                    format!(
                        "unknown capability {c:?} (known: {})",
                        CAPABILITIES.join(", ")
                    ),
                );
            }
        }
        p.capabilities = Some(caps.clone());
    }
    profiles::resolve_quality(at, raw, mapping, &mut p.quality, &mut p.quality_source, v);
    if let Some(t) = raw.tokens_per_second {
        if !(t > 0.0 && t.is_finite()) {
            v.push(
                MODELS_FILE,
                format!("{at}.profile.tokens_per_second"),
                "must be above 0",
            );
        } else {
            p.tokens_per_second = t;
        }
    }
    if let Some(l) = raw.latency {
        p.latency = l.0;
    }
    p
}
