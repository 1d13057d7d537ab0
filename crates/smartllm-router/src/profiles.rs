//! Live model profiles: exponentially weighted moving averages of time to
//! first token, full latency, output speed and error rate, per model.
//!
//! What was measured fades with its age (half-life `FADE`): a model that
//! timed out once, or failed a run of requests, and then got no traffic is
//! not judged by that forever. Its error rate falls back towards none and
//! its timings towards the configured profile (`weight`), so the router
//! tries it again and what it measures then counts.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

const ALPHA: f64 = 0.2;
/// Half-life of what was measured, once nothing new is.
pub const FADE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LiveSnapshot {
    pub requests: u64,
    pub errors: u64,
    /// EWMA time to first byte of the answer.
    pub ttft_ms: Option<f64>,
    /// EWMA time to the complete answer.
    pub latency_ms: Option<f64>,
    /// EWMA output tokens per second after the first byte.
    pub tokens_per_second: Option<f64>,
    /// EWMA of failures (1) and successes (0), faded with age.
    pub error_rate: f64,
    /// How much the timings count against the configured profile's: 1 just
    /// measured, halving every `FADE` without a new measure.
    pub weight: f64,
}

impl LiveSnapshot {
    /// `measured` in proportion to `weight`, `profile` in the rest.
    pub fn blend(&self, measured: Option<f64>, profile: f64) -> f64 {
        measured.map_or(profile, |m| self.weight * m + (1.0 - self.weight) * profile)
    }

    /// Fold a new timing `x` into `old`: the more the average has faded
    /// (`weight`), the more the new measure counts (all of it, once the
    /// old one has faded away).
    fn timing(&self, old: Option<f64>, x: f64) -> Option<f64> {
        ewma_by(old, x, 1.0 - (1.0 - ALPHA) * self.weight)
    }

    /// This snapshot as it reads `age` after its last measure.
    fn faded(mut self, age: Duration) -> LiveSnapshot {
        let keep = 0.5f64.powf(age.as_secs_f64() / FADE.as_secs_f64());
        self.error_rate *= keep;
        self.weight = keep;
        self
    }
}

fn ewma(old: Option<f64>, x: f64) -> Option<f64> {
    ewma_by(old, x, ALPHA)
}

fn ewma_by(old: Option<f64>, x: f64, alpha: f64) -> Option<f64> {
    Some(match old {
        None => x,
        Some(o) => o + alpha * (x - o),
    })
}

#[derive(Default)]
pub struct LiveProfiles {
    /// Each model's averages as of its last measure, and when that was.
    inner: RwLock<HashMap<String, (LiveSnapshot, Instant)>>,
}

impl LiveProfiles {
    fn update(&self, model: &str, f: impl FnOnce(&mut LiveSnapshot)) {
        self.update_at(model, Instant::now(), f)
    }

