//! Upstream health checks and DNS re-resolution for the pools of the current
//! runtime snapshot, plus periodic upkeep: metrics, and the sweep that keeps
//! per-deployment and per-scope state bounded (circuit breakers of addresses
//! gone after a reload or a DNS change, live profiles of removed models,
//! budget spend of past periods, rate limit buckets that are full again).

use crate::runtime::BackendDeployments;
use crate::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(250);
const DNS_REFRESH: Duration = Duration::from_secs(60);

pub struct HealthService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // (config version, model) -> last check / last DNS refresh
        let mut last_check: HashMap<(u64, String), Instant> = HashMap::new();
        let mut last_dns: HashMap<(u64, String), Instant> = HashMap::new();
        let mut last_upkeep = Instant::now();
        let mut ticker = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            let rt = self.shared.runtime.load_full();
            last_check.retain(|(v, _), _| *v == rt.version);
            last_dns.retain(|(v, _), _| *v == rt.version);
            let mut tasks = tokio::task::JoinSet::new();
            for (name, pool) in &rt.pools {
                let key = (rt.version, name.clone());
                let dns_due = last_dns
                    .get(&key)
                    .is_none_or(|t| t.elapsed() >= DNS_REFRESH);
                if dns_due {
                    last_dns.insert(key.clone(), Instant::now());
                }
                let check_due = pool.health_enabled
                    && last_check
                        .get(&key)
                        .is_none_or(|t| t.elapsed() >= pool.health_interval);
                if check_due {
                    last_check.insert(key, Instant::now());
                }
                if !dns_due && !check_due {
                    continue;
                }
                let pool = pool.clone();
                // A fresh snapshot already resolved its addresses in prepare().
                let refresh = dns_due && rt.loaded_at.elapsed() >= DNS_REFRESH;
                tasks.spawn(async move {
                    if refresh {
                        if let Err(e) = pool.lb.update().await {
                            tracing::warn!(model = %pool.model, error = %e, "re-resolving deployments failed");
                        }
                    }
                    if check_due {
                        pool.activate_health();
                        pool.lb.backends().run_health_check(true).await;
                        for b in pool.lb.backends().get_backend().iter() {
                            crate::metrics::upstream_healthy(&pool.model, &b.addr.to_string(), pool.lb.backends().ready(b));
                        }
                    }
                });
            }
            drop(rt);
            // Do not wait on slow checks here forever: they have their own timeouts.
            while tasks.join_next().await.is_some() {}
            if last_upkeep.elapsed() >= Duration::from_secs(5) {
                self.shared.metrics.run_upkeep();
                sweep(&self.shared);
                last_upkeep = Instant::now();
            }
        }
    }
}

/// Drop state that no longer belongs to the running config: breakers of
/// deployments (`model/provider/address`) not in any pool now, profiles of models
/// no longer configured; and expired quota state.
///
/// (The ids of the running config's deployments, as the breakers know
/// them, come from [`deployment_ids`].)
pub fn sweep(shared: &Shared) {
    let rt = shared.runtime.load_full();
    let current = deployment_ids(&rt);
    let gone = shared.breakers.retain(|id| current.contains(id));
    if !gone.is_empty() {
        tracing::debug!(
            ?gone,
            "circuit breakers of deployments no longer configured dropped"
        );
    }
    shared.profiles.retain(|m| rt.config.model(m).is_some());
    shared.quotas.sweep();
}

/// The ids of the running config's deployments (`model/provider/address`),
/// as their circuit breakers and `smartllm_circuit_state` name them.
pub(crate) fn deployment_ids(rt: &crate::Runtime) -> HashSet<String> {
    let mut current: HashSet<String> = HashSet::new();
    for pool in rt.pools.values() {
        for b in pool.lb.backends().get_backend().iter() {
            let Some(ids) = b.ext.get::<BackendDeployments>() else {
                continue;
            };
            for (i, id) in ids.0.iter() {
                if pool.deployments.get(*i).is_some() {
                    current.insert(id.to_string());
                }
            }
        }
    }
    current
}
