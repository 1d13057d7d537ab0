//! `routes.yaml`: route aliases (fixed or routed, with objective,
//! constraints, rules, fallbacks and experiments) over the models of
//! `models.yaml`, the task classifier, and the files they refer to.

use super::relative_to;
use crate::raw::{RawClassifier, RawRoute};
use crate::routing::task_names;
use crate::{
    Arm, ClassifierConfig, CostRule, Experiment, Issues, RouteConfig, RouteRule, RuleWhen,
    StickyBy, Strategy, Task, Weights, CAPABILITIES, ROUTES_FILE,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every alias of `routes.yaml`. `models` are the names models.yaml defines.
pub(super) fn resolve_routes(
    dir: &Path,
    routes: &BTreeMap<String, RawRoute>,
    models: &BTreeSet<String>,
    v: &mut Issues<'_>,
) -> BTreeMap<String, RouteConfig> {
    let mut resolved = BTreeMap::new();
    for (name, r) in routes {
        if models.contains(name) {
            v.push(
                ROUTES_FILE,
                format!("routes.{name}"),
                format!("route {name:?} has the name of a model; pick another alias"),
            );
        }
        resolved.insert(name.clone(), resolve_route(dir, name, r, models, v));
    }
    // The same pattern on two aliases: which one a name goes to would
    // depend on their names' order.
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, r) in routes {
        for (i, p) in r.patterns.iter().enumerate() {
            match owner.get(p.as_str()) {
                Some(first) if first != name => v.push(
                    ROUTES_FILE,
                    format!("routes.{name}.match[{i}]"),
                    format!(
                        "{p:?} is also a pattern of routes.{first}; a name must have one alias"
                    ),
                ),
                _ => {
                    owner.insert(p, name);
                }
            }
        }
    }
    resolved
}

pub(super) fn resolve_classifier(
    dir: &Path,
    raw: &RawClassifier,
    v: &mut Issues<'_>,
) -> ClassifierConfig {
    let k = raw.k.unwrap_or(7);
    if !(1..=64).contains(&k) {
        v.push(ROUTES_FILE, "classifier.k", "must be between 1 and 64");
    }
    ClassifierConfig {
        examples: raw.examples.as_ref().map(|f| relative_to(dir, f)),
        k: k.clamp(1, 64),
    }
}

