//! Rate limits: requests and tokens per minute, per virtual key and per
//! tenant/app, as token buckets (a full minute's allowance as burst, refilled
//! continuously). Tokens are charged twice: the estimated prompt before the
//! request, the completion after it, so a bucket can go into debt and later
//! requests wait it out. Buckets live across config reloads; limits are read
//! from the current config on every request. With `fleet.redis` the same
//! buckets live in Redis (see `fleet`), shared by every gateway.

use crate::fleet::Charge;
use crate::Shared;
use smartllm_config::{FleetConfig, FleetOnError, Limits};
use smartllm_protocol::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Seconds until `cost` fits, or None if it fits now (and is taken).
fn take(b: &mut Bucket, per_minute: u64, cost: f64, now: Instant) -> Option<f64> {
    let capacity = per_minute as f64;
    let rate = capacity / 60.0;
    b.level = (b.level + now.duration_since(b.at).as_secs_f64() * rate).min(capacity);
    b.at = now;
    if b.level >= cost.min(capacity) {
        b.level -= cost;
        None
    } else {
        Some((cost.min(capacity) - b.level) / rate)
    }
}

/// A bucket to charge and how to name it in a refusal.
pub type Planned = (Charge, String);

/// The buckets a request charges: one request and `tokens` estimated tokens
/// against every limit that applies. Refuses at once (no wait would help)
/// a request larger than a whole minute's token allowance.
pub fn plan(scopes: &[(&str, Limits)], tokens: u64) -> Result<Vec<Planned>, ApiError> {
    let mut out = Vec::new();
    for (scope, limits) in scopes {
        for (kind, limit, cost) in [
            ("requests", limits.requests_per_minute, 1.0),
            ("tokens", limits.tokens_per_minute, tokens as f64),
        ] {
            let Some(limit) = limit else { continue };
            if kind == "tokens" && tokens > limit {
                return Err(ApiError::new(
                    429,
                    "rate_limit_error",
                    "request_too_large_for_limit",
                    format!("This request needs about {tokens} tokens, more than the {limit} tokens per minute allowed for {scope}."),
                ));
            }
            out.push((
                Charge {
                    id: format!("{scope}:{kind}"),
                    per_minute: limit,
                    cost,
                },
                format!("{limit} {kind} per minute for {scope}"),
            ));
        }
    }
    Ok(out)
}

/// The 429 of a refused request.
pub fn rate_limited(secs: f64, what: &str) -> ApiError {
    let mut e = ApiError::new(
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        format!("Rate limit reached: {what}. Retry in {:.1}s.", secs),
    );
    e.retry_after = Some(secs.ceil().max(1.0) as u64);
    e
}

/// The 503 when limits must be shared by the fleet and Redis is unreachable.
pub fn fleet_unavailable(e: &crate::fleet::FleetError) -> ApiError {
    let mut err = ApiError::unavailable(
        "fleet_state_unavailable",
        format!("Rate limits and budgets for this key are shared by the gateway fleet and cannot be checked right now ({e})."),
    );
    err.retry_after = Some(1);
    err
}

/// Admit a request against its limits: fleet-wide through Redis when
/// `fleet.redis` is set, else (or when Redis fails and `on_error: local`) in
/// this process.
pub async fn admit(
    shared: &Shared,
    fleet: &FleetConfig,
    scopes: &[(&str, Limits)],
    tokens: u64,
) -> Result<(), ApiError> {
    let planned = plan(scopes, tokens)?;
    if planned.is_empty() {
        return Ok(());
    }
    if let Some(f) = shared.fleet(fleet) {
        let charges: Vec<Charge> = planned.iter().map(|(c, _)| c.clone()).collect();
        match f.admit(&charges).await {
            Ok(None) => return Ok(()),
            Ok(Some((secs, i))) => return Err(rate_limited(secs, &planned[i].1)),
            Err(e) if f.on_error() == FleetOnError::Reject => return Err(fleet_unavailable(&e)),
            Err(_) => {}
        }
    }
    shared.limiter.apply(&planned)
}

/// Charge the tokens a request used beyond its estimate (after the answer;
/// never delays it: the fleet call runs in the background).
pub fn charge_after(
    shared: &Arc<Shared>,
    fleet: &FleetConfig,
    scopes: &[(&str, Limits)],
    tokens: u64,
) {
    if tokens == 0 {
        return;
    }
    let charges: Vec<Charge> = scopes
        .iter()
        .filter_map(|(scope, l)| {
            Some(Charge {
                id: format!("{scope}:tokens"),
                per_minute: l.tokens_per_minute?,
                cost: tokens as f64,
            })
        })
        .collect();
    if charges.is_empty() {
        return;
    }
    match shared.fleet(fleet) {
        Some(f) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                if f.charge(&charges).await.is_err() {
                    shared.limiter.charge(&charges);
                }
            });
        }
        None => shared.limiter.charge(&charges),
    }
}

