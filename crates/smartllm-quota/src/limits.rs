//! Rate limits: requests and tokens per minute, per virtual key and per
//! tenant/app, as token buckets (a full minute's allowance as burst, refilled
//! continuously). Tokens are charged twice: the estimated prompt before the
//! request, the completion after it, so a bucket can go into debt and later
//! requests wait it out. Buckets live across config reloads; limits are read
//! from the current config on every request. With `fleet.redis` the same
//! buckets live in Redis (see `fleet`), shared by every gateway.

use crate::fleet::Charge;
use crate::Refusal;
use smartllm_config::Limits;
use std::collections::HashMap;
use std::sync::Mutex;
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
pub fn plan(scopes: &[(String, Limits)], tokens: u64) -> Result<Vec<Planned>, Refusal> {
    let mut out = Vec::new();
    for (scope, limits) in scopes {
        for (kind, limit, cost) in [
            ("requests", limits.requests_per_minute, 1.0),
            ("tokens", limits.tokens_per_minute, tokens as f64),
        ] {
            let Some(limit) = limit else { continue };
            if kind == "tokens" && tokens > limit {
                return Err(Refusal::TooLargeForLimit {
                    tokens,
                    limit,
                    scope: scope.clone(),
                });
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

/// The refusal of a request a bucket cannot take now.
pub fn rate_limited(secs: f64, what: &str) -> Refusal {
    Refusal::RateLimited {
        retry_after: secs,
        what: what.to_string(),
    }
}

impl Limiter {
    /// Charge one request and `tokens` estimated tokens against every limit
    /// that applies, in this process; refuse with 429 (and Retry-After) if
    /// any is exhausted.
    pub fn admit(&self, scopes: &[(String, Limits)], tokens: u64) -> Result<(), Refusal> {
        self.apply(&plan(scopes, tokens)?)
    }

    /// Charge every planned bucket or none.
    pub fn apply(&self, planned: &[Planned]) -> Result<(), Refusal> {
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

    pub(super) fn scopes(s: &[(&str, Limits)]) -> Vec<(String, Limits)> {
        s.iter().map(|(n, l)| (n.to_string(), *l)).collect()
    }

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
            l.admit(&scopes(&[("key k", rpm(3))]), 0).unwrap();
        }
        let e = l.admit(&scopes(&[("key k", rpm(3))]), 0).unwrap_err();
        assert!(matches!(e, Refusal::RateLimited { .. }), "{e:?}");
        assert!((1..=20).contains(&e.retry_after().unwrap()), "{e:?}");
        // Another scope is independent.
        l.admit(&scopes(&[("key other", rpm(3))]), 0).unwrap();
    }

    #[test]
    fn tokens_per_minute_and_debt() {
        let l = Limiter::default();
        let tpm = Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        };
        l.admit(&scopes(&[("app a/b", tpm)]), 600).unwrap();
        assert!(
            l.admit(&scopes(&[("app a/b", tpm)]), 600).is_err(),
            "only 400 left"
        );
        l.admit(&scopes(&[("app a/b", tpm)]), 300).unwrap();
        l.charge(&[Charge {
            id: "app a/b:tokens".into(),
            per_minute: 1000,
            cost: 500.0,
        }]);
        let e = l.admit(&scopes(&[("app a/b", tpm)]), 10).unwrap_err();
        assert!(e.retry_after().unwrap() >= 24, "in debt: {e:?}");
        let e = l.admit(&scopes(&[("app a/b", tpm)]), 5000).unwrap_err();
        assert!(matches!(e, Refusal::TooLargeForLimit { .. }), "{e:?}");
    }

    #[test]
    fn a_refusal_charges_nothing() {
        let l = Limiter::default();
        let key = rpm(1);
        let app = rpm(100);
        l.admit(&scopes(&[("key", key), ("app", app)]), 0).unwrap();
        for _ in 0..5 {
            assert!(l.admit(&scopes(&[("key", key), ("app", app)]), 0).is_err());
        }
        // The app bucket was charged once, not six times.
        for _ in 0..99 {
            l.admit(&scopes(&[("app", app)]), 0).unwrap();
        }
        assert!(l.admit(&scopes(&[("app", app)]), 0).is_err());
    }
}

#[cfg(test)]
mod scenario_tests {
    use super::tests::scopes;
    use super::*;

    #[test]
    fn four_requests_with_token_estimates() {
        let l = Limiter::default();
        let lim = Limits {
            requests_per_minute: Some(3),
            tokens_per_minute: None,
        };
        let results: Vec<bool> = (0..4)
            .map(|_| l.admit(&scopes(&[("key 'alice'", lim)]), 20).is_ok())
            .collect();
        assert_eq!(results, vec![true, true, true, false]);
    }
}
