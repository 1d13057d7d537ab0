//! A runtime snapshot: one validated [`Config`] plus everything derived from it
//! that requests need (provider keys, health-checked load-balanced pools per
//! model). Built by the fallible async [`Runtime::prepare`]; swapped in with
//! arc-swap; every request holds the snapshot it started with.

use crate::metrics;
use async_trait::async_trait;
use pingora_core::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, WrappedX509};
use pingora_http::RequestHeader;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, HealthRegistry, LoadBalancer};
use smartllm_config::{ApiKeySource, Config, HealthCheckKind, ProviderConfig, ProviderKind, Url};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A provider with its key resolved.
#[derive(Debug)]
pub struct ProviderRuntime {
    pub cfg: ProviderConfig,
    /// Where requests go (the configured URL, or the demo upstream).
    pub url: Url,
    /// `Ok(None)`: no key needed. `Err`: a key is configured but unavailable.
    pub key: Result<Option<String>, KeyError>,
    pub demo: bool,
    /// CAs from `tls_ca_file`, trusted instead of the system roots.
    pub ca: Option<Arc<CaType>>,
    /// Upstream connections are pooled per provider and trust settings:
    /// Pingora's reuse hash does not cover a per-peer CA, so a connection
    /// verified against one provider's CA must never serve another's.
    pub pool_key: u64,
}

impl ProviderRuntime {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }
}

#[derive(Debug)]
pub struct DeploymentRuntime {
    pub provider: Arc<ProviderRuntime>,
    pub upstream_model: String,
}

/// Which deployments live behind one backend address (usually one): each
/// one's index in its pool and its circuit breaker's id
/// ([`crate::routing::deployment_id`], made once here rather than formatted
/// on every request); and, in the same order, each one's provider (which
/// health check the address gets does not depend on indices, which a reload
/// may change while an older snapshot's backend is still being checked).
#[derive(Debug, Clone)]
pub struct BackendDeployments(pub Arc<Vec<(usize, Arc<str>)>>, pub Arc<Vec<Arc<str>>>);

impl BackendDeployments {
    pub fn providers(&self) -> impl Iterator<Item = &str> + '_ {
        self.1.iter().map(|p| &**p)
    }
}

pub struct ModelPool {
    pub model: String,
    /// The most tokens the model writes (`profile.max_output_tokens`): a
    /// larger limit asked for is lowered to it upstream, so a client asking
    /// for more (Claude Code's 32,000) gets the model's most, not a 400.
    pub max_output_tokens: Option<u64>,
    /// The model's context window (`profile.context_window`).
    pub context_window: u64,
    /// `structured_outputs` is among the model's listed capabilities: a
    /// chat `json_schema` goes to Anthropic as `output_config.format`.
    pub structured_outputs: bool,
    /// `system_messages` is among the model's listed capabilities: an
    /// Anthropic Messages request's `role: "system"` turns go to it as they
    /// are (else they join the system prompt).
    pub system_messages: bool,
    /// `reasoning` is listed: an Anthropic request's `thinking` goes to the
    /// model's OpenAI-compatible providers as `reasoning_effort`.
    pub reasoning: bool,
    /// Capabilities are listed and `reasoning` is not among them: a
    /// request's `reasoning_effort` (agents often send one) is
    /// left out for the model's OpenAI-compatible providers, which would
    /// answer 400 to it. (Listed with nothing: sent as given.)
    pub no_reasoning: bool,
    /// `thinking` is listed: an OpenAI request's `reasoning_effort` goes to
    /// the model's Anthropic providers as a thinking budget.
    pub thinking: bool,
    pub deployments: Vec<DeploymentRuntime>,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    pub health_interval: Duration,
    pub health_enabled: bool,
    rr: AtomicUsize,
    /// The model's health state, kept across reloads.
    health: Arc<ModelHealth>,
    /// The checks this snapshot's config asks for.
    checks: Arc<HealthDispatch>,
}

