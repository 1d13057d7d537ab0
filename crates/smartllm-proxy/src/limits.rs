//! Rate limits: requests and tokens per minute, per virtual key and per
//! tenant/app, as token buckets (a full minute's allowance as burst, refilled
//! continuously). Tokens are charged twice: the estimated prompt before the
//! request, the completion after it, so a bucket can go into debt and later
//! requests wait it out. Buckets live across config reloads; limits are read
//! from the current config on every request.

use smartllm_config::Limits;
use smartllm_protocol::ApiError;
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

impl Limiter {
    /// Charge one request and `tokens` estimated tokens against every limit
    /// that applies; refuse with 429 (and Retry-After) if any is exhausted.
    pub fn admit(&self, scopes: &[(&str, Limits)], tokens: u64) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Check every limit first, then charge: a refusal charges nothing.
        let mut wait: Option<(f64, String)> = None;
        let mut plan: Vec<(String, u64, f64)> = Vec::new();
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
                let id = format!("{scope}:{kind}");
                let b = buckets.entry(id.clone()).or_insert(Bucket {
                    level: limit as f64,
                    at: now,
                });
                let mut probe = Bucket {
                    level: b.level,
                    at: b.at,
                };
                if let Some(secs) = take(&mut probe, limit, cost, now) {
                    if wait.as_ref().is_none_or(|(w, _)| secs > *w) {
                        wait = Some((secs, format!("{limit} {kind} per minute for {scope}")));
                    }
                }
                plan.push((id, limit, cost));
            }
        }
        if let Some((secs, what)) = wait {
            let mut e = ApiError::new(
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!("Rate limit reached: {what}. Retry in {:.1}s.", secs),
            );
            e.retry_after = Some(secs.ceil().max(1.0) as u64);
            return Err(e);
        }
        for (id, limit, cost) in plan {
            if let Some(b) = buckets.get_mut(&id) {
                take(b, limit, cost, now);
            }
        }
        Ok(())
    }

    /// Charge tokens used after the fact (the completion); may go into debt.
    pub fn charge(&self, scopes: &[(&str, Limits)], tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for (scope, limits) in scopes {
            if let Some(limit) = limits.tokens_per_minute {
                let b = buckets.entry(format!("{scope}:tokens")).or_insert(Bucket {
                    level: limit as f64,
                    at: now,
                });
                let capacity = limit as f64;
                b.level = (b.level + now.duration_since(b.at).as_secs_f64() * capacity / 60.0)
                    .min(capacity)
                    - tokens as f64;
                b.at = now;
            }
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
        l.charge(&[("app a/b", tpm)], 500);
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
