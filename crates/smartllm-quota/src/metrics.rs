//! The quota metrics: names as constants, descriptions, and one typed
//! function per metric so call sites cannot misspell a name or a label.
//! Budget labels name a tenant, app or key: they go through
//! [`labels::budget`] (bounded, maybe hashed) like every such name.

use metrics::{counter, describe_counter, describe_gauge, gauge};
use smartllm_ledger::labels;

pub const BUDGET_USED: &str = "smartllm_budget_used_ratio";
pub const BUDGET_ALERTS: &str = "smartllm_budget_alerts_total";
pub const BUDGET_ALERTS_DROPPED: &str = "smartllm_budget_alerts_dropped_total";
pub const BUDGET_WEBHOOK_FAILED: &str = "smartllm_budget_webhook_failed_total";
pub const RATE_LIMITED: &str = "smartllm_rate_limited_total";
pub const BUDGET_EXCEEDED: &str = "smartllm_budget_exceeded_total";
pub const COST_CAP: &str = "smartllm_request_cost_cap_total";
pub const FLEET_ERRORS: &str = "smartllm_fleet_errors_total";
pub const FLEET_UP: &str = "smartllm_fleet_redis_up";

/// Describe every quota metric (once, when the recorder is installed).
pub fn describe() {
    describe_gauge!(
        BUDGET_USED,
        "Share of a budget spent in the current period (1.0 = all of it), by budget and period."
    );
    describe_counter!(
        BUDGET_ALERTS,
        "Budget alerts raised, by budget and threshold percentage."
    );
    describe_counter!(
        BUDGET_ALERTS_DROPPED,
        "Budget alert webhooks not queued because the alert queue was full."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a rate limit, by the limit's scope (key:NAME, app:TENANT/APP) and kind (requests, tokens)."
    );
    describe_counter!(
        BUDGET_WEBHOOK_FAILED,
        "Budget alerts whose webhook delivery failed for good (retries exhausted, refused, or redirected), by budget."
    );
    describe_counter!(
        BUDGET_EXCEEDED,
        "Requests that met an exhausted budget, by budget and action (reject, degrade; wait: refused for what requests in flight hold)."
    );
    describe_counter!(
        COST_CAP,
        "Requests a per-request cost cap acted on, by budget and action (capped, reject)."
    );
    describe_counter!(
        FLEET_ERRORS,
        "Failed calls to the fleet's Redis, by operation."
    );
    describe_gauge!(
        FLEET_UP,
        "1 when the last call to the fleet's Redis succeeded, else 0."
    );
}

pub fn budget_used(budget: &str, period: &'static str, ratio: f64) {
    gauge!(BUDGET_USED, "budget" => labels::budget(budget), "period" => period).set(ratio);
}

pub fn budget_alert(budget: &str, threshold: f64) {
    counter!(BUDGET_ALERTS, "budget" => labels::budget(budget), "threshold" => format!("{threshold}"))
        .increment(1);
}

/// A budget began refusing requests that fit an empty period (`threshold="refusing"`).
pub fn budget_refusing(budget: &str) {
    counter!(BUDGET_ALERTS, "budget" => labels::budget(budget), "threshold" => "refusing")
        .increment(1);
}

pub fn alert_dropped() {
    counter!(BUDGET_ALERTS_DROPPED).increment(1);
}

/// A request a rate limit refused; `limit` is the refusing bucket as the
/// limiter names it (`key 'ci':requests`, `app 'acme/web':tokens`).
pub fn rate_limited(limit: &str) {
    let (scope, kind) = limit.rsplit_once(':').unwrap_or((limit, "-"));
    // `key 'ci'` -> `key:ci`, as budgets are named (and labelled).
    let id = match scope.split_once(' ') {
        Some((k, name)) => format!("{k}:{}", name.trim_matches('\'')),
        None => scope.to_string(),
    };
    counter!(RATE_LIMITED, "scope" => labels::budget(&id), "kind" => kind.to_string()).increment(1);
}

/// An alert's webhook delivery failed for good.
pub fn webhook_failed(budget: &str) {
    counter!(BUDGET_WEBHOOK_FAILED, "budget" => labels::budget(budget)).increment(1);
}

/// `action`: reject or degrade.
pub fn budget_exceeded(budget: &str, action: &'static str) {
    counter!(BUDGET_EXCEEDED, "budget" => labels::budget(budget), "action" => action).increment(1);
}

/// `action`: capped (max tokens lowered) or reject.
pub fn cost_cap(budget: &str, action: &'static str) {
    counter!(COST_CAP, "budget" => labels::budget(budget), "action" => action).increment(1);
}

pub fn fleet_up(up: bool) {
    gauge!(FLEET_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn fleet_error(op: &'static str) {
    counter!(FLEET_ERRORS, "op" => op).increment(1);
}
