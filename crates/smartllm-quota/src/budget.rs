//! Budgets: spend per tenant, app and key for the current UTC day and month,
//! kept in memory (warmed from the ledger at start), checked before each
//! request with an estimate of its cost, and raised as alerts when a threshold
//! is crossed: a log line, a metric, and — for budgets with a webhook — an
//! [`Alert`] on the channel the proxy's alert service delivers (retried there,
//! never blocking a request). With `fleet.redis` the spend lives in Redis,
//! shared by the fleet: this map is then a view of the fleet's totals,
//! refreshed before each check.
//!
//! Bounded whatever clients send: spend is kept only for the scopes a
//! configured budget names (a reload that names new ones reads their spend
//! back from the ledger), and only for the current day and month; alerts
//! already sent are forgotten once their period is over. [`Budgets::prune`]
//! runs on every reload and periodically (the health service's upkeep).

use crate::fleet::{Fleet, HoldOn, NoRoom};
use crate::{metrics, Quotas, Refusal, Scope};
use serde_json::json;
use smartllm_config::{Budget, Config, FleetConfig, FleetOnError, OnExceed, Pricing, Url};
use smartllm_ledger::{civil, format_day, now_secs, Dim, Ledger};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Seconds a day's and a month's spend counters live in Redis.
const DAY_TTL: u64 = 3 * 86_400;
const MONTH_TTL: u64 = 40 * 86_400;

#[derive(Default)]
pub struct Budgets {
    /// "scope-id|period" -> USD, for the scopes some budget names
    spend: Mutex<HashMap<String, f64>>,
    /// "budget-id|period|threshold" already alerted
    fired: Mutex<HashSet<String>>,
    /// The budget ids of the running config (see [`Budgets::track`]).
    tracked: Mutex<HashSet<String>>,
    /// Where spend is read back from (set by [`Budgets::warm`]).
    ledger: Mutex<Option<Ledger>>,
    /// The day (since the epoch) the kept alert marks were last swept.
    marks_swept: std::sync::atomic::AtomicU64,
    /// "scope-id|period" -> (USD, TTL): spend this gateway counted that has
    /// not reached the fleet's counters yet (Redis was down or slow); sent
    /// with the next spend, and added to what Redis says meanwhile.
    unsynced: Mutex<HashMap<String, (f64, u64)>>,
    /// "scope-id|period" -> USD: spend counted here and on its way to the
    /// fleet's counters (sent, no answer yet). A counter Redis lacks is
    /// seeded from this gateway's figure without it: that send adds it.
    sending: Mutex<HashMap<String, f64>>,
    /// "scope-id|period" -> USD: the estimates of requests the budgets let
    /// through whose cost is not recorded yet (see [`Hold`]).
    held: Mutex<HashMap<String, f64>>,
}

/// A request's estimated cost, held against the budgets that let it through
/// until its cost is recorded (drop it then) or it ends without one: a burst
/// of concurrent requests cannot all pass a budget only the first of them
/// fit. With a fleet, the hold is also taken in Redis, where every gateway's
/// requests in flight count (see [`Fleet::hold`]).
pub struct Hold {
    quotas: Arc<Quotas>,
    keys: Vec<String>,
    usd: f64,
    /// The fleet's copy of this hold (its id), let go with it.
    fleet: Option<(Arc<Fleet>, String)>,
    /// Let go of on this gateway already (see [`Hold::release_here`]).
    released_here: bool,
}

impl Hold {
    /// Let go of the hold on this gateway (its cost counts here now); the
    /// fleet's copy goes when the hold is dropped.
    fn release_here(&mut self) {
        if !std::mem::replace(&mut self.released_here, true) {
            self.quotas.budgets.release(&self.keys, self.usd);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release_here();
        if let Some((fleet, id)) = self.fleet.take() {
            let keys = std::mem::take(&mut self.keys);
            // Off the caller's path, among the tasks a drain waits for; a
            // release Redis misses is sent later, and the hold expires.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.quotas.tasks.spawn_on(
                    async move {
                        let _ = fleet.release(&id, &keys).await;
                    },
                    &rt,
                );
            }
        }
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("keys", &self.keys)
            .field("usd", &self.usd)
            .finish()
    }
}

/// Two holds are equal when they hold the same amount on the same budgets.
impl PartialEq for Hold {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys && self.usd == other.usd
    }
}

/// `usd` to the nano-dollar.
fn nanos(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// A share (`spent / limit`) to nine places: 0.952, not 0.9520000000000002.
fn share(spent: f64, limit: f64) -> f64 {
    if limit > 0.0 {
        (spent / limit * 1e9).round() / 1e9
    } else {
        0.0
    }
}

/// "id|period" -> (id, period)
fn split_spend_key(k: &str) -> Option<(&str, &str)> {
    k.rsplit_once('|')
}

/// The key of an alert of budget `id` in `period` (`d:2026-12-04`) at
/// `what` (a threshold, or `refusing`) of `limit`: "id|period|what@limit".
/// The limit is part of it, so a budget a reload raises alerts again at the
/// new limit's thresholds (one lowered does at its first refusal).
fn alert_key(id: &str, period: &str, what: impl std::fmt::Display, limit: f64) -> String {
    format!("{id}|{period}|{what}@{limit}")
}

/// "id|period|threshold@limit" -> (id, period)
fn split_fired_key(k: &str) -> Option<(&str, &str)> {
    let (rest, _threshold) = k.rsplit_once('|')?;
    rest.rsplit_once('|')
}

/// (day period, month period, seconds until the day ends, until the month ends)
fn periods(now: u64) -> (String, String, u64, u64) {
    let days = now / 86_400;
    let (y, m, _) = civil(days);
    let day_left = 86_400 - now % 86_400;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    // days from today to the 1st of next month
    let mut probe = days + 1;
    while civil(probe) != (ny, nm, 1) {
        probe += 1;
    }
    let month_left = (probe * 86_400).saturating_sub(now);
    (
        format!("d:{}", format_day(days)),
        format!("m:{y:04}-{m:02}"),
        day_left,
        month_left,
    )
}

/// The first day (days since the epoch) of the month holding `days`.
fn month_start_day(days: u64) -> u64 {
    let (_, _, d) = civil(days);
    days - (u64::from(d) - 1)
}

/// One period of a budget: what is spent, the burn rate (the period's spend
/// over its elapsed time, at least an hour so a new period does not spike),
/// the spend projected at the period's end at that rate, and when the limit
/// would be reached at that rate (None when not within the period).
fn period_status(spent: f64, limit: f64, elapsed: u64, left: u64) -> serde_json::Value {
    let hours = (elapsed as f64 / 3600.0).max(1.0);
    let burn = spent / hours;
    let projected = spent + burn * left as f64 / 3600.0;
    let exhausted_in = if spent >= limit {
        Some(0)
    } else if burn > 0.0 {
        let secs = ((limit - spent) / burn * 3600.0).ceil() as u64;
        (secs < left).then_some(secs)
    } else {
        None
    };
    json!({
        "spent_usd": spent,
        "limit_usd": limit,
        "used_ratio": share(spent, limit),
        "burn_usd_per_hour": nanos(burn),
        "projected_usd": nanos(projected),
        "exhausted_in_secs": exhausted_in,
        "resets_in_secs": left,
    })
}

/// A budget that a request would take over its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    /// The budget's id (`tenant:acme`, `app:acme/web`, `key:k`).
    pub budget: String,
    pub scope: &'static str,
    pub name: String,
    pub period: &'static str,
    pub spent: f64,
    /// Held by requests in flight (see [`Hold`]).
    pub held: f64,
    pub limit: f64,
    pub resets_in: u64,
    /// The request fits what is spent; only what requests in flight hold
    /// leaves it no room: it may go once they end (retry shortly).
    pub in_flight: bool,
    /// What the request could cost (its firm part: the prompt and the
    /// output it may write), as the budget weighed it (an f32: what the
    /// message says, not what is charged).
    pub could_cost: f32,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Exceeded {
            period,
            limit,
            scope,
            name,
            spent,
            held,
            ..
        } = self;
        let limit = usd(*limit);
        if self.in_flight {
            return write!(
                f,
                "The {period} budget of ${limit} for {scope} '{name}' has no room for this request while requests in flight hold ${held:.4} of it (${spent:.4} spent); retry in a moment."
            );
        }
        let left = self.limit - spent - held;
        let held = if *held > 0.0 {
            format!(", ${held:.4} more held by requests in flight")
        } else {
            String::new()
        };
        // Refused on its estimate before the budget is all spent: say what
        // is left rather than "used up".
        let state = if left > 0.0 {
            format!(
                "has ${} left, less than the ${} this request could cost at most (its prompt and the output its token limit allows)",
                usd(left),
                usd(f64::from(self.could_cost))
            )
        } else {
            "is used up".to_string()
        };
        write!(
            f,
            "The {period} budget of ${limit} for {scope} '{name}' {state} (${spent:.4} spent{held}); it resets in {}h{:02}m (UTC).",
            self.resets_in / 3600,
            (self.resets_in % 3600) / 60
        )
    }
}

impl std::error::Error for Exceeded {}

