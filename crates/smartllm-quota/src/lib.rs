//! Quotas: rate limits, budgets, the per-request cost cap, and their
//! fleet-wide counters in Redis. Inputs are plain values (a [`Scope`] of
//! tenant, app and key; the limits and budgets of the running config; an
//! estimate); outputs are enums ([`Admission`], [`BudgetDecision`],
//! [`cost_cap::CostCap`]) and [`Refusal`]s that the proxy turns into API
//! errors in one place. Budget alerts leave on a channel that the proxy's
//! alert service delivers; fleet writes run as tracked background tasks that
//! a shutdown waits for. Nothing here knows Pingora or HTTP.

pub mod budget;
pub mod cost_cap;
pub mod fleet;
pub mod images;
pub mod limits;
pub mod metrics;
#[cfg(test)]
mod test_support;

use arc_swap::ArcSwapOption;
use smartllm_config::{Config, FleetConfig, FleetOnError, Limits, VirtualKey};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

pub use budget::{Alert, BudgetDecision, Exceeded};
pub use fleet::{Charge, Fleet, FleetError};
pub use limits::{Headroom, Left, Limiter};

/// Who a request is for: the scope that limits, budgets and spend apply to.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub app: &'a str,
    pub key: &'a str,
}

impl Scope<'_> {
    /// The budget ids this scope falls under (tenant, app, key).
    pub fn budget_ids(&self) -> [String; 3] {
        [
            format!("tenant:{}", self.tenant),
            format!("app:{}/{}", self.tenant, self.app),
            format!("key:{}", self.key),
        ]
    }
}

/// Why a request is refused. The proxy maps each to an API error (status,
/// type, code, message, `Retry-After`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// A bucket is empty: retry in `retry_after` seconds.
    #[error("Rate limit reached: {what}. Retry in {retry_after:.1}s.")]
    /// `headroom`: the refusing bucket, for the 429's rate-limit headers.
    RateLimited {
        retry_after: f64,
        what: String,
        headroom: Headroom,
        /// The refusing bucket (`key 'ci':requests`), for the metric.
        limit: String,
    },
    /// More tokens than a whole minute's allowance: no wait would help.
    #[error("This request needs about {tokens} tokens, more than the {limit} tokens per minute allowed for {scope}.")]
    TooLargeForLimit {
        tokens: u64,
        limit: u64,
        scope: String,
    },
    /// Limits or budgets are fleet-wide, Redis is unreachable and
    /// `fleet.on_error` is `reject`.
    #[error("Rate limits and budgets for this key are shared by the gateway fleet and cannot be checked right now ({0}).")]
    FleetUnavailable(String),
    /// A budget is used up (`on_exceed: reject`).
    #[error("{0}")]
    BudgetExceeded(Exceeded),
    /// The prompt alone costs more than the per-request cap on every model.
    #[error("This request's prompt (up to {bound} tokens) alone would cost up to ${cheapest:.6} on '{model}', more than the ${cap} per-request cap of {scope} '{name}'. Send a shorter prompt.")]
    CostCapExceeded {
        bound: u64,
        cheapest: f64,
        model: String,
        cap: f64,
        scope: &'static str,
        name: String,
    },
    /// A server-side tool (web search, code execution, ...) is billed per
    /// use and by content no output limit bounds: under a per-request cap
    /// its cost cannot be held.
    #[error("This request asks for the provider's server-side tool '{tool}', billed per use and for what it fetches, which no output limit bounds: it cannot be held to the ${cap} per-request cap of {scope} '{name}'. Leave the tool out, or use a key without max_request_usd.")]
    CostCapUnbounded {
        tool: String,
        cap: f64,
        scope: &'static str,
        name: String,
    },
}

impl Refusal {
    /// Seconds after which a retry may succeed (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after, .. } => Some(retry_after.ceil().max(1.0) as u64),
            Refusal::FleetUnavailable(_) => Some(1),
            Refusal::BudgetExceeded(e) if e.in_flight => Some(1),
            Refusal::BudgetExceeded(e) => Some(e.resets_in.max(1)),
            Refusal::TooLargeForLimit { .. }
            | Refusal::CostCapExceeded { .. }
            | Refusal::CostCapUnbounded { .. } => None,
        }
    }
}

