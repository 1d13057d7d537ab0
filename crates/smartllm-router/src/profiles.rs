//! Live model profiles: exponentially weighted moving averages of time to
//! first token, full latency, output speed and error rate, per model.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

const ALPHA: f64 = 0.2;

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
    /// EWMA of failures (1) and successes (0).
    pub error_rate: f64,
}

fn ewma(old: Option<f64>, x: f64) -> Option<f64> {
    Some(match old {
        None => x,
        Some(o) => o + ALPHA * (x - o),
    })
}

#[derive(Default)]
pub struct LiveProfiles {
    inner: RwLock<HashMap<String, LiveSnapshot>>,
}

impl LiveProfiles {
    fn update(&self, model: &str, f: impl FnOnce(&mut LiveSnapshot)) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(model) {
            f(s);
        } else {
            let mut s = LiveSnapshot::default();
            f(&mut s);
            map.insert(model.to_string(), s);
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
            s.latency_ms = ewma(s.latency_ms, total.as_secs_f64() * 1e3);
            match ttft {
                Some(ttft) => {
                    s.ttft_ms = ewma(s.ttft_ms, ttft.as_secs_f64() * 1e3);
                    let gen = total.saturating_sub(ttft).as_secs_f64();
                    if let Some(n) = completion_tokens.filter(|n| *n >= 16) {
                        if gen > 0.01 {
                            s.tokens_per_second = ewma(s.tokens_per_second, n as f64 / gen);
                        }
                    }
                }
                None => {
                    let tps = s.tokens_per_second.unwrap_or(default_tps).max(1.0);
                    let generating = completion_tokens.map_or(0.0, |n| n as f64 / tps);
                    let waited = (total.as_secs_f64() - generating).max(0.0);
                    s.ttft_ms = ewma(s.ttft_ms, waited * 1e3);
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
                s.ttft_ms = ewma(s.ttft_ms, w.as_secs_f64() * 1e3);
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

    pub fn get(&self, model: &str) -> Option<LiveSnapshot> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied()
    }

    pub fn all(&self) -> HashMap<String, LiveSnapshot> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
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
