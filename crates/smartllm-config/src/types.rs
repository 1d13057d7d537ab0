//! The validated, resolved configuration: [`Config`] and the types of its
//! sections, with the few methods the gateway asks of them. Routing types
//! live in [`crate::routing`].

use crate::routing::{CircuitBreakerConfig, ClassifierConfig, ModelProfile, RouteConfig};
use crate::UrlError;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The validated, resolved configuration. Not `Deserialize`: it only comes from
/// [`load_dir`](crate::load_dir).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dir: PathBuf,
    /// sha256 over the files' contents: identifies what is running.
    pub digest: String,
    pub server: ServerConfig,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub embedder: EmbedderConfig,
    pub logging: LoggingConfig,
    pub demo: DemoConfig,
    pub reload: ReloadConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub routes: BTreeMap<String, RouteConfig>,
    pub classifier: ClassifierConfig,
    pub cache: CacheConfig,
    pub keys: KeysConfig,
    pub ledger: LedgerConfig,
    pub fleet: FleetConfig,
    pub metrics: MetricsConfig,
    pub tracing: TracingConfig,
    /// Where the admin API token comes from (None: no token required).
    pub admin_token: ApiKeySource,
    /// Each model's full price (models.yaml `pricing`, else the catalog's).
    pub prices: BTreeMap<String, ModelPrice>,
}

/// OpenTelemetry spans (`tracing:` in smartllm.yaml). Restart-only.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The full OTLP/HTTP traces URL (`http://host:4318/v1/traces`); None: off.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled; a client's `traceparent` decides for its own.
    pub sample_ratio: f64,
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "smartllm".into(),
        }
    }
}

/// What to do when the fleet's Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetOnError {
    /// Enforce limits and budgets per process until Redis is back.
    Local,
    /// Refuse requests that have limits or budgets (503).
    Reject,
}

/// Limits and budgets shared by several gateways through Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// None: every gateway enforces its own limits and budgets.
    pub redis: Option<String>,
    /// CA certificates (PEM) for a `rediss://` server; None: the public
    /// roots (Mozilla's, built in).
    pub tls_ca_file: Option<PathBuf>,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: FleetOnError,
    /// Cache inserts, purges and version changes go to every gateway
    /// through a Redis stream; lookups stay in process.
    pub share_cache: bool,
    /// Entries the stream keeps (older ones are trimmed: a gateway further
    /// behind catches up from the snapshot keys instead).
    pub cache_stream_len: u64,
    /// Ledger counters are also added up in Redis for `/admin/costs?scope=fleet`.
    pub share_costs: bool,
}

/// The restart-only change of `fleet.redis` or `key_prefix` for the shared
/// cache and costs (limits and budgets move at once).
pub const FLEET_SYNC_MOVED: &str = "fleet.redis or key_prefix, for the shared cache and costs";

impl FleetConfig {
    /// Where `redis` points, for logs: the URL without its user and
    /// password, nor its query (`redis+unix://` URLs carry them there:
    /// `?user=..&pass=..`); "-" when there is none.
    pub fn redis_addr(&self) -> String {
        let Some(url) = &self.redis else {
            return "-".into();
        };
        let url = url.split(['?', '#']).next().unwrap_or_default();
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{rest}")
            }
            None => url.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreConfig {
    /// Bytes for RocksDB's shared block cache, memtables included.
    pub memory_budget: u64,
    /// Whether the gateway keeps Responses API conversations
    /// (`previous_response_id`, `GET /v1/responses/{id}`) for providers
    /// that do not keep them.
    pub responses: bool,
    /// How long a kept conversation lives (OpenAI keeps them 30 days).
    pub responses_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    pub flush_interval: Duration,
    /// Requests to a model with no price (no `pricing`, no catalog match).
    pub unpriced: UnpricedPolicy,
}

/// `ledger.unpriced`: what a request to a model without any price gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnpricedPolicy {
    /// Served, recorded at $0 and counted in `smartllm_unpriced_requests_total`.
    #[default]
    Allow,
    /// Refused (400 `model_unpriced`) before any upstream call.
    Reject,
}

/// Where a model's price comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PriceSource {
    /// Neither `pricing` in models.yaml nor a catalog entry: it costs $0.
    #[default]
    Unpriced,
    /// `pricing` in models.yaml.
    Configured,
    /// The built-in catalog's entry of this name.
    Catalog(String),
}

/// Prices above a prompt size (USD per 1M tokens): every token of a request
/// whose prompt exceeds `above_tokens` is billed at these.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct LongContextPrice {
    pub above_tokens: u64,
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    pub cache_read_per_1m: f64,
    pub cache_write_5m_per_1m: f64,
    pub cache_write_1h_per_1m: f64,
}

/// Everything a model's requests are billed by (USD per 1M tokens, and per
/// request): models.yaml `pricing`, or else the catalog.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelPrice {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cache_read_per_1m: f64,
    /// Prompt tokens written to the prompt cache for 5 minutes (Anthropic's default).
    pub cache_write_5m_per_1m: f64,
    /// Prompt tokens written to the prompt cache for 1 hour.
    pub cache_write_1h_per_1m: f64,
    /// Reasoning tokens when priced apart from other output (they are part of
    /// the output tokens; None: at the output price).
    pub reasoning_per_1m: Option<f64>,
    /// Audio prompt tokens (part of the input; None: at the input price).
    pub audio_input_per_1m: Option<f64>,
    /// Audio answer tokens (part of the output; None: at the output price).
    pub audio_output_per_1m: Option<f64>,
    pub per_request: f64,
    /// USD per 1,000 web searches a provider's server-side tool runs
    /// (Anthropic's web search, OpenAI's web search tool: 10 unless set).
    pub web_search_per_1k: f64,
    pub long_context: Option<LongContextPrice>,
    /// How the provider's processing tiers scale the token prices.
    pub service_tiers: ServiceTiers,
    pub source: PriceSource,
}

/// Anthropic's and OpenAI's list price of their web search tools, USD per
/// 1,000 searches.
pub const DEFAULT_WEB_SEARCH_PER_1K: f64 = 10.0;

