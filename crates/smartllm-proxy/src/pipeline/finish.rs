//! The end of a request (Pingora's `logging` phase, after the last byte went
//! out): the token buckets settled against the pre-charged estimate, metrics,
//! the access log and ledger record, experiment outcome, budget spend, the
//! trace's server span, and the in-flight count a drain waits on. Nothing
//! here delays the response; fleet writes and span exports run in the
//! background.

use crate::ctx::Ctx;
use crate::{access_log, metrics, Shared};
use pingora_error::Error;
use pingora_proxy::Session;

pub fn run(shared: &Shared, session: &Session, e: Option<&Error>, ctx: &mut Ctx) {
    let rt = ctx.rt.clone();
    // A request that used no tokens of a provider (a cache hit, an error,
    // a refusal after admission) gives its whole estimate back.
    if let Some(rt) = rt
        .as_ref()
        .filter(|_| ctx.precharged_tokens > 0 || ctx.usage.is_some())
    {
        let scopes = smartllm_quota::limits_for(&rt.config, ctx.key.as_deref(), ctx.scope());
        let used = ctx.usage.map_or(0, |u| u.total());
        shared
            .quotas
            .charge_after(&rt.config.fleet, &scopes, used, ctx.precharged_tokens);
    }
    let cost = access_log::finish(session, e, ctx, shared.ledger.as_ref());
    let status = match ctx.status {
        0 => session.response_written().map_or(0, |r| r.status.as_u16()),
        s => s,
    };
    record_outcomes(shared, ctx, status);
    let answered = status == 200 && !ctx.stream_failed;
    if let (Some(model), Some(task), true) = (ctx.model(), ctx.task, answered) {
        if let Some(task) = smartllm_router::Task::parse(task) {
            let served = smartllm_router::Served {
                tenant: ctx.tenant.clone(),
                model: model.to_string(),
                task,
                score: None,
            };
            if let Some(question) = ctx.question {
                // A regenerate counts against the answer it replaces.
                if ctx.regenerate {
                    if let Some(before) = shared.feedback.regenerated(question, &ctx.tenant) {
                        crate::metrics::regenerate(&before.model, before.task.as_str());
                    }
                }
                shared.feedback.answered(question, served.clone());
            }
            shared.feedback.remember(&ctx.request_id, served);
        }
    }
    if let Some(trace) = ctx.trace.take() {
        trace.finish(ctx, status);
    }
    if let Some((exp, arm)) = &ctx.experiment {
        let ok = ctx.status < 400 && ctx.error_code.is_none();
        metrics::experiment(exp, arm, ok, cost);
    }
    // Its cost counts now: what it held goes (with a fleet, once the cost
    // has reached Redis). An answer settled before its last bytes went out.
    if !ctx.budget_settled {
        record_budget(shared, ctx, cost);
    }
    // Takes the request's names out of `ctx`: nothing reads them after this.
    shared.recent.record(ctx, status, cost);
    // Last: a drain (SIGTERM, graceful upgrade) waits for this request's
    // ledger record and budget charge, not just its response.
    ctx.in_flight = None;
}

/// Record `cost` against the request's budgets and let its hold go.
fn record_budget(shared: &Shared, ctx: &mut Ctx, cost: f64) {
    let hold = ctx.budget_hold.take();
    if let Some(rt) = ctx.rt.clone() {
        // Against the budgets in force now: one a reload added while this
        // request ran read its spend from the ledger without this cost.
        let now = shared.runtime.load();
        shared.quotas.record_and_release(
            &now.config.keys.budgets,
            &rt.config.fleet,
            ctx.scope(),
            cost,
            hold,
        );
    }
    ctx.budget_settled = true;
}

/// Count an answer's cost against its budgets, and let go what it held,
/// before its last bytes go out (its usage is known by then): a client
/// that sends its next request as soon as it has read this answer (on
/// another connection) finds the spend recorded and nothing held, where
/// the end of the request (Pingora's `logging` phase, after the last
/// write) could come after that next request was admitted and refuse it
/// for what this one still held (`budget_in_flight`).
pub fn settle_budget(shared: &Shared, ctx: &mut Ctx) {
    if ctx.budget_settled {
        return;
    }
    let cost = crate::access_log::request_cost_usd(ctx, shared.ledger.as_ref());
    record_budget(shared, ctx, cost);
}

/// Outcomes the router learns from without being told (issue #18): each
/// model that failed this request before a fallback answered it, and the
/// model that had it last when it ended in an upstream failure (502/504, the
/// provider's own 5xx, or a stream that broke after it started), count as a score of 0 for this tenant on this
/// task, next to the users' feedback (`/admin/models` shows them as
/// `implicit`). So does an answer the model cut off at its own output limit
/// when no max-tokens limit was asked for (`ctx.cut_off`). The client's
/// errors, a client that left and the gateway's own refusals are not the
/// model's doing and count nothing.
fn record_outcomes(shared: &Shared, ctx: &Ctx, status: u16) {
    let Some(task) = ctx.task.and_then(smartllm_router::Task::parse) else {
        return;
    };
    if ctx.client_gone {
        return;
    }
    for m in &ctx.failed_models {
        shared.feedback.failure(&ctx.tenant, m, task);
    }
    let upstream_failed = ctx.attempts > 0
        && (matches!(status, 500 | 502 | 504)
            || status >= 500 && ctx.error_code == Some("upstream_status")
            || ctx.stream_failed);
    if upstream_failed || (ctx.cut_off && status == 200) {
        if let Some(model) = ctx.model() {
            shared.feedback.failure(&ctx.tenant, model, task);
            if ctx.cut_off {
                crate::metrics::truncated(model, task.as_str());
            }
        }
    }
}