/// A model's health registry, one for the process's life: a reload's pool
/// joins it, so a deployment that failed its checks stays unhealthy across
/// the reload instead of starting healthy again (traffic to a dead host
/// until it fails its checks anew). Health is kept per address.
struct ModelHealth {
    registry: Arc<HealthRegistry>,
    /// The checks of the running snapshot (see [`ModelPool::activate_health`]).
    dispatch: Arc<arc_swap::ArcSwap<HealthDispatch>>,
}

/// Models' health registries by model name (bounded by the models ever configured).
static HEALTH: std::sync::LazyLock<arc_swap::ArcSwap<HashMap<String, Arc<ModelHealth>>>> =
    std::sync::LazyLock::new(Default::default);

/// The health registry of `model`, made with `checks` the first time.
fn model_health(model: &str, checks: &Arc<HealthDispatch>) -> Arc<ModelHealth> {
    if let Some(h) = HEALTH.load().get(model) {
        return h.clone();
    }
    let fresh = {
        let registry = HealthRegistry::with_equivalence(|b: &Backend| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.addr.hash(&mut h);
            h.finish()
        });
        let dispatch = Arc::new(arc_swap::ArcSwap::new(checks.clone()));
        registry.set_health_check(Box::new(SwappableChecks(dispatch.clone())));
        Arc::new(ModelHealth {
            registry: Arc::new(registry),
            dispatch,
        })
    };
    let mut out = fresh.clone();
    HEALTH.rcu(|m| {
        let mut m = HashMap::clone(m);
        out = m
            .entry(model.to_string())
            .or_insert_with(|| fresh.clone())
            .clone();
        m
    });
    out
}

/// The registry's check: the running snapshot's [`HealthDispatch`].
struct SwappableChecks(Arc<arc_swap::ArcSwap<HealthDispatch>>);

#[async_trait]
impl HealthCheck for SwappableChecks {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        let checks = self.0.load_full();
        checks.check(target).await
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let checks = self.0.load_full();
        checks.health_status_change(target, healthy).await
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.0.load().health_threshold(success)
    }
}

impl ModelPool {
    /// Checks run the way this snapshot's config says (called for the running
    /// snapshot before its checks run; a snapshot a reload rejected never is).
    pub fn activate_health(&self) {
        if !Arc::ptr_eq(&self.health.dispatch.load(), &self.checks) {
            self.health.dispatch.store(self.checks.clone());
        }
    }

    /// The deployments on `backend` (usually one; several when deployments
    /// share an address, e.g. two organisations' keys on one provider), each
    /// with its index in the pool and its circuit breaker's id. With
    /// `rotate`, starting at a position that moves on each call: round robin
    /// among them for the one call per attempt that picks; without, in order
    /// (for checks that look at all of them).
    pub fn deployments_on<'b>(
        &'b self,
        backend: &'b Backend,
        rotate: bool,
    ) -> impl Iterator<Item = (usize, &'b DeploymentRuntime, &'b str)> + 'b {
        let ids: &[(usize, Arc<str>)] = backend
            .ext
            .get::<BackendDeployments>()
            .map(|d| d.0.as_slice())
            .unwrap_or(&[]);
        let start = if rotate && ids.len() > 1 {
            self.rr.fetch_add(1, Ordering::Relaxed) % ids.len()
        } else {
            0
        };
        ids.iter()
            .cycle()
            .skip(start)
            .take(ids.len())
            .filter_map(|(i, id)| Some((*i, self.deployments.get(*i)?, &**id)))
    }

    /// Deployments over all backends (what a request may try in turn).
    pub fn deployment_slots(&self) -> usize {
        self.lb
            .backends()
            .get_backend()
            .iter()
            .map(|b| b.ext.get::<BackendDeployments>().map_or(0, |d| d.0.len()))
            .sum()
    }
}