/// Multipliers of every token price (not the per-request price) for a
/// request the provider served on a processing tier other than its
/// standard one (`models.yaml` `service_tiers`). Defaults, for models
/// OpenAI serves (its API, Azure, or its catalog prices): its flex tier is
/// billed at half the list price on every model that offers it; its
/// priority prices run 1.7x to 2x the list price, so 1.75x unless set.
/// Other providers' tiers default to 1 (their list price).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceTiers {
    pub flex: f64,
    pub priority: f64,
}

impl Default for ServiceTiers {
    fn default() -> Self {
        ServiceTiers {
            flex: 0.5,
            priority: 1.75,
        }
    }
}

impl ModelPrice {
    pub fn is_priced(&self) -> bool {
        self.source != PriceSource::Unpriced
    }
}

/// USD per million tokens, and per request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pricing {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    pub cached_input_per_1m: f64,
    pub per_request: f64,
}

/// Per-minute limits (None = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualKey {
    pub name: String,
    pub sha256: [u8; 32],
    /// The key this one replaces, accepted as this one until a rotation
    /// ends (`smartllm keys rotate NAME --finish`).
    pub previous_sha256: Option<[u8; 32]>,
    pub tenant: String,
    pub app: String,
    pub models: Vec<String>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Tenant,
    App,
    Key,
}