/// Dollars as people read them: cents from a dollar up, four decimals
/// below (a $0.0002 budget is not "$0.00").
fn usd(x: f64) -> String {
    if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else if x == 0.0 || x.abs() >= 0.0001 {
        format!("{x:.4}")
    } else {
        // Under a hundredth of a cent: two significant digits, never a
        // "$0.0000 left" of a budget that still has some.
        let digits = (-x.abs().log10()).ceil() as usize + 1;
        format!("{x:.digits$}")
    }
}

/// What the budgets say about a request about to be sent.
#[derive(Debug, PartialEq)]
pub enum BudgetDecision {
    /// Within every budget that applies (or none applies), with the
    /// request's estimate held against those that do.
    Within(Option<Hold>),
    /// A budget is used up and says to serve this cheaper model instead.
    Degrade { model: String, budget: String },
    /// A budget is used up and refuses the request (or the fleet's spend
    /// cannot be read and `fleet.on_error` is `reject`).
    Reject(Refusal),
}

/// A budget alert to deliver to its webhook.
#[derive(Debug, Clone)]
pub struct Alert {
    pub webhook: Url,
    /// The JSON document to POST.
    pub body: String,
    /// The budget's id (`tenant:acme`) and what the alert says (`80%`,
    /// `refusing`), for the delivery's log lines and metric.
    pub budget: String,
    pub what: String,
}

/// The estimated cost of a request before it is sent (see [`estimate`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Estimate {
    /// What the request can cost for sure: its prompt, the per-request
    /// price and, when the request caps its answer, that many tokens.
    pub firm: f64,
    /// A typical answer's cost when the request does not cap its answer.
    /// Held like the rest, so that a burst of uncapped requests cannot all
    /// pass a budget; but a request nothing else holds room from is not
    /// refused on this guess alone.
    pub expected: f64,
}

impl Estimate {
    pub fn total(self) -> f64 {
        self.firm + self.expected
    }
}

/// A known cost (a cap on the answer given, or nothing to answer).
impl From<f64> for Estimate {
    fn from(firm: f64) -> Estimate {
        Estimate {
            firm,
            expected: 0.0,
        }
    }
}

/// The estimated cost of a request before it is sent: the prompt's
/// `prompt_tokens` (estimated: text at about four bytes a token, images per
/// image), plus `max_output` tokens of answer when the request caps it,
/// else `expected_output` tokens as a typical answer.
pub fn estimate(
    pricing: &Pricing,
    prompt_tokens: u64,
    max_output: Option<u64>,
    expected_output: u64,
) -> Estimate {
    let output = |tokens: u64| tokens as f64 * pricing.output_per_1m / 1e6;
    Estimate {
        firm: prompt_tokens as f64 * pricing.input_per_1m / 1e6
            + max_output.map_or(0.0, output)
            + pricing.per_request,
        expected: if max_output.is_some() {
            0.0
        } else {
            output(expected_output)
        },
    }
}

/// Is there room for a request estimated at `estimate` in a budget period
/// with `spent` spent and `held` held by requests in flight? A typical
/// answer's cost (when the request sets no cap) counts against what others
/// hold, never alone. The fleet's script (`fleet::HOLD`) has the same rule.
fn room(spent: f64, held: f64, limit: f64, estimate: Estimate) -> bool {
    let total = estimate.total();
    let alone_fits = held <= 1e-12 && spent + estimate.firm <= limit;
    spent < limit && (total <= 0.0 || spent + held + total <= limit || alone_fits)
}

/// A budget period a request is checked, and its estimate held, against.
#[derive(Debug)]
pub struct Slot<'a> {
    /// "scope-id|period"
    pub key: String,
    pub budget: &'a Budget,
    pub period: &'static str,
    pub limit: f64,
    /// Seconds until the period ends.
    pub resets_in: u64,
}

impl Slot<'_> {
    fn exceeded(&self, spent: f64, held: f64, estimate: Estimate) -> Exceeded {
        let b = self.budget;
        Exceeded {
            budget: b.id(),
            scope: b.scope.as_str(),
            name: b.name.clone(),
            period: self.period,
            spent,
            held,
            limit: self.limit,
            resets_in: self.resets_in,
            in_flight: spent < self.limit && spent + estimate.firm <= self.limit,
            could_cost: estimate.firm as f32,
        }
    }
}

/// Seconds a fleet hold lives in Redis at most: a gateway that dies with
/// requests in flight leaves holds no longer than this (an answer that
/// takes longer keeps its hold on its own gateway only).
const FLEET_HOLD_SECS: u64 = 600;

/// An id no other hold of the fleet has: this process's token and a count.
fn fleet_hold_id() -> String {
    static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 40)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{process:x}.{n}")
}

impl Budgets {
    /// Load this month's spend of the tracked budgets from the ledger, and
    /// keep the ledger to read back budgets that a reload adds.
    pub fn warm(&self, ledger: &Ledger) {
        *self.ledger.lock().unwrap_or_else(|p| p.into_inner()) = Some(ledger.clone());
        let ids = self
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.merge(Self::load(ledger, &ids));
    }

    /// Add spend read back from the ledger to what is counted already:
    /// requests that ended while the ledger was read count for tracked
    /// budgets as they end (see [`Quotas::record_and_release`]), and the
    /// read must not overwrite them.
    fn merge(&self, loaded: HashMap<String, f64>) {
        let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in loaded {
            *spend.entry(k).or_default() += v;
        }
    }

    /// Mark as fired, without sending, every alert threshold that spend
    /// already meets (spend read back after a restart).
    fn mark_reached(&self, budgets: &[Budget], now: u64) {
        let (day, month, _, _) = periods(now);
        let mut reached = Vec::new();
        for b in budgets {
            for (p, limit) in [(&day, b.daily_usd), (&month, b.monthly_usd)] {
                let Some(limit) = limit.filter(|l| *l > 0.0) else {
                    continue;
                };
                let pct = self.spent(&b.id(), p) / limit * 100.0;
                for &t in b.alert_at.iter().filter(|t| pct >= **t) {
                    reached.push(alert_key(&b.id(), p, t, limit));
                }
            }
        }
        self.fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(reached);
    }

    /// This month's and today's spend of the budget ids `ids`, from the ledger.
    fn load(ledger: &Ledger, ids: &HashSet<String>) -> HashMap<String, f64> {
        let mut out: HashMap<String, f64> = HashMap::new();
        if ids.is_empty() {
            return out;
        }
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
                for r in rows {
                    let g = |d| r.group.get(&d).cloned().unwrap_or_default();
                    let scope = Scope {
                        tenant: &g(Dim::Tenant),
                        app: &g(Dim::App),
                        key: &g(Dim::Key),
                    }
                    .budget_ids();
                    for id in scope.iter().filter(|id| ids.contains(*id)) {
                        *out.entry(format!("{id}|{month_p}")).or_default() += r.cost_usd;
                        if g(Dim::Day) == today {
                            *out.entry(format!("{id}|{day_p}")).or_default() += r.cost_usd;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read this month's spend from the ledger; budgets start from zero")
            }
        }
        out
    }

    /// Track the budgets of the running config (at start and on every
    /// reload): spend of scopes no budget names any more is dropped (the
    /// alerts sent stay until their period ends), and budgets new to this process read their spend back from
    /// the ledger (when [`Budgets::warm`] gave one). They are tracked before
    /// the read: a request that ends during it counts for them as it ends
    /// (its ledger record may come too late for the read), and the read is
    /// added to that, so no spend is lost. One whose record the read saw as
    /// well counts twice (a budget errs on the strict side).
    pub fn track(&self, budgets: &[Budget]) {
        let ids: HashSet<String> = budgets.iter().map(|b| b.id()).collect();
        let added: HashSet<String> = {
            let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            let added = ids.difference(&tracked).cloned().collect();
            *tracked = ids.clone();
            added
        };
        self.spend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| split_spend_key(k).is_some_and(|(id, _)| ids.contains(id)));
        // Alerts already sent are kept, tracked or not, until their period
        // ends (`prune`): a budget a reload drops by mistake and the next
        // restores must not alert again on thresholds it already alerted.
        let ledger = self
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(ledger) = ledger {
            self.merge(Self::load(&ledger, &added));
        }
        self.prune();
    }

    /// Forget spend and alerts of past days and months.
    pub fn prune(&self) {
        self.prune_at(now_secs());
    }

