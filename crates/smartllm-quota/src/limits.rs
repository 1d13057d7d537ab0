//! Rate limits: requests and tokens per minute, per virtual key and per
//! tenant/app, as token buckets (a full minute's allowance as burst, refilled
//! continuously). Tokens are charged twice: the estimated prompt before the
//! request, then the difference to what it used after it (the completion,
//! less an overestimate), so a bucket can go into debt and later requests
//! wait it out. Buckets live across config reloads; limits are read
//! from the current config on every request. With `fleet.redis` the same
//! buckets live in Redis (see `fleet`), shared by every gateway.
//!
//! A bucket that has refilled to its capacity is the same as no bucket (a
//! new one starts full), so full buckets are dropped: when the map grows past
//! [`SWEEP_AT`] (and twice what the last sweep left), and periodically
//! through [`Limiter::sweep`]. The map holds only buckets charged within
//! about the last minute (or still in debt).

use crate::fleet::Charge;
use crate::Refusal;
use smartllm_config::Limits;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets held before an insert sweeps out the full ones.
pub const SWEEP_AT: usize = 1024;

#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
    /// Its limit when last charged: the level it refills to.
    per_minute: u64,
}

impl Bucket {
    fn full(&self, now: Instant) -> bool {
        let capacity = self.per_minute as f64;
        self.level + now.duration_since(self.at).as_secs_f64() * capacity / 60.0 >= capacity
    }
}

#[derive(Default)]
struct Buckets {
    map: HashMap<String, Bucket>,
    /// The size at which the next insert sweeps (0: [`SWEEP_AT`]).
    sweep_at: usize,
}

impl Buckets {
    /// Drop the buckets that are full again.
    fn sweep(&mut self, now: Instant) {
        self.map.retain(|_, b| !b.full(now));
        self.sweep_at = SWEEP_AT.max(self.map.len() * 2);
    }

    /// The bucket `id`, a new full one if there is none (sweeping first
    /// when the map is large).
    fn entry(&mut self, id: &str, per_minute: u64, now: Instant) -> &mut Bucket {
        if !self.map.contains_key(id) && self.map.len() >= self.sweep_at.max(SWEEP_AT) {
            self.sweep(now);
        }
        let b = self.map.entry(id.to_string()).or_insert(Bucket {
            level: per_minute as f64,
            at: now,
            per_minute,
        });
        b.per_minute = per_minute;
        b
    }
}

#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<Buckets>,
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

/// The refusal of a request bucket `c` cannot take for `secs` seconds, with
/// what that bucket holds now (the rate-limit headers of the 429: what is
/// left and when it is full again).
pub fn rate_limited(secs: f64, c: &Charge, what: &str) -> Refusal {
    let per = c.per_minute as f64;
    // `secs` is how long the bucket takes to refill up to this request's cost.
    // (Below zero for a bucket in debt: then it takes longer than a minute.)
    let level = if per > 0.0 {
        (c.cost - secs * per / 60.0).min(per)
    } else {
        0.0
    };
    let mut headroom = Headroom::default();
    headroom.meet(c, level);
    Refusal::RateLimited {
        retry_after: secs,
        what: what.to_string(),
        headroom,
        limit: c.id.clone(),
    }
}

/// What a limit leaves a key after a request (the `x-ratelimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Left {
    /// Its allowance per minute.
    pub limit: u64,
    /// Whole requests or tokens left in the bucket now.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: f64,
}

/// The tightest limit of each kind a request met (the one with the least
/// left), after charging it; none of a kind no limit applied.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Headroom {
    pub requests: Option<Left>,
    pub tokens: Option<Left>,
}

impl Headroom {
    /// From the planned buckets and their levels after the charge.
    pub fn of(planned: &[Planned], levels: &[f64]) -> Headroom {
        let mut h = Headroom::default();
        for ((c, _), &level) in planned.iter().zip(levels) {
            h.meet(c, level);
        }
        h
    }

    /// Bucket `c` at `level`: kept as its kind's figure if it leaves less
    /// than the one met so far.
    fn meet(&mut self, c: &Charge, level: f64) {
        let per = c.per_minute as f64;
        let left = Left {
            limit: c.per_minute,
            remaining: level.max(0.0).floor() as u64,
            reset_secs: if per > 0.0 {
                (per - level).max(0.0) * 60.0 / per
            } else {
                0.0
            },
        };
        let slot = if c.id.ends_with(":requests") {
            &mut self.requests
        } else {
            &mut self.tokens
        };
        if slot.is_none_or(|s| left.remaining < s.remaining) {
            *slot = Some(left);
        }
    }
}