/// Resolve one alias of `routes.yaml`. `models` are the names models.yaml defines.
fn resolve_route(
    dir: &Path,
    name: &str,
    r: &RawRoute,
    models: &BTreeSet<String>,
    v: &mut Issues<'_>,
) -> RouteConfig {
    let at = format!("routes.{name}");
    let known = || models.iter().cloned().collect::<Vec<_>>().join(", ");
    let check_model = |v: &mut Issues<'_>, path: String, m: &str| {
        if !models.contains(m) {
            v.push(
                ROUTES_FILE,
                path,
                format!("unknown model {m:?} (models.yaml defines: {})", known()),
            );
        }
    };
    let candidates = r.candidates.clone().unwrap_or_default();
    let mut route = match (&r.model, r.candidates.is_some()) {
        (Some(m), false) => {
            check_model(v, format!("{at}.model"), m);
            RouteConfig::fixed(name, m)
        }
        (Some(_), true) => {
            v.push(
                ROUTES_FILE,
                format!("{at}.candidates"),
                "give either model (a fixed alias) or candidates (a routed alias), not both",
            );
            RouteConfig::fixed(name, "")
        }
        (None, true) if candidates.is_empty() => {
            v.push(
                ROUTES_FILE,
                format!("{at}.candidates"),
                "needs at least one model",
            );
            RouteConfig::fixed(name, "")
        }
        (None, true) => {
            let mut seen = BTreeSet::new();
            for (i, m) in candidates.iter().enumerate() {
                check_model(v, format!("{at}.candidates[{i}]"), m);
                if !seen.insert(m) {
                    v.push(
                        ROUTES_FILE,
                        format!("{at}.candidates[{i}]"),
                        format!("{m:?} is listed twice"),
                    );
                }
            }
            let mut rc = RouteConfig::fixed(name, &candidates[0]);
            rc.candidates = candidates.clone();
            rc.strategy = Strategy::Utility;
            rc
        }
        (None, false) => {
            v.push(
                ROUTES_FILE,
                &at,
                "needs model (a fixed alias) or candidates (a routed alias)",
            );
            RouteConfig::fixed(name, "")
        }
    };
    for (i, p) in r.patterns.iter().enumerate() {
        let path = format!("{at}.match[{i}]");
        if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            v.push(
                ROUTES_FILE,
                path,
                format!("{p:?}: a model name pattern (`*` for any characters) without spaces"),
            );
        } else if r.patterns[..i].contains(p) {
            v.push(ROUTES_FILE, path, format!("{p:?} is listed twice"));
        } else {
            route.patterns.push(p.clone());
        }
    }
    let routed = !route.candidates.is_empty();
    let only_routed = |v: &mut Issues<'_>, key: &str| {
        v.push(
            ROUTES_FILE,
            format!("{at}.{key}"),
            "only a routed alias (with candidates) takes this setting",
        );
    };
    match (r.strategy.as_deref(), &r.learned) {
        (None | Some("utility"), None) => {}
        (Some("learned"), Some(file)) => route.strategy = Strategy::Learned(relative_to(dir, file)),
        (Some("learned"), None) => v.push(
            ROUTES_FILE,
            format!("{at}.learned"),
            "strategy: learned needs learned: FILE (made by smartllm train-router)",
        ),
        (None | Some("utility"), Some(_)) => v.push(
            ROUTES_FILE,
            format!("{at}.strategy"),
            "learned: FILE is only used with strategy: learned",
        ),
        (Some(s), _) => v.push(
            ROUTES_FILE,
            format!("{at}.strategy"),
            format!("unknown strategy {s:?} (utility or learned)"),
        ),
    }
    if !routed && r.strategy.is_some() {
        only_routed(v, "strategy");
    }
    if let Some(w) = &r.weights {
        if !routed {
            only_routed(v, "weights");
        }
        let d = Weights::default();
        let (q, c, l) = (
            w.quality.unwrap_or(d.quality),
            w.cost.unwrap_or(d.cost),
            w.latency.unwrap_or(d.latency),
        );
        let mut ok = true;
        for (k, x) in [("quality", q), ("cost", c), ("latency", l)] {
            if !(x >= 0.0 && x.is_finite()) {
                v.push(
                    ROUTES_FILE,
                    format!("{at}.weights.{k}"),
                    "must be 0 or more",
                );
                ok = false;
            }
        }
        let sum = q + c + l;
        if ok && sum <= 0.0 {
            v.push(
                ROUTES_FILE,
                format!("{at}.weights"),
                "at least one weight must be above 0",
            );
        } else if ok {
            route.weights = Weights {
                quality: q / sum,
                cost: c / sum,
                latency: l / sum,
            };
        }
    }
    let c = &r.constraints;
    route.constraints.latency_budget = c.latency_budget.map(|d| d.0);
    if let Some(x) = c.max_cost_usd {
        if !(x > 0.0 && x.is_finite()) {
            v.push(
                ROUTES_FILE,
                format!("{at}.constraints.max_cost_usd"),
                "must be above 0",
            );
        }
        route.constraints.max_cost_usd = Some(x);
    }
    if let Some(x) = c.min_quality {
        if !(0.0..=1.0).contains(&x) {
            v.push(
                ROUTES_FILE,
                format!("{at}.constraints.min_quality"),
                "must be between 0 and 1",
            );
        }
        route.constraints.min_quality = Some(x);
    }
    for (i, cap) in c.capabilities.iter().enumerate() {
        if !CAPABILITIES.contains(&cap.as_str()) {
            v.push(
                ROUTES_FILE,
                format!("{at}.constraints.capabilities[{i}]"),
                format!(
                    "unknown capability {cap:?} (known: {})",
                    CAPABILITIES.join(", ")
                ),
            );
        }
    }
    route.constraints.capabilities = c.capabilities.clone();
    if !routed
        && (c.latency_budget.is_some()
            || c.max_cost_usd.is_some()
            || !c.capabilities.is_empty()
            || c.min_quality.is_some())
    {
        only_routed(v, "constraints");
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let rat = format!("{at}.rules[{i}]");
        if !routed {
            only_routed(v, &format!("rules[{i}]"));
        }
        let w = &rule.when;
        let mut tasks = Vec::new();
        for (j, t) in w.task.iter().enumerate() {
            match Task::parse(t) {
                Some(t) => tasks.push(t),
                None => v.push(
                    ROUTES_FILE,
                    format!("{rat}.when.task[{j}]"),
                    format!("unknown task {t:?} (known: {})", task_names()),
                ),
            }
        }
        for (k, x) in [
            ("min_complexity", w.min_complexity),
            ("max_complexity", w.max_complexity),
        ] {
            if x.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
                v.push(
                    ROUTES_FILE,
                    format!("{rat}.when.{k}"),
                    "must be between 0 and 1",
                );
            }
        }
        if let Some(p) = &rule.pin {
            check_model(v, format!("{rat}.pin"), p);
        }
        for (j, m) in rule.exclude.iter().enumerate() {
            check_model(v, format!("{rat}.exclude[{j}]"), m);
        }
        for (j, m) in rule.prefer.iter().enumerate() {
            check_model(v, format!("{rat}.prefer[{j}]"), m);
        }
        if rule.pin.is_none() && rule.exclude.is_empty() && rule.prefer.is_empty() {
            v.push(ROUTES_FILE, &rat, "a rule needs pin, exclude or prefer");
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        for (k, want) in &w.headers {
            let lower = k.to_ascii_lowercase();
            if headers.iter().any(|(name, _)| *name == lower) {
                // Both would have to match one header: the rule never could.
                v.push(
                    ROUTES_FILE,
                    format!("{rat}.when.headers.{k}"),
                    "header given twice (names are case-insensitive)",
                );
            } else {
                headers.push((lower, want.clone()));
            }
        }
        route.rules.push(RouteRule {
            name: rule.name.clone().unwrap_or_else(|| format!("rule{i}")),
            when: RuleWhen {
                tasks,
                min_complexity: w.min_complexity,
                max_complexity: w.max_complexity,
                min_prompt_tokens: w.min_prompt_tokens,
                max_prompt_tokens: w.max_prompt_tokens,
                languages: w.language.iter().map(|l| l.to_ascii_lowercase()).collect(),
                has_code: w.has_code,
                has_math: w.has_math,
                has_tools: w.has_tools,
                has_images: w.has_images,
                headers,
                apps: w.app.clone(),
                tenants: w.tenant.clone(),
            },
            pin: rule.pin.clone(),
            exclude: rule.exclude.clone(),
            prefer: rule.prefer.clone(),
        });
    }
    for (i, m) in r.fallback.iter().enumerate() {
        check_model(v, format!("{at}.fallback[{i}]"), m);
    }
    route.fallback = r.fallback.clone();
    route.max_fallbacks = r.max_fallbacks.unwrap_or(2);
    if route.max_fallbacks > 8 {
        v.push(
            ROUTES_FILE,
            format!("{at}.max_fallbacks"),
            "must be 8 or less",
        );
    }
    if let Some(p) = r.budget_pressure_at {
        if !(0.0..=1.0).contains(&p) {
            v.push(
                ROUTES_FILE,
                format!("{at}.budget_pressure_at"),
                "must be between 0 and 1",
            );
        }
        route.budget_pressure_at = p;
    }
    let tolerance = r.quality_tolerance.unwrap_or(0.02);
    if !(0.0..=0.5).contains(&tolerance) {
        v.push(
            ROUTES_FILE,
            format!("{at}.quality_tolerance"),
            "must be between 0 and 0.5 (a share of the best candidate's expected quality)",
        );
    }
    route.cost_rule = match r.cost_rule.as_deref() {
        None | Some("log") => CostRule::Log,
        Some("linear") => CostRule::Linear,
        Some("cheapest_within") => CostRule::CheapestWithin(tolerance),
        Some(other) => {
            v.push(
                ROUTES_FILE,
                format!("{at}.cost_rule"),
                format!("unknown rule {other:?}: use log, linear or cheapest_within"),
            );
            CostRule::Log
        }
    };
    if let Some(x) = r.explore {
        if !(0.0..=0.5).contains(&x) {
            v.push(
                ROUTES_FILE,
                format!("{at}.explore"),
                "must be between 0 and 0.5 (the share of requests explored)",
            );
        }
        route.explore = x.clamp(0.0, 0.5);
    }
    if let Some(x) = r.explore_floor {
        if !(0.0..=1.0).contains(&x) {
            v.push(
                ROUTES_FILE,
                format!("{at}.explore_floor"),
                "must be between 0 and 1",
            );
        }
        route.explore_floor = x.clamp(0.0, 1.0);
    }
    if r.quality_tolerance.is_some() && !matches!(route.cost_rule, CostRule::CheapestWithin(_)) {
        v.push(
            ROUTES_FILE,
            format!("{at}.quality_tolerance"),
            "applies only to cost_rule: cheapest_within",
        );
    }
    if let Some(e) = &r.experiment {
        let eat = format!("{at}.experiment");
        let sticky_by = match e.sticky_by.as_deref() {
            None | Some("user") => StickyBy::User,
            Some("key") => StickyBy::Key,
            Some(s) => {
                v.push(
                    ROUTES_FILE,
                    format!("{eat}.sticky_by"),
                    format!("unknown value {s:?} (user or key)"),
                );
                StickyBy::User
            }
        };
        if e.arms.len() < 2 {
            v.push(
                ROUTES_FILE,
                format!("{eat}.arms"),
                "an experiment needs at least two arms",
            );
        }
        let mut names = BTreeSet::new();
        let mut arms = Vec::new();
        for (i, a) in e.arms.iter().enumerate() {
            if !(a.weight >= 0.0 && a.weight.is_finite()) {
                v.push(
                    ROUTES_FILE,
                    format!("{eat}.arms[{i}].weight"),
                    "must be 0 or more",
                );
            }
            if !names.insert(a.name.clone()) {
                v.push(
                    ROUTES_FILE,
                    format!("{eat}.arms[{i}].name"),
                    format!("arm {:?} is listed twice", a.name),
                );
            }
            if let Some(m) = &a.model {
                check_model(v, format!("{eat}.arms[{i}].model"), m);
            }
            arms.push(Arm {
                name: a.name.clone(),
                weight: a.weight.max(0.0),
                model: a.model.clone(),
            });
        }
        if arms.iter().map(|a| a.weight).sum::<f64>() <= 0.0 {
            v.push(
                ROUTES_FILE,
                format!("{eat}.arms"),
                "the arms' weights must add up to more than 0",
            );
        }
        if !routed && arms.iter().any(|a| a.model.is_none()) {
            v.push(
                ROUTES_FILE,
                format!("{eat}.arms"),
                "on a fixed alias every arm needs a model",
            );
        }
        route.experiment = Some(Experiment {
            name: e.name.clone(),
            sticky_by,
            arms,
        });
    }
    route
}

