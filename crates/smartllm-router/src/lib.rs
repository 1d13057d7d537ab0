//! The router: turns a request into features (task, complexity, tokens,
//! language, code/math/tools/images), scores the candidate models of a routed
//! alias on expected quality, cost and latency from their static and live
//! profiles (or a learned per-model quality predictor), applies constraints,
//! rules and experiments, and returns an explained decision with its fallback
//! chain. Everything here is synchronous and allocation-light: a decision
//! takes microseconds and runs on the proxy's threads; the prompt embedding it
//! uses is computed once per request by the embedder (shared with the cache).

pub mod assets;
pub mod breaker;
pub mod classifier;
pub mod decide;
pub mod eval;
pub mod features;
pub mod feedback;
pub mod language;
pub mod learned;
pub mod profiles;
pub mod suggest;

pub use assets::RouterAssets;
pub use breaker::{BreakerState, Breakers, Permit};
pub use classifier::TaskClassifier;
pub use decide::{decide, Candidate, Decision, ModelState, RequestInfo};
pub use features::{extract, extract_with, Extraction, Features};
pub use feedback::{FeedbackBook, Served};
pub use learned::LearnedRouter;
pub use profiles::{LiveProfiles, LiveSnapshot};
pub use smartllm_config::Task;

/// Metric names (see README).
pub mod metric_names {
    pub const DECISIONS: &str = "smartllm_route_decisions_total";
    pub const FALLBACKS: &str = "smartllm_route_fallbacks_total";
    pub const CIRCUIT_STATE: &str = "smartllm_circuit_state";
    pub const CIRCUIT_TRANSITIONS: &str = "smartllm_circuit_transitions_total";
    pub const EXPERIMENT_REQUESTS: &str = "smartllm_experiment_requests_total";
    pub const EXPERIMENT_COST: &str = "smartllm_experiment_cost_usd_total";
    pub const DECISION_SECONDS: &str = "smartllm_route_decision_seconds";
}