    /// Fade the averages to `now`, then fold in the new measure: a failure
    /// long after the last one starts from a low error rate.
    fn update_at(&self, model: &str, now: Instant, f: impl FnOnce(&mut LiveSnapshot)) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // The error rate is carried forward faded; timings fade into the
        // profile's where they are read (`blend`), and a new one counts the
        // more the older ones have faded (`timing`). In place: no key is
        // allocated for a model already measured.
        let fold = |s: &mut LiveSnapshot, age: Duration| {
            *s = s.faded(age);
            f(s);
            s.weight = 1.0;
        };
        match map.get_mut(model) {
            Some((s, at)) => {
                fold(s, now.saturating_duration_since(*at));
                *at = now;
            }
            None => {
                let mut s = LiveSnapshot::default();
                fold(&mut s, Duration::ZERO);
                map.insert(model.to_string(), (s, now));
            }
        }
    }

    /// A successful answer, complete after `total`. Streamed, its first
    /// token came after `ttft` and the rest measures the output speed. An
    /// answer sent whole (`ttft` None) has no first token to time: its wait
    /// for the first token is the total less the time its tokens took at the
    /// speed measured on streams (or `default_tps`, the profile's), so a
    /// buffered answer's generation is not counted as waiting.
    pub fn record_success(
        &self,
        model: &str,
        ttft: Option<Duration>,
        total: Duration,
        completion_tokens: Option<u64>,
        default_tps: f64,
    ) {
        self.update(model, |s| {
            s.requests += 1;
            s.latency_ms = s.timing(s.latency_ms, total.as_secs_f64() * 1e3);
            match ttft {
                Some(ttft) => {
                    s.ttft_ms = s.timing(s.ttft_ms, ttft.as_secs_f64() * 1e3);
                    let gen = total.saturating_sub(ttft).as_secs_f64();
                    if let Some(n) = completion_tokens.filter(|n| *n >= 16) {
                        if gen > 0.01 {
                            s.tokens_per_second = s.timing(s.tokens_per_second, n as f64 / gen);
                        }
                    }
                }
                None => {
                    let tps = s.tokens_per_second.unwrap_or(default_tps).max(1.0);
                    let generating = completion_tokens.map_or(0.0, |n| n as f64 / tps);
                    let waited = (total.as_secs_f64() - generating).max(0.0);
                    s.ttft_ms = s.timing(s.ttft_ms, waited * 1e3);
                }
            }
            s.error_rate = ewma(Some(s.error_rate), 0.0).unwrap_or(0.0);
        });
    }

    /// A failed attempt (connect error, timeout, 429, 5xx). A timeout also
    /// counts as a slow first byte, so latency budgets see it.
    pub fn record_failure(&self, model: &str, waited: Option<Duration>) {
        self.update(model, |s| {
            s.requests += 1;
            s.errors += 1;
            s.error_rate = ewma(Some(s.error_rate), 1.0).unwrap_or(1.0);
            if let Some(w) = waited {
                s.ttft_ms = s.timing(s.ttft_ms, w.as_secs_f64() * 1e3);
            }
        });
    }

    /// Forget the models `keep` rejects (gone from the running config).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|m, _| keep(m));
    }

    /// `model`'s averages as they read now (faded with their age).
    pub fn get(&self, model: &str) -> Option<LiveSnapshot> {
        self.get_at(model, Instant::now())
    }

    fn get_at(&self, model: &str, now: Instant) -> Option<LiveSnapshot> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .map(|(s, at)| s.faded(now.saturating_duration_since(*at)))
    }

    pub fn all(&self) -> HashMap<String, LiveSnapshot> {
        let now = Instant::now();
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(m, (s, at))| (m.clone(), s.faded(now.saturating_duration_since(*at))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_tracks_latency_and_errors() {
        let p = LiveProfiles::default();
        p.record_success(
            "m",
            Some(Duration::from_millis(100)),
            Duration::from_millis(1100),
            Some(100),
            50.0,
        );
        let s = p.get("m").unwrap();
        assert_eq!(s.ttft_ms, Some(100.0));
        assert!((s.tokens_per_second.unwrap() - 100.0).abs() < 1e-6);
        for _ in 0..20 {
            p.record_success(
                "m",
                Some(Duration::from_millis(600)),
                Duration::from_millis(700),
                None,
                50.0,
            );
        }
        assert!(p.get("m").unwrap().ttft_ms.unwrap() > 590.0);
        for _ in 0..10 {
            p.record_failure("m", None);
        }
        let s = p.get("m").unwrap();
        assert!(s.error_rate > 0.85 && s.errors == 10 && s.requests == 31);
        assert!(p.get("other").is_none());
        p.record_failure("gone", None);
        p.retain(|m| m == "m");
        assert!(p.get("gone").is_none() && p.get("m").is_some());
    }

    /// One timeout long ago no longer keeps a model out: its error rate
    /// halves every `FADE` and its timings count for less against the
    /// profile's; a new measure counts in full again.
    #[test]
    fn what_was_measured_fades_with_age() {
        let p = LiveProfiles::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            p.update_at("m", t0, |s| {
                s.errors += 1;
                s.error_rate = ewma(Some(s.error_rate), 1.0).unwrap();
                s.ttft_ms = ewma(s.ttft_ms, 600_000.0);
            });
        }
        let fresh = p.get_at("m", t0).unwrap();
        assert!(fresh.error_rate > 0.6 && fresh.weight == 1.0, "{fresh:?}");
        assert_eq!(fresh.blend(fresh.ttft_ms, 800.0), 600_000.0);
        let later = p.get_at("m", t0 + FADE * 2).unwrap();
        assert!((later.error_rate - fresh.error_rate / 4.0).abs() < 1e-9);
        assert!((later.weight - 0.25).abs() < 1e-9);
        let ttft = later.blend(later.ttft_ms, 800.0);
        assert!(
            (ttft - (0.25 * 600_000.0 + 0.75 * 800.0)).abs() < 1e-6,
            "{ttft}"
        );
        // An hour on, the profile is all that counts.
        let hour = p.get_at("m", t0 + Duration::from_secs(3600)).unwrap();
        assert!(hour.error_rate < 0.001 && hour.blend(hour.ttft_ms, 800.0) < 1000.0);
        // A success then starts from the faded error rate, and its timing
        // counts the more the old ones have faded (here 1 - 0.8 x 0.25).
        p.update_at("m", t0 + FADE * 2, |s| {
            s.error_rate = ewma(Some(s.error_rate), 0.0).unwrap();
            s.ttft_ms = s.timing(s.ttft_ms, 800.0);
        });
        let again = p.get_at("m", t0 + FADE * 2).unwrap();
        assert!((again.error_rate - later.error_rate * 0.8).abs() < 1e-9);
        assert_eq!(again.weight, 1.0);
        let want = 600_000.0 + 0.8 * (800.0 - 600_000.0);
        assert!((again.ttft_ms.unwrap() - want).abs() < 1e-6, "{again:?}");
        assert_eq!(again.requests, 0);
    }

    /// A buffered answer's generation time is not taken for its wait for
    /// the first token: 200 tokens in 2.3 s at the 100 tokens/s streams
    /// measured is 0.3 s of waiting, not 2.3 s.
    #[test]
    fn a_buffered_answer_is_not_all_waiting() {
        let p = LiveProfiles::default();
        p.record_success(
            "m",
            Some(Duration::from_millis(300)),
            Duration::from_millis(1300),
            Some(100),
            10.0,
        );
        let buffered = LiveProfiles::default();
        buffered.record_success("b", None, Duration::from_millis(2300), Some(200), 100.0);
        let ttft = buffered.get("b").unwrap().ttft_ms.unwrap();
        assert!((ttft - 300.0).abs() < 1.0, "{ttft}");
        // With a speed measured on streams, that one counts.
        p.record_success("m", None, Duration::from_millis(2300), Some(200), 10.0);
        let s = p.get("m").unwrap();
        assert!((s.ttft_ms.unwrap() - 300.0).abs() < 1.0, "{s:?}");
        assert_eq!(s.latency_ms.map(f64::round), Some(1500.0));
        // More tokens than the time could carry: no negative wait.
        buffered.record_success("z", None, Duration::from_millis(100), Some(1000), 100.0);
        assert_eq!(buffered.get("z").unwrap().ttft_ms, Some(0.0));
    }
}