impl Limiter {
    /// Charge one request and `tokens` estimated tokens against every limit
    /// that applies, in this process; refuse with 429 (and Retry-After) if
    /// any is exhausted.
    pub fn admit(&self, scopes: &[(&str, Limits)], tokens: u64) -> Result<(), ApiError> {
        self.apply(&plan(scopes, tokens)?)
    }

    /// Charge every planned bucket or none.
    pub fn apply(&self, planned: &[Planned]) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Check every limit first, then charge: a refusal charges nothing.
        let mut wait: Option<(f64, &str)> = None;
        for (c, what) in planned {
            let b = buckets.entry(c.id.clone()).or_insert(Bucket {
                level: c.per_minute as f64,
                at: now,
            });
            let mut probe = Bucket {
                level: b.level,
                at: b.at,
            };
            if let Some(secs) = take(&mut probe, c.per_minute, c.cost, now) {
                if wait.is_none_or(|(w, _)| secs > w) {
                    wait = Some((secs, what));
                }
            }
        }
        if let Some((secs, what)) = wait {
            return Err(rate_limited(secs, what));
        }
        for (c, _) in planned {
            if let Some(b) = buckets.get_mut(&c.id) {
                take(b, c.per_minute, c.cost, now);
            }
        }
        Ok(())
    }

    /// Charge tokens used after the fact (the completion); may go into debt.
    pub fn charge(&self, charges: &[Charge]) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for c in charges {
            let b = buckets.entry(c.id.clone()).or_insert(Bucket {
                level: c.per_minute as f64,
                at: now,
            });
            let capacity = c.per_minute as f64;
            b.level = (b.level + now.duration_since(b.at).as_secs_f64() * capacity / 60.0)
                .min(capacity)
                - c.cost;
            b.at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(n: u64) -> Limits {
        Limits {
            requests_per_minute: Some(n),
            tokens_per_minute: None,
        }
    }

    #[test]
    fn requests_per_minute_with_retry_after() {
        let l = Limiter::default();
        for _ in 0..3 {
            l.admit(&[("key k", rpm(3))], 0).unwrap();
        }
        let e = l.admit(&[("key k", rpm(3))], 0).unwrap_err();
        assert_eq!((e.status, e.code), (429, "rate_limit_exceeded"));
        assert!((1..=20).contains(&e.retry_after.unwrap()), "{e:?}");
        // Another scope is independent.
        l.admit(&[("key other", rpm(3))], 0).unwrap();
    }

    #[test]
    fn tokens_per_minute_and_debt() {
        let l = Limiter::default();
        let tpm = Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        };
        l.admit(&[("app a/b", tpm)], 600).unwrap();
        assert!(l.admit(&[("app a/b", tpm)], 600).is_err(), "only 400 left");
        l.admit(&[("app a/b", tpm)], 300).unwrap();
        l.charge(&[Charge {
            id: "app a/b:tokens".into(),
            per_minute: 1000,
            cost: 500.0,
        }]);
        let e = l.admit(&[("app a/b", tpm)], 10).unwrap_err();
        assert!(e.retry_after.unwrap() >= 24, "in debt: {e:?}");
        let e = l.admit(&[("app a/b", tpm)], 5000).unwrap_err();
        assert_eq!(e.code, "request_too_large_for_limit");
    }

    #[test]
    fn a_refusal_charges_nothing() {
        let l = Limiter::default();
        let key = rpm(1);
        let app = rpm(100);
        l.admit(&[("key", key), ("app", app)], 0).unwrap();
        for _ in 0..5 {
            assert!(l.admit(&[("key", key), ("app", app)], 0).is_err());
        }
        // The app bucket was charged once, not six times.
        for _ in 0..99 {
            l.admit(&[("app", app)], 0).unwrap();
        }
        assert!(l.admit(&[("app", app)], 0).is_err());
    }
}

#[cfg(test)]
mod scenario_tests {
    use super::*;

    #[test]
    fn four_requests_with_token_estimates() {
        let l = Limiter::default();
        let lim = Limits {
            requests_per_minute: Some(3),
            tokens_per_minute: None,
        };
        let results: Vec<bool> = (0..4)
            .map(|_| l.admit(&[("key 'alice'", lim)], 20).is_ok())
            .collect();
        assert_eq!(results, vec![true, true, true, false]);
    }
}
