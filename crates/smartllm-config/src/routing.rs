//! Routing settings: model profiles (`models.yaml`), routed aliases with their
//! objective, constraints, rules, fallbacks and experiments (`routes.yaml`), and
//! the task classifier's examples.

use crate::raw::{RawCircuitBreaker, RawClassifier, RawProfile, RawRoute};
use crate::{Issues, MODELS_FILE, ROUTES_FILE};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The task types the router tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Code,
    Math,
    Reasoning,
    Summarisation,
    Extraction,
    Translation,
    Creative,
    Chat,
}

impl Task {
    pub const ALL: [Task; 8] = [
        Task::Code,
        Task::Math,
        Task::Reasoning,
        Task::Summarisation,
        Task::Extraction,
        Task::Translation,
        Task::Creative,
        Task::Chat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Code => "code",
            Task::Math => "math",
            Task::Reasoning => "reasoning",
            Task::Summarisation => "summarisation",
            Task::Extraction => "extraction",
            Task::Translation => "translation",
            Task::Creative => "creative",
            Task::Chat => "chat",
        }
    }

    pub fn parse(s: &str) -> Option<Task> {
        let s = s.trim().to_ascii_lowercase();
        Some(match s.as_str() {
            "code" | "coding" => Task::Code,
            "math" | "maths" => Task::Math,
            "reasoning" => Task::Reasoning,
            "summarisation" | "summarization" | "summary" => Task::Summarisation,
            "extraction" => Task::Extraction,
            "translation" => Task::Translation,
            "creative" | "creative_writing" => Task::Creative,
            "chat" => Task::Chat,
            _ => return None,
        })
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn task_names() -> String {
    Task::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the router assumes about a model before it has measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProfile {
    pub context_window: u64,
    /// The provider's limit on one answer's tokens (None: the context window).
    pub max_output_tokens: Option<u64>,
    /// `None`: not declared (the model is assumed to support what is asked).
    pub capabilities: Option<Vec<String>>,
    /// Quality per task (indexed by [`Task::index`]), 0 to 1.
    pub quality: [f64; 8],
    pub tokens_per_second: f64,
    /// Typical time to first token.
    pub latency: Duration,
}

impl Default for ModelProfile {
    fn default() -> Self {
        ModelProfile {
            context_window: 128_000,
            max_output_tokens: None,
            capabilities: None,
            quality: [0.7; 8],
            tokens_per_second: 60.0,
            latency: Duration::from_millis(500),
        }
    }
}

impl ModelProfile {
    pub fn quality(&self, task: Task) -> f64 {
        self.quality[task.index()]
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|x| x == capability))
    }
}

pub const CAPABILITIES: [&str; 5] = ["tools", "vision", "json", "streaming", "audio"];

pub(crate) fn resolve_profile(
    at: &str,
    raw: Option<&RawProfile>,
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
    if let Some(d) = raw.quality.get("default") {
        p.quality = [*d; 8];
    }
    for (k, q) in &raw.quality {
        if !(0.0..=1.0).contains(q) {
            v.push(
                MODELS_FILE,
                format!("{at}.profile.quality.{k}"),
                "must be between 0 and 1",
            );
        }
        if k == "default" {
            continue;
        }
        match Task::parse(k) {
            Some(t) => p.quality[t.index()] = q.clamp(0.0, 1.0),
            None => v.push(
                MODELS_FILE,
                format!("{at}.profile.quality.{k}"),
                format!("unknown task {k:?} (known: {}, default)", task_names()),
            ),
        }
    }
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

/// Per-deployment circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the circuit (0: never).
    pub failures: u32,
    /// How long an open circuit refuses traffic before one trial request.
    pub cooldown: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

pub(crate) fn resolve_breaker(raw: Option<&RawCircuitBreaker>) -> CircuitBreakerConfig {
    let d = CircuitBreakerConfig::default();
    match raw {
        None => d,
        Some(r) => CircuitBreakerConfig {
            failures: r.failures.unwrap_or(d.failures),
            cooldown: r.cooldown.map(|c| c.0).unwrap_or(d.cooldown),
        },
    }
    .validated()
}

impl CircuitBreakerConfig {
    fn validated(mut self) -> Self {
        self.cooldown = self.cooldown.max(Duration::from_millis(100));
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// A plain alias for one model.
    Fixed,
    /// Expected utility from the profiles (static and live).
    Utility,
    /// Quality predicted per model from the prompt embedding by a trained file.
    Learned(PathBuf),
}

impl Strategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Strategy::Fixed => "fixed",
            Strategy::Utility => "utility",
            Strategy::Learned(_) => "learned",
        }
    }
}