    fn prune_at(&self, now: u64) {
        let (day, month, _, _) = periods(now);
        let current = |p: &str| p == day || p == month;
        self.spend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| split_spend_key(k).is_some_and(|(_, p)| current(p)));
        self.fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| split_fired_key(k).is_some_and(|(_, p)| current(p)));
    }

    /// Entries held: (spend, alerts fired).
    pub fn sizes(&self) -> (usize, usize) {
        (
            self.spend.lock().map(|s| s.len()).unwrap_or(0),
            self.fired.lock().map(|f| f.len()).unwrap_or(0),
        )
    }

    /// What `id` spent in `period`, to the nano-dollar (the ledger's unit):
    /// a sum of float costs carries noise (0.0025199999999999992) that
    /// webhooks, the admin API and the metrics would otherwise show.
    fn spent(&self, id: &str, period: &str) -> f64 {
        nanos(self.get(&format!("{id}|{period}")))
    }

    /// The first budget this request (estimated at `estimate`) would
    /// exceed, counting what requests in flight hold; else the budget
    /// periods its estimate is now held on (release them with
    /// [`Budgets::release`]). One lock over the check and the hold: two
    /// requests cannot both take the last of a budget.
    /// Budgets `skip` says are met are not checked (a degrade budget whose
    /// target serves the request), nor held.
    pub fn check<'a>(
        &self,
        budgets: &'a [Budget],
        scope: Scope<'_>,
        estimate: Estimate,
        skip: impl Fn(&Budget) -> bool,
    ) -> Result<Vec<Slot<'a>>, Box<(&'a Budget, Exceeded)>> {
        if budgets.is_empty() {
            return Ok(Vec::new());
        }
        let ids = scope.budget_ids();
        let total = estimate.total();
        let (day, month, day_left, month_left) = periods(now_secs());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots: Vec<Slot<'a>> = Vec::new();
        // Monthly periods first: a request over both a daily and a monthly
        // budget is refused on the monthly one, whose reset (Retry-After)
        // is the one a retry has to wait for. The fleet's hold checks the
        // slots in this order too.
        for (period, p, left) in [("monthly", &month, month_left), ("daily", &day, day_left)] {
            for b in budgets {
                if !ids.contains(&b.id()) || skip(b) {
                    continue;
                }
                let limit = if period == "monthly" {
                    b.monthly_usd
                } else {
                    b.daily_usd
                };
                let Some(limit) = limit else { continue };
                let slot = Slot {
                    key: format!("{}|{p}", b.id()),
                    budget: b,
                    period,
                    limit,
                    resets_in: left,
                };
                let spent = self.get(&slot.key);
                let in_flight = held.get(&slot.key).copied().unwrap_or(0.0);
                if !room(spent, in_flight, limit, estimate) {
                    return Err(Box::new((b, slot.exceeded(spent, in_flight, estimate))));
                }
                // Two budgets on one scope (a tenant's and its app's) hold apart.
                if !slots.iter().any(|s| s.key == slot.key) {
                    slots.push(slot);
                }
            }
        }
        if total > 0.0 {
            for s in &slots {
                *held.entry(s.key.clone()).or_default() += total;
            }
        } else {
            slots.clear();
        }
        Ok(slots)
    }

    /// Let go of what a request held (its cost is recorded, or it ended).
    fn release(&self, keys: &[String], usd: f64) {
        if keys.is_empty() {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            if let Some(v) = held.get_mut(k) {
                *v -= usd;
                // Sums of floats: what is left of a few holds' rounding is nothing.
                if *v <= 1e-12 {
                    held.remove(k);
                }
            }
        }
    }

    /// The highest share of any budget this request's tenant, app or key has
    /// spent in its current period (0 when none applies: the router's cue to
    /// favour cheaper candidates), and the least any of them has left (None
    /// when none applies: a candidate expected to cost more is the router's
    /// last choice). One pass, one lock of the spend per budget period.
    pub fn pressure_and_left(&self, budgets: &[Budget], scope: Scope<'_>) -> (f64, Option<f64>) {
        if budgets.is_empty() {
            return (0.0, None);
        }
        let ids = scope.budget_ids();
        let (day, month, _, _) = periods(now_secs());
        let (mut worst, mut least) = (0.0f64, None::<f64>);
        for b in budgets {
            if !ids.contains(&b.id()) {
                continue;
            }
            for (p, limit) in [(&day, b.daily_usd), (&month, b.monthly_usd)] {
                if let Some(limit) = limit.filter(|l| *l > 0.0) {
                    let spent = self.spent(&b.id(), p);
                    worst = worst.max(spent / limit);
                    let left = (limit - spent).max(0.0);
                    least = Some(least.map_or(left, |l| l.min(left)));
                }
            }
        }
        (worst, least)
    }

    /// Every configured budget with its spend, limit and burn rate in the
    /// current UTC day and month (for the admin API and the dashboard).
    pub fn status(&self, budgets: &[Budget]) -> Vec<serde_json::Value> {
        let now = now_secs();
        let (day, month, day_left, month_left) = periods(now);
        let day_elapsed = now % 86_400;
        let month_elapsed = now - month_start_day(now / 86_400) * 86_400;
        let fired = self.fired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        budgets
            .iter()
            .map(|b| {
                let id = b.id();
                let mut periods_out = serde_json::Map::new();
                for (name, p, limit, elapsed, left) in [
                    ("daily", &day, b.daily_usd, day_elapsed, day_left),
                    ("monthly", &month, b.monthly_usd, month_elapsed, month_left),
                ] {
                    let Some(limit) = limit else { continue };
                    let spent = self.spent(&id, p);
                    let mut status = period_status(spent, limit, elapsed, left);
                    // Turning requests away before its limit (see
                    // `Quotas::alert_refusing`): used up for all that asks.
                    status["refusing"] = json!(
                        spent >= limit || fired.contains(&alert_key(&id, p, "refusing", limit))
                    );
                    periods_out.insert(name.to_string(), status);
                }
                json!({
                    "budget": id,
                    "scope": b.scope.as_str(),
                    "name": b.name,
                    "on_exceed": match &b.on_exceed {
                        OnExceed::Reject => "reject".to_string(),
                        OnExceed::Degrade(m) => format!("degrade to {m}"),
                    },
                    "max_request_usd": b.max_request_usd,
                    "periods": periods_out,
                })
            })
            .collect()
    }

    /// With a fleet, bring the spend of the budgets that apply to this
    /// request up to date from Redis (seeding a counter Redis lacks with this
    /// gateway's own ledger figure). Fails only with `on_error: reject`.
    async fn refresh(
        &self,
        fleet: Option<Arc<Fleet>>,
        budgets: &[Budget],
        scope: Scope<'_>,
    ) -> Result<(), Refusal> {
        let ids = scope.budget_ids();
        self.refresh_these(fleet, budgets.iter().filter(|b| ids.contains(&b.id())))
            .await
    }

    /// [`Budgets::refresh`] for `budgets`, whatever scope they name.
    async fn refresh_these<'b>(
        &self,
        fleet: Option<Arc<Fleet>>,
        budgets: impl Iterator<Item = &'b Budget>,
    ) -> Result<(), Refusal> {
        let Some(f) = fleet else {
            return Ok(());
        };
        let (day, month, _, _) = periods(now_secs());
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for b in budgets {
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
                        // Plus what this gateway counted but could not send yet.
                        Some(v) => self.set(id, v + self.unsynced(id)),
                        None => {
                            // This gateway's figure holds what it could not
                            // send: seeded, it is sent. (When another
                            // gateway's seed came first, it is sent below
                            // with the rest this gateway could not send.)
                            // Less what is on its way there: seeded with
                            // it, that send would add it a second time.
                            let mine = self.get(id) - self.sending_of(id);
                            if mine > 1e-12
                                && matches!(f.seed_spend(id, mine, *ttl).await, Ok(true))
                            {
                                self.forget_unsynced(id);
                            }
                        }
                    }
                }
                // Redis is back: what it missed goes now, not with this
                // gateway's next spend (which a budget may refuse).
                let deferred = self.with_unsynced(Vec::new());
                if !deferred.is_empty() {
                    match f.add_spend(&deferred).await {
                        Ok(totals) => {
                            for ((id, _, _), total) in deferred.iter().zip(totals) {
                                self.set(id, total);
                            }
                        }
                        Err(_) => self.defer(&deferred),
                    }
                }
                Ok(())
            }
            Err(e) if f.on_error() == FleetOnError::Reject => {
                Err(Refusal::FleetUnavailable(e.to_string()))
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

    /// Keep spend the fleet's counters have not taken yet.
    fn defer(&self, spends: &[(String, u64, f64)]) {
        let mut u = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        for (id, ttl, usd) in spends {
            let e = u.entry(id.clone()).or_insert((0.0, *ttl));
            e.0 += usd;
            e.1 = e.1.max(*ttl);
        }
    }

    /// `spends` plus everything deferred, merged per counter (the deferred
    /// taken out: put back with [`Budgets::defer`] if this send fails too).
    fn with_unsynced(&self, spends: Vec<(String, u64, f64)>) -> Vec<(String, u64, f64)> {
        let deferred =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = spends;
        for (id, (usd, ttl)) in deferred {
            match out.iter_mut().find(|(k, _, _)| *k == id) {
                Some(e) => {
                    e.2 += usd;
                    e.1 = e.1.max(ttl);
                }
                None => out.push((id, ttl, usd)),
            }
        }
        out
    }

    /// Count `spends` as on their way to the fleet (`sign` 1) or arrived
    /// or deferred (`sign` -1).
    fn sending(&self, spends: &[(String, u64, f64)], sign: f64) {
        let mut s = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        for (id, _, usd) in spends {
            let e = s.entry(id.clone()).or_insert(0.0);
            *e += sign * usd;
            if *e <= 1e-12 {
                s.remove(id);
            }
        }
    }

    /// What of `id_period` is on its way to the fleet.
    fn sending_of(&self, id_period: &str) -> f64 {
        self.sending
            .lock()
            .map(|s| s.get(id_period).copied().unwrap_or(0.0))
            .unwrap_or(0.0)
    }

    fn forget_unsynced(&self, id_period: &str) {
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id_period);
    }

    /// What this gateway counted for `id_period` that the fleet has not.
    fn unsynced(&self, id_period: &str) -> f64 {
        self.unsynced
            .lock()
            .map(|u| u.get(id_period).map_or(0.0, |e| e.0))
            .unwrap_or(0.0)
    }

    fn add(&self, ids: &[String], periods: [&str; 2], usd: f64) {
        let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            for p in periods {
                *spend.entry(format!("{id}|{p}")).or_default() += usd;
            }
        }
    }

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
                metrics::budget_used(&b.id(), period, share(spent, limit));
                for &t in &b.alert_at {
                    if pct < t {
                        continue;
                    }
                    let key = alert_key(&b.id(), p, t, limit);
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
                            refusing: false,
                        });
                    }
                }
            }
        }
        out
    }
}