pub struct Runtime {
    pub config: Arc<Config>,
    pub version: u64,
    pub loaded_at: Instant,
    pub providers: BTreeMap<String, Arc<ProviderRuntime>>,
    pub pools: HashMap<String, Arc<ModelPool>>,
    pub demo_mode: bool,
    /// Model names and route aliases, for error messages and `/v1/models`.
    pub known_models: Vec<String>,
    /// Compiled cache exclusion rules.
    pub cache_exclusions: Arc<smartllm_cache::Exclusions>,
    /// Virtual keys by the sha256 of the key.
    pub keys: HashMap<[u8; 32], Arc<smartllm_config::VirtualKey>>,
    /// The admin API's token, when one is configured.
    pub admin_token: Option<String>,
    /// Task classifier and learned routers.
    pub router: Arc<smartllm_router::RouterAssets>,
    /// The API listener's certificate (and client CAs), when `server.tls` is set.
    pub tls: Option<Arc<crate::tls::ListenerTls>>,
    /// The admin listener's, when `server.admin_tls` is set.
    pub admin_tls: Option<Arc<crate::tls::ListenerTls>>,
}

impl Runtime {
    pub fn pool(&self, model: &str) -> Option<&Arc<ModelPool>> {
        self.pools.get(model)
    }

    /// Build a snapshot: read provider keys, resolve deployment addresses, load
    /// the router's classifier (embedded with `embedder`; an unchanged examples
    /// file reuses `previous_router`) and learned routers.
    pub async fn prepare(
        config: Config,
        version: u64,
        embedder: Option<Arc<smartllm_embed::Embedder>>,
        previous_router: Option<Arc<smartllm_router::RouterAssets>>,
    ) -> Result<Runtime, PrepareError> {
        let config = Arc::new(config);
        // Demo mode: no provider that needs a key has one.
        let needs_key: Vec<_> = config
            .providers
            .values()
            .filter(|p| p.api_key != ApiKeySource::None)
            .collect();
        let keys: BTreeMap<String, Result<Option<String>, KeyError>> = config
            .providers
            .values()
            .map(|p| (p.name.clone(), read_key(&p.api_key)))
            .collect();
        let demo_mode = config.demo.auto
            && !needs_key.is_empty()
            && needs_key
                .iter()
                .all(|p| !matches!(keys.get(&p.name), Some(Ok(Some(_)))));

        let mut providers = BTreeMap::new();
        for p in config.providers.values() {
            let needs = p.api_key != ApiKeySource::None;
            let demo = demo_mode && needs;
            let key = if demo {
                Ok(None)
            } else {
                keys.get(&p.name).cloned().unwrap_or(Ok(None))
            };
            if let Err(e) = &key {
                tracing::warn!(provider = %p.name, "provider key unavailable: {e}; its models will answer 503");
            }
            let url = if demo {
                let mut u = config.demo.upstream.clone();
                // Anthropic's paths sit under the same /v1 prefix on mock-llm.
                if p.kind == ProviderKind::Anthropic && u.path.is_empty() {
                    u.path = "/v1".into();
                }
                u
            } else {
                p.base_url.clone()
            };
            let ca = match (&p.tls_ca_file, demo) {
                (Some(path), false) => {
                    Some(load_ca(path).map_err(|error| PrepareError::CaFile {
                        provider: p.name.clone(),
                        error,
                    })?)
                }
                _ => None,
            };
            let pool_key = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.name.hash(&mut h);
                url.authority().hash(&mut h);
                for c in ca.iter().flat_map(|c| c.iter()) {
                    c.borrow_raw_cert().hash(&mut h);
                }
                h.finish()
            };
            providers.insert(
                p.name.clone(),
                Arc::new(ProviderRuntime {
                    cfg: p.clone(),
                    url,
                    key,
                    demo,
                    ca,
                    pool_key,
                }),
            );
        }