/// The outcome of charging a request against its rate limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Admitted; `precharged` estimated tokens were taken from the token
    /// buckets, which leave `headroom`.
    Admitted { precharged: u64, headroom: Headroom },
    /// Refused: answer 429 (or 503 when the fleet cannot be asked).
    Limited(Refusal),
}

/// The limits that apply to a request's key and app, with the names a
/// refusal gives them.
pub fn limits_for(
    config: &Config,
    key: Option<&VirtualKey>,
    scope: Scope<'_>,
) -> Vec<(String, Limits)> {
    let mut out = Vec::new();
    if let Some(k) = key {
        if k.limits != Limits::default() {
            out.push((format!("key '{}'", k.name), k.limits));
        }
    }
    if !config.keys.apps.is_empty() {
        let app = format!("{}/{}", scope.tenant, scope.app);
        if let Some(l) = config.keys.apps.get(&app) {
            out.push((format!("app '{app}'"), *l));
        }
    }
    out
}

/// Limits, budgets and their fleet state, shared by every request. Buckets
/// and spend live across config reloads; limits and budgets are read from
/// the config each call is given.
pub struct Quotas {
    limiter: Limiter,
    budgets: budget::Budgets,
    /// The Redis client (rebuilt when `fleet` changes on reload).
    fleet: ArcSwapOption<Fleet>,
    /// Fleet writes after a request (token charges, spend, alert claims).
    tasks: TaskTracker,
    alerts: mpsc::Sender<Alert>,
}

impl Quotas {
    /// Quotas and the receiving end of their webhook alerts (at most
    /// `alert_queue` waiting; beyond that an alert is logged and counted but
    /// its webhook dropped).
    pub fn new(alert_queue: usize) -> (Quotas, mpsc::Receiver<Alert>) {
        let (tx, rx) = mpsc::channel(alert_queue.max(1));
        (
            Quotas {
                limiter: Limiter::default(),
                budgets: budget::Budgets::default(),
                fleet: ArcSwapOption::empty(),
                tasks: TaskTracker::new(),
                alerts: tx,
            },
            rx,
        )
    }

    /// The fleet client for this config (None: limits and budgets are per process).
    pub fn fleet(&self, cfg: &FleetConfig) -> Option<Arc<Fleet>> {
        cfg.redis.as_ref()?;
        if let Some(f) = self.fleet.load_full() {
            if f.config == *cfg {
                return Some(f);
            }
        }
        match Fleet::new(cfg) {
            Ok(f) => {
                let f = f.map(Arc::new);
                self.fleet.store(f.clone());
                f
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use fleet.redis; limits and budgets are per process");
                None
            }
        }
    }

    /// Admit a request against its limits (one request and `tokens`
    /// estimated prompt tokens): fleet-wide through Redis when `fleet.redis`
    /// is set, else (or when Redis fails and `on_error: local`) in this process.
    pub async fn admit(
        &self,
        fleet: &FleetConfig,
        scopes: &[(String, Limits)],
        tokens: u64,
    ) -> Admission {
        let planned = match limits::plan(scopes, tokens) {
            Ok(p) => p,
            Err(r) => return Admission::Limited(r),
        };
        if planned.is_empty() {
            return Admission::Admitted {
                precharged: 0,
                headroom: Headroom::default(),
            };
        }
        let admitted = |levels: Vec<f64>| Admission::Admitted {
            precharged: tokens,
            headroom: Headroom::of(&planned, &levels),
        };
        if let Some(f) = self.fleet(fleet) {
            let charges: Vec<Charge> = planned.iter().map(|(c, _)| c.clone()).collect();
            match f.admit(&charges).await {
                Ok(Ok(levels)) => return admitted(levels),
                Ok(Err((secs, i))) => {
                    return Admission::Limited(limits::rate_limited(
                        secs,
                        &planned[i].0,
                        &planned[i].1,
                    ))
                }
                Err(e) if f.on_error() == FleetOnError::Reject => {
                    return Admission::Limited(Refusal::FleetUnavailable(e.to_string()))
                }
                Err(_) => {}
            }
        }
        match self.limiter.apply(&planned) {
            Ok(levels) => admitted(levels),
            Err(r) => Admission::Limited(r),
        }
    }

