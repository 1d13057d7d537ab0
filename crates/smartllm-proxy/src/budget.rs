//! Budgets: spend per tenant, app and key for the current UTC day and month,
//! kept in memory (warmed from the ledger at start), checked before each
//! request with an estimate of its cost, and raised as alerts when a threshold
//! is crossed: a log line, a metric, and an optional webhook POST that is
//! retried in the background and never blocks a request. With `fleet.redis`
//! the spend lives in Redis, shared by the fleet: this map is then a view of
//! the fleet's totals, refreshed before each check.

use crate::ctx::Ctx;
use crate::Shared;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use serde_json::json;
use smartllm_config::{Budget, FleetConfig, FleetOnError, Url};
use smartllm_ledger::{civil, format_day, now_secs, Dim, Ledger};
use smartllm_protocol::{ApiError, ParsedRequest};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const METRIC_USED: &str = "smartllm_budget_used_ratio";
pub const METRIC_ALERTS: &str = "smartllm_budget_alerts_total";
pub const METRIC_EXCEEDED: &str = "smartllm_budget_exceeded_total";
pub const METRIC_COST_CAP: &str = "smartllm_request_cost_cap_total";

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

    /// With a fleet, bring the spend of the budgets that apply to this
    /// request up to date from Redis (seeding a counter Redis lacks with this
    /// gateway's own ledger figure). Fails only with `on_error: reject`.
    pub async fn refresh(
        &self,
        shared: &Shared,
        fleet: &FleetConfig,
        budgets: &[Budget],
        ctx: &Ctx,
    ) -> Result<(), ApiError> {
        let Some(f) = shared.fleet(fleet) else {
            return Ok(());
        };
        let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
        let (day, month, _, _) = periods(now_secs());
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for b in budgets.iter().filter(|b| ids.contains(&b.id())) {
            for (p, limit, ttl) in [
                (&day, b.daily_usd, DAY_TTL),
                (&month, b.monthly_usd, MONTH_TTL),
            ] {
                let id = format!("{}|{p}", b.id());
                if limit.is_some() && !wanted.iter().any(|(w, _)| *w == id) {
                    wanted.push((id, ttl));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = wanted.iter().map(|(id, _)| id.clone()).collect();
        match f.spend(&names).await {
            Ok(values) => {
                for ((id, ttl), v) in wanted.iter().zip(values) {
                    match v {
                        Some(v) => self.set(id, v),
                        None => {
                            let mine = self.get(id);
                            if mine > 0.0 {
                                let _ = f.seed_spend(id, mine, *ttl).await;
                            }
                        }
                    }
                }
                Ok(())
            }
            Err(e) if f.on_error() == FleetOnError::Reject => {
                Err(crate::limits::fleet_unavailable(&e))
            }
            Err(_) => Ok(()),
        }
    }

    fn get(&self, id_period: &str) -> f64 {
        self.spend
            .lock()
            .map(|s| s.get(id_period).copied().unwrap_or(0.0))
            .unwrap_or(0.0)
    }

    fn set(&self, id_period: &str, usd: f64) {
        self.spend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id_period.to_string(), usd);
    }

    /// Add a request's cost; raise alerts for thresholds it crosses. With a
    /// fleet, the cost goes to Redis in the background and alerts use the
    /// fleet's totals (one gateway sends each alert).
    pub fn record(
        shared: &Arc<Shared>,
        budgets: &[Budget],
        fleet: &FleetConfig,
        ctx: &Ctx,
        cost: f64,
    ) {
        if cost <= 0.0 {
            return;
        }
        let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
        let (day, month, _, _) = periods(now_secs());
        {
            let mut spend = shared
                .budgets
                .spend
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                for p in [&day, &month] {
                    *spend.entry(format!("{id}|{p}")).or_default() += cost;
                }
            }
        }
        let relevant: Vec<Budget> = budgets
            .iter()
            .filter(|b| ids.contains(&b.id()))
            .cloned()
            .collect();
        let Some(f) = shared.fleet(fleet) else {
            for c in shared.budgets.crossings(&relevant, &day, &month) {
                fire(shared, c);
            }
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let keys: Vec<(String, u64)> = ids
                .iter()
                .flat_map(|id| {
                    [
                        (format!("{id}|{day}"), DAY_TTL),
                        (format!("{id}|{month}"), MONTH_TTL),
                    ]
                })
                .collect();
            let shared_ok = match f.add_spend(&keys, cost).await {
                Ok(totals) => {
                    for ((id, _), total) in keys.iter().zip(totals) {
                        shared.budgets.set(id, total);
                    }
                    true
                }
                Err(_) => false,
            };
            for c in shared.budgets.crossings(&relevant, &day, &month) {
                // One gateway of the fleet sends each alert.
                if !shared_ok || f.claim(&c.key, MONTH_TTL).await.unwrap_or(true) {
                    fire(&shared, c);
                }
            }
        });
    }

    /// Thresholds newly crossed (each reported once per gateway and period);
    /// updates the budget use gauges.
    fn crossings(&self, budgets: &[Budget], day: &str, month: &str) -> Vec<Crossing> {
        let mut out = Vec::new();
        for b in budgets {
            for (period, p, limit) in [
                ("daily", day, b.daily_usd),
                ("monthly", month, b.monthly_usd),
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
                    let key = format!("{}|{p}|{t}", b.id());
                    if self
                        .fired
                        .lock()
                        .map(|mut f| f.insert(key.clone()))
                        .unwrap_or(false)
                    {
                        out.push(Crossing {
                            budget: b.clone(),
                            period,
                            threshold: t,
                            spent,
                            limit,
                            key,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Seconds a day's and a month's spend counters live in Redis.
const DAY_TTL: u64 = 3 * 86_400;
const MONTH_TTL: u64 = 40 * 86_400;

/// A budget threshold crossed.
struct Crossing {
    budget: Budget,
    period: &'static str,
    threshold: f64,
    spent: f64,
    limit: f64,
    key: String,
}

/// Log, count and (optionally) POST an alert.
fn fire(shared: &Shared, c: Crossing) {
    let b = &c.budget;
    tracing::warn!(budget = %b.id(), period = c.period, threshold_pct = c.threshold, spent_usd = c.spent, limit_usd = c.limit, "budget alert");
    metrics::counter!(METRIC_ALERTS, "budget" => b.id(), "threshold" => format!("{}", c.threshold))
        .increment(1);
    if let Some(url) = b.webhook.clone() {
        let body = json!({
            "type": "budget_alert", "budget": b.id(), "scope": b.scope.as_str(), "name": b.name,
            "period": c.period, "threshold_pct": c.threshold, "spent_usd": c.spent, "limit_usd": c.limit,
            "at": now_secs(),
        });
        spawn_webhook(shared, url, body.to_string());
    }
}

/// The tightest per-request cost cap (`max_request_usd`) of the budgets that
/// apply to this request, and the budget it comes from.
pub fn request_cap<'a>(budgets: &'a [Budget], ctx: &Ctx) -> Option<(f64, &'a Budget)> {
    let ids = scope_ids(&ctx.tenant, &ctx.app, &ctx.key_name);
    budgets
        .iter()
        .filter(|b| ids.contains(&b.id()))
        .filter_map(|b| Some((b.max_request_usd?, b)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

/// An upper bound of the prompt's tokens as a provider counts them: the
/// whole request body (JSON syntax, tools and all) in o200k tokens plus a
/// quarter for other tokenizers and the chat template's tokens per message.
/// Bodies over 1 MiB are bounded by their size (a token is at least a byte).
/// Tokenizing more than 4 KiB (about half a millisecond) runs on the blocking pool.
pub async fn prompt_token_bound(req: &ParsedRequest, request_bytes: usize) -> u64 {
    let messages = req
        .body
        .get("messages")
        .and_then(serde_json::Value::as_array)
        .map_or(1, Vec::len) as u64;
    let overhead = 4 * messages + 16;
    if request_bytes > 1 << 20 {
        return request_bytes as u64 + overhead;
    }
    let text = serde_json::to_string(&req.body).unwrap_or_default();
    let tokens = if text.len() <= 4 << 10 {
        smartllm_ledger::estimate_tokens(&text)
    } else {
        let len = text.len() as u64;
        tokio::task::spawn_blocking(move || smartllm_ledger::estimate_tokens(&text))
            .await
            .unwrap_or(len)
    };
    (tokens as f64 * 1.25).ceil() as u64 + overhead
}

/// What a per-request cost cap leaves of a model chain.
#[derive(Debug, PartialEq)]
pub enum CapFit {
    /// These models can serve; `max_output`: the output tokens to allow so
    /// that none of them can pass the cap (None: none can anyway).
    Fits {
        chain: Vec<String>,
        max_output: Option<u64>,
    },
    /// No model can: the cheapest prompt alone would cost this much.
    TooExpensive { cheapest: f64 },
}

/// Keep the models of `chain` under which a `prompt_tokens` prompt and at
/// least one output token cost no more than `cap`, and the output tokens to
/// allow: what every kept model can afford, never more than a model may
/// answer (its max output or what its context window leaves).
pub fn fit_cap(
    config: &smartllm_config::Config,
    chain: &[String],
    prompt_tokens: u64,
    cap: f64,
) -> CapFit {
    let mut kept = Vec::new();
    let mut allow = u64::MAX;
    let mut needed = false;
    let mut cheapest = f64::INFINITY;
    for name in chain {
        let Some(m) = config.model(name) else {
            continue;
        };
        let p = &m.pricing;
        let prompt_cost = prompt_tokens as f64 * p.input_per_1m / 1e6 + p.per_request;
        cheapest = cheapest.min(prompt_cost);
        let per_output = p.output_per_1m / 1e6;
        let affordable = if per_output > 0.0 {
            ((cap - prompt_cost) / per_output).floor()
        } else if prompt_cost <= cap {
            f64::MAX
        } else {
            -1.0
        };
        if affordable < 1.0 {
            continue;
        }
        let limit = m
            .profile
            .context_window
            .saturating_sub(prompt_tokens)
            .max(1)
            .min(m.profile.max_output_tokens.unwrap_or(u64::MAX));
        let affordable = affordable.min(u64::MAX as f64) as u64;
        needed |= affordable < limit;
        allow = allow.min(affordable.min(limit));
        kept.push(name.clone());
    }
    if kept.is_empty() {
        CapFit::TooExpensive { cheapest }
    } else {
        CapFit::Fits {
            chain: kept,
            max_output: needed.then_some(allow),
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

    fn config() -> smartllm_config::Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
        let model = |name: &str, input: f64, output: f64, max_out: Option<u64>| {
            smartllm_config::ModelConfig {
                name: name.into(),
                owned_by: "test".into(),
                deployments: Vec::new(),
                pricing: smartllm_config::Pricing {
                    input_per_1m: input,
                    output_per_1m: output,
                    cached_input_per_1m: input,
                    per_request: 0.0,
                },
                profile: smartllm_config::ModelProfile {
                    context_window: 100_000,
                    max_output_tokens: max_out,
                    ..Default::default()
                },
            }
        };
        // USD per 1M tokens: cheap 1/2, dear 10/40 (max 4096 out).
        cfg.models = vec![
            model("cheap", 1.0, 2.0, None),
            model("dear", 10.0, 40.0, Some(4096)),
        ];
        cfg
    }

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cost_cap_lowers_max_tokens_to_what_every_model_affords() {
        let cfg = config();
        // 1000 prompt tokens, $0.05 cap: dear pays $0.01 for the prompt and
        // affords 1000 output tokens; cheap pays $0.001 and affords 24500.
        let fit = fit_cap(&cfg, &chain(&["dear", "cheap"]), 1000, 0.05);
        assert_eq!(
            fit,
            CapFit::Fits {
                chain: chain(&["dear", "cheap"]),
                // 999.99… in binary floating point: rounded down, never up.
                max_output: Some(999)
            }
        );
        // The bound holds: prompt + max output on the dearest model = the cap.
        let worst = 1000.0 * 10.0 / 1e6 + 999.0 * 40.0 / 1e6;
        assert!(worst <= 0.05 + 1e-12, "{worst}");
    }

    #[test]
    fn cost_cap_drops_models_whose_prompt_alone_passes_it() {
        let cfg = config();
        // 10k prompt tokens at $0.11 cap: dear's prompt costs $0.10 (+1 token
        // at 40/M fits: 250 tokens), so both stay; at $0.09 only cheap does.
        match fit_cap(&cfg, &chain(&["dear", "cheap"]), 10_000, 0.09) {
            CapFit::Fits {
                chain: c,
                max_output,
            } => {
                assert_eq!(c, chain(&["cheap"]));
                // 0.08 / 2e-6 = 40000 tokens, but the context leaves 90000: capped.
                assert_eq!(max_output, Some(40_000));
            }
            other => panic!("{other:?}"),
        }
        match fit_cap(&cfg, &chain(&["dear", "cheap"]), 100_000, 0.05) {
            CapFit::TooExpensive { cheapest } => assert!((cheapest - 0.1).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cost_cap_never_asks_more_than_a_model_may_answer() {
        let cfg = config();
        // A generous cap: dear affords 24750 tokens but answers at most 4096,
        // so the cap cannot be passed and max tokens stays as asked.
        match fit_cap(&cfg, &chain(&["dear"]), 1000, 1.0) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, None),
            other => panic!("{other:?}"),
        }
        // With cheap in the chain too (it could answer 99000 tokens for
        // $0.198 < $1): nothing to cap either.
        match fit_cap(&cfg, &chain(&["cheap", "dear"]), 1000, 1.0) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, None),
            other => panic!("{other:?}"),
        }
        // At $0.1 cheap affords 49500 tokens and dear 2250 (below its 4096
        // limit): both are capped at 2250.
        match fit_cap(&cfg, &chain(&["cheap", "dear"]), 1000, 0.1) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, Some(2250)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_tightest_applicable_cap_wins() {
        let b = |scope, name: &str, cap| Budget {
            scope,
            name: name.into(),
            daily_usd: None,
            monthly_usd: None,
            max_request_usd: Some(cap),
            alert_at: vec![],
            on_exceed: smartllm_config::OnExceed::Reject,
            webhook: None,
        };
        use smartllm_config::BudgetScope::*;
        let budgets = vec![
            b(Tenant, "acme", 0.5),
            b(App, "acme/web", 0.2),
            b(Key, "other", 0.01),
        ];
        let mut ctx = Ctx::new();
        ctx.tenant = "acme".into();
        ctx.app = "web".into();
        ctx.key_name = "k".into();
        let (cap, from) = request_cap(&budgets, &ctx).unwrap();
        assert_eq!((cap, from.id().as_str()), (0.2, "app:acme/web"));
        ctx.tenant = "beta".into();
        assert!(request_cap(&budgets, &ctx).is_none());
    }
}