        let mut pools = HashMap::new();
        for m in &config.models {
            let deployments: Vec<DeploymentRuntime> = m
                .deployments
                .iter()
                .map(|d| DeploymentRuntime {
                    provider: providers[&d.provider].clone(),
                    upstream_model: d.upstream_model.clone(),
                })
                .collect();
            let targets: Vec<Target> = m
                .deployments
                .iter()
                .enumerate()
                .map(|(i, d)| Target {
                    authority: providers[&d.provider].url.authority(),
                    weight: d.weight,
                    index: i,
                    provider: d.provider.clone(),
                    upstream_model: d.upstream_model.clone(),
                })
                .collect();
            let discovery = DeploymentDiscovery {
                model: m.name.clone(),
                targets,
            };
            let checks = Arc::new(HealthDispatch::new(&m.name, &deployments));
            let health_enabled = checks.enabled;
            let health_interval = checks.interval;
            // Unchecked, a model's addresses are healthy: a registry of its
            // own, so health an earlier config's checks found does not stay
            // (nothing would ever check it again).
            let health = model_health(&m.name, &checks);
            let backends = if health_enabled {
                Backends::new_with_health_registry(Box::new(discovery), health.registry.clone())
            } else {
                Backends::new(Box::new(discovery))
            };
            let lb = LoadBalancer::<RoundRobin>::from_backends(backends);
            lb.update()
                .await
                .map_err(|error| PrepareError::Deployments {
                    model: m.name.clone(),
                    error,
                })?;
            pools.insert(
                m.name.clone(),
                Arc::new(ModelPool {
                    model: m.name.clone(),
                    max_output_tokens: m.profile.max_output_tokens,
                    context_window: m.profile.context_window,
                    structured_outputs: m.profile.has("structured_outputs"),
                    system_messages: m.profile.has("system_messages"),
                    reasoning: m.profile.has("reasoning"),
                    no_reasoning: m.profile.capabilities.is_some() && !m.profile.has("reasoning"),
                    thinking: m.profile.has("thinking"),
                    deployments,
                    lb: Arc::new(lb),
                    health_interval,
                    health_enabled,
                    rr: AtomicUsize::new(0),
                    health,
                    checks,
                }),
            );
        }
        let mut known_models: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
        known_models.extend(config.routes.keys().cloned());
        let cache_exclusions = Arc::new(
            smartllm_cache::Exclusions::new(
                &config.cache.exclude_patterns,
                &config.cache.detectors,
            )
            .map_err(PrepareError::Exclusions)?,
        );
        let keys = config
            .keys
            .keys
            .iter()
            .flat_map(|k| {
                // During a rotation the key it replaces is the same key.
                let k = Arc::new(k.clone());
                std::iter::once(k.sha256)
                    .chain(k.previous_sha256)
                    .map(move |h| (h, k.clone()))
            })
            .collect();
        // Fail closed: a configured but unavailable admin token is an error.
        let admin_token = match &config.admin_token {
            ApiKeySource::None => None,
            src => Some(
                read_key(src)
                    .and_then(|k| k.ok_or(KeyError::Empty))
                    .map_err(PrepareError::AdminToken)?,
            ),
        };
        // Checked on the config that runs: `admin_listen` is restart-only, so
        // a reload that moves it to loopback in the file and drops the token
        // must not leave the listener that still runs beyond loopback open.
        let admin_listen = config.server.admin_listen;
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            return Err(PrepareError::AdminOpen(admin_listen));
        }
        let listener_tls = |listener, t: &Option<smartllm_config::TlsConfig>| {
            t.as_ref()
                .map(|t| crate::tls::ListenerTls::load(listener, t).map(Arc::new))
                .transpose()
                .map_err(PrepareError::Tls)
        };
        let tls = listener_tls(crate::tls::Listener::Api, &config.server.tls)?;
        let admin_tls = listener_tls(crate::tls::Listener::Admin, &config.server.admin_tls)?;
        let router_cfg = config.clone();
        let router = tokio::task::spawn_blocking(move || {
            let embed = |texts: Vec<String>| -> Result<_, smartllm_router::assets::EmbedFnError> {
                embedder
                    .as_ref()
                    .ok_or("no embedder")?
                    .task_vectors_blocking(texts)
                    .map_err(|e| format!("embedding classifier examples: {e}").into())
            };
            smartllm_router::RouterAssets::build(
                &router_cfg,
                Some(&embed),
                previous_router.as_deref(),
            )
        })
        .await
        .map_err(PrepareError::RouterPanicked)?
        .map_err(PrepareError::Router)?;
        Ok(Runtime {
            router: Arc::new(router),
            config,
            version,
            loaded_at: Instant::now(),
            providers,
            pools,
            demo_mode,
            known_models,
            cache_exclusions,
            keys,
            admin_token,
            tls,
            admin_tls,
        })
    }
}

