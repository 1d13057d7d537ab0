//! The Pingora layer of SmartLLM Router. `Gateway` implements `ProxyHttp`
//! thinly: every phase calls into a module. API requests are answered in
//! `request_filter`, which reads the whole (bounded) body, validates it,
//! resolves the model and performs the upstream exchange itself over Pingora's
//! pooled HTTP connector — so bodies of any size up to the limit reach the
//! upstream intact (Pingora's 64 KiB retry buffer is never involved), retries can
//! resend the full body, and provider adapters can translate both ways.

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod cache_sweeper;
pub mod ctx;
pub mod fleet;
pub mod frontend;
pub mod handler;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod reload;
pub mod respond;
pub mod routing;
pub mod runtime;
pub mod shutdown;
pub mod upstream;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use ctx::Ctx;
pub use runtime::Runtime;

/// Results of the start-up self-test of the native stack (ONNX model + FAISS).
#[derive(Debug, Clone)]
pub struct SelfTest {
    pub embed_ms: f64,
    pub paraphrase_cosine: f32,
    pub unrelated_cosine: f32,
    pub nearest_ok: bool,
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
    pub limiter: limits::Limiter,
    pub budgets: budget::Budgets,
    /// Redis-backed limits and budgets (rebuilt when `fleet` changes on reload).
    pub fleet: arc_swap::ArcSwapOption<fleet::Fleet>,
    /// Live model profiles (EWMA latency, TTFT, speed, errors) for the router.
    pub profiles: smartllm_router::LiveProfiles,
    /// Circuit breakers per deployment (they outlive reloads).
    pub breakers: smartllm_router::Breakers,
    /// Outbound connections for alert webhooks (kept apart from upstream pools).
    pub webhook_connector: Arc<Connector>,
    /// Requests being served (for draining on SIGTERM).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Set on SIGTERM: not ready, new requests get 503.
    pub draining: std::sync::atomic::AtomicBool,
    /// Set once the API listener has accepted a connection from `/readyz`.
    pub api_listening: std::sync::atomic::AtomicBool,
    /// Answers waiting to be stored in the cache (bounded by cache.max_pending_inserts).
    pub pending_inserts: Arc<std::sync::atomic::AtomicUsize>,
    pub config_dir: PathBuf,
    pub reload_lock: tokio::sync::Mutex<()>,
    pub reload_status: Mutex<reload::ReloadStatus>,
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
        crate::metrics::component_ready(
            crate::metrics::EMBEDDER_READY,
            components.self_test.as_ref().is_some_and(|t| t.nearest_ok),
        );
        crate::metrics::component_ready(crate::metrics::STORE_READY, components.store.is_some());
        Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            connector: Connector::new(None),
            metrics,
            components,
            cache,
            ledger,
            limiter: limits::Limiter::default(),
            budgets: budget::Budgets::default(),
            fleet: arc_swap::ArcSwapOption::empty(),
            profiles: smartllm_router::LiveProfiles::default(),
            breakers: smartllm_router::Breakers::default(),
            webhook_connector: Arc::new(Connector::new(None)),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            pending_inserts: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            api_listening: std::sync::atomic::AtomicBool::new(false),
            config_dir,
            reload_lock: tokio::sync::Mutex::new(()),
            reload_status: Mutex::new(reload::ReloadStatus::default()),
        })
    }

    /// The fleet client for this config (None: limits and budgets are per process).
    pub fn fleet(&self, cfg: &smartllm_config::FleetConfig) -> Option<Arc<fleet::Fleet>> {
        cfg.redis.as_ref()?;
        if let Some(f) = self.fleet.load_full() {
            if f.config == *cfg {
                return Some(f);
            }
        }
        match fleet::Fleet::new(cfg) {
            Ok(f) => {
                let f = f.map(Arc::new);
                self.fleet.store(f.clone());
                f
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use fleet.redis; limits and budgets are per process");
                None
            }
        }
    }

    pub fn ready(&self) -> bool {
        !self.draining.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .components
                .self_test
                .as_ref()
                .is_some_and(|t| t.nearest_ok)
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
        frontend::head_complete();
        ctx.begin(session, self.shared.runtime.load_full());
        self.shared
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ctx.in_flight = true;
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            let mut err = smartllm_protocol::ApiError::unavailable(
                "server_shutting_down",
                "This gateway instance is shutting down; retry the request (it will reach another instance).",
            );
            err.retry_after = Some(1);
            ctx.status = 503;
            session.set_keepalive(None);
            respond::error(session, ctx, &err).await?;
            return Ok(true);
        }
        // Shed beyond the concurrency limit rather than queue without bound.
        let limit = ctx.rt.as_ref().map(|rt| rt.config.server.max_in_flight);
        if limit.is_some_and(|max| {
            self.shared
                .in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
                > max
        }) {
            ::metrics::counter!(metrics::SHED, "reason" => "max_in_flight").increment(1);
            let mut err = smartllm_protocol::ApiError::unavailable(
                "server_overloaded",
                "The gateway is at its concurrency limit (server.max_in_flight); retry shortly.",
            );
            err.retry_after = Some(1);
            ctx.status = 503;
            respond::error(session, ctx, &err).await?;
            return Ok(true);
        }
        handler::handle(&self.shared, session, ctx).await?;
        Ok(true)
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
        // Tokens beyond the pre-charged estimate count against the limits now.
        if let (Some(u), Some(rt)) = (ctx.usage, ctx.rt.clone()) {
            let scopes = limits_for(&rt, ctx);
            let scopes: Vec<(&str, smartllm_config::Limits)> =
                scopes.iter().map(|(s, l)| (s.as_str(), *l)).collect();
            limits::charge_after(
                &self.shared,
                &rt.config.fleet,
                &scopes,
                u.total().saturating_sub(ctx.precharged_tokens),
            );
        }
        let cost = access_log::finish(session, e, ctx, self.shared.ledger.as_ref());
        if let Some((exp, arm)) = &ctx.experiment {
            let outcome = if ctx.status < 400 { "ok" } else { "error" };
            ::metrics::counter!(smartllm_router::metric_names::EXPERIMENT_REQUESTS, "experiment" => exp.clone(), "arm" => arm.clone(), "outcome" => outcome).increment(1);
            if cost > 0.0 {
                ::metrics::gauge!(smartllm_router::metric_names::EXPERIMENT_COST, "experiment" => exp.clone(), "arm" => arm.clone())
                    .increment(cost);
            }
        }
        if let Some(rt) = ctx.rt.clone() {
            budget::Budgets::record(
                &self.shared,
                &rt.config.keys.budgets,
                &rt.config.fleet,
                ctx,
                cost,
            );
        }
        // Last: a drain (SIGTERM, graceful upgrade) waits for this request's
        // ledger record and budget charge, not just its response.
        if std::mem::take(&mut ctx.in_flight) {
            self.shared
                .in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The limits that apply to this request's key and app.
pub fn limits_for(rt: &Runtime, ctx: &Ctx) -> Vec<(String, smartllm_config::Limits)> {
    let mut out = Vec::new();
    if let Some(k) = ctx.key.as_ref() {
        if k.limits != smartllm_config::Limits::default() {
            out.push((format!("key '{}'", k.name), k.limits));
        }
    }
    let app = format!("{}/{}", ctx.tenant, ctx.app);
    if let Some(l) = rt.config.keys.apps.get(&app) {
        out.push((format!("app '{app}'"), *l));
    }
    out
}
