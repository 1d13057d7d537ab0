//! Budgets: spend per tenant, app and key for the current UTC day and month,
//! kept in memory (warmed from the ledger at start), checked before each
//! request with an estimate of its cost, and raised as alerts when a threshold
//! is crossed: a log line, a metric, and an optional webhook POST that is
//! retried in the background and never blocks a request.

use crate::ctx::Ctx;
use crate::Shared;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use serde_json::json;
use smartllm_config::{Budget, Url};
use smartllm_ledger::{civil, format_day, now_secs, Dim, Ledger};
use smartllm_protocol::ApiError;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

pub const METRIC_USED: &str = "smartllm_budget_used_ratio";
pub const METRIC_ALERTS: &str = "smartllm_budget_alerts_total";
pub const METRIC_EXCEEDED: &str = "smartllm_budget_exceeded_total";

#[derive(Default)]
pub struct Budgets {
    /// "scope-id|period" -> USD
    spend: Mutex<HashMap<String, f64>>,
    /// "budget-id|period|threshold" already alerted
    fired: Mutex<HashSet<String>>,
}

/// (day period, month period, seconds until the day ends, until the month ends)
fn periods(now: u64) -> (String, String, u64, u64) {
    let days = now / 86_400;
    let (y, m, d) = civil(days);
    let day_left = 86_400 - now % 86_400;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    // days from today to the 1st of next month
    let mut probe = days + 1;
    while civil(probe) != (ny, nm, 1) {
        probe += 1;
    }
    let month_left = (probe * 86_400).saturating_sub(now);
    let _ = d;
    (
        format!("d:{}", format_day(days)),
        format!("m:{y:04}-{m:02}"),
        day_left,
        month_left,
    )
}

fn scope_ids(tenant: &str, app: &str, key: &str) -> [String; 3] {
    [
        format!("tenant:{tenant}"),
        format!("app:{tenant}/{app}"),
        format!("key:{key}"),
    ]
}

/// A budget that a request would take over its limit.
pub struct Exceeded<'a> {
    pub budget: &'a Budget,
    pub period: &'static str,
    pub spent: f64,
    pub limit: f64,
    pub resets_in: u64,
}

impl Budgets {
    /// Load this month's spend from the ledger.
    pub fn warm(&self, ledger: &Ledger) {
        let now = now_secs();
        let days = now / 86_400;
        let (y, m, _) = civil(days);
        let mut first = days;
        while first > 0 && civil(first - 1).1 == m && civil(first - 1).0 == y {
            first -= 1;
        }
        let (day_p, month_p, _, _) = periods(now);
        let today = format_day(days);
        match ledger.query(
            first * 86_400,
            now + 1,
            &[Dim::Day, Dim::Tenant, Dim::App, Dim::Key],
        ) {
            Ok(rows) => {
                let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
                for r in rows {
                    let g = |d| r.group.get(&d).cloned().unwrap_or_default();
                    for id in scope_ids(&g(Dim::Tenant), &g(Dim::App), &g(Dim::Key)) {
                        *spend.entry(format!("{id}|{month_p}")).or_default() += r.cost_usd;
                        if g(Dim::Day) == today {
                            *spend.entry(format!("{id}|{day_p}")).or_default() += r.cost_usd;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read this month's spend from the ledger; budgets start from zero")
            }
        }
    }

    fn spent(&self, id: &str, period: &str) -> f64 {
        self.spend
            .lock()
            .map(|s| s.get(&format!("{id}|{period}")).copied().unwrap_or(0.0))
            .unwrap_or(0.0)
    }

    /// The first budget this request (estimated at `estimate` USD) would exceed.
    pub fn check<'a>(
        &self,
        budgets: &'a [Budget],
        ctx: &Ctx,
        estimate: f64,
    ) -> Option<Exceeded<'a>> {
        let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
        let (day, month, day_left, month_left) = periods(now_secs());
        for b in budgets {
            if !ids.contains(&b.id()) {
                continue;
            }
            for (period, p, limit, left) in [
                ("daily", &day, b.daily_usd, day_left),
                ("monthly", &month, b.monthly_usd, month_left),
            ] {
                let Some(limit) = limit else { continue };
                let spent = self.spent(&b.id(), p);
                if spent >= limit || (estimate > 0.0 && spent + estimate > limit) {
                    return Some(Exceeded {
                        budget: b,
                        period,
                        spent,
                        limit,
                        resets_in: left,
                    });
                }
            }
        }
        None
    }

    /// The highest share of any budget this request's tenant, app or key has
    /// spent in its current period (0 when none applies): the router's cue to
    /// favour cheaper candidates.
    pub fn pressure(&self, budgets: &[Budget], ctx: &Ctx) -> f64 {
        let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
        let (day, month, _, _) = periods(now_secs());
        let mut worst = 0.0f64;
        for b in budgets {
            if !ids.contains(&b.id()) {
                continue;
            }
            for (p, limit) in [(&day, b.daily_usd), (&month, b.monthly_usd)] {
                if let Some(limit) = limit.filter(|l| *l > 0.0) {
                    worst = worst.max(self.spent(&b.id(), p) / limit);
                }
            }
        }
        worst
    }

    /// Add a request's cost; raise alerts for thresholds it crosses.
    pub fn record(&self, shared: &Shared, budgets: &[Budget], ctx: &Ctx, cost: f64) {
        if cost <= 0.0 {
            return;
        }
        let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
        let (day, month, _, _) = periods(now_secs());
        {
            let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                for p in [&day, &month] {
                    *spend.entry(format!("{id}|{p}")).or_default() += cost;
                }
            }
        }
        for b in budgets {
            if !ids.contains(&b.id()) {
                continue;
            }
            for (period, p, limit) in [
                ("daily", &day, b.daily_usd),
                ("monthly", &month, b.monthly_usd),
            ] {
                let Some(limit) = limit else { continue };
                let spent = self.spent(&b.id(), p);
                let pct = spent / limit * 100.0;
                metrics::gauge!(METRIC_USED, "budget" => b.id(), "period" => period)
                    .set(spent / limit);
                for &t in &b.alert_at {
                    if pct < t {
                        continue;
                    }
                    let fired_key = format!("{}|{p}|{t}", b.id());
                    if !self
                        .fired
                        .lock()
                        .map(|mut f| f.insert(fired_key))
                        .unwrap_or(false)
                    {
                        continue;
                    }
                    tracing::warn!(budget = %b.id(), period, threshold_pct = t, spent_usd = spent, limit_usd = limit, "budget alert");
                    metrics::counter!(METRIC_ALERTS, "budget" => b.id(), "threshold" => format!("{t}")).increment(1);
                    if let Some(url) = b.webhook.clone() {
                        let body = json!({
                            "type": "budget_alert", "budget": b.id(), "scope": b.scope.as_str(), "name": b.name,
                            "period": period, "threshold_pct": t, "spent_usd": spent, "limit_usd": limit,
                            "at": now_secs(),
                        });
                        spawn_webhook(shared, url, body.to_string());
                    }
                }
            }
        }
    }
}