/// Why a runtime snapshot cannot be built (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("providers.{provider}.tls_ca_file: {error}")]
    CaFile { provider: String, error: CaError },
    #[error("model {model}: resolving deployments: {error}")]
    Deployments {
        model: String,
        error: Box<pingora_error::Error>,
    },
    #[error("cache.exclude.patterns: {0}")]
    Exclusions(regex::Error),
    #[error("admin token ({setting}): {0}", setting = admin_token_setting(.0))]
    AdminToken(KeyError),
    #[error("the admin API listens on {0}, beyond loopback (a restart-only setting): set admin.token_env or admin.token_file so it keeps needing a token")]
    AdminOpen(std::net::SocketAddr),
    #[error("{0}")]
    Tls(crate::tls::ListenerTlsError),
    #[error("{0}")]
    Router(smartllm_router::assets::AssetError),
    #[error("loading the router panicked: {0}")]
    RouterPanicked(tokio::task::JoinError),
}

/// Why a CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not a PEM certificate bundle: {error}", path.display())]
    NotPem {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    Empty(PathBuf),
}

/// Why a configured key (provider or admin) is unavailable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("key file {} is empty", .0.display())]
    FileEmpty(PathBuf),
    #[error("cannot read key file {}: {error}", path.display())]
    FileUnreadable { path: PathBuf, error: String },
    #[error("empty")]
    Empty,
}

/// Read a PEM bundle of CA certificates.
fn load_ca(path: &std::path::Path) -> Result<Arc<CaType>, CaError> {
    let file = std::fs::File::open(path).map_err(|error| CaError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let ders = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CaError::NotPem {
            path: path.to_path_buf(),
            error,
        })?;
    if ders.is_empty() {
        return Err(CaError::Empty(path.to_path_buf()));
    }
    let certs: Vec<WrappedX509> = ders
        .into_iter()
        .map(|d| WrappedX509::new(d.as_ref().to_vec(), parse_x509))
        .collect();
    Ok(Arc::from(certs.into_boxed_slice()))
}

/// The providers whose key cannot be read, with why (for a refused reload).
pub(crate) fn unreadable_keys(config: &Config) -> String {
    let out: Vec<String> = config
        .providers
        .values()
        .filter_map(|p| match read_key(&p.api_key) {
            Err(e) => Some(format!("{}: {e}", p.name)),
            Ok(_) => None,
        })
        .collect();
    out.join("; ")
}

/// The `smartllm.yaml` setting an unreadable admin token came from.
fn admin_token_setting(e: &KeyError) -> &'static str {
    match e {
        KeyError::EnvUnset(_) => "admin.token_env in smartllm.yaml",
        _ => "admin.token_file in smartllm.yaml",
    }
}

/// Why `serve` (or a reload) would refuse `config`'s admin token: one is
/// configured and cannot be read here (`smartllm check --local` fails on
/// it as `serve` does). None: none configured, or it reads.
pub fn admin_token_problem(config: &Config) -> Option<String> {
    match read_key(&config.admin_token).and_then(|k| match (&config.admin_token, k) {
        (ApiKeySource::None, _) | (_, Some(_)) => Ok(()),
        (_, None) => Err(KeyError::Empty),
    }) {
        Ok(()) => None,
        Err(e) => Some(PrepareError::AdminToken(e).to_string()),
    }
}

fn read_key(src: &ApiKeySource) -> Result<Option<String>, KeyError> {
    match src {
        ApiKeySource::None => Ok(None),
        ApiKeySource::Env(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            _ => Err(KeyError::EnvUnset(var.clone())),
        },
        ApiKeySource::File(path) => match std::fs::read_to_string(path) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            Ok(_) => Err(KeyError::FileEmpty(path.clone())),
            Err(e) => Err(KeyError::FileUnreadable {
                path: path.clone(),
                error: e.to_string(),
            }),
        },
    }
}

/// Resolves each deployment's host (DNS re-resolution on every update) into
/// backends; deployments that share an address share one backend.
struct DeploymentDiscovery {
    model: String,
    targets: Vec<Target>,
}