    /// Settle a request's token buckets once its usage is known (after the
    /// answer; never delays it: the fleet call runs in the background): the
    /// tokens it `used` beyond the `precharged` estimate are charged, and an
    /// estimate above what it used is given back (up to a full bucket), so
    /// an overestimated prompt (an image, a long system prompt the provider
    /// cached) does not hold a key's allowance for a minute.
    pub fn charge_after(
        self: &Arc<Self>,
        fleet: &FleetConfig,
        scopes: &[(String, Limits)],
        used: u64,
        precharged: u64,
    ) {
        let tokens = used as f64 - precharged as f64;
        if tokens == 0.0 {
            return;
        }
        let charges: Vec<Charge> = scopes
            .iter()
            .filter_map(|(scope, l)| {
                Some(Charge {
                    id: format!("{scope}:tokens"),
                    per_minute: l.tokens_per_minute?,
                    cost: tokens,
                })
            })
            .collect();
        if charges.is_empty() {
            return;
        }
        match self.fleet(fleet) {
            Some(f) => {
                let quotas = self.clone();
                self.tasks.spawn(async move {
                    if f.charge(&charges).await.is_err() {
                        quotas.limiter.charge(&charges);
                    }
                });
            }
            None => self.limiter.charge(&charges),
        }
    }

    /// Fleet writes still running (shutdown waits for them).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Alerts queued and not yet taken by the delivery service.
    pub fn alerts_queued(&self) -> usize {
        self.alerts.max_capacity() - self.alerts.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_precharges_the_estimate_and_refuses_with_the_bucket_named() {
        let cfg = test_support::config();
        let (quotas, _alerts) = Quotas::new(1);
        let scopes = vec![(
            "key 'k'".to_string(),
            Limits {
                requests_per_minute: Some(2),
                tokens_per_minute: Some(1000),
            },
        )];
        // What is left after each: the x-ratelimit-* headers' figures.
        for left in [1, 0] {
            match quotas.admit(&cfg.fleet, &scopes, 100).await {
                Admission::Admitted {
                    precharged: 100,
                    headroom,
                } => {
                    let r = headroom.requests.unwrap();
                    assert_eq!((r.limit, r.remaining), (2, left));
                    // Full again after (2 - left) requests' refill, 30 s each.
                    let full = 30.0 * (2 - left) as f64;
                    assert!((r.reset_secs - full).abs() < 0.5, "{r:?}");
                    let t = headroom.tokens.unwrap();
                    assert_eq!(t.limit, 1000);
                    assert!(
                        (899 - 100 * (1 - left)..=900 - 100 * (1 - left)).contains(&t.remaining),
                        "{t:?}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        match quotas.admit(&cfg.fleet, &scopes, 100).await {
            Admission::Limited(r @ Refusal::RateLimited { .. }) => {
                assert!(
                    r.to_string().contains("2 requests per minute for key 'k'"),
                    "{r}"
                );
                assert!(r.retry_after().is_some_and(|s| (1..=30).contains(&s)));
            }
            other => panic!("{other:?}"),
        }
        // No limits: admitted with nothing charged.
        assert_eq!(
            quotas.admit(&cfg.fleet, &[], 100).await,
            Admission::Admitted {
                precharged: 0,
                headroom: Headroom::default()
            }
        );
    }

    #[test]
    fn limits_for_names_the_key_and_the_app() {
        let mut cfg = test_support::config();
        let l = Limits {
            requests_per_minute: Some(5),
            tokens_per_minute: None,
        };
        cfg.keys.apps.insert("acme/web".into(), l);
        let scope = Scope {
            tenant: "acme",
            app: "web",
            key: "k",
        };
        let names: Vec<String> = limits_for(&cfg, None, scope)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["app 'acme/web'"]);
    }
}
