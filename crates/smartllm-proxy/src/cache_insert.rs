//! A cache write waiting for its answer: set on a miss, completed by the
//! exchange once the whole answer is known, stored off the request path.

use crate::metrics;
use serde_json::Value;
use smartllm_cache::{CacheKey, SemanticCache};
use smartllm_config::CachePolicy;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Any choice ended by the token limit.
fn cut_short(completion: &str) -> bool {
    serde_json::from_str::<Value>(completion).is_ok_and(|v| {
        v["choices"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"] == "length"))
    })
}

/// What a miss needs to store the answer later.
pub struct PendingInsert {
    pub cache: Arc<SemanticCache>,
    pub key: CacheKey,
    pub embedding: Option<Vec<f32>>,
    pub policy: CachePolicy,
    pub route: String,
    pub model: String,
    /// A per-request cost cap lowered max tokens: an answer it cut short
    /// (finish_reason "length") is not stored.
    pub cost_capped: bool,
    /// Keyed under a model the client named (not a routed alias): only that
    /// model's answer is stored; a substitute (budget degrade, cost cap,
    /// fallback) drops the write.
    pub fixed_model: bool,
    /// Stores in progress gateway-wide, and the bound on them.
    pub pending: Arc<std::sync::atomic::AtomicUsize>,
    pub max_pending: usize,
    /// Where the store runs (a drain waits for it before the data dir closes).
    pub tasks: TaskTracker,
    /// The fleet, when it shares the cache: the stored entry goes to it.
    pub fleet: Option<Arc<crate::fleet_sync::FleetSync>>,
}

impl PendingInsert {
    /// Store `completion` (a `chat.completion` JSON document) in the background.
    pub fn spawn(self, completion: String) {
        use std::sync::atomic::Ordering;
        if self.cost_capped && cut_short(&completion) {
            return;
        }
        // Under overload, drop the store rather than pile up tasks and memory.
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            metrics::shed("cache_insert");
            return;
        }
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let pending = self.pending.clone();
            match self
                .cache
                .insert(
                    self.key,
                    self.embedding,
                    completion,
                    &self.policy,
                    &self.route,
                    &self.model,
                )
                .await
            {
                Ok(stored) => {
                    if let Some(fleet) = &self.fleet {
                        fleet.publish(crate::fleet_sync::CacheEvent::Insert(Box::new(stored)));
                    }
                }
                Err(e) => {
                    if let smartllm_cache::CacheError::Embed(
                        smartllm_embed::EmbedError::Overloaded(_),
                    ) = e
                    {
                        metrics::shed("cache_insert");
                    } else {
                        tracing::warn!(error = %e, "storing a cache entry failed");
                    }
                }
            }
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_cut_by_the_token_limit_are_recognised() {
        let cut = r#"{"choices":[{"index":0,"finish_reason":"length","message":{"content":"a"}}]}"#;
        let whole = r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"content":"a"}}]}"#;
        assert!(super::cut_short(cut));
        assert!(!super::cut_short(whole));
        assert!(!super::cut_short("not json"));
    }
}
