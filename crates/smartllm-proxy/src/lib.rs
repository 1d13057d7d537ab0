//! The Pingora layer of SmartLLM Router. `Gateway` implements `ProxyHttp`
//! thinly: every trait method is one call. API requests are answered in
//! `request_filter` by [`pipeline`], which reads the whole (bounded) body,
//! validates it, resolves the model and performs the upstream exchange itself
//! over Pingora's pooled HTTP connector — so bodies of any size up to the
//! limit reach the upstream intact (Pingora's 64 KiB retry buffer is never
//! involved), retries can resend the full body, and provider adapters can
//! translate both ways. Long-lived work runs as background services
//! (reloader, health checks, cache sweeper, budget alerts).

pub mod access_log;
pub mod admin;
pub mod alerts;
pub mod auth;
pub mod cache_insert;
pub mod cache_sweeper;
pub mod ctx;
pub mod drain;
pub mod fleet_sync;
pub mod frontend;
pub mod health;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod recent;
pub mod reload;
pub mod respond;
pub mod responses_store;
pub mod routing;
pub mod runtime;
pub mod shutdown;
pub mod tls;
pub mod ui;
pub mod upstream_pool;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use ctx::Ctx;

/// Budget alerts waiting for delivery before new ones are dropped (logged and counted).
const ALERT_QUEUE: usize = 1024;
pub use runtime::Runtime;

/// Results of the start-up self-test of the native stack (ONNX model + FAISS).
#[derive(Debug, Clone)]
pub struct SelfTest {
    pub embed_ms: f64,
    pub paraphrase_cosine: f32,
    pub unrelated_cosine: f32,
    pub nearest_ok: bool,
}

/// After a tenant's erasure: flush and compact the column families that
/// held its cache entries and stored responses, so their deleted values
/// leave the data dir's files (write-ahead logs and SSTs) now. On the
/// blocking pool, one compaction at a time; logged when done.
pub(crate) fn erase_from_disk(shared: &Shared) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let Some(store) = shared.components.store.clone() else {
        return;
    };
    let cache = shared.cache.clone();
    tokio::task::spawn_blocking(move || {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        // The saved index file holds the purged vectors too: saved again
        // without them.
        if let Some(Err(e)) = cache.map(|c| c.persist()) {
            tracing::warn!(error = %e, "saving the cache index after a purge failed; the saved file keeps the purged vectors until the next save");
        }
        use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_RESPONSES, CF_VECTORS};
        match store.compact_deleted(&[CF_ENTRIES, CF_VECTORS, CF_EXACT, CF_RESPONSES]) {
            Ok(()) => tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "after the purge: index saved again, store flushed and compacted (the purged entries are rewritten out of its files)"
            ),
            Err(e) => {
                tracing::error!(error = %e, "compacting after a purge failed; the purged entries are unreadable through the gateway but stay in the data dir's files until RocksDB compacts them")
            }
        }
    });
}

/// Components loaded at start and reported on `/readyz`.
pub struct Components {
    pub embedder: Option<Arc<smartllm_embed::Embedder>>,
    pub self_test: Option<SelfTest>,
    pub store: Option<Arc<smartllm_store::Store>>,
}

