//! The last requests that reached a model, as metadata (who, which model and
//! route, tokens, cost, cache outcome, status, latency; never a prompt, an
//! answer, a header or a key), in a bounded ring the logging phase fills:
//! `GET /admin/requests/expensive` and the dashboard read the costliest.

use crate::ctx::Ctx;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Requests kept (each a few hundred bytes).
pub const CAPACITY: usize = 1000;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentRequest {
    pub unix_ms: u64,
    pub request_id: String,
    pub endpoint: &'static str,
    pub route: Option<String>,
    pub model: String,
    pub provider: Option<String>,
    pub tenant: String,
    pub app: String,
    pub key: String,
    pub status: u16,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost_usd: f64,
    pub cache: Option<&'static str>,
    pub latency_ms: f64,
}

#[derive(Default)]
pub struct Recent {
    ring: Mutex<VecDeque<RecentRequest>>,
}

impl Recent {
    /// Keep a finished request that reached a model (upstream or cache).
    /// The last use of `ctx`: its names move into the ring (no copies).
    /// A request refused before that (a key over its budget or rate, a
    /// bad body) is not kept: a refused client sending thousands would push
    /// every real request out of the ring.
    pub fn record(&self, ctx: &mut Ctx, status: u16, cost_usd: f64) {
        let reached =
            ctx.provider.is_some() || ctx.cache_status.is_some_and(|c| c.starts_with("hit"));
        if !reached {
            return;
        }
        let Some(model) = ctx.take_model() else {
            return;
        };
        let usage = ctx.usage.unwrap_or_default();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let take = std::mem::take::<String>;
        self.push(RecentRequest {
            unix_ms,
            request_id: take(&mut ctx.request_id),
            endpoint: ctx.endpoint,
            route: ctx.route.take(),
            model,
            provider: ctx.provider.take(),
            tenant: take(&mut ctx.tenant),
            app: take(&mut ctx.app),
            key: take(&mut ctx.key_name),
            status,
            stream: ctx.stream,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cost_usd,
            cache: ctx.cache_status,
            latency_ms: ctx.start.elapsed().as_secs_f64() * 1e3,
        });
    }

    fn push(&self, r: RecentRequest) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// The `limit` costliest kept requests that finished within `window_ms`
    /// (unix milliseconds, its end exclusive), costliest first (ties: the
    /// newest first), and how many were kept in all.
    pub fn costliest(
        &self,
        window_ms: std::ops::Range<u64>,
        limit: usize,
    ) -> (Vec<RecentRequest>, usize) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<RecentRequest> = ring
            .iter()
            .filter(|r| window_ms.contains(&r.unix_ms))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.cost_usd
                .total_cmp(&a.cost_usd)
                .then(b.unix_ms.cmp(&a.unix_ms))
        });
        out.truncate(limit);
        (out, ring.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(i: u64, cost: f64) -> RecentRequest {
        RecentRequest {
            unix_ms: i,
            request_id: format!("r{i}"),
            endpoint: "chat_completions",
            route: None,
            model: "m".into(),
            provider: None,
            tenant: "t".into(),
            app: "a".into(),
            key: "k".into(),
            status: 200,
            stream: false,
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
            cost_usd: cost,
            cache: None,
            latency_ms: 1.0,
        }
    }

    #[test]
    fn bounded_and_sorted_by_cost() {
        let r = Recent::default();
        for i in 0..(CAPACITY as u64 + 10) {
            r.push(req(i, (i % 7) as f64));
        }
        let (top, kept) = r.costliest(0..u64::MAX, 3);
        assert_eq!(kept, CAPACITY);
        assert!(top.iter().all(|t| t.cost_usd == 6.0));
        assert!(top[0].unix_ms > top[1].unix_ms);
        // The oldest were dropped.
        assert!(r
            .costliest(0..u64::MAX, usize::MAX)
            .0
            .iter()
            .all(|t| t.unix_ms >= 10));
        assert_eq!(r.costliest(CAPACITY as u64 + 5..u64::MAX, 100).0.len(), 5);
    }

    #[test]
    fn windows_end_where_asked() {
        let r = Recent::default();
        for i in 0..10 {
            // The newest are the costliest: a window's end must be kept to.
            r.push(req(i * 1000, i as f64));
        }
        let (top, kept) = r.costliest(2000..5000, 100);
        assert_eq!(kept, 10);
        let at: Vec<u64> = top.iter().map(|t| t.unix_ms).collect();
        assert_eq!(at, [4000, 3000, 2000], "the end is exclusive");
        assert!(r.costliest(5000..5000, 100).0.is_empty());
        assert_eq!(r.costliest(9000..u64::MAX, 100).0.len(), 1);
    }
}