/// A budget threshold crossed.
struct Crossing {
    budget: Budget,
    period: &'static str,
    threshold: f64,
    spent: f64,
    limit: f64,
    key: String,
    /// Not a threshold: the budget began refusing (or degrading) requests
    /// that would fit an empty period (`threshold` is then the share spent).
    refusing: bool,
}

impl Quotas {
    /// Spend this gateway counted that the fleet's counters have not taken
    /// (Redis unreachable since): how many budget periods miss some, and the
    /// most one misses (USD).
    pub fn spend_unsent(&self) -> (usize, f64) {
        let u = self
            .budgets
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let most = u.values().map(|e| e.0).fold(0.0, f64::max);
        (u.len(), most)
    }

    /// Load this month's spend from the ledger (at start, after
    /// [`Quotas::track_budgets`]). Thresholds of `budgets` that spend
    /// already meets were alerted on before the restart: not sent again
    /// (with a fleet too: its Redis may be out of reach, and then alerts go
    /// unclaimed).
    pub fn warm(&self, ledger: &Ledger, budgets: &[Budget]) {
        self.budgets.warm(ledger);
        let now = now_secs();
        self.budgets.mark_reached(budgets, now);
        // And the alerts spend cannot tell were sent (`budget_refusing`).
        let (day, month, _, _) = periods(now);
        let kept =
            ledger.marks(|m| split_fired_key(m).is_some_and(|(_, p)| p == day || p == month));
        self.budgets
            .fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(kept);
    }

    /// The budgets of the running config (at start and on every reload; may
    /// read the ledger, so call it off the async threads): see [`Budgets::track`].
    pub fn track_budgets(&self, budgets: &[Budget]) {
        self.budgets.track(budgets);
    }

    /// Periodic upkeep: forget spend and alerts of past periods and rate
    /// limit buckets that are full again; once a day, the alert marks kept
    /// in the data dir for past periods too (off the caller's thread).
    pub fn sweep(&self) {
        self.budgets.prune();
        self.limiter.sweep();
        let now = now_secs();
        let today = now / 86_400;
        if self
            .budgets
            .marks_swept
            .swap(today, std::sync::atomic::Ordering::SeqCst)
            == today
        {
            return;
        }
        let ledger = self
            .budgets
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(ledger), Ok(rt)) = (ledger, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (day, month, _, _) = periods(now);
        self.tasks.spawn_blocking_on(
            move || {
                ledger.marks(|m| split_fired_key(m).is_some_and(|(_, p)| p == day || p == month));
            },
            &rt,
        );
    }

    /// In-memory entries: (spend, alerts fired, rate limit buckets).
    pub fn state_sizes(&self) -> (usize, usize, usize) {
        let (spend, fired) = self.budgets.sizes();
        (spend, fired, self.limiter.len())
    }

    /// Every budget's spend and burn rate this day and month (see [`Budgets::status`]).
    pub fn budget_status(&self, budgets: &[Budget]) -> Vec<serde_json::Value> {
        self.budgets.status(budgets)
    }

    /// With a fleet, bring every budget's spend up to date from Redis (one
    /// read), for what the admin API and `/metrics` show: without it a
    /// gateway that has not served a scope since its start shows its own
    /// ledger's figure, not the fleet's. Redis out of reach: the figures
    /// this gateway knows.
    pub async fn refresh_all(self: &Arc<Self>, config: &Config) {
        let budgets = &config.keys.budgets;
        let Some(f) = self.fleet(&config.fleet).filter(|_| !budgets.is_empty()) else {
            return;
        };
        if self
            .budgets
            .refresh_these(Some(f.clone()), budgets.iter())
            .await
            .is_ok()
        {
            self.alert_crossed_in(&f, budgets.to_vec());
        }
    }

    /// Set `smartllm_budget_used_ratio` of every budget and period from
    /// the spend known now (at each scrape of `/metrics`).
    pub fn export_budget_gauges(&self, budgets: &[Budget]) {
        let (day, month, _, _) = periods(now_secs());
        for b in budgets {
            for (period, p, limit) in [
                ("daily", &day, b.daily_usd),
                ("monthly", &month, b.monthly_usd),
            ] {
                if let Some(limit) = limit.filter(|l| *l > 0.0) {
                    metrics::budget_used(
                        &b.id(),
                        period,
                        share(self.budgets.spent(&b.id(), p), limit),
                    );
                }
            }
        }
    }

    /// The budgets' pressure on this scope and what they have left (see
    /// [`Budgets::pressure_and_left`]).
    pub fn budget_pressure_and_left(
        &self,
        budgets: &[Budget],
        scope: Scope<'_>,
    ) -> (f64, Option<f64>) {
        self.budgets.pressure_and_left(budgets, scope)
    }

    /// May a request estimated at `estimate` go to `model`? With a
    /// fleet, the spend is brought up to date from Redis first.
    pub async fn budget(
        self: &Arc<Self>,
        config: &Config,
        scope: Scope<'_>,
        model: &str,
        estimate: impl Into<Estimate>,
    ) -> BudgetDecision {
        self.budget_with(config, scope, model, estimate.into(), false)
            .await
    }

    /// [`Quotas::budget`] for a request a degrade budget already sent to
    /// the cheaper `model`: every degrade budget is met by that (one step
    /// only), and every `reject` budget still applies and holds. (Checked
    /// as for any model, a second exceeded degrade budget would hide a
    /// tenant's exhausted `reject` budget behind it.)
    pub async fn budget_degraded(
        self: &Arc<Self>,
        config: &Config,
        scope: Scope<'_>,
        model: &str,
        estimate: impl Into<Estimate>,
    ) -> BudgetDecision {
        self.budget_with(config, scope, model, estimate.into(), true)
            .await
    }

    async fn budget_with(
        self: &Arc<Self>,
        config: &Config,
        scope: Scope<'_>,
        model: &str,
        estimate: Estimate,
        degraded: bool,
    ) -> BudgetDecision {
        let budgets = &config.keys.budgets;
        if budgets.is_empty() {
            return BudgetDecision::Within(None);
        }
        let fleet = self.fleet(&config.fleet);
        let local = fleet.is_none();
        if let Err(r) = self.budgets.refresh(fleet.clone(), budgets, scope).await {
            return BudgetDecision::Reject(r);
        }
        if let Some(f) = &fleet {
            self.alert_crossed(f, budgets, scope);
        }
        // A degrade budget whose target is this model is met by serving
        // it; every other budget still applies.
        let degraded_to_this = |b: &Budget| match &b.on_exceed {
            OnExceed::Degrade(target) => {
                degraded
                    || config
                        .resolve_model(target)
                        .is_some_and(|(m, _)| m.name == model)
            }
            OnExceed::Reject => false,
        };
        let (budget, ex) = match self
            .budgets
            .check(budgets, scope, estimate, degraded_to_this)
        {
            Ok(slots) if slots.is_empty() => return BudgetDecision::Within(None),
            Ok(slots) => {
                let mut hold = Hold {
                    quotas: self.clone(),
                    keys: slots.iter().map(|s| s.key.clone()).collect(),
                    usd: estimate.total(),
                    fleet: None,
                    released_here: false,
                };
                let Some(f) = fleet else {
                    return BudgetDecision::Within(Some(hold));
                };
                // This gateway's holds fit; the fleet's must too.
                let on: Vec<HoldOn> = slots
                    .iter()
                    .map(|s| HoldOn {
                        id: s.key.clone(),
                        limit: s.limit,
                        spent: self.budgets.get(&s.key),
                        unsent: self.budgets.unsynced(&s.key),
                    })
                    .collect();
                let id = fleet_hold_id();
                let taken = f
                    .hold(&id, &on, estimate.firm, estimate.total(), FLEET_HOLD_SECS)
                    .await;
                // Even when the answer was lost: Redis may have taken it.
                let fleet_on_error = f.on_error();
                hold.fleet = Some((f, id));
                match taken {
                    Ok(None) => return BudgetDecision::Within(Some(hold)),
                    Ok(Some(NoRoom { index, held, spent })) => {
                        drop(hold);
                        let s = &slots[index];
                        (s.budget, s.exceeded(spent, held, estimate))
                    }
                    Err(e) if fleet_on_error == FleetOnError::Reject => {
                        return BudgetDecision::Reject(Refusal::FleetUnavailable(e.to_string()))
                    }
                    // Redis is out of reach: this gateway's holds decide.
                    Err(_) => return BudgetDecision::Within(Some(hold)),
                }
            }
            Err(exceeded) => *exceeded,
        };
        self.alert_refusing(config, budget, &ex, estimate);
        if local && !ex.in_flight {
            // Thresholds spend already meets that no request's spend will
            // cross, since a refused request costs nothing: a budget a
            // reload added, or lowered, below what its scope has spent
            // (thresholds met at a restart were marked sent: `warm`).
            // With a fleet, `alert_crossed` above does this.
            let (day, month, _, _) = periods(now_secs());
            for c in self
                .budgets
                .crossings(std::slice::from_ref(budget), &day, &month)
            {
                self.fire(c);
            }
        }
        match &budget.on_exceed {
            OnExceed::Degrade(target) => match config.resolve_model(target) {
                Some((m, _)) if m.name != model => {
                    metrics::budget_exceeded(&ex.budget, "degrade");
                    BudgetDecision::Degrade {
                        model: m.name.clone(),
                        budget: ex.budget,
                    }
                }
                _ => BudgetDecision::Within(None),
            },
            OnExceed::Reject => {
                // Room held by requests in flight is no budget used up: a
                // retry may fit (and an alert on `reject` would cry wolf).
                metrics::budget_exceeded(&ex.budget, if ex.in_flight { "wait" } else { "reject" });
                BudgetDecision::Reject(Refusal::BudgetExceeded(ex))
            }
        }
    }