impl BudgetScope {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::Tenant => "tenant",
            BudgetScope::App => "app",
            BudgetScope::Key => "key",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OnExceed {
    Reject,
    /// Serve with this model or route instead.
    Degrade(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub scope: BudgetScope,
    pub name: String,
    pub daily_usd: Option<f64>,
    pub monthly_usd: Option<f64>,
    /// The most one request may cost (its max_tokens is capped to fit).
    pub max_request_usd: Option<f64>,
    pub alert_at: Vec<f64>,
    pub on_exceed: OnExceed,
    pub webhook: Option<Url>,
}

impl Budget {
    /// `tenant:acme`, `app:acme/web`, `key:ci`
    pub fn id(&self) -> String {
        format!("{}:{}", self.scope.as_str(), self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeysConfig {
    pub require_key: bool,
    /// `require_key` was written in `keys.yaml` (not inferred from a key list).
    pub require_key_explicit: bool,
    pub keys: Vec<VirtualKey>,
    /// Limits per `tenant/app`.
    pub apps: BTreeMap<String, Limits>,
    pub budgets: Vec<Budget>,
}

impl KeysConfig {
    /// Budgets and app limits that name no tenant, app or key of the listed
    /// keys (a typo: "batch-jb"), which would apply to nobody, as warnings
    /// naming the entry. None while no key is listed (a fresh install's
    /// budgets wait for their keys), and an open gateway's own callers
    /// (`anonymous`, `key:...`) count as named.
    pub fn unmatched(&self) -> Vec<String> {
        if self.keys.is_empty() {
            return Vec::new();
        }
        let open =
            |name: &str| !self.require_key && (name == "anonymous" || name.starts_with("key:"));
        let known = |scope: BudgetScope, name: &str| {
            let tenant = match scope {
                BudgetScope::App => name.split_once('/').map_or(name, |(t, _)| t),
                _ => name,
            };
            open(tenant)
                || self.keys.iter().any(|k| match scope {
                    BudgetScope::Tenant => k.tenant == name,
                    BudgetScope::App => {
                        name.split_once('/') == Some((k.tenant.as_str(), k.app.as_str()))
                    }
                    BudgetScope::Key => k.name == name,
                })
        };
        let what = |scope: BudgetScope| match scope {
            BudgetScope::Tenant => "tenant",
            BudgetScope::App => "tenant/app",
            BudgetScope::Key => "key name",
        };
        let mut out = Vec::new();
        for (i, b) in self.budgets.iter().enumerate() {
            if !known(b.scope, &b.name) {
                out.push(format!(
                    "keys.yaml budgets[{i}].name: {:?} is no {} of a listed key, so this budget applies to nobody",
                    b.name,
                    what(b.scope)
                ));
            }
        }
        // A degrade budget whose target a key in its scope may not use
        // refuses that key's requests instead (the budget never opens a
        // model the key's `models` leaves out).
        for (i, b) in self.budgets.iter().enumerate() {
            let OnExceed::Degrade(target) = &b.on_exceed else {
                continue;
            };
            for k in &self.keys {
                let in_scope = match b.scope {
                    BudgetScope::Tenant => k.tenant == b.name,
                    BudgetScope::App => {
                        b.name.split_once('/') == Some((k.tenant.as_str(), k.app.as_str()))
                    }
                    BudgetScope::Key => k.name == b.name,
                };
                if in_scope && !k.models.is_empty() && !k.models.contains(target) {
                    out.push(format!(
                        "keys.yaml budgets[{i}].degrade_to: key {:?} may not use {target:?} (not in its models), so once this budget is used up its requests are refused, not degraded",
                        k.name
                    ));
                }
            }
        }
        for name in self.apps.keys() {
            if !known(BudgetScope::App, name) {
                out.push(format!(
                    "keys.yaml apps.{name}: no listed key has this tenant/app, so these limits apply to nobody"
                ));
            }
        }
        out
    }
}

/// Cache behaviour for one route alias or model (or the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    pub enabled: bool,
    pub semantic: bool,
    pub similarity_threshold: f32,
    pub ttl: Duration,
    pub version: u32,
    pub max_temperature: f64,
    /// The verifier's pass score when it is on (`cache.verifier`): a
    /// semantic candidate at or above `similarity_threshold` that the guard
    /// lets through is served only if the verifier scores the pair at or
    /// above it. `None`: cosine and guard decide alone.
    pub verifier: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    Email,
    Phone,
    Card,
    ApiKey,
    /// A US Social Security number (3-2-4 digits, the ranges never issued left out).
    Ssn,
    /// An IBAN whose check digits hold (mod 97).
    Iban,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Global switch: off means no lookups and no inserts anywhere.
    pub enabled: bool,
    pub defaults: CachePolicy,
    pub routes: BTreeMap<String, CachePolicy>,
    pub l1_entries: usize,
    pub top_k: usize,
    pub max_pending_inserts: usize,
    pub ivf_threshold: usize,
    /// Vectors from which an IVF build encodes with product quantisation.
    pub pq_threshold: usize,
    /// Seals new entries (and opens them).
    pub encryption_key_file: Option<PathBuf>,
    /// Open entries sealed before a key rotation; never seal. Empty unless
    /// `encryption_key_file` is set.
    pub encryption_old_key_files: Vec<PathBuf>,
    /// Validated regular expressions.
    pub exclude_patterns: Vec<String>,
    pub detectors: Vec<Detector>,
    /// The exclusions read answers too (`cache.exclude.answers`).
    pub exclude_answers: bool,
    /// Who shares cached answers: a tenant's keys and apps (the default), or
    /// only the requests of one app, or of one key.
    pub isolation: CacheIsolation,
}

/// `cache.isolation`: the scope within which requests share answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheIsolation {
    #[default]
    Tenant,
    App,
    Key,
}

impl CacheConfig {
    /// The policy of a request: its route alias if it has one, else its model.
    pub fn policy(&self, route: Option<&str>, model: &str) -> &CachePolicy {
        route
            .and_then(|r| self.routes.get(r))
            .or_else(|| self.routes.get(model))
            .unwrap_or(&self.defaults)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub max_body_bytes: u64,
    pub max_header_bytes: u64,
    pub client_body_timeout: Duration,
    pub client_header_timeout: Duration,
    pub client_body_deadline: Duration,
    pub keepalive_timeout: Duration,
    /// Longest wait for a client to take the next part of an answer.
    pub client_write_timeout: Duration,
    pub http1_pipelining: bool,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub upstream_attempts: usize,
    pub max_in_flight: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    /// After SIGTERM: `/readyz` says 503 (load balancers take the instance
    /// out) while requests are still served, for this long; then the drain
    /// (new requests 503, in-flight ones finish). Read at the SIGTERM: a
    /// reload applies.
    pub drain_delay: Duration,
    /// TLS on the API listener; `None` = plaintext. Turning it on or off
    /// needs a restart; new files (or new contents) reload live.
    pub tls: Option<TlsConfig>,
    /// Cleartext HTTP/2 with prior knowledge on a plaintext API listener
    /// (restart-only).
    pub h2c: bool,
    /// TLS on the admin listener, as `tls` is on the API listener.
    pub admin_tls: Option<TlsConfig>,
}

/// `server.tls`: where the listener's certificate, key and client CAs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates signed by these CAs are required.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedderConfig {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub onnxruntime: PathBuf,
    /// Worker sessions; 0: by the device the embedder gets (2 on a GPU, the
    /// CPU count on the CPU, a CUDA setting that fell back included).
    pub threads: usize,
    pub max_seq_len: usize,
    pub device: Device,
    pub queue_depth: usize,
    pub max_queue_wait: Duration,
    /// Recent embeddings kept by text, so a text seen again skips the model.
    pub cache_entries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// What `/metrics` may say about callers (`metrics:` in smartllm.yaml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Distinct values per label kind (tenant, app, key); beyond: `__overflow__`.
    pub max_label_values: usize,
    /// Tenant, app and key names in labels: as they are, or hashed.
    pub label_names: LabelNames,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_label_values: 1000,
            label_names: LabelNames::Plain,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelNames {
    Plain,
    /// The first 12 hex digits of the name's sha256.
    Hashed,
}

impl LabelNames {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelNames::Plain => "plain",
            LabelNames::Hashed => "hashed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    pub level: String,
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    pub auto: bool,
    pub upstream: Url,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReloadConfig {
    pub watch: bool,
    pub debounce: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Any OpenAI-compatible API (OpenAI, Azure-style gateways, vLLM, mock-llm, ...).
    OpenAi,
    /// Anthropic's Messages API, translated to and from OpenAI's shapes.
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// What an OpenAI-compatible provider calls the answer's token limit.
/// OpenAI itself deprecated `max_tokens` and its reasoning models refuse
/// it; many compatible servers know only `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLimitField {
    MaxTokens,
    MaxCompletionTokens,
}

impl TokenLimitField {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenLimitField::MaxTokens => "max_tokens",
            TokenLimitField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiKeySource {
    None,
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (`/v1`), may be empty.
    pub path: String,
    /// The path and query string exactly as written (`/hooks/abc/`,
    /// `/v1/spaces/X/messages?key=K&token=T`), may be empty: what a budget
    /// webhook is POSTed to, where a trailing slash can matter. Only
    /// [`Url::parse_webhook`] admits a query string.
    pub target: String,
}

impl Url {
    /// A base URL (a provider's, the OTLP endpoint): its path is a prefix
    /// that request paths are appended to, so a query string is refused.
    pub fn parse(s: &str) -> Result<Url, UrlError> {
        Url::parse_as(s, false)
    }

    /// A budget webhook's URL: as [`Url::parse`], but a query string is
    /// admitted (Google Chat's `?key=...&token=...` authenticates the
    /// sender) and sent, with the path as written, as [`Url::target`].
    pub fn parse_webhook(s: &str) -> Result<Url, UrlError> {
        Url::parse_as(s, true)
    }

    fn parse_as(s: &str, query: bool) -> Result<Url, UrlError> {
        let url = || s.to_string();
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(UrlError::Scheme(url()));
        };
        // The authority ends at the path, or at a query or fragment that
        // follows it directly (`https://host?key=k`).
        let (authority, target) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(UrlError::NoHost(url()));
        }
        if authority.contains('@') {
            return Err(UrlError::Credentials(url()));
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            // [v6]:port
            let end = inner.find(']').ok_or_else(|| UrlError::Ipv6Host(url()))?;
            let host = &inner[..end];
            let port = match inner[end + 1..].strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| UrlError::Port {
                    url: url(),
                    port: p.to_string(),
                })?,
                None => default_port(tls),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| UrlError::Port {
                        url: url(),
                        port: p.to_string(),
                    })?,
                ),
                None => (authority.to_string(), default_port(tls)),
            }
        };
        // A fragment is never sent in HTTP, so one would be dropped unseen.
        if target.contains('#') || (!query && target.contains('?')) {
            return Err(UrlError::QueryOrFragment(url()));
        }
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        Ok(Url {
            tls,
            host,
            port,
            path: path.trim_end_matches('/').to_string(),
            target: target.to_string(),
        })
    }