/// `digest` extended with the contents of the files the routes refer to.
pub(super) fn digest_referenced_files(
    digest: &str,
    classifier: &ClassifierConfig,
    routes: &BTreeMap<String, RouteConfig>,
    v: &mut Issues<'_>,
) -> String {
    // Files the routes refer to (classifier examples, learned routers) are part
    // of what runs: a change to one is a change of config.
    let mut hasher = Sha256::new();
    hasher.update(digest.as_bytes());
    for (key, path) in referenced_files(classifier, routes) {
        match std::fs::read(&path) {
            Ok(bytes) => {
                // The key, not the resolved path: the path as written is in
                // the files' text already, and `check --config conf` must
                // give the digest the gateway on /etc/... reports.
                hasher.update(key.as_bytes());
                hasher.update([0]);
                hasher.update(&bytes);
            }
            Err(e) => v.push(
                ROUTES_FILE,
                key,
                format!("cannot read {}: {e}", path.display()),
            ),
        }
    }
    hex::encode(&hasher.finalize()[..8])
}

/// Files the routing settings read, whose contents belong to the config's digest.
fn referenced_files(
    classifier: &ClassifierConfig,
    routes: &BTreeMap<String, RouteConfig>,
) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Some(p) = &classifier.examples {
        out.push(("classifier.examples".to_string(), p.clone()));
    }
    for r in routes.values() {
        if let Strategy::Learned(p) = &r.strategy {
            out.push((format!("routes.{}.learned", r.name), p.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;

    fn load_routes(routes: &str) -> Result<Config, ConfigError> {
        let models = "models:\n  - name: a\n    deployments: [ { provider: mock } ]\n  - name: b\n    deployments: [ { provider: mock } ]\n";
        load_dir(
            write_dir(&[
                (MAIN_FILE, "data_dir: /tmp/x\n"),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, models),
                (ROUTES_FILE, routes),
            ])
            .path(),
        )
    }

    /// Names no model or alias has go to the alias whose `match` pattern
    /// fits them most specifically; models and aliases by name come first.
    #[test]
    fn match_patterns_take_the_names_clients_send() {
        let c = load_routes(
            "routes:\n  big:\n    model: b\n    match: [\"claude-*\", \"gpt-4o-*\"]\n  small:\n    model: a\n    match: [\"claude-*haiku*\", \"gpt-4o-mini-*\"]\n  auto:\n    candidates: [a, b]\n    match: [\"*\"]\n",
        )
        .unwrap();
        let to = |name: &str| {
            c.resolve_model(name)
                .map(|(m, r)| (m.name.clone(), r.map(|r| r.name.clone())))
        };
        let pair = |m: &str, r: Option<&str>| Some((m.to_string(), r.map(str::to_string)));
        assert_eq!(to("claude-sonnet-4-5-20250929"), pair("b", Some("big")));
        assert_eq!(to("claude-haiku-4-5-20251001"), pair("a", Some("small")));
        assert_eq!(to("claude-3-5-haiku-latest"), pair("a", Some("small")));
        assert_eq!(to("gpt-4o-2024-08-06"), pair("b", Some("big")));
        assert_eq!(to("gpt-4o-mini-2024-07-18"), pair("a", Some("small")));
        // The catch-all takes the rest; names defined come first.
        assert_eq!(to("mistral-large"), pair("a", Some("auto")));
        assert_eq!(to("b"), pair("b", None));
        assert_eq!(to("small"), pair("a", Some("small")));
        assert!(c.routes["auto"].is_routed());
        let none =
            load_routes("routes:\n  big:\n    model: b\n    match: [\"claude-*\"]\n").unwrap();
        assert!(none.resolve_model("gpt-4o").is_none());
    }

    #[test]
    fn bad_or_shared_match_patterns_are_refused_at_their_line() {
        let err = load_routes(
            "routes:\n  big:\n    model: b\n    match: [\"claude-*\", \"with space\", \"claude-*\"]\n  small:\n    model: a\n    match:\n      - \"\"\n      - \"claude-*\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "routes.yaml:4: routes.big.match[1]: \"with space\": a model name pattern"
            ),
            "{text}"
        );
        assert!(
            text.contains("routes.yaml:4: routes.big.match[2]: \"claude-*\" is listed twice"),
            "{text}"
        );
        assert!(
            text.contains("routes.yaml:8: routes.small.match[0]"),
            "{text}"
        );
        assert!(
            text.contains("routes.yaml:9: routes.small.match[1]: \"claude-*\" is also a pattern of routes.big"),
            "{text}"
        );
    }

    #[test]
    fn rule_headers_differing_only_in_case_are_refused() {
        let models = "models:\n  - name: a\n    deployments: [ { provider: mock } ]\n  - name: b\n    deployments: [ { provider: mock } ]\n";
        let load = |headers: &str| {
            let routes = format!(
                "routes:\n  r:\n    candidates: [a, b]\n    rules:\n      - when:\n          headers:\n{headers}        pin: b\n"
            );
            load_dir(
                write_dir(&[
                    (MAIN_FILE, "data_dir: /tmp/x\n"),
                    (PROVIDERS_FILE, PROVIDERS),
                    (MODELS_FILE, models),
                    (ROUTES_FILE, &routes),
                ])
                .path(),
            )
        };
        let err = load("            X-Tier: gold\n            x-tier: silver\n").unwrap_err();
        assert_eq!(err.issues.len(), 1, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("routes.yaml:8: routes.r.rules[0].when.headers.x-tier: header given twice (names are case-insensitive)"),
            "{text}"
        );
        let c = load("            X-Tier: gold\n            X-App: web\n").unwrap();
        assert_eq!(
            c.routes["r"].rules[0].when.headers,
            [
                ("x-app".to_string(), "web".to_string()),
                ("x-tier".to_string(), "gold".to_string())
            ]
        );
    }
}
