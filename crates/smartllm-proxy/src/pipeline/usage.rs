//! `GET /v1/smartllm/usage`: a virtual key reads its own spend (today and
//! this month, from this gateway's ledger), its rate limits, and every budget
//! that applies to it with what is left. Authenticated by the key itself; it
//! says nothing about other keys.

use super::Failure;
use crate::ctx::Ctx;
use crate::runtime::Runtime;
use crate::{respond, Shared};
use pingora_proxy::Session;
use serde_json::{json, Value};
use smartllm_config::Limits;
use smartllm_ledger::{civil, Dim, Filter, Row};
use smartllm_protocol::ApiError;

/// Spend of one scope in one period.
#[derive(Default, Clone, Copy)]
struct Spend {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

impl Spend {
    fn add(&mut self, r: &Row) {
        self.requests += r.requests;
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
        self.cost_usd += r.cost_usd;
    }

    fn json(&self) -> Value {
        json!({"requests": self.requests, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd})
    }
}

fn limits(l: &Limits) -> Value {
    json!({"requests_per_minute": l.requests_per_minute, "tokens_per_minute": l.tokens_per_minute})
}

pub async fn answer(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
) -> Result<(), Failure> {
    let Some(key) = ctx.key.clone() else {
        return Err(ApiError::new(
            401,
            "invalid_request_error",
            "missing_api_key",
            "GET /v1/smartllm/usage reports a virtual key's own spend: present the key (Authorization: Bearer ...).",
        )
        .into());
    };
    let Some(ledger) = shared.ledger.clone() else {
        return Err(ApiError::unavailable(
            "ledger_unavailable",
            "The cost ledger is not available on this gateway.",
        )
        .into());
    };
    let now = smartllm_ledger::now_secs();
    let today = now / 86_400;
    let (_, _, day_of_month) = civil(today);
    let month_start = (today - u64::from(day_of_month) + 1) * 86_400;
    let (next_y, next_m) = match civil(today) {
        (y, 12, _) => (y + 1, 1),
        (y, m, _) => (y, m + 1),
    };
    let mut next_month = today + 1;
    while civil(next_month) != (next_y, next_m, 1) {
        next_month += 1;
    }
    let filter = Filter {
        tenant: Some(key.tenant.clone()),
        ..Filter::default()
    };
    let rows = tokio::task::spawn_blocking(move || {
        ledger.query_where(
            month_start,
            now + 1,
            &[Dim::Day, Dim::App, Dim::Key],
            &filter,
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading the ledger: {e}")))?
    .map_err(|e| ApiError::internal(format!("reading the ledger: {e}")))?;
    let today_label = smartllm_ledger::format_day(today);
    // [tenant, app, key] x [today, month]
    let mut spend = [[Spend::default(); 2]; 3];
    for r in &rows {
        let (app, k) = (&r.group[&Dim::App], &r.group[&Dim::Key]);
        let is_today = r.group[&Dim::Day] == today_label;
        for (i, applies) in [true, *app == key.app, *k == key.name]
            .into_iter()
            .enumerate()
        {
            if applies {
                spend[i][1].add(r);
                if is_today {
                    spend[i][0].add(r);
                }
            }
        }
    }
    let ids = ctx.scope().budget_ids();
    let mut budgets = Vec::new();
    let mut remaining: Option<f64> = None;
    for b in &rt.config.keys.budgets {
        let Some(i) = ids.iter().position(|id| *id == b.id()) else {
            continue;
        };
        for (period, limit, spent, resets) in [
            (
                "daily",
                b.daily_usd,
                spend[i][0].cost_usd,
                (today + 1) * 86_400 - now,
            ),
            (
                "monthly",
                b.monthly_usd,
                spend[i][1].cost_usd,
                next_month * 86_400 - now,
            ),
        ] {
            let Some(limit) = limit else { continue };
            let left = (limit - spent).max(0.0);
            remaining = Some(remaining.map_or(left, |r: f64| r.min(left)));
            budgets.push(json!({
                "budget": b.id(), "scope": b.scope.as_str(), "name": b.name, "period": period,
                "limit_usd": limit, "spent_usd": spent, "remaining_usd": left,
                "resets_in_secs": resets,
            }));
        }
        if let Some(m) = b.max_request_usd {
            budgets.push(
                json!({"budget": b.id(), "scope": b.scope.as_str(), "name": b.name,
                "period": "request", "limit_usd": m}),
            );
        }
    }
    let app_id = format!("{}/{}", key.tenant, key.app);
    let body = json!({
        "object": "smartllm.usage",
        "key": key.name,
        "tenant": key.tenant,
        "app": key.app,
        "models": if key.models.is_empty() { Value::Null } else { json!(key.models) },
        "spend": {
            "today": spend[2][0].json(),
            "this_month": spend[2][1].json(),
            "app_today": spend[1][0].json(),
            "app_this_month": spend[1][1].json(),
            "tenant_today": spend[0][0].json(),
            "tenant_this_month": spend[0][1].json(),
        },
        "limits": {
            "key": limits(&key.limits),
            "app": rt.config.keys.apps.get(&app_id).map(limits),
        },
        "budgets": budgets,
        "remaining_usd": remaining,
        "period": {"day": today_label, "month_from": smartllm_ledger::format_day(month_start / 86_400)},
    });
    let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    respond::json(session, ctx, 200, bytes, &[]).await?;
    Ok(())
}
