//! Routing settings: model profiles (`models.yaml`), routed aliases with their
//! objective, constraints, rules, fallbacks and experiments (`routes.yaml`), and
//! the task classifier's examples. They are resolved in `resolve::models`
//! and `resolve::routes`.

use std::path::PathBuf;
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

/// The task names, for messages.
pub(crate) fn task_names() -> String {
    Task::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a model's quality for one task came from, most trusted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QualitySource {
    /// `profiles.yaml`: scored answers (`smartllm profile run`).
    Measured,
    /// `profile.quality.TASK` in `models.yaml`.
    Configured,
    /// `profile.benchmarks`, through the benchmark-to-task mapping.
    Benchmarks,
    /// `profile.quality.default`, the mean of the model's benchmark scores
    /// when none maps to the task, or the built-in 0.7.
    #[default]
    Default,
}

impl QualitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            QualitySource::Measured => "measured",
            QualitySource::Configured => "configured",
            QualitySource::Benchmarks => "benchmarks",
            QualitySource::Default => "default",
        }
    }
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
    /// Where each task's quality came from (indexed like `quality`).
    pub quality_source: [QualitySource; 8],
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
            quality_source: [QualitySource::Default; 8],
            tokens_per_second: 60.0,
            latency: Duration::from_millis(500),
        }
    }
}

impl ModelProfile {
    pub fn quality(&self, task: Task) -> f64 {
        self.quality[task.index()]
    }

    /// Whether the model has `capability`: listed, or assumed when the
    /// model lists none, except [`NEVER_ASSUMED`], which only a listing
    /// gives.
    pub fn has(&self, capability: &str) -> bool {
        match &self.capabilities {
            Some(c) => c.iter().any(|x| x == capability),
            None => !NEVER_ASSUMED.contains(&capability),
        }
    }
}

/// Capabilities a model has only when listed with them: each changes what
/// the gateway sends it, and a model that lacks one answers 400.
pub const NEVER_ASSUMED: [&str; 4] = [
    "structured_outputs",
    "system_messages",
    "reasoning",
    "thinking",
];

pub const CAPABILITIES: [&str; 9] = [
    "tools",
    "vision",
    "json",
    "streaming",
    "audio",
    // Anthropic's structured outputs (`output_config.format`): Claude
    // models that take it are listed with it, never assumed.
    "structured_outputs",
    // Anthropic's mid-conversation system messages (`role: "system"` among
    // the turns; Claude Opus 4.8): never assumed either.
    "system_messages",
    // An OpenAI-compatible reasoning model (o-series, GPT-5) that takes
    // `reasoning_effort`: an Anthropic request's `thinking` reaches it as
    // an effort. Never assumed (other models answer 400 to the field).
    "reasoning",
    // A Claude model with extended thinking: an OpenAI request's
    // `reasoning_effort` reaches it as a thinking budget. Never assumed.
    "thinking",
];

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

impl CircuitBreakerConfig {
    pub(crate) fn validated(mut self) -> Self {
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
    /// Model names (not defined as models or aliases) this alias answers
    /// to: `*` stands for any characters ([`pattern_matches`]).
    pub patterns: Vec<String>,
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
    /// How expected dollars weigh against expected quality.
    pub cost_rule: CostRule,
    /// Share of requests explored by Thompson sampling (0 = never).
    pub explore: f64,
    /// No candidate under this expected quality is explored.
    pub explore_floor: f64,
}

/// Whether `name` matches `pattern`, where `*` stands for any characters
/// (none included) and everything else for itself, case included.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod pattern_tests {
    use super::pattern_matches as m;

    #[test]
    fn stars_stand_for_any_characters_and_the_rest_for_itself() {
        assert!(m("claude-*", "claude-sonnet-4-5"));
        assert!(m("claude-*", "claude-"));
        assert!(!m("claude-*", "claude"));
        assert!(!m("claude-*", "Claude-sonnet"));
        assert!(m("claude-*haiku*", "claude-3-5-haiku-20241022"));
        assert!(m("claude-*haiku*", "claude-haiku-4-5"));
        assert!(!m("claude-*haiku*", "claude-sonnet-4"));
        assert!(m("*-latest", "gpt-4o-latest"));
        assert!(!m("*-latest", "gpt-4o-latest-2"));
        assert!(m("*", ""));
        assert!(m("a*b*b", "abb"));
        assert!(!m("a*b*b", "ab"));
        assert!(m("gpt-4o", "gpt-4o"));
        assert!(!m("gpt-4o", "gpt-4o-mini"));
        assert!(m("**", "x"));
    }
}

/// How a routed alias trades expected cost against expected quality.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CostRule {
    /// Utility with cost relative to the dearest candidate (the rule before
    /// `log`): with one expensive candidate, the cheap ones barely differ.
    Linear,
    /// Utility with cost placed between the cheapest candidate (0) and the
    /// dearest (1) on a log scale: the extremes weigh as under `linear`, and
    /// every doubling of the price in between counts the same.
    Log,
    /// The cheapest candidate whose expected quality is within this share of
    /// the best candidate's (latency breaks ties through utility).
    CheapestWithin(f64),
}

impl CostRule {
    pub fn as_str(&self) -> String {
        match self {
            CostRule::Linear => "linear".into(),
            CostRule::Log => "log".into(),
            CostRule::CheapestWithin(t) => {
                format!("cheapest_within:{}%", (t * 1000.0).round() / 10.0)
            }
        }
    }
}

impl RouteConfig {
    /// A plain alias for one model.
    pub fn fixed(name: &str, model: &str) -> RouteConfig {
        RouteConfig {
            name: name.to_string(),
            patterns: Vec::new(),
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
            cost_rule: CostRule::Log,
            explore: 0.0,
            explore_floor: 0.5,
        }
    }

    /// The most specific of this alias's patterns that `model` matches:
    /// its count of literal characters (None: none matches).
    pub fn matches(&self, model: &str) -> Option<usize> {
        self.patterns
            .iter()
            .filter(|p| pattern_matches(p, model))
            .map(|p| p.chars().filter(|c| *c != '*').count())
            .max()
    }

    /// The router decides this alias per request.
    pub fn is_routed(&self) -> bool {
        self.strategy != Strategy::Fixed || self.experiment.is_some() || !self.rules.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierConfig {
    /// `task<TAB>prompt` lines.
    pub examples: Option<PathBuf>,
    pub k: usize,
}