/// Objective weights, normalised to sum to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub quality: f64,
    pub cost: f64,
    pub latency: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            quality: 0.6,
            cost: 0.3,
            latency: 0.1,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    pub latency_budget: Option<Duration>,
    pub max_cost_usd: Option<f64>,
    pub capabilities: Vec<String>,
    pub min_quality: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleWhen {
    pub tasks: Vec<Task>,
    pub min_complexity: Option<f64>,
    pub max_complexity: Option<f64>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    pub languages: Vec<String>,
    pub has_code: Option<bool>,
    pub has_math: Option<bool>,
    pub has_tools: Option<bool>,
    pub has_images: Option<bool>,
    /// (lower-case header name, value or `*`)
    pub headers: Vec<(String, String)>,
    pub apps: Vec<String>,
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRule {
    pub name: String,
    pub when: RuleWhen,
    pub pin: Option<String>,
    pub exclude: Vec<String>,
    pub prefer: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyBy {
    /// The request body's `user`, else the virtual key.
    User,
    Key,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    pub name: String,
    pub weight: f64,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub sticky_by: StickyBy,
    pub arms: Vec<Arm>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// The fixed model, or (routed) the first candidate.
    pub model: String,
    /// Routed aliases: the models chosen from (empty for a fixed alias).
    pub candidates: Vec<String>,
    pub strategy: Strategy,
    pub weights: Weights,
    pub constraints: Constraints,
    pub rules: Vec<RouteRule>,
    pub fallback: Vec<String>,
    pub max_fallbacks: usize,
    pub experiment: Option<Experiment>,
    pub budget_pressure_at: f64,
}

impl RouteConfig {
    /// A plain alias for one model.
    pub fn fixed(name: &str, model: &str) -> RouteConfig {
        RouteConfig {
            name: name.to_string(),
            model: model.to_string(),
            candidates: Vec::new(),
            strategy: Strategy::Fixed,
            weights: Weights::default(),
            constraints: Constraints::default(),
            rules: Vec::new(),
            fallback: Vec::new(),
            max_fallbacks: 2,
            experiment: None,
            budget_pressure_at: 0.8,
        }
    }

    /// The router decides this alias per request.
    pub fn is_routed(&self) -> bool {
        self.strategy != Strategy::Fixed || self.experiment.is_some() || !self.rules.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierConfig {
    /// task<TAB>prompt lines.
    pub examples: Option<PathBuf>,
    pub k: usize,
}

pub(crate) fn resolve_classifier(
    dir: &Path,
    raw: &RawClassifier,
    v: &mut Issues<'_>,
) -> ClassifierConfig {
    let k = raw.k.unwrap_or(7);
    if !(1..=64).contains(&k) {
        v.push(ROUTES_FILE, "classifier.k", "must be between 1 and 64");
    }
    ClassifierConfig {
        examples: raw.examples.as_ref().map(|f| crate::relative_to(dir, f)),
        k: k.clamp(1, 64),
    }
}

/// Resolve one alias of `routes.yaml`. `models` are the names models.yaml defines.
pub(crate) fn resolve_route(
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
        (Some("learned"), Some(file)) => {
            route.strategy = Strategy::Learned(crate::relative_to(dir, file))
        }
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
                headers: w
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect(),
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

/// Files the routing settings read, whose contents belong to the config's digest.
pub(crate) fn referenced_files(
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