impl Limiter {
    /// Charge one request and `tokens` estimated tokens against every limit
    /// that applies, in this process; refuse with 429 (and Retry-After) if
    /// any is exhausted.
    pub fn admit(&self, scopes: &[(String, Limits)], tokens: u64) -> Result<(), Refusal> {
        self.apply(&plan(scopes, tokens)?).map(|_| ())
    }

    /// Charge every planned bucket or none; the buckets' levels after it.
    pub fn apply(&self, planned: &[Planned]) -> Result<Vec<f64>, Refusal> {
        self.apply_at(planned, Instant::now())
    }

    fn apply_at(&self, planned: &[Planned], now: Instant) -> Result<Vec<f64>, Refusal> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Check every limit first, then charge: a refusal charges nothing.
        let mut wait: Option<(f64, &Charge, &str)> = None;
        for (c, what) in planned {
            let b = buckets.entry(&c.id, c.per_minute, now);
            let mut probe = Bucket {
                level: b.level,
                at: b.at,
                per_minute: b.per_minute,
            };
            if let Some(secs) = take(&mut probe, c.per_minute, c.cost, now) {
                if wait.is_none_or(|(w, _, _)| secs > w) {
                    wait = Some((secs, c, what));
                }
            }
        }
        if let Some((secs, c, what)) = wait {
            return Err(rate_limited(secs, c, what));
        }
        // (Through `entry`: a sweep while checking a later limit may have
        // taken a bucket just made full for an earlier one.)
        let mut levels = Vec::with_capacity(planned.len());
        for (c, _) in planned {
            let b = buckets.entry(&c.id, c.per_minute, now);
            take(b, c.per_minute, c.cost, now);
            levels.push(b.level);
        }
        Ok(levels)
    }

    /// Charge tokens used after the fact (the completion); may go into
    /// debt. A negative cost gives tokens back, up to a full bucket.
    pub fn charge(&self, charges: &[Charge]) {
        self.charge_at(charges, Instant::now());
    }

    fn charge_at(&self, charges: &[Charge], now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for c in charges {
            let b = buckets.entry(&c.id, c.per_minute, now);
            let capacity = c.per_minute as f64;
            b.level = ((b.level + now.duration_since(b.at).as_secs_f64() * capacity / 60.0)
                .min(capacity)
                - c.cost)
                .min(capacity);
            b.at = now;
        }
    }

    /// Drop the buckets that are full again (periodic upkeep).
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sweep(now);
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.lock().map(|b| b.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_names_the_tightest_limit_of_each_kind() {
        let c = |id: &str, per_minute| {
            (
                Charge {
                    id: id.into(),
                    per_minute,
                    cost: 1.0,
                },
                String::new(),
            )
        };
        let planned = [
            c("key 'k':requests", 10),
            c("key 'k':tokens", 1000),
            c("app 'a/b':requests", 100),
        ];
        let h = Headroom::of(&planned, &[5.0, -20.0, 3.5]);
        assert_eq!(
            h.requests,
            Some(Left {
                limit: 100,
                remaining: 3,
                reset_secs: 96.5 * 60.0 / 100.0
            })
        );
        // A bucket in debt has none left, and is full a minute and more on.
        let t = h.tokens.unwrap();
        assert_eq!((t.limit, t.remaining), (1000, 0));
        assert!((t.reset_secs - 61.2).abs() < 1e-9, "{t:?}");
        assert_eq!(Headroom::of(&[], &[]), Headroom::default());
    }

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
        // The refusal carries what the refusing bucket holds: nothing left,
        // full again in a minute (three requests' refill, 20 s each).
        let Refusal::RateLimited { headroom, .. } = &e else {
            unreachable!()
        };
        assert_eq!(headroom.tokens, None);
        let r = headroom.requests.unwrap();
        assert_eq!((r.limit, r.remaining), (3, 0));
        assert!((59.0..=60.0).contains(&r.reset_secs), "{r:?}");
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
        let e = l.admit(&scopes(&[("app a/b", tpm)]), 600).unwrap_err();
        let Refusal::RateLimited { headroom, .. } = &e else {
            panic!("only 400 left: {e:?}")
        };
        let t = headroom.tokens.unwrap();
        assert_eq!(t.limit, 1000);
        assert!((399..=401).contains(&t.remaining), "{t:?}");
        assert!((35.0..=36.1).contains(&t.reset_secs), "{t:?}");
        l.admit(&scopes(&[("app a/b", tpm)]), 300).unwrap();
        l.charge(&[Charge {
            id: "app a/b:tokens".into(),
            per_minute: 1000,
            cost: 500.0,
        }]);
        let e = l.admit(&scopes(&[("app a/b", tpm)]), 10).unwrap_err();
        assert!(e.retry_after().unwrap() >= 24, "in debt: {e:?}");
        let Refusal::RateLimited { headroom, .. } = &e else {
            unreachable!()
        };
        let t = headroom.tokens.unwrap();
        assert_eq!(t.remaining, 0);
        assert!(t.reset_secs > 60.0, "full again only after the debt: {t:?}");
        let e = l.admit(&scopes(&[("app a/b", tpm)]), 5000).unwrap_err();
        assert!(matches!(e, Refusal::TooLargeForLimit { .. }), "{e:?}");
    }

    /// An estimate above what the request used is given back, never beyond
    /// a full bucket.
    #[test]
    fn an_overestimate_is_given_back_up_to_a_full_bucket() {
        let l = Limiter::default();
        let tpm = Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        };
        let s = scopes(&[("key k", tpm)]);
        let t0 = Instant::now();
        l.apply_at(&plan(&s, 900).unwrap(), t0).unwrap();
        assert!(l.apply_at(&plan(&s, 800).unwrap(), t0).is_err());
        // It used 100 of the 900 estimated.
        let back = |tokens: f64| Charge {
            id: "key k:tokens".into(),
            per_minute: 1000,
            cost: tokens,
        };
        l.charge_at(&[back(-800.0)], t0);
        l.apply_at(&plan(&s, 800).unwrap(), t0).unwrap();
        // A refund larger than what was taken fills the bucket, no more.
        l.charge_at(&[back(-5000.0)], t0);
        l.apply_at(&plan(&s, 1000).unwrap(), t0).unwrap();
        assert!(l.apply_at(&plan(&s, 1).unwrap(), t0).is_err());
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
mod bound_tests {
    use super::tests::scopes;
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_that_are_full_again_are_dropped() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let lim = Limits {
            requests_per_minute: Some(60),
            tokens_per_minute: None,
        };
        for i in 0..SWEEP_AT {
            let s = scopes(&[(&format!("key 'k{i}'"), lim)]);
            l.apply_at(&plan(&s, 0).unwrap(), t0).unwrap();
        }
        assert_eq!(l.len(), SWEEP_AT);
        // A minute later they are all full again: the next insert drops them.
        let later = t0 + Duration::from_secs(61);
        let s = scopes(&[("key 'new'", lim)]);
        l.apply_at(&plan(&s, 0).unwrap(), later).unwrap();
        assert_eq!(l.len(), 1);
        // 10,000 distinct scopes: inserts sweep as the map doubles; what is
        // left after a minute goes with the periodic sweep.
        for i in 0..10_000 {
            let s = scopes(&[(&format!("key 'x{i}'"), lim)]);
            l.apply_at(&plan(&s, 0).unwrap(), later).unwrap();
        }
        l.sweep_at(later + Duration::from_secs(61));
        assert_eq!(l.len(), 0);
        l.apply_at(&plan(&s, 0).unwrap(), later).unwrap();
        // A bucket in debt stays until it has refilled.
        let debt = scopes(&[("key 'debtor'", lim)]);
        l.apply_at(&plan(&debt, 0).unwrap(), later).unwrap();
        for _ in 0..59 {
            l.apply_at(&plan(&debt, 0).unwrap(), later).unwrap();
        }
        l.sweep_at(later + Duration::from_secs(30));
        assert_eq!(l.len(), 1, "the debtor is half full, 'new' is full");
        assert!(l.apply_at(&plan(&debt, 0).unwrap(), later).is_err());
        l.sweep_at(later + Duration::from_secs(61));
        assert_eq!(l.len(), 0);
    }

    /// A sweep while checking a request's second limit (a key and its app,
    /// both new) never lets its first go uncharged.
    #[test]
    fn a_sweep_between_a_requests_limits_charges_them_all() {
        let rpm = |n| Limits {
            requests_per_minute: Some(n),
            tokens_per_minute: None,
        };
        let l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..SWEEP_AT - 1 {
            let s = scopes(&[(&format!("key 'k{i}'"), rpm(60))]);
            l.apply_at(&plan(&s, 0).unwrap(), t0).unwrap();
        }
        // A minute later all are full again: the key's new bucket fills the
        // map, and the app's sweeps it, the key's (new, full) with the rest.
        let later = t0 + Duration::from_secs(61);
        let both = scopes(&[("key 'one'", rpm(1)), ("app 'a/b'", rpm(100))]);
        l.apply_at(&plan(&both, 0).unwrap(), later).unwrap();
        assert!(
            l.apply_at(&plan(&both, 0).unwrap(), later).is_err(),
            "the key's one request a minute was charged"
        );
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