    /// Add a request's cost; raise alerts for thresholds it crosses. With a
    /// fleet, the cost goes to Redis in the background and alerts use the
    /// fleet's totals (one gateway sends each alert).
    pub fn record(
        self: &Arc<Self>,
        budgets: &[Budget],
        fleet: &FleetConfig,
        scope: Scope<'_>,
        cost: f64,
    ) {
        self.record_and_release(budgets, fleet, scope, cost, None)
    }

    /// [`Quotas::record`], then let go of the request's `hold`: with a fleet,
    /// once its cost has reached Redis, so that no other gateway sees the
    /// request as neither spent nor held.
    pub fn record_and_release(
        self: &Arc<Self>,
        budgets: &[Budget],
        fleet: &FleetConfig,
        scope: Scope<'_>,
        cost: f64,
        hold: Option<Hold>,
    ) {
        if cost <= 0.0 {
            return;
        }
        let all = scope.budget_ids();
        let relevant: Vec<Budget> = budgets
            .iter()
            .filter(|b| all.contains(&b.id()))
            .cloned()
            .collect();
        // Spend is kept only for scopes a budget names: whatever tenants,
        // apps and keys clients bring, the map holds no more than the config.
        let ids: Vec<String> = all
            .iter()
            .filter(|id| relevant.iter().any(|b| b.id() == **id))
            .cloned()
            .collect();
        // Budgets a reload is adding are tracked, and read their spend back
        // from the ledger, before the config that names them runs: a
        // request ending meanwhile (under the config it is given, without
        // them) counts for them too, or the read could miss it (see
        // [`Budgets::track`]). Counted here only: with a fleet, a counter
        // Redis lacks starts from this gateway's figure (these included) at
        // the budget's first check; sent now, it would start without the
        // spend read back.
        let adding: Vec<String> = {
            let tracked = self
                .budgets
                .tracked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.iter()
                .filter(|id| !ids.contains(*id) && tracked.contains(*id))
                .cloned()
                .collect()
        };
        if ids.is_empty() && adding.is_empty() {
            return;
        }
        let (day, month, _, _) = periods(now_secs());
        self.budgets.add(&ids, [&day, &month], cost);
        self.budgets.add(&adding, [&day, &month], cost);
        let mut hold = hold;
        if let Some(h) = hold.as_mut() {
            h.release_here();
        }
        let Some(f) = self.fleet(fleet).filter(|_| !ids.is_empty()) else {
            for c in self.budgets.crossings(&relevant, &day, &month) {
                self.fire(c);
            }
            return;
        };
        let quotas = self.clone();
        let spends: Vec<(String, u64, f64)> = ids
            .iter()
            .flat_map(|id| {
                [
                    (format!("{id}|{day}"), DAY_TTL, cost),
                    (format!("{id}|{month}"), MONTH_TTL, cost),
                ]
            })
            .collect();
        // With it, what earlier sends could not deliver. At least once:
        // a send that timed out after Redis applied it is counted twice
        // (a budget errs on the strict side), never lost. On its way from
        // now (counted here already): a seed of a counter Redis lacks, read
        // meanwhile, leaves it out.
        let spends = quotas.budgets.with_unsynced(spends);
        quotas.budgets.sending(&spends, 1.0);
        self.tasks.spawn(async move {
            // The fleet's copy of the hold goes with the spend, in one
            // transaction (see [`Fleet::add_spend_releasing`]).
            let mut hold = hold;
            let releasing = hold.as_mut().and_then(|h| {
                let (of, id) = h.fleet.take_if(|(of, _)| Arc::ptr_eq(of, &f))?;
                Some((of, id, h.keys.clone()))
            });
            let result = f
                .add_spend_releasing(
                    &spends,
                    releasing
                        .as_ref()
                        .map(|(_, id, on)| (id.as_str(), on.as_slice())),
                )
                .await;
            let shared_ok = match result {
                Ok(totals) => {
                    for ((id, _, _), total) in spends.iter().zip(totals) {
                        quotas.budgets.set(id, total);
                    }
                    quotas.budgets.sending(&spends, -1.0);
                    true
                }
                Err(_) => {
                    quotas.budgets.defer(&spends);
                    quotas.budgets.sending(&spends, -1.0);
                    // Kept for a later hold's round trip when Redis is out
                    // of reach (the hold expires meanwhile).
                    if let Some((of, id, on)) = &releasing {
                        let _ = of.release(id, on).await;
                    }
                    false
                }
            };
            // Its cost is in Redis (or will be sent): its hold goes.
            drop(hold);
            for c in quotas.budgets.crossings(&relevant, &day, &month) {
                // One gateway of the fleet sends each alert.
                if !shared_ok || f.claim(&c.key, MONTH_TTL).await.unwrap_or(true) {
                    quotas.fire(c);
                }
            }
        });
    }

    /// Alert the thresholds the fleet's figures, just read from Redis, have
    /// crossed since this gateway last looked (one gateway of the fleet
    /// sends each). Spend reaches Redis by other ways than this gateway's
    /// own requests: other gateways', or its own sent late once Redis is
    /// back after an outage. Without this a budget those pushed past 80%
    /// and 100% would refuse every request and never say so.
    fn alert_crossed(self: &Arc<Self>, f: &Arc<Fleet>, budgets: &[Budget], scope: Scope<'_>) {
        let ids = scope.budget_ids();
        let relevant: Vec<Budget> = budgets
            .iter()
            .filter(|b| ids.contains(&b.id()))
            .cloned()
            .collect();
        self.alert_crossed_in(f, relevant);
    }

    /// [`Quotas::alert_crossed`] for `relevant`, whatever scopes they name.
    fn alert_crossed_in(self: &Arc<Self>, f: &Arc<Fleet>, relevant: Vec<Budget>) {
        if relevant.is_empty() {
            return;
        }
        let (day, month, _, _) = periods(now_secs());
        let crossed = self.budgets.crossings(&relevant, &day, &month);
        if crossed.is_empty() {
            return;
        }
        let (quotas, f) = (self.clone(), f.clone());
        self.tasks.spawn(async move {
            for c in crossed {
                if f.claim(&c.key, MONTH_TTL).await.unwrap_or(true) {
                    quotas.fire(c);
                }
            }
        });
    }