/// Each upstream host's addresses as last resolved, and when, across
/// reloads: a failed lookup (a DNS hiccup) keeps them for up to
/// [`LAST_KNOWN_FOR`] after the last successful one, rather than emptying the
/// pool and dropping the deployments' circuit state with it; a host that is
/// gone for longer is gone. Keyed by `host:port` from the config: bounded by
/// the hosts ever configured.
type KnownAddrs = HashMap<String, (Vec<SocketAddr>, Instant)>;
static LAST_KNOWN: std::sync::LazyLock<arc_swap::ArcSwap<KnownAddrs>> =
    std::sync::LazyLock::new(Default::default);
const LAST_KNOWN_FOR: Duration = Duration::from_secs(3600);
/// How long resolving an upstream host (or a webhook's) may take.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

struct Target {
    /// host:port
    authority: String,
    weight: usize,
    /// The deployment's index in its pool.
    index: usize,
    provider: String,
    /// The model's name at the provider.
    upstream_model: String,
}

#[async_trait]
impl ServiceDiscovery for DeploymentDiscovery {
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        type OnAddr = (usize, Vec<(usize, Arc<str>)>, Vec<Arc<str>>);
        let mut by_addr: BTreeMap<SocketAddr, OnAddr> = BTreeMap::new();
        let mut resolved: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for t in &self.targets {
            let addrs = match resolved.get(&t.authority) {
                Some(a) => Ok(a.clone()),
                // A resolver that does not answer (glibc waits up to 30 s)
                // must not hold up the health tick: the last known
                // addresses stand in, as for a failed lookup.
                None => match tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host(t.authority.as_str()),
                )
                .await
                {
                    Ok(a) => a.map(|a| a.collect::<Vec<_>>()),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no DNS answer within {RESOLVE_TIMEOUT:?}"),
                    )),
                },
            };
            let addrs = match addrs {
                Ok(a) if !a.is_empty() => Ok(a),
                Ok(_) => Err("no address".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let addrs = match addrs {
                Ok(a) => {
                    resolved.insert(t.authority.clone(), a.clone());
                    Ok(a)
                }
                Err(e) => match LAST_KNOWN
                    .load()
                    .get(&t.authority)
                    .filter(|(_, at)| at.elapsed() < LAST_KNOWN_FOR)
                    .map(|(a, _)| a)
                {
                    Some(a) => {
                        tracing::warn!(target_host = %t.authority, error = %e, "cannot resolve upstream host; keeping its last known addresses");
                        resolved.insert(t.authority.clone(), a.clone());
                        Ok(a.clone())
                    }
                    None => Err(e),
                },
            };
            match addrs {
                Ok(addrs) => {
                    for a in addrs {
                        let e = by_addr.entry(a).or_insert((0, Vec::new(), Vec::new()));
                        e.0 += t.weight;
                        let mut id = crate::routing::deployment_id(
                            &self.model,
                            &t.provider,
                            &PSocketAddr::Inet(a),
                        );
                        // Two deployments of the model on one provider (other
                        // upstream models): each keeps its own circuit, named
                        // by its upstream model (and its place, only if that
                        // is the same too), so reordering renames nothing.
                        let same = |o: &&Target| o.index != t.index && o.provider == t.provider;
                        if self.targets.iter().any(|o| same(&o)) {
                            id.push('#');
                            id.push_str(&t.upstream_model);
                            if self
                                .targets
                                .iter()
                                .any(|o| same(&o) && o.upstream_model == t.upstream_model)
                            {
                                id.push_str(&format!("#{}", t.index));
                            }
                        }
                        e.1.push((t.index, id.into()));
                        e.2.push(t.provider.as_str().into());
                    }
                }
                Err(e) => {
                    tracing::warn!(target_host = %t.authority, error = %e, "cannot resolve upstream host; will retry")
                }
            }
        }
        if !resolved.is_empty() {
            let now = Instant::now();
            LAST_KNOWN.rcu(|known| {
                let mut known = HashMap::clone(known);
                for (host, addrs) in &resolved {
                    // Addresses kept after a failed lookup keep their age.
                    let fresh = known.get(host).is_none_or(|(a, _)| a != addrs);
                    if fresh || !matches!(known.get(host), Some((_, at)) if at.elapsed() < LAST_KNOWN_FOR) {
                        known.insert(host.clone(), (addrs.clone(), now));
                    }
                }
                known
            });
        }
        let backends = by_addr
            .into_iter()
            .map(|(addr, (weight, ids, providers))| {
                let mut b = Backend {
                    addr: PSocketAddr::Inet(addr),
                    weight,
                    ext: Default::default(),
                };
                b.ext
                    .insert(BackendDeployments(Arc::new(ids), Arc::new(providers)));
                b
            })
            .collect();
        Ok((backends, HashMap::new()))
    }
}

