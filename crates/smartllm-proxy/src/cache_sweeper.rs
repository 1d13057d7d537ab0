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
                let now = smartllm_ledger::now_secs();
                let n = cache.sweep(|e| {
                    outdated(&rt.config, &e.route, &e.model, e.version)
                        || too_old(&rt.config, &e.route, &e.model, e.created_at, now)
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

/// An entry stored under `route` by `model` at cache `version` is outdated
/// when the policy the lookup would apply says another version. The lookup
/// resolves a routed alias's policy by the alias (its answers are cached
/// under it, whichever model served them), a fixed one's by its model.
pub(crate) fn outdated(
    config: &smartllm_config::Config,
    route: &str,
    model: &str,
    version: u32,
) -> bool {
    policy(config, route, model).version != version
}

/// An entry stored at `created_at` is too old when the policy the lookup
/// would apply now has a shorter TTL than it was stored with (a lowered
/// `ttl`): the lookup no longer serves it, so the sweep removes it.
fn too_old(
    config: &smartllm_config::Config,
    route: &str,
    model: &str,
    created_at: u64,
    now: u64,
) -> bool {
    now >= created_at.saturating_add(policy(config, route, model).ttl.as_secs())
}

/// The cache policy the lookup applies to what `model` stored under `route`.
fn policy<'a>(
    config: &'a smartllm_config::Config,
    route: &str,
    model: &str,
) -> &'a smartllm_config::CachePolicy {
    let alias = (route != model).then_some(route);
    let routed = alias
        .and_then(|r| config.routes.get(r))
        .is_some_and(|r| r.is_routed());
    let key = if routed { route } else { model };
    config.cache.policy(alias, key)
}

#[cfg(test)]
mod tests {
    use super::{outdated, too_old};

    /// A model's own cache version does not outdate what a routed alias
    /// stored (the lookup never reads it for the alias); the alias's does,
    /// and a fixed alias follows its model.
    #[test]
    fn entries_are_outdated_by_the_policy_the_lookup_applies() {
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, t: &str| std::fs::write(dir.path().join(n), t).unwrap();
        w("smartllm.yaml", "server: {}\n");
        w(
            "providers.yaml",
            "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n",
        );
        w(
            "models.yaml",
            "models:\n  - name: small\n    deployments: [ { provider: p } ]\n",
        );
        w(
            "routes.yaml",
            "routes:\n  auto:\n    candidates: [small]\n  fixed:\n    model: small\n",
        );
        w(
            "cache.yaml",
            "cache:\n  enabled: true\n  ttl: 1h\n  routes:\n    small: { version: 3, ttl: 60s }\n",
        );
        let c = smartllm_config::load_dir(dir.path()).unwrap();
        assert!(
            !outdated(&c, "auto", "small", 1),
            "the alias's policy is the defaults"
        );
        assert!(outdated(&c, "auto", "small", 3));
        assert!(
            outdated(&c, "fixed", "small", 1),
            "a fixed alias follows its model"
        );
        assert!(!outdated(&c, "fixed", "small", 3));
        assert!(!outdated(&c, "small", "small", 3));
        // A TTL lowered after the entry was stored: the policy's TTL now.
        assert!(too_old(&c, "fixed", "small", 1_000, 1_060));
        assert!(!too_old(&c, "fixed", "small", 1_000, 1_059));
        assert!(
            !too_old(&c, "auto", "small", 1_000, 1_060),
            "the alias keeps 1h"
        );
    }
}