    /// `host:port` suitable for DNS resolution.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The Host header value (port omitted when it is the scheme's default).
    pub fn host_header(&self) -> String {
        if self.port == default_port(self.tls) {
            self.host.clone()
        } else {
            self.authority()
        }
    }
}

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheckKind {
    Tcp,
    Http,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub path: String,
    pub interval: Duration,
    pub failures: usize,
    pub successes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: Url,
    pub api_key: ApiKeySource,
    pub headers: Vec<(String, String)>,
    pub anthropic_version: String,
    /// Anthropic Messages requests with thinking (asked for, or blocks in
    /// the history) reach this OpenAI-compatible provider without it, rather
    /// than being refused with a 400.
    pub drop_thinking: bool,
    /// Responses requests with built-in tools (`web_search`, `file_search`,
    /// `code_interpreter`, `image_generation`, `mcp`: tools the provider
    /// runs) reach this provider, which does not speak Responses, without
    /// them (`x-smartllm-dropped-tools` says which), rather than being
    /// refused with a 400.
    pub drop_builtin_tools: bool,
    /// An OpenAI-kind provider that speaks the Responses API: `/v1/responses`
    /// requests pass through to it (it keeps `previous_response_id` state).
    pub responses: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub stream_usage: bool,
    /// The field chat requests sent here carry the answer's token limit in
    /// (the client's or the translation's is renamed to it); None: as the
    /// client named it (translations write `max_tokens`).
    pub max_tokens_field: Option<TokenLimitField>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub health_check: HealthCheckConfig,
    pub circuit_breaker: CircuitBreakerConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub owned_by: String,
    pub deployments: Vec<DeploymentConfig>,
    pub pricing: Pricing,
    pub profile: ModelProfile,
    /// What the model does (chat, embedding, ...): suggestions and routing
    /// only put a request on a model of its kind.
    pub mode: ModelMode,
    /// `mode` was written in models.yaml (not guessed from the names).
    pub mode_explicit: bool,
}

impl ModelConfig {
    /// Whether a request that needs a `want` model (chat, or embedding for
    /// `/v1/embeddings`) may go to this one by name. A mode written in
    /// models.yaml is held to; a guessed one only when it is embedding (a
    /// name with "embed" in it is no chat model), since many embedding
    /// models (`bge-m3`, `e5-large`) and some chat models have names the
    /// guess misreads.
    pub fn serves(&self, want: ModelMode) -> bool {
        if self.mode_explicit {
            self.mode == want
        } else {
            self.mode != ModelMode::Embedding || want == ModelMode::Embedding
        }
    }
}

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelMode {
    /// Chat completions (and text completions).
    #[default]
    Chat,
    Embedding,
    Image,
    Audio,
    Rerank,
}

impl ModelMode {
    pub fn parse(s: &str) -> Option<ModelMode> {
        Some(match s {
            "chat" | "completion" | "responses" => ModelMode::Chat,
            "embedding" => ModelMode::Embedding,
            "image" | "image_generation" => ModelMode::Image,
            "audio" | "audio_transcription" | "audio_speech" => ModelMode::Audio,
            "rerank" => ModelMode::Rerank,
            _ => return None,
        })
    }