/// Health checks per backend, by the kind its provider configures.
struct HealthDispatch {
    model: String,
    /// Per deployment: the check to run (None = not checked).
    checks: Vec<Option<Box<dyn HealthCheck + Send + Sync>>>,
    /// Per deployment: its provider's name.
    providers: Vec<String>,
    enabled: bool,
    interval: Duration,
    failures: usize,
    successes: usize,
    /// The last failed check's error by address, for the transition's log
    /// line (Pingora's own is left out of the log: it dumps the whole peer).
    /// Held by the health-check task alone, never on a request's path.
    last_error: std::sync::Mutex<HashMap<String, String>>,
}

impl HealthDispatch {
    fn new(model: &str, deployments: &[DeploymentRuntime]) -> Self {
        let mut checks: Vec<Option<Box<dyn HealthCheck + Send + Sync>>> = Vec::new();
        let providers: Vec<String> = deployments
            .iter()
            .map(|d| d.provider.name().to_string())
            .collect();
        let mut interval = Duration::from_secs(3600);
        let (mut failures, mut successes) = (1, 1);
        for d in deployments {
            let p = &d.provider;
            let hc = &p.cfg.health_check;
            interval = interval.min(hc.interval);
            failures = failures.max(hc.failures);
            successes = successes.max(hc.successes);
            let check: Option<Box<dyn HealthCheck + Send + Sync>> = match hc.kind {
                HealthCheckKind::None => None,
                HealthCheckKind::Tcp => {
                    let mut c = if p.url.tls {
                        TcpHealthCheck::new_tls(&p.url.host)
                    } else {
                        TcpHealthCheck::new()
                    };
                    // The provider's own CA (`tls_ca_file`), as its requests
                    // use: without it a private CA's handshake always fails.
                    c.peer_template.options.ca = p.ca.clone();
                    c.peer_template.options.connection_timeout =
                        Some(p.cfg.connect_timeout.min(Duration::from_secs(5)));
                    Some(c)
                }
                HealthCheckKind::Http => {
                    let mut c = HttpHealthCheck::new(&p.url.host_header(), p.url.tls);
                    if p.url.tls {
                        c.peer_template.sni = p.url.host.clone();
                        c.peer_template.options.ca = p.ca.clone();
                    }
                    let path = if p.demo {
                        "/health".to_string()
                    } else {
                        hc.path.clone()
                    };
                    if let Some(req) = health_request(p, &path) {
                        c.req = req;
                    }
                    c.peer_template.options.connection_timeout =
                        Some(p.cfg.connect_timeout.min(Duration::from_secs(5)));
                    c.peer_template.options.read_timeout = Some(Duration::from_secs(5));
                    Some(Box::new(c))
                }
            };
            checks.push(check);
        }
        let enabled = checks.iter().any(Option::is_some);
        HealthDispatch {
            model: model.to_string(),
            checks,
            providers,
            enabled,
            interval,
            failures,
            successes,
            last_error: Default::default(),
        }
    }
}