/// The error a rejected request gets.
pub fn exceeded_error(e: &Exceeded<'_>) -> ApiError {
    let mut err = ApiError::new(
        429,
        "insufficient_quota",
        "budget_exceeded",
        format!(
            "The {} budget of ${:.2} for {} '{}' is used up (${:.4} spent); it resets in {}h{:02}m (UTC).",
            e.period,
            e.limit,
            e.budget.scope.as_str(),
            e.budget.name,
            e.spent,
            e.resets_in / 3600,
            (e.resets_in % 3600) / 60
        ),
    );
    err.retry_after = Some(e.resets_in.max(1));
    err
}

fn spawn_webhook(shared: &Shared, url: Url, body: String) {
    let connector = shared.webhook_connector.clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=4 {
            match post(&connector, &url, &body).await {
                Ok(status) if (200..300).contains(&status) => return,
                Ok(status) => {
                    tracing::warn!(attempt, status, host = %url.host, "budget webhook refused")
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, host = %url.host, "budget webhook failed")
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        tracing::error!(host = %url.host, "budget webhook gave up after 4 attempts");
    });
}

async fn post(
    connector: &pingora_core::connectors::http::Connector,
    url: &Url,
    body: &str,
) -> Result<u16, String> {
    let addr = tokio::net::lookup_host(url.authority())
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut peer = HttpPeer::new(
        addr,
        url.tls,
        if url.tls {
            url.host.clone()
        } else {
            String::new()
        },
    );
    peer.options.connection_timeout = Some(Duration::from_secs(5));
    peer.options.read_timeout = Some(Duration::from_secs(10));
    let (mut s, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| e.to_string())?;
    let path = if url.path.is_empty() {
        "/".to_string()
    } else {
        url.path.clone()
    };
    let mut h = RequestHeader::build("POST", path.as_bytes(), None).map_err(|e| e.to_string())?;
    for (k, v) in [
        ("host", url.host_header()),
        ("content-type", "application/json".into()),
        ("content-length", body.len().to_string()),
        (
            "user-agent",
            concat!("smartllm/", env!("CARGO_PKG_VERSION")).into(),
        ),
    ] {
        h.insert_header(k, v).map_err(|e| e.to_string())?;
    }
    s.write_request_header(Box::new(h))
        .await
        .map_err(|e| e.to_string())?;
    s.write_request_body(bytes::Bytes::from(body.to_string()), true)
        .await
        .map_err(|e| e.to_string())?;
    s.finish_request_body().await.map_err(|e| e.to_string())?;
    s.read_response_header().await.map_err(|e| e.to_string())?;
    let status = s.response_header().map(|r| r.status.as_u16()).unwrap_or(0);
    while let Ok(Some(_)) = s.read_response_body().await {}
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_resets() {
        // 2025-11-25T13:00Z
        let now = 20_417 * 86_400 + 13 * 3600;
        let (d, m, day_left, month_left) = periods(now);
        assert_eq!((d.as_str(), m.as_str()), ("d:2025-11-25", "m:2025-11"));
        assert_eq!(day_left, 11 * 3600);
        assert_eq!(month_left, 5 * 86_400 + 11 * 3600);
        // December rolls into January.
        let dec31 = (20_417 + 36) * 86_400;
        assert_eq!(periods(dec31).1, "m:2025-12");
        assert_eq!(periods(dec31).3, 86_400);
    }
}