    /// The mode a model's names suggest (its own name and its deployments'
    /// upstream names): `text-embedding-3-small` is an embedding model,
    /// `dall-e-3` an image model, `whisper-1` an audio one.
    pub fn infer<'a>(names: impl IntoIterator<Item = &'a str>) -> ModelMode {
        for n in names {
            let n = n.to_ascii_lowercase();
            if n.contains("embed") {
                return ModelMode::Embedding;
            }
            if n.contains("rerank") {
                return ModelMode::Rerank;
            }
            if [
                "dall-e",
                "gpt-image",
                "imagen",
                "stable-diffusion",
                "sdxl",
                "flux",
            ]
            .iter()
            .any(|k| n.contains(k))
            {
                return ModelMode::Image;
            }
            if ["whisper", "tts", "transcribe"]
                .iter()
                .any(|k| n.contains(k))
            {
                return ModelMode::Audio;
            }
        }
        ModelMode::Chat
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelMode::Chat => "chat",
            ModelMode::Embedding => "embedding",
            ModelMode::Image => "image",
            ModelMode::Audio => "audio",
            ModelMode::Rerank => "rerank",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentConfig {
    pub provider: String,
    pub upstream_model: String,
    pub weight: usize,
}

/// An upstream model name of OpenAI's reasoning models: the o-series (`o1`,
/// `o3-2025-04-16`, `o4-mini`) and GPT-5 (`gpt-5`, `gpt-5.1`, `gpt-5-mini`)
/// but its chat models (`gpt-5-chat-latest`); a provider prefix
/// (`openai/o3`) is skipped. They refuse sampling settings (`temperature`,
/// `top_p`, penalties) and cannot give stop sequences, log-probabilities or
/// `logit_bias`.
pub fn openai_reasoning_model(upstream: &str) -> bool {
    let n = upstream
        .rsplit('/')
        .next()
        .unwrap_or(upstream)
        .to_ascii_lowercase();
    // A fine-tune (`ft:o4-mini-2025-04-16:org::id`) is its base model's
    // kind; a variant suffix (`o3:online`) changes nothing.
    let n = n.strip_prefix("ft:").unwrap_or(&n);
    let n = n.split(':').next().unwrap_or(n);
    if n.contains("-chat") {
        return false;
    }
    n.starts_with("gpt-5")
        || ["o1", "o3", "o4"].iter().any(|p| {
            n.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
}

impl Config {
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// No silent $0: each model with neither `pricing` nor a catalog entry
    /// for its upstream names, said at `check`, at the start and at every
    /// reload.
    pub fn unpriced_warnings(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| !self.price(&m.name).is_some_and(|p| p.is_priced()))
            .map(|m| {
                let upstream: Vec<&str> = m
                    .deployments
                    .iter()
                    .map(|d| d.upstream_model.as_str())
                    .collect();
                format!(
                    "model {} has no price: no pricing in models.yaml and no price catalog entry for {}; its requests {} (set pricing, or ledger.unpriced)",
                    m.name,
                    upstream.join(", "),
                    match self.ledger.unpriced {
                        UnpricedPolicy::Allow => "are recorded at $0",
                        UnpricedPolicy::Reject => "are refused (ledger.unpriced: reject)",
                    }
                )
            })
            .collect()
    }

    /// Budgets whose day allows more than their month (`daily_usd: 1`,
    /// `monthly_usd: 0.5`): the month binds first, and the daily limit
    /// never does. Said with the unpriced models' warnings.
    pub fn budget_warnings(&self) -> Vec<String> {
        self.keys
            .budgets
            .iter()
            .filter_map(|b| {
                let (d, m) = (b.daily_usd?, b.monthly_usd?);
                (d > m).then(|| {
                    format!(
                        "budget {}: daily_usd ${d} is above monthly_usd ${m}, so the daily limit never binds (the month's runs out first)",
                        b.id()
                    )
                })
            })
            .collect()
    }

    /// Models that look like OpenAI reasoning models (an upstream name of
    /// the o-series or GPT-5) and list capabilities without `reasoning`:
    /// their requests' `reasoning_effort` is left out and their sampling
    /// settings sent, which such a model ignores or refuses. Said with the
    /// unpriced models' warnings.
    pub fn capability_warnings(&self) -> Vec<String> {
        // (o1-mini and o1-preview take no `reasoning_effort`.)
        let reasoning_name = |n: &str| {
            let base = n.rsplit('/').next().unwrap_or(n).to_ascii_lowercase();
            openai_reasoning_model(n)
                && !base.starts_with("o1-mini")
                && !base.starts_with("o1-preview")
        };
        self.models
            .iter()
            .filter(|m| m.profile.capabilities.is_some() && !m.profile.has("reasoning"))
            .filter_map(|m| {
                let d = m
                    .deployments
                    .iter()
                    .find(|d| reasoning_name(&d.upstream_model))?;
                Some(format!(
                    "model {} (upstream {}) lists capabilities without `reasoning`: its requests' reasoning_effort is left out and their temperature and top_p sent, which OpenAI's reasoning models refuse; add `reasoning` to its capabilities if it is one",
                    m.name, d.upstream_model
                ))
            })
            .collect()
    }

    /// A configured model's full price (an unpriced model has a zero price).
    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        self.prices.get(model)
    }

    /// Resolve a requested model name: a configured model, a route alias,
    /// or the alias with the most specific `match` pattern the name fits
    /// (most literal characters; equally specific ones: the first alias by
    /// name).
    pub fn resolve_model(&self, requested: &str) -> Option<(&ModelConfig, Option<&RouteConfig>)> {
        if let Some(m) = self.model(requested) {
            return Some((m, None));
        }
        let route = match self.routes.get(requested) {
            Some(r) => r,
            None => self.route_matching(requested)?,
        };
        Some((self.model(&route.model)?, Some(route)))
    }

    /// The alias whose `match` patterns fit `requested` most specifically.
    pub fn route_matching(&self, requested: &str) -> Option<&RouteConfig> {
        let mut best: Option<(usize, &RouteConfig)> = None;
        for r in self.routes.values() {
            if let Some(n) = r.matches(requested) {
                if best.is_none_or(|(b, _)| n > b) {
                    best = Some((n, r));
                }
            }
        }
        best.map(|(_, r)| r)
    }

    /// The sections of the config that differ in `new` (`models`, `keys`,
    /// `fleet`, ...), for the line a reload logs: what changed, not only
    /// that something did.
    pub fn changed_sections(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |name: &'static str, differs: bool| {
            if differs {
                out.push(name);
            }
        };
        check("server", self.server != new.server);
        check("data_dir", self.data_dir != new.data_dir);
        check("store", self.store != new.store);
        check("embedder", self.embedder != new.embedder);
        check("logging", self.logging != new.logging);
        check("demo", self.demo != new.demo);
        check("reload", self.reload != new.reload);
        check("providers", self.providers != new.providers);
        check(
            "models",
            self.models != new.models || self.prices != new.prices,
        );
        check("routes", self.routes != new.routes);
        check("classifier", self.classifier != new.classifier);
        check("cache", self.cache != new.cache);
        check("keys", self.keys != new.keys);
        check("ledger", self.ledger != new.ledger);
        check("fleet", self.fleet != new.fleet);
        check("metrics", self.metrics != new.metrics);
        check("tracing", self.tracing != new.tracing);
        check("admin", self.admin_token != new.admin_token);
        out
    }

    /// Settings that only take effect at start. Returns a description of each
    /// one that differs, so a reload can say that it needs a restart.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {a} -> {b}"));
            }
        };
        check(
            "server.listen",
            self.server.listen.to_string(),
            new.server.listen.to_string(),
        );
        check(
            "server.admin_listen",
            self.server.admin_listen.to_string(),
            new.server.admin_listen.to_string(),
        );
        check(
            "server.threads",
            self.server.threads.to_string(),
            new.server.threads.to_string(),
        );
        check(
            "server.grace_period",
            format!("{:?}", self.server.grace_period),
            format!("{:?}", new.server.grace_period),
        );
        check(
            "server.graceful_shutdown_timeout",
            format!("{:?}", self.server.graceful_shutdown_timeout),
            format!("{:?}", new.server.graceful_shutdown_timeout),
        );
        let on = |t: &Option<TlsConfig>| if t.is_some() { "on" } else { "off" }.to_string();
        check("server.tls", on(&self.server.tls), on(&new.server.tls));
        check(
            "server.admin_tls",
            on(&self.server.admin_tls),
            on(&new.server.admin_tls),
        );
        check(
            "server.h2c",
            self.server.h2c.to_string(),
            new.server.h2c.to_string(),
        );
        check(
            "data_dir",
            self.data_dir.display().to_string(),
            new.data_dir.display().to_string(),
        );
        check(
            "cache.l1_entries",
            self.cache.l1_entries.to_string(),
            new.cache.l1_entries.to_string(),
        );
        check(
            "fleet.share_cache",
            self.fleet.share_cache.to_string(),
            new.fleet.share_cache.to_string(),
        );
        check(
            "fleet.share_costs",
            self.fleet.share_costs.to_string(),
            new.fleet.share_costs.to_string(),
        );
        check(
            "fleet.cache_stream_len",
            self.fleet.cache_stream_len.to_string(),
            new.fleet.cache_stream_len.to_string(),
        );
        if (self.fleet.share_cache || self.fleet.share_costs)
            && (self.fleet.redis != new.fleet.redis
                || self.fleet.key_prefix != new.fleet.key_prefix)
        {
            // Limits and budgets move to the new Redis at once; the shared
            // cache and cost view stay on the one they started with. (The
            // URL may hold a password: it is not repeated here.)
            check(
                FLEET_SYNC_MOVED,
                "the old Redis".into(),
                "the new one".into(),
            );
        }
        check(
            "ledger.flush_interval",
            format!("{:?}", self.ledger.flush_interval),
            format!("{:?}", new.ledger.flush_interval),
        );
        check(
            "store.memory_budget",
            self.store.memory_budget.to_string(),
            new.store.memory_budget.to_string(),
        );
        check(
            "store.responses",
            self.store.responses.to_string(),
            new.store.responses.to_string(),
        );
        check(
            "store.responses_ttl",
            format!("{:?}", self.store.responses_ttl),
            format!("{:?}", new.store.responses_ttl),
        );
        // Key by key, as written in smartllm.yaml (not the whole struct).
        let (e, f) = (&self.embedder, &new.embedder);
        let path = |p: &std::path::Path| p.display().to_string();
        check("embedder.model", path(&e.model), path(&f.model));
        check("embedder.tokenizer", path(&e.tokenizer), path(&f.tokenizer));
        check(
            "embedder.onnxruntime",
            path(&e.onnxruntime),
            path(&f.onnxruntime),
        );
        check(
            "embedder.threads",
            e.threads.to_string(),
            f.threads.to_string(),
        );
        check(
            "embedder.max_seq_len",
            e.max_seq_len.to_string(),
            f.max_seq_len.to_string(),
        );
        let device = |d: &Device| format!("{d:?}").to_lowercase();
        check("embedder.device", device(&e.device), device(&f.device));
        check(
            "embedder.queue_depth",
            e.queue_depth.to_string(),
            f.queue_depth.to_string(),
        );
        check(
            "embedder.max_queue_wait",
            format!("{:?}", e.max_queue_wait),
            format!("{:?}", f.max_queue_wait),
        );
        check(
            "embedder.cache_entries",
            e.cache_entries.to_string(),
            f.cache_entries.to_string(),
        );
        check(
            "logging.level",
            self.logging.level.clone(),
            new.logging.level.clone(),
        );
        check(
            "reload.watch",
            self.reload.watch.to_string(),
            new.reload.watch.to_string(),
        );
        check(
            "metrics.label_names",
            self.metrics.label_names.as_str().to_string(),
            new.metrics.label_names.as_str().to_string(),
        );
        let (t, u) = (&self.tracing, &new.tracing);
        let endpoint = |o: &Option<String>| o.clone().unwrap_or_else(|| "(off)".into());
        check(
            "tracing.otlp_endpoint",
            endpoint(&t.otlp_endpoint),
            endpoint(&u.otlp_endpoint),
        );
        check(
            "tracing.sample_ratio",
            t.sample_ratio.to_string(),
            u.sample_ratio.to_string(),
        );
        check(
            "tracing.service_name",
            t.service_name.clone(),
            u.service_name.clone(),
        );
        let file = |o: &Option<PathBuf>| {
            o.as_deref()
                .map_or("(none)".into(), |p| p.display().to_string())
        };
        check(
            "cache.encryption_key_file",
            file(&self.cache.encryption_key_file),
            file(&new.cache.encryption_key_file),
        );
        let files = |v: &[PathBuf]| {
            let all: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
            format!("[{}]", all.join(", "))
        };
        check(
            "cache.encryption_old_key_files",
            files(&self.cache.encryption_old_key_files),
            files(&new.cache.encryption_old_key_files),
        );
        out
    }

    /// Keeps a reload from `self` to `new` from opening the gateway by
    /// mistake, and says what it kept. A `keys.yaml` emptied, truncated or
    /// deleted by mistake would turn `require_key` off (it follows the key
    /// list unless written), letting every request in without a key; the
    /// reload still applies (the keys it removed stop working) but requests
    /// without a key stay refused until `require_key: false` is written.
    pub fn fail_closed(&self, new: &mut Config) -> Vec<String> {
        let mut out = Vec::new();
        if self.keys.require_key && !new.keys.require_key && !new.keys.require_key_explicit {
            new.keys.require_key = true;
            out.push(format!(
                "{}: no key is listed any more; keys stay required (every request is refused with 401) until keys are added or `require_key: false` is written",
                self.dir.join(crate::KEYS_FILE).display()
            ));
        }
        out
    }

    /// A copy of `new` with the restart-only settings of `self`: what a live
    /// reload can actually apply.
    pub fn with_restart_only_from(&self, mut new: Config) -> Config {
        new.server.listen = self.server.listen;
        new.server.admin_listen = self.server.admin_listen;
        new.server.threads = self.server.threads;
        new.server.grace_period = self.server.grace_period;
        new.server.graceful_shutdown_timeout = self.server.graceful_shutdown_timeout;
        // The listener is plaintext or TLS from its start; with TLS on, new
        // files (or new contents) are served to new handshakes.
        if self.server.tls.is_some() != new.server.tls.is_some() {
            new.server.tls = self.server.tls.clone();
        }
        if self.server.admin_tls.is_some() != new.server.admin_tls.is_some() {
            new.server.admin_tls = self.server.admin_tls.clone();
        }
        new.server.h2c = self.server.h2c;
        new.data_dir = self.data_dir.clone();
        new.store = self.store;
        // The verifier's default pass score follows the embedding model,
        // which changes on restart only: policies that took the new
        // model's default keep the running model's until then.
        let running = crate::default_verifier_threshold(&self.embedder.model);
        let next = crate::default_verifier_threshold(&new.embedder.model);
        if running != next {
            let routes = new.cache.routes.values_mut();
            for p in std::iter::once(&mut new.cache.defaults).chain(routes) {
                if p.verifier == Some(next) {
                    p.verifier = Some(running);
                }
            }
        }
        new.embedder = self.embedder.clone();
        new.logging.level = self.logging.level.clone();
        new.reload.watch = self.reload.watch;
        new.metrics.label_names = self.metrics.label_names;
        new.tracing = self.tracing.clone();
        new.cache.encryption_key_file = self.cache.encryption_key_file.clone();
        new.cache.encryption_old_key_files = self.cache.encryption_old_key_files.clone();
        new.cache.l1_entries = self.cache.l1_entries;
        // The ledger's writer runs with the interval it started with;
        // `ledger.unpriced` is read per request and applies at once.
        new.ledger.flush_interval = self.ledger.flush_interval;
        new.fleet.share_cache = self.fleet.share_cache;
        new.fleet.share_costs = self.fleet.share_costs;
        new.fleet.cache_stream_len = self.fleet.cache_stream_len;
        new
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redis_address_is_logged_without_its_password() {
        let mut f = crate::FleetConfig {
            redis: Some("redis://:s3cret@10.0.0.5:6379/2".into()),
            tls_ca_file: None,
            key_prefix: "smartllm".into(),
            timeout: std::time::Duration::from_millis(250),
            on_error: crate::FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 1,
            share_costs: false,
        };
        assert_eq!(f.redis_addr(), "redis://10.0.0.5:6379/2");
        f.redis = Some("redis+unix:///run/redis.sock?db=1&user=u&pass=s3cret".into());
        assert_eq!(f.redis_addr(), "redis+unix:///run/redis.sock");
        f.redis = None;
        assert_eq!(f.redis_addr(), "-");
    }

    use crate::test_support::*;
    use crate::*;

    #[test]
    fn restart_only_changes_are_detected_and_kept() {
        let a = write_dir(&[(MAIN_FILE, "server:\n  listen: 127.0.0.1:1000\n")]);
        let b = write_dir(&[(
            MAIN_FILE,
            "server:\n  listen: 127.0.0.1:2000\n  max_body_size: 1MiB\n",
        )]);
        let old = load_dir(a.path()).unwrap();
        let new = load_dir(b.path()).unwrap();
        let changes = old.restart_only_changes(&new);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].starts_with("server.listen"));
        let applied = old.with_restart_only_from(new);
        assert_eq!(applied.server.listen.port(), 1000);
        assert_eq!(applied.server.max_body_bytes, 1 << 20);
    }

    /// The verifier's default pass score is the running embedding model's
    /// until a restart loads the model a reload named.
    #[test]
    fn the_default_verifier_pass_score_follows_the_running_model() {
        let a = write_dir(&[(MAIN_FILE, "")]);
        let b = write_dir(&[(MAIN_FILE, "embedder:\n  model: model.int8.onnx\n")]);
        let old = load_dir(a.path()).unwrap();
        let new = load_dir(b.path()).unwrap();
        let (l3, l6) = (
            Some(crate::resolve::cache::DEFAULT_VERIFIER_THRESHOLD),
            Some(crate::resolve::cache::L6_VERIFIER_THRESHOLD),
        );
        assert_ne!(l3, l6);
        assert_eq!(new.cache.defaults.verifier, l6);
        assert_eq!(old.cache.defaults.verifier, l3);
        let applied = old.with_restart_only_from(new.clone());
        assert_eq!(applied.cache.defaults.verifier, l3);
        assert_eq!(new.with_restart_only_from(old).cache.defaults.verifier, l6);
    }

    #[test]
    fn cache_encryption_keys_are_restart_only() {
        let a = write_dir(&[
            (MAIN_FILE, ""),
            (
                CACHE_FILE,
                "cache:\n  encryption_key_file: a.key\n  ttl: 1h\n",
            ),
        ]);
        let b = write_dir(&[(MAIN_FILE, ""), (
            CACHE_FILE,
            "cache:\n  encryption_key_file: b.key\n  encryption_old_key_files: [a.key]\n  ttl: 2h\n",
        )]);
        let old = load_dir(a.path()).unwrap();
        let new = load_dir(b.path()).unwrap();
        let changes = old.restart_only_changes(&new);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].starts_with("cache.encryption_key_file"));
        assert!(changes[1].starts_with("cache.encryption_old_key_files"));
        let applied = old.with_restart_only_from(new);
        assert_eq!(
            applied.cache.encryption_key_file,
            Some(a.path().join("a.key"))
        );
        assert!(applied.cache.encryption_old_key_files.is_empty());
        assert_eq!(applied.cache.defaults.ttl.as_secs(), 7200);
    }

    /// A keys.yaml emptied, cut to comments or deleted keeps keys required
    /// on a reload (its keys stop working); `require_key: false` opens.
    #[test]
    fn an_emptied_keys_file_keeps_keys_required() {
        let key = format!(
            "keys:\n  - name: a\n    sha256: {}\n    tenant: t\n",
            "ab".repeat(32)
        );
        let base = [
            (MAIN_FILE, "server: {}\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
        ];
        let with = |keys: Option<&str>| {
            let mut files = base.to_vec();
            if let Some(k) = keys {
                files.push((KEYS_FILE, k));
            }
            let d = write_dir(&files);
            load_dir(d.path()).unwrap()
        };
        let old = with(Some(&key));
        assert!(old.keys.require_key);
        for keys in [Some("keys: []\n"), Some(""), Some("# all gone\n"), None] {
            let mut new = with(keys);
            assert!(!new.keys.require_key, "{keys:?}");
            let kept = old.fail_closed(&mut new);
            assert!(new.keys.require_key, "{keys:?}");
            assert_eq!(kept.len(), 1, "{keys:?}");
            assert!(new.keys.keys.is_empty());
        }
        let mut open = with(Some("require_key: false\nkeys: []\n"));
        assert!(old.fail_closed(&mut open).is_empty());
        assert!(!open.keys.require_key);
        // An open gateway stays as open as its file says.
        let mut still = with(Some("keys: []\n"));
        assert!(open.fail_closed(&mut still).is_empty());
        assert!(!still.keys.require_key);
    }

    /// An o-series or GPT-5 model listed with capabilities but without
    /// `reasoning` is named (its efforts would be left out unseen).
    #[test]
    fn a_reasoning_model_listed_without_reasoning_is_named() {
        let models = "models:
  - name: o3
    profile: { capabilities: [tools, json] }
    deployments: [ { provider: p, model: o3-2025-04-16 } ]
  - name: r
    profile: { capabilities: [tools, reasoning] }
    deployments: [ { provider: p, model: gpt-5-mini } ]
  - name: any
    deployments: [ { provider: p, model: o4-mini } ]
  - name: four
    profile: { capabilities: [tools] }
    deployments: [ { provider: p, model: gpt-4o } ]
  - name: azure
    profile: { capabilities: [tools] }
    deployments: [ { provider: p, model: openai/gpt-5.1 } ]
  - name: other
    profile: { capabilities: [tools] }
    deployments: [ { provider: p, model: o3x-local } ]
";
        let d = write_dir(&[
            (MAIN_FILE, ""),
            (
                PROVIDERS_FILE,
                "providers:\n  p:\n    kind: openai\n    base_url: https://api.example.com/v1\n",
            ),
            (MODELS_FILE, models),
        ]);
        let w = load_dir(d.path()).unwrap().capability_warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        for (name, reasoning) in [
            ("o3", true),
            ("o3-mini-2025-01-31", true),
            ("openai/o4-mini", true),
            ("gpt-5.1", true),
            ("gpt-5-chat-latest", false),
            ("gpt-4o", false),
            ("o3x-local", false),
            ("gpt-oss-120b", false),
            ("ft:o4-mini-2025-04-16:acme::abc123", true),
            ("openai/o3:online", true),
            ("ft:gpt-4o-mini:acme::x", false),
        ] {
            assert_eq!(openai_reasoning_model(name), reasoning, "{name}");
        }
        assert!(
            w[0].starts_with("model o3 (upstream o3-2025-04-16)"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("model azure (upstream openai/gpt-5.1)"),
            "{w:?}"
        );
    }

    /// Key, token and CA files are part of the config: a key rotated in its
    /// file is a change a reload applies; the watcher watches them.
    #[test]
    fn secret_files_are_in_the_digest_and_watched() {
        const CERT: &str = include_str!("testdata/cert.pem");
        let d = write_dir(&[
            (MAIN_FILE, "server: {}\nadmin:\n  token_file: admin.token\n"),
            (
                PROVIDERS_FILE,
                "providers:\n  p:\n    kind: openai\n    base_url: https://api.example.com/v1\n    api_key_file: /nonexistent/p.key\n    tls_ca_file: ca.pem\n",
            ),
            (MODELS_FILE, "models:\n  - name: m\n    deployments: [ { provider: p } ]\n"),
            ("admin.token", "t1\n"),
            ("ca.pem", CERT),
        ]);
        let first = load_dir(d.path()).unwrap();
        std::fs::write(d.path().join("admin.token"), "t2\n").unwrap();
        let second = load_dir(d.path()).unwrap();
        assert_ne!(first.digest, second.digest);
        assert_eq!(second.digest, load_dir(d.path()).unwrap().digest);
        // A new CA bundle (the loader reads it: it must hold a certificate).
        std::fs::write(d.path().join("ca.pem"), format!("{CERT}{CERT}")).unwrap();
        assert_ne!(second.digest, load_dir(d.path()).unwrap().digest);
        let watched = second.watched_files();
        for f in [
            d.path().join("admin.token"),
            d.path().join("ca.pem"),
            std::path::PathBuf::from("/nonexistent/p.key"),
        ] {
            assert!(watched.contains(&f), "{f:?} not in {watched:?}");
        }
        // The digest is the directory's, however it is named: the same
        // through a link to it (`check --config conf` against the
        // gateway's /etc/smartllm).
        let link = d.path().with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        let through = load_dir(&link).map(|c| c.digest);
        std::fs::remove_file(&link).unwrap();
        assert_eq!(through.unwrap(), load_dir(d.path()).unwrap().digest);
    }

    #[test]
    fn urls() {
        let u = Url::parse("https://api.openai.com/v1/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "api.openai.com", 443, "/v1")
        );
        assert_eq!(u.host_header(), "api.openai.com");
        let u = Url::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.host_header()),
            (8000, "", "127.0.0.1:8000".to_string())
        );
        assert!(Url::parse("ftp://x").is_err());
        assert!(Url::parse("http://user:pw@x").is_err());
        let u = Url::parse("http://[::1]:9/v1").unwrap();
        assert_eq!(u.authority(), "[::1]:9");
    }

    /// A webhook is sent to its path exactly as written (a trailing slash
    /// kept) and its query string (Google Chat authenticates by it); a
    /// base URL still refuses a query, also right after the host.
    #[test]
    fn webhook_urls_keep_their_path_and_query() {
        let u =
            Url::parse_webhook("https://chat.googleapis.com/v1/spaces/X/messages?key=K&token=T%3D")
                .unwrap();
        assert_eq!(
            (u.host.as_str(), u.path.as_str(), u.target.as_str()),
            (
                "chat.googleapis.com",
                "/v1/spaces/X/messages",
                "/v1/spaces/X/messages?key=K&token=T%3D"
            )
        );
        let u = Url::parse_webhook("http://hooks.example:8080/abc/").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8080, "/abc/"));
        let u = Url::parse_webhook("https://hooks.example?k=v").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("hooks.example", 443, "?k=v")
        );
        assert!(Url::parse_webhook("https://hooks.example/a#frag").is_err());
        assert_eq!(
            Url::parse("https://api.example/v1/").unwrap().target,
            "/v1/"
        );
        assert!(Url::parse("https://api.example/v1?x=1").is_err());
        assert!(Url::parse("https://api.example?x=1").is_err());
        assert!(Url::parse("https://api.example#x").is_err());
    }
}