#[async_trait]
impl HealthCheck for HealthDispatch {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        let Some(ids) = target.ext.get::<BackendDeployments>() else {
            return Ok(());
        };
        // The address is healthy when any deployment on it passes its
        // provider's check (as this snapshot configures it; a provider it
        // no longer has is not checked).
        let mut last = Ok(());
        for provider in ids.providers() {
            let check = self
                .providers
                .iter()
                .position(|p| p == provider)
                .and_then(|i| self.checks.get(i))
                .and_then(|c| c.as_ref());
            match check {
                None => return Ok(()),
                Some(c) => match c.check(target).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Err(e),
                },
            }
        }
        if let Err(e) = &last {
            // The error alone (its context, not the peer's whole options).
            let why = match &e.context {
                Some(c) => format!("{}: {c}", e.etype().as_str()),
                None => e.etype().as_str().to_string(),
            };
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(target.addr.to_string(), why);
        }
        last
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let addr = target.addr.to_string();
        if healthy {
            tracing::info!(model = %self.model, address = %addr, "upstream healthy again");
        } else {
            let error = self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&addr)
                .cloned()
                .unwrap_or_default();
            tracing::warn!(model = %self.model, address = %addr, %error, "upstream failed its health check");
        }
        metrics::upstream_healthy(&self.model, &addr, healthy);
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.successes
        } else {
            self.failures
        }
    }
}

/// The HTTP health check's request to provider `p`: its key, and what the
/// provider needs on every request (Anthropic answers 400 without its
/// version; Azure and others take headers of their own), or the check fails
/// on a healthy provider.
fn health_request(p: &ProviderRuntime, path: &str) -> Option<RequestHeader> {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).ok()?;
    let _ = req.append_header("Host", p.url.host_header());
    let _ = req.append_header(
        "User-Agent",
        concat!("smartllm/", env!("CARGO_PKG_VERSION")),
    );
    if let Ok(Some(key)) = &p.key {
        let _ = match p.cfg.kind {
            ProviderKind::OpenAi => req.append_header("Authorization", format!("Bearer {key}")),
            ProviderKind::Anthropic => req.append_header("x-api-key", key.as_str()),
        };
    }
    if p.cfg.kind == ProviderKind::Anthropic {
        let _ = req.append_header("anthropic-version", p.cfg.anthropic_version.as_str());
    }
    for (name, value) in &p.cfg.headers {
        let _ = req.insert_header(name.clone(), value.as_str());
    }
    Some(req)
}

/// The peer to connect to for `addr` of provider `p`.
pub fn peer_for(p: &ProviderRuntime, addr: &PSocketAddr) -> Option<HttpPeer> {
    let PSocketAddr::Inet(inet) = addr else {
        return None;
    };
    let sni = if p.url.tls {
        p.url.host.clone()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(*inet, p.url.tls, sni);
    peer.options.connection_timeout = Some(p.cfg.connect_timeout);
    peer.options.ca = p.ca.clone();
    peer.group_key = p.pool_key;
    peer.options.read_timeout = Some(p.cfg.idle_timeout);
    peer.options.write_timeout = Some(Duration::from_secs(30));
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    Some(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(yaml: &str) -> ProviderRuntime {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        std::fs::write(dir.path().join("providers.yaml"), yaml).unwrap();
        let c = smartllm_config::load_dir(dir.path()).unwrap();
        let cfg = c.providers["p"].clone();
        ProviderRuntime {
            url: cfg.base_url.clone(),
            cfg,
            key: Ok(Some("sk-test".into())),
            demo: false,
            ca: None,
            pool_key: 0,
        }
    }

    /// The HTTP health check asks as requests do: the key, Anthropic's
    /// version, the provider's own headers.
    #[test]
    fn the_health_check_carries_what_the_provider_needs() {
        let a = provider(
            "providers:\n  p:\n    kind: anthropic\n    base_url: https://api.anthropic.com\n    api_key_env: X\n",
        );
        let req = health_request(&a, "/v1/models").unwrap();
        let h = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(h("x-api-key").as_deref(), Some("sk-test"));
        assert_eq!(
            h("anthropic-version").as_deref(),
            Some(a.cfg.anthropic_version.as_str())
        );
        assert_eq!(h("host").as_deref(), Some("api.anthropic.com"));
        let o = provider(
            "providers:\n  p:\n    kind: openai\n    base_url: https://example.openai.azure.com/openai/v1\n    api_key_env: X\n    headers: { api-version: 2025-01-01 }\n",
        );
        let req = health_request(&o, "/openai/v1/models").unwrap();
        let h = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(h("authorization").as_deref(), Some("Bearer sk-test"));
        assert_eq!(h("api-version").as_deref(), Some("2025-01-01"));
        assert!(h("anthropic-version").is_none());
    }
}