/// State shared by the proxy, the admin listener and the background services.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub connector: Connector,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub components: Components,
    pub cache: Option<Arc<smartllm_cache::SemanticCache>>,
    pub ledger: Option<smartllm_ledger::Ledger>,
    /// Responses API conversations kept for translated providers.
    pub responses: Option<Arc<responses_store::ResponsesStore>>,
    /// Rate limits, budgets, cost cap and their fleet-wide state.
    pub quotas: Arc<smartllm_quota::Quotas>,
    /// Budget alerts for the alert service to deliver (taken when it starts).
    pub alerts: Mutex<Option<tokio::sync::mpsc::Receiver<smartllm_quota::Alert>>>,
    /// Background work a request leaves behind (cache inserts); a drain
    /// waits for it before the data dir closes.
    pub tasks: tokio_util::task::TaskTracker,
    /// Budget alert webhooks being delivered (the final stop waits for them).
    pub alert_deliveries: tokio_util::task::TaskTracker,
    /// Live model profiles (EWMA latency, TTFT, speed, errors) for the router.
    pub profiles: smartllm_router::LiveProfiles,
    /// Users' scores of answers (`POST /v1/feedback`), by model and task.
    pub feedback: Arc<smartllm_router::FeedbackBook>,
    /// Circuit breakers per deployment (they outlive reloads).
    pub breakers: smartllm_router::Breakers,
    /// Requests being served (for draining on SIGTERM).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Set on SIGTERM: not ready, new requests get 503.
    pub draining: std::sync::atomic::AtomicBool,
    /// The texts of the config directory as it last loaded (a reload's
    /// baseline: emptied files, keys.yaml applied on its own).
    pub config_texts: std::sync::Mutex<Option<std::collections::BTreeMap<&'static str, String>>>,
    /// SIGTERM came: not ready (`/readyz` 503), though requests are still
    /// served until `server.drain_delay` has passed and `draining` is set.
    pub stopping: std::sync::atomic::AtomicBool,
    /// When the SIGTERM drain began: the shutdown that follows waits only
    /// what is left of `drain_timeout`, not a second one.
    pub drain_started: std::sync::OnceLock<std::time::Instant>,
    /// Set when the drain's time is up with requests still in flight:
    /// their streams end at once with the gateway's error event (in the
    /// client's shape, then the end of the stream) rather than being cut.
    pub drain_expired: tokio::sync::watch::Sender<bool>,
    /// Set once the API listener has accepted a connection from `/readyz`.
    pub api_listening: std::sync::atomic::AtomicBool,
    /// Answers waiting to be stored in the cache (bounded by cache.max_pending_inserts).
    pub pending_inserts: Arc<std::sync::atomic::AtomicUsize>,
    pub config_dir: PathBuf,
    pub reload_lock: tokio::sync::Mutex<()>,
    pub reload_status: Mutex<reload::ReloadStatus>,
    /// The last requests that reached a model, as metadata (for the dashboard).
    pub recent: recent::Recent,
    /// OpenTelemetry spans (None: `tracing:` off). Restart-only.
    pub tracing: Option<otel::Tracing>,
    /// The fleet's shared cache and cost view (None: not shared). Restart-only.
    pub fleet_sync: Option<Arc<fleet_sync::FleetSync>>,
}