    /// A request refused (or degraded) by `budget` for want of room, not
    /// for what requests in flight hold, though it would fit the budget's
    /// whole period: the budget now turns requests away before spend
    /// reaches its limit ($49.98 of $50 refuses every request that could
    /// cost more than 2 cents, and no threshold alert would ever say so).
    /// One `budget_refusing` alert per budget and period (one gateway of a
    /// fleet sends it); threshold alerts are left to spend.
    fn alert_refusing(
        self: &Arc<Self>,
        config: &Config,
        budget: &Budget,
        ex: &Exceeded,
        estimate: Estimate,
    ) {
        // Spend at the limit is the 100% threshold's to say.
        if ex.in_flight || ex.spent >= ex.limit || estimate.firm > ex.limit {
            return;
        }
        let (day, month, _, _) = periods(now_secs());
        let p = if ex.period == "daily" { day } else { month };
        let key = alert_key(&budget.id(), &p, "refusing", ex.limit);
        let first = self
            .budgets
            .fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        if !first {
            return;
        }
        // Spend read back at a restart cannot tell that this was sent (or,
        // without alerts, that the budget refuses): kept in the ledger's
        // store, off the request's thread.
        let ledger = self
            .budgets
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(ledger) = ledger {
            let mark = key.clone();
            let keep = move || {
                if let Err(e) = ledger.keep_mark(&mark) {
                    tracing::warn!(error = %e, alert = %mark, "keeping a sent budget alert failed; a restart may send it again");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(self.tasks.spawn_blocking_on(keep, &rt)),
                Err(_) => keep(),
            }
        }
        // Marked for the budget's status (`refusing`) even with no alerts
        // to send.
        if budget.alert_at.is_empty() {
            return;
        }
        let c = Crossing {
            budget: budget.clone(),
            period: ex.period,
            // Percent to six places (95.2, not 95.20000000000002).
            threshold: (ex.spent / ex.limit * 1e8).round() / 1e6,
            spent: ex.spent,
            limit: ex.limit,
            key,
            refusing: true,
        };
        match self.fleet(&config.fleet) {
            None => self.fire(c),
            Some(f) => {
                let quotas = self.clone();
                self.tasks.spawn(async move {
                    if f.claim(&c.key, MONTH_TTL).await.unwrap_or(true) {
                        quotas.fire(c);
                    }
                });
            }
        }
    }

    /// Log and count an alert, and queue its webhook for delivery.
    fn fire(&self, c: Crossing) {
        let b = &c.budget;
        if c.refusing {
            tracing::warn!(budget = %b.id(), period = c.period, spent_usd = c.spent, limit_usd = c.limit, "budget refusing requests before its limit");
            metrics::budget_refusing(&b.id());
        } else {
            tracing::warn!(budget = %b.id(), period = c.period, threshold_pct = c.threshold, spent_usd = c.spent, limit_usd = c.limit, "budget alert");
            metrics::budget_alert(&b.id(), c.threshold);
        }
        if let Some(url) = b.webhook.clone() {
            let body = if c.refusing {
                json!({
                    "type": "budget_refusing", "budget": b.id(), "scope": b.scope.as_str(), "name": b.name,
                    "action": match b.on_exceed { OnExceed::Reject => "reject", OnExceed::Degrade(_) => "degrade" },
                    "period": c.period, "used_pct": c.threshold, "spent_usd": nanos(c.spent), "limit_usd": c.limit,
                    "at": now_secs(),
                })
            } else {
                json!({
                    "type": "budget_alert", "budget": b.id(), "scope": b.scope.as_str(), "name": b.name,
                    "period": c.period, "threshold_pct": c.threshold, "spent_usd": nanos(c.spent), "limit_usd": c.limit,
                    "at": now_secs(),
                })
            };
            let alert = Alert {
                webhook: url,
                body: body.to_string(),
                budget: b.id(),
                what: if c.refusing {
                    "refusing".into()
                } else {
                    format!("{}% {}", c.threshold, c.period)
                },
            };
            if self.alerts.try_send(alert).is_err() {
                tracing::error!(budget = %b.id(), "budget alert queue full or closed; webhook not sent");
                metrics::alert_dropped();
            }
        }
    }
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

    #[test]
    fn burn_rate_and_projection() {
        // 2025-11-25 is the 25th: the month began 24 days earlier.
        assert_eq!(month_start_day(20_417), 20_417 - 24);
        // $6 spent in the first 12 hours of a day with 12 left, limit $10.
        let s = period_status(6.0, 10.0, 12 * 3600, 12 * 3600);
        assert_eq!(s["burn_usd_per_hour"], 0.5);
        assert_eq!(s["projected_usd"], 12.0);
        assert_eq!(s["exhausted_in_secs"], 8 * 3600);
        // A new period counts at least an hour; a limit reached is 0; one
        // not reached before the reset is null.
        assert_eq!(period_status(1.0, 10.0, 60, 3600)["burn_usd_per_hour"], 1.0);
        assert_eq!(
            period_status(10.0, 10.0, 3600, 3600)["exhausted_in_secs"],
            0
        );
        assert!(period_status(1.0, 10.0, 3600, 3600)["exhausted_in_secs"].is_null());
    }

    fn budget(on_exceed: OnExceed, webhook: Option<Url>) -> Budget {
        Budget {
            scope: smartllm_config::BudgetScope::Tenant,
            name: "acme".into(),
            daily_usd: Some(1.0),
            monthly_usd: None,
            max_request_usd: None,
            alert_at: vec![50.0],
            on_exceed,
            webhook,
        }
    }

    const ACME: Scope<'static> = Scope {
        tenant: "acme",
        app: "web",
        key: "k",
    };

