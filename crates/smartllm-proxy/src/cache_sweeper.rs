//! Background upkeep of the cache: expired entries, and entries whose route's
//! cache version was bumped, leave RocksDB and the index.

use crate::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub struct CacheSweeper {
    pub shared: Arc<Shared>,
    pub every: Duration,
}

#[async_trait]
impl BackgroundService for CacheSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(cache) = self.shared.cache.clone() else {
            return;
        };
        let mut ticker = tokio::time::interval(self.every);
        ticker.tick().await;
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            ticks += 1;
            let save = ticks.is_multiple_of(10);
            let rt = self.shared.runtime.load_full();
            let cache = cache.clone();
            let swept = tokio::task::spawn_blocking(move || {
                let cfg = &rt.config.cache;
                let n = cache.sweep(|e| {
                    let route = (e.route != e.model).then_some(e.route.as_str());
                    cfg.policy(route, &e.model).version != e.version
                })?;
                if save {
                    cache.persist()?;
                }
                Ok::<_, smartllm_cache::CacheError>(n)
            })
            .await;
            match swept {
                Ok(Ok(n)) if n > 0 => tracing::info!(
                    removed = n,
                    "cache sweep removed expired or outdated entries"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cache sweep failed"),
                Err(e) => tracing::warn!(error = %e, "cache sweep task failed"),
            }
        }
    }
}