impl Shared {
    pub fn new(
        runtime: Runtime,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
        components: Components,
        cache: Option<Arc<smartllm_cache::SemanticCache>>,
        ledger: Option<smartllm_ledger::Ledger>,
        config_dir: PathBuf,
    ) -> Arc<Shared> {
        crate::metrics::config_version(runtime.version);
        crate::metrics::providers_known(runtime.config.providers.keys());
        crate::metrics::component_ready(
            crate::metrics::EMBEDDER_READY,
            components.self_test.as_ref().is_some_and(|t| t.nearest_ok),
        );
        crate::metrics::component_ready(crate::metrics::STORE_READY, components.store.is_some());
        let (quotas, alerts) = smartllm_quota::Quotas::new(ALERT_QUEUE);
        apply_metrics_config(&runtime.config);
        quotas.track_budgets(&runtime.config.keys.budgets);
        let tracing = otel::Tracing::start(&runtime.config.tracing);
        // The vector space the embedder makes (model and tokenizer contents,
        // window, dimension): a peer's vectors of another are not used.
        // With the cache key, vectors travel sealed: tagged apart, so that a
        // peer without the key (or an earlier release, which reads vectors
        // in the clear) keeps such entries for their exact key alone, and
        // this one takes no vector in the clear.
        let sealed = if runtime.config.cache.encryption_key_file.is_some() {
            ";sealed"
        } else {
            ""
        };
        let model_tag = components
            .embedder
            .as_ref()
            .map(|e| format!("{}{sealed}", e.fingerprint()))
            .unwrap_or_default();
        let fleet_sync = fleet_sync::FleetSync::new(&runtime.config.fleet, model_tag);
        if fleet_sync.as_ref().is_some_and(|f| f.shares_cache())
            && runtime.config.cache.encryption_key_file.is_none()
        {
            tracing::warn!(
                "fleet.share_cache without cache.encryption_key_file: prompts and answers rest in the fleet's Redis in the clear, and whoever can write to it can add entries to any tenant's cache; give every gateway the same key"
            );
        }
        if let (Some(sync), Some(ledger)) = (&fleet_sync, &ledger) {
            if runtime.config.fleet.share_costs {
                ledger.share_with(sync.cost_sink());
            }
        }
        let codec = cache
            .as_ref()
            .map_or_else(smartllm_cache::Codec::plain, |c| c.codec().clone());
        let keep = runtime.config.store.responses;
        let ttl = runtime.config.store.responses_ttl;
        let responses = components.store.clone().filter(|_| keep).and_then(|store| {
            responses_store::ResponsesStore::start_with_ttl(store, codec, ttl)
                .map(Arc::new)
                .map_err(|e| tracing::error!(error = %e, "cannot start the Responses store's writer; stored responses are off"))
                .ok()
        });
        if let Some(r) = responses.clone() {
            // After a key rotation: kept conversations sealed with the old
            // key are sealed again with the new one, off the start's path.
            let spawned = std::thread::Builder::new()
                .name("smartllm-reseal".into())
                .spawn(move || match r.reseal() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        resealed = n,
                        "stored Responses API conversations sealed with an old key (or in the clear) were sealed with the current cache.encryption_key_file"
                    ),
                    Err(e) => tracing::error!(error = %e, "sealing stored responses with the current key failed; those sealed with an old key need it in cache.encryption_old_key_files"),
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the thread that seals stored responses with the current key");
            }
        }
        Arc::new(Shared {
            responses,
            runtime: ArcSwap::from_pointee(runtime),
            connector: Connector::new(None),
            metrics,
            components,
            cache,
            ledger,
            quotas: Arc::new(quotas),
            alerts: Mutex::new(Some(alerts)),
            tasks: tokio_util::task::TaskTracker::new(),
            alert_deliveries: tokio_util::task::TaskTracker::new(),
            profiles: smartllm_router::LiveProfiles::default(),
            feedback: Arc::new(smartllm_router::FeedbackBook::default()),
            breakers: smartllm_router::Breakers::default(),
            in_flight: Default::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            // (Read once more: what a start loaded a moment ago.)
            config_texts: std::sync::Mutex::new(smartllm_config::read_texts(&config_dir).ok()),
            drain_started: std::sync::OnceLock::new(),
            drain_expired: tokio::sync::watch::channel(false).0,
            pending_inserts: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            api_listening: std::sync::atomic::AtomicBool::new(false),
            config_dir,
            reload_lock: tokio::sync::Mutex::new(()),
            reload_status: Mutex::new(reload::ReloadStatus::default()),
            recent: recent::Recent::default(),
            tracing,
            fleet_sync,
        })
    }

    pub fn ready(&self) -> bool {
        !self.draining.load(std::sync::atomic::Ordering::SeqCst)
            && !self.stopping.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .components
                .self_test
                .as_ref()
                .is_some_and(|t| t.nearest_ok)
            // Failing runs are reported, not gated on: without embeddings
            // requests are still served (routing by keywords, no semantic
            // cache), and a gateway out of service would see no request
            // whose run could show it well again. No worker left is.
            && self
                .components
                .embedder
                .as_ref()
                .is_some_and(|e| e.health().workers_live > 0)
            && self.components.store.is_some()
    }
}

pub struct Gateway {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        pipeline::begin(&self.shared, session, ctx);
        Ok(())
    }

    /// Every request is answered here (see [`pipeline`]).
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        pipeline::run(&self.shared, session, ctx)
            .await
            .map(|()| true)
    }

    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &Ctx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(frontend::Reused))
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; reaching here is a bug.
        Error::e_explain(ErrorType::InternalError, "request reached upstream_peer")
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        respond::fail_to_proxy(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        pipeline::finish::run(&self.shared, session, e, ctx);
    }
}

/// `metrics:` of the running config: the cap on tenant, app and key label
/// values and whether names are hashed (at start and on every reload).
pub fn apply_metrics_config(config: &smartllm_config::Config) {
    smartllm_ledger::labels::configure(
        config.metrics.max_label_values,
        config.metrics.label_names == smartllm_config::LabelNames::Hashed,
    );
}