    #[tokio::test]
    async fn within_then_degrade_or_reject_once_spent() {
        let mut cfg = crate::test_support::config();
        cfg.keys.budgets = vec![budget(OnExceed::Degrade("cheap".into()), None)];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        let est = estimate(&cfg.models[1].pricing, 1000, Some(100), 0);
        assert!(matches!(
            quotas.budget(&cfg, ACME, "dear", est).await,
            BudgetDecision::Within(Some(_))
        ));
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.99);
        // The estimate would pass the $1 daily limit: the cheaper model serves.
        assert_eq!(
            quotas.budget(&cfg, ACME, "dear", est).await,
            BudgetDecision::Degrade {
                model: "cheap".into(),
                budget: "tenant:acme".into()
            }
        );
        // Already on the degraded model: it keeps serving.
        assert_eq!(
            quotas.budget(&cfg, ACME, "cheap", est).await,
            BudgetDecision::Within(None)
        );
        // Another tenant is untouched.
        let other = Scope {
            tenant: "beta",
            ..ACME
        };
        assert_eq!(
            quotas.budget(&cfg, other, "dear", est).await,
            BudgetDecision::Within(None)
        );
        cfg.keys.budgets = vec![budget(OnExceed::Reject, None)];
        match quotas.budget(&cfg, ACME, "dear", est).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => {
                assert_eq!((e.budget.as_str(), e.period), ("tenant:acme", "daily"));
                assert!((e.spent - 0.99).abs() < 1e-9, "{e:?}");
            }
            other => panic!("{other:?}"),
        }
        // The pressure, and what is left: the daily limit less the spend;
        // another tenant has no budget, so nothing bounds it.
        let (pressure, left) = quotas.budget_pressure_and_left(&cfg.keys.budgets, ACME);
        assert!(pressure > 0.98, "{pressure}");
        let left = left.unwrap();
        assert!((left - 0.01).abs() < 1e-9, "{left}");
        assert_eq!(
            quotas.budget_pressure_and_left(&cfg.keys.budgets, other),
            (0.0, None)
        );
        assert_eq!(quotas.budget_pressure_and_left(&[], ACME), (0.0, None));
    }

    /// A request that does not cap its answer holds a typical answer's
    /// cost too: a burst of them cannot all pass a budget on their prompts'
    /// cost. Alone, such a request is not refused on that guess.
    #[tokio::test]
    async fn uncapped_requests_hold_a_typical_answer_but_are_not_refused_on_it_alone() {
        let mut cfg = crate::test_support::config();
        cfg.keys.budgets = vec![budget(OnExceed::Reject, None)];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.9);
        let pricing = smartllm_config::Pricing {
            input_per_1m: 1.0,
            output_per_1m: 1000.0,
            cached_input_per_1m: 1.0,
            per_request: 0.0,
        };
        // $0.004 of prompt; a typical answer of 200 tokens $0.20: more than
        // the $0.10 left, but nothing else is in flight.
        let est = estimate(&pricing, 4000, None, 200);
        assert!((est.firm - 0.004).abs() < 1e-9, "{est:?}");
        assert!((est.expected - 0.2).abs() < 1e-9, "{est:?}");
        let first = quotas.budget(&cfg, ACME, "dear", est).await;
        let BudgetDecision::Within(Some(hold)) = &first else {
            panic!("{first:?}")
        };
        assert!((hold.usd - 0.204).abs() < 1e-9, "{hold:?}");
        // The next waits for it: a burst of uncapped requests is one at a
        // time this close to the limit (before, all of them passed).
        match quotas.budget(&cfg, ACME, "dear", est).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => assert!(e.in_flight, "{e:?}"),
            other => panic!("{other:?}"),
        }
        // A cap on the answer is firm: 200 tokens capped do not fit $0.10.
        let capped = estimate(&pricing, 4000, Some(200), 0);
        drop(first);
        match quotas.budget(&cfg, ACME, "dear", capped).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => assert!(!e.in_flight, "{e:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            quotas.budget(&cfg, ACME, "dear", est).await,
            BudgetDecision::Within(Some(_))
        ));
    }

    /// Requests in flight hold their estimates: of a burst that each fit
    /// the budget alone, only as many pass as fit together; what a request
    /// held is let go when it ends.
    #[tokio::test]
    async fn requests_in_flight_hold_their_estimates_against_the_budget() {
        let mut cfg = crate::test_support::config();
        cfg.keys.budgets = vec![budget(OnExceed::Reject, None)];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.5);
        // $0.50 of $1 spent; each request estimated at $0.20: two fit.
        let first = quotas.budget(&cfg, ACME, "dear", 0.2).await;
        let second = quotas.budget(&cfg, ACME, "dear", 0.2).await;
        assert!(matches!(first, BudgetDecision::Within(Some(_))));
        assert!(matches!(second, BudgetDecision::Within(Some(_))));
        // Refused for a moment (it fits what is spent), not for the day.
        match quotas.budget(&cfg, ACME, "dear", 0.2).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => {
                assert!((e.held - 0.4).abs() < 1e-9, "{e:?}");
                assert!(e.in_flight, "{e:?}");
                assert!(
                    e.to_string().contains("requests in flight hold $0.4000"),
                    "{e}"
                );
                let r = Refusal::BudgetExceeded(e);
                assert_eq!(r.retry_after(), Some(1));
            }
            other => panic!("{other:?}"),
        }
        // The first ends costing $0.05: its cost counts, its hold goes.
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.05);
        drop(first);
        assert!(matches!(
            quotas.budget(&cfg, ACME, "dear", 0.2).await,
            BudgetDecision::Within(Some(_))
        ));
        drop(second);
        assert!(quotas.budgets.held.lock().unwrap().is_empty());
        // Scopes no budget names hold nothing.
        let other = Scope {
            tenant: "beta",
            ..ACME
        };
        assert_eq!(
            quotas.budget(&cfg, other, "dear", 0.9).await,
            BudgetDecision::Within(None)
        );
    }

    /// Over both its daily and its monthly budget, a request is refused on
    /// the monthly one: a retry at the daily reset would be refused again.
    #[tokio::test]
    async fn over_both_periods_the_refusal_waits_for_the_month() {
        let mut cfg = crate::test_support::config();
        cfg.keys.budgets = vec![Budget {
            monthly_usd: Some(1.0),
            ..budget(OnExceed::Reject, None)
        }];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 1.5);
        let (_, _, day_left, month_left) = periods(now_secs());
        match quotas.budget(&cfg, ACME, "dear", 0.1).await {
            BudgetDecision::Reject(r @ Refusal::BudgetExceeded(_)) => {
                let Refusal::BudgetExceeded(e) = &r else {
                    unreachable!()
                };
                assert_eq!(e.period, "monthly", "{e:?}");
                let after = r.retry_after().unwrap();
                assert!(after + 5 >= month_left && after >= day_left, "{after}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Served by the model a used-up budget degrades to, a request is still
    /// checked against (and held on) the scope's other budgets.
    #[tokio::test]
    async fn a_degraded_request_still_meets_the_other_budgets() {
        let mut cfg = crate::test_support::config();
        let app = Budget {
            scope: smartllm_config::BudgetScope::App,
            name: "acme/web".into(),
            ..budget(OnExceed::Degrade("cheap".into()), None)
        };
        let tenant = Budget {
            daily_usd: Some(2.0),
            ..budget(OnExceed::Reject, None)
        };
        cfg.keys.budgets = vec![app, tenant];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 1.0);
        assert!(matches!(
            quotas.budget(&cfg, ACME, "dear", 0.5).await,
            BudgetDecision::Degrade { .. }
        ));
        // On "cheap" the app budget is met; the tenant's $2 holds $0.50 each.
        let first = quotas.budget(&cfg, ACME, "cheap", 0.4).await;
        assert!(
            matches!(first, BudgetDecision::Within(Some(_))),
            "{first:?}"
        );
        let _second = quotas.budget(&cfg, ACME, "cheap", 0.4).await;
        match quotas.budget(&cfg, ACME, "cheap", 0.4).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => {
                assert_eq!(e.budget, "tenant:acme", "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A second exhausted degrade budget (its target another model) never
    /// hides an exhausted `reject` budget from a degraded request.
    #[tokio::test]
    async fn a_degraded_request_meets_every_reject_budget() {
        let mut cfg = crate::test_support::config();
        let app = Budget {
            scope: smartllm_config::BudgetScope::App,
            name: "acme/web".into(),
            ..budget(OnExceed::Degrade("cheap".into()), None)
        };
        let key = Budget {
            scope: smartllm_config::BudgetScope::Key,
            name: "k".into(),
            ..budget(OnExceed::Degrade("dear".into()), None)
        };
        let tenant = Budget {
            daily_usd: Some(2.0),
            ..budget(OnExceed::Reject, None)
        };
        cfg.keys.budgets = vec![app, key, tenant];
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 2.0);
        assert!(matches!(
            quotas.budget(&cfg, ACME, "dear", 0.1).await,
            BudgetDecision::Degrade { ref model, .. } if model == "cheap"
        ));
        match quotas.budget_degraded(&cfg, ACME, "cheap", 0.1).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => {
                assert_eq!(e.budget, "tenant:acme", "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Gateway A counted $0.45 while Redis was down; Redis came back and
    /// gateway B spent $0.60 (B sent the 50% alert). A's next check sends
    /// its late $0.45: the fleet is at 105%, every request is refused, and
    /// the 80% and 100% alerts are A's to send (claimed once in Redis).
    /// Before, thresholds were looked at only after a request's own cost,
    /// so they were never sent. (A real redis-server: `make test` installs
    /// it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thresholds_the_fleets_figure_crosses_are_alerted_by_one_gateway() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cfg = crate::test_support::config();
        let hook = Url::parse("http://127.0.0.1:9/hook").unwrap();
        let mut b = budget(OnExceed::Reject, Some(hook));
        b.alert_at = vec![50.0, 80.0, 100.0];
        cfg.keys.budgets = vec![b];
        cfg.fleet = FleetConfig {
            redis: Some(format!("redis://127.0.0.1:{port}/0")),
            tls_ca_file: None,
            key_prefix: "t".into(),
            timeout: std::time::Duration::from_millis(500),
            on_error: FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        let gateway = || {
            let (q, alerts) = Quotas::new(8);
            (Arc::new(q), alerts)
        };
        let thresholds = |alerts: &mut tokio::sync::mpsc::Receiver<crate::Alert>| {
            let mut got = Vec::new();
            while let Ok(a) = alerts.try_recv() {
                let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
                got.push(body["threshold_pct"].as_f64().unwrap());
            }
            got
        };
        let (a, mut a_alerts) = gateway();
        let (b, mut b_alerts) = gateway();
        // Redis is down: A keeps its spend to send later.
        a.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.45);
        a.tasks().close();
        a.tasks().wait().await;
        a.tasks().reopen();
        assert_eq!(
            a.budgets
                .unsynced(&format!("tenant:acme|{}", periods(now_secs()).0)),
            0.45
        );
        let (mut server, _dir) = redis_server(port).await;
        // A's back-off after the failed send ends.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        b.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.6);
        b.tasks().close();
        b.tasks().wait().await;
        assert_eq!(thresholds(&mut b_alerts), vec![50.0]);
        match a.budget(&cfg, ACME, "m", 0.01).await {
            BudgetDecision::Reject(Refusal::BudgetExceeded(e)) => {
                assert!((e.spent - 1.05).abs() < 1e-9, "{e:?}")
            }
            other => panic!("{other:?}"),
        }
        a.tasks().close();
        a.tasks().wait().await;
        let mut got = thresholds(&mut a_alerts);
        got.sort_by(f64::total_cmp);
        assert_eq!(got, vec![80.0, 100.0]);
        // A third gateway that has served nothing of this budget shows the
        // fleet's figure (the admin API and /metrics read it so), and
        // alerts nothing the others sent.
        let (c, mut c_alerts) = gateway();
        assert_eq!(
            c.budget_status(&cfg.keys.budgets)[0]["periods"]["daily"]["spent_usd"],
            0.0
        );
        c.refresh_all(&cfg).await;
        let spent = c.budget_status(&cfg.keys.budgets)[0]["periods"]["daily"]["spent_usd"]
            .as_f64()
            .unwrap();
        assert!((spent - 1.05).abs() < 1e-9, "{spent}");
        c.tasks().close();
        c.tasks().wait().await;
        assert!(thresholds(&mut c_alerts).is_empty());
        let _ = server.kill();
        let _ = server.wait();
    }

    /// A real redis-server on `port` (no persistence), up and answering;
    /// its data directory lives as long as the returned guard.
    async fn redis_server(port: u16) -> (std::process::Child, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut server = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.path().display().to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (`make test` installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return (server, dir);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = server.kill();
        let _ = server.wait();
        panic!("redis-server did not start");
    }

    /// A request's cost is counted here at once and sent to Redis by a
    /// task; a budget check in between that finds the counter missing in
    /// Redis seeds it from this gateway's figure. Seeded with that cost,
    /// the send then added it a second time (an e2e run saw one $0.027
    /// request counted as $0.054 and the next refused). The seed now leaves
    /// out what is on its way. (A real redis-server.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seed_leaves_out_the_spend_on_its_way_to_redis() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut server, _dir) = redis_server(port).await;
        let mut cfg = crate::test_support::config();
        cfg.keys.budgets = vec![budget(OnExceed::Reject, None)];
        cfg.fleet = FleetConfig {
            redis: Some(format!("redis://127.0.0.1:{port}/0")),
            tls_ca_file: None,
            key_prefix: "s".into(),
            timeout: std::time::Duration::from_millis(500),
            on_error: FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        let (q, _alerts) = Quotas::new(8);
        let q = Arc::new(q);
        let day = format!("tenant:acme|{}", periods(now_secs()).0);
        // What `record` does before its send task runs: counted here, on
        // its way.
        let on_its_way = vec![(day.clone(), DAY_TTL, 0.027)];
        q.budgets.add(
            &["tenant:acme".to_string()],
            [&periods(now_secs()).0, &periods(now_secs()).1],
            0.027,
        );
        q.budgets.sending(&on_its_way, 1.0);
        // A check meanwhile finds no counter in Redis: nothing to seed.
        q.refresh_all(&cfg).await;
        let f = Fleet::new(&cfg.fleet).unwrap().unwrap();
        assert_eq!(
            f.spend(std::slice::from_ref(&day)).await.unwrap(),
            vec![None]
        );
        // The send arrives: the fleet counts the cost once.
        let totals = f.add_spend(&on_its_way).await.unwrap();
        q.budgets.sending(&on_its_way, -1.0);
        assert!((totals[0] - 0.027).abs() < 1e-9, "{totals:?}");
        // And a gateway whose own spend is not on its way seeds it.
        let (q2, _alerts2) = Quotas::new(8);
        let q2 = Arc::new(q2);
        cfg.fleet.key_prefix = "s2".into();
        q2.budgets.add(
            &["tenant:acme".to_string()],
            [&periods(now_secs()).0, &periods(now_secs()).1],
            0.01,
        );
        q2.refresh_all(&cfg).await;
        let f2 = Fleet::new(&cfg.fleet).unwrap().unwrap();
        let seeded = f2.spend(std::slice::from_ref(&day)).await.unwrap();
        assert!(
            seeded[0].is_some_and(|v| (v - 0.01).abs() < 1e-9),
            "{seeded:?}"
        );
        let _ = server.kill();
        let _ = server.wait();
    }

    #[tokio::test]
    async fn a_crossed_threshold_sends_one_alert_on_the_channel() {
        let mut cfg = crate::test_support::config();
        let hook = Url::parse("http://127.0.0.1:9/hook").unwrap();
        cfg.keys.budgets = vec![budget(OnExceed::Reject, Some(hook))];
        let (quotas, mut alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.3);
        assert!(alerts.try_recv().is_err(), "30% crosses no threshold");
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.3);
        let alert = alerts.try_recv().expect("60% crosses 50%");
        assert_eq!(alert.webhook.host, "127.0.0.1");
        let body: serde_json::Value = serde_json::from_str(&alert.body).unwrap();
        assert_eq!(body["budget"], "tenant:acme");
        assert_eq!(body["threshold_pct"], 50.0);
        assert_eq!(body["period"], "daily");
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.1);
        assert!(alerts.try_recv().is_err(), "each threshold alerts once");
        // A reload drops the budget by mistake, the next restores it (its
        // spend read back from the ledger): the 50% alert is not sent again.
        quotas.track_budgets(&[]);
        quotas.track_budgets(&cfg.keys.budgets);
        let day = periods(now_secs()).0;
        quotas
            .budgets
            .merge(HashMap::from([(format!("tenant:acme|{day}"), 0.7)]));
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.05);
        assert!(alerts.try_recv().is_err(), "alerted before the reloads");
        // A period's alerts go with the period.
        quotas.budgets.prune_at(now_secs() + 40 * 86_400);
        assert_eq!(quotas.state_sizes().1, 0);
    }

    /// A reload that raises a budget's limit re-arms its alerts: the
    /// thresholds of the new limit are sent as spend crosses them (they
    /// were keyed by budget and period only, so none came again).
    #[tokio::test]
    async fn a_raised_limit_alerts_again_at_its_own_thresholds() {
        let mut cfg = crate::test_support::config();
        let hook = Url::parse("http://127.0.0.1:9/hook").unwrap();
        cfg.keys.budgets = vec![budget(OnExceed::Reject, Some(hook))];
        let (quotas, mut alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.6);
        assert!(alerts.try_recv().is_ok(), "50% of $1");
        // Raised to $2: 0.6 is 30%, then 1.2 is 60% of the new limit.
        cfg.keys.budgets[0].daily_usd = Some(2.0);
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.0);
        assert!(alerts.try_recv().is_err(), "30% of $2 crosses nothing");
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.6);
        let body: serde_json::Value =
            serde_json::from_str(&alerts.try_recv().expect("50% of $2").body).unwrap();
        assert_eq!(
            (body["threshold_pct"].clone(), body["limit_usd"].clone()),
            (json!(50.0), json!(2.0))
        );
        // With the figures to the nano-dollar.
        assert_eq!(body["spent_usd"], json!(1.2));
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.1);
        assert!(alerts.try_recv().is_err(), "once");
    }

    /// A budget added (or lowered) below what its scope has spent refuses
    /// every request, and no request's spend will cross its thresholds: the
    /// first refusal sends them, once each.
    #[tokio::test]
    async fn a_budget_added_below_its_spend_alerts_on_its_first_refusal() {
        let mut cfg = crate::test_support::config();
        let hook = Url::parse("http://127.0.0.1:9/hook").unwrap();
        let mut b = budget(OnExceed::Reject, Some(hook));
        b.alert_at = vec![50.0, 100.0];
        cfg.keys.budgets = vec![b];
        let (quotas, mut alerts) = Quotas::new(8);
        let quotas = Arc::new(quotas);
        quotas.track_budgets(&cfg.keys.budgets);
        // Today's spend, read back from the ledger as the reload adds it.
        let day = periods(now_secs()).0;
        quotas
            .budgets
            .merge(HashMap::from([(format!("tenant:acme|{day}"), 1.18)]));
        let est = estimate(&cfg.models[1].pricing, 1000, Some(100), 0);
        for _ in 0..3 {
            assert!(matches!(
                quotas.budget(&cfg, ACME, "dear", est).await,
                BudgetDecision::Reject(Refusal::BudgetExceeded(_))
            ));
        }
        let mut sent = vec![];
        while let Ok(a) = alerts.try_recv() {
            let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
            sent.push((body["type"].clone(), body["threshold_pct"].clone()));
        }
        assert_eq!(
            sent,
            vec![
                (json!("budget_alert"), json!(50.0)),
                (json!("budget_alert"), json!(100.0))
            ]
        );
    }

    /// A reload adding a budget tracks it, then reads its spend back from
    /// the ledger while the old config (without it) still runs: a request
    /// ending meanwhile counts for it, and the read adds to that.
    #[test]
    fn a_budget_being_added_counts_requests_that_end_during_its_read() {
        let b = budget(OnExceed::Reject, None);
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        let fleet = crate::test_support::config().fleet;
        // The reload tracks the new budget (no ledger here to read).
        quotas.track_budgets(std::slice::from_ref(&b));
        // A request ends under the old config, which had no budgets.
        quotas.record(&[], &fleet, ACME, 0.2);
        let day = periods(now_secs()).0;
        assert!((quotas.budgets.spent("tenant:acme", &day) - 0.2).abs() < 1e-9);
        // The ledger's figure is added to it, not written over it.
        let read = HashMap::from([(format!("tenant:acme|{day}"), 1.0)]);
        quotas.budgets.merge(read);
        assert!((quotas.budgets.spent("tenant:acme", &day) - 1.2).abs() < 1e-9);
        // Untracked and unconfigured, nothing is kept.
        quotas.track_budgets(&[]);
        quotas.record(&[], &fleet, ACME, 0.2);
        assert_eq!(quotas.state_sizes().0, 0);
    }

    #[test]
    fn spend_is_kept_only_for_budgeted_scopes_and_current_periods() {
        let mut cfg = crate::test_support::config();
        let (quotas, _alerts) = Quotas::new(4);
        let quotas = Arc::new(quotas);
        // No budgets: 10,000 distinct callers leave nothing behind.
        for i in 0..10_000 {
            let (t, k) = (format!("key:{i:032x}"), format!("k{i}"));
            let scope = Scope {
                tenant: &t,
                app: "",
                key: &k,
            };
            quotas.record(&cfg.keys.budgets, &cfg.fleet, scope, 0.01);
        }
        assert_eq!(quotas.state_sizes(), (0, 0, 0));
        // A budget on one tenant: only its two periods are kept.
        cfg.keys.budgets = vec![budget(OnExceed::Reject, None)];
        quotas.track_budgets(&cfg.keys.budgets);
        for i in 0..1000 {
            let t = format!("t{i}");
            let scope = Scope { tenant: &t, ..ACME };
            quotas.record(&cfg.keys.budgets, &cfg.fleet, scope, 0.01);
            quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.0001);
        }
        assert_eq!(quotas.state_sizes().0, 2);
        assert!((quotas.budgets.spent("tenant:acme", &periods(now_secs()).0) - 0.1).abs() < 1e-9);
        // Past periods and alerts are forgotten.
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.5);
        assert_eq!(quotas.state_sizes().1, 1, "the 50% alert fired");
        quotas.budgets.prune_at(now_secs() + 40 * 86_400);
        assert_eq!(quotas.state_sizes(), (0, 0, 0));
        // A reload that drops the budget drops its spend.
        quotas.record(&cfg.keys.budgets, &cfg.fleet, ACME, 0.01);
        assert_eq!(quotas.state_sizes().0, 2);
        quotas.track_budgets(&[]);
        assert_eq!(quotas.state_sizes(), (0, 0, 0));
    }
}
