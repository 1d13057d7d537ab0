//! SmartLLM Router configuration: a directory of YAML files, parsed strictly
//! (unknown keys are errors), validated as a whole (every error is reported, with
//! file, key path and line) and resolved into [`Config`], which the rest of the
//! gateway consumes. Loading is pure: secrets (provider keys) are read when the
//! proxy prepares a runtime snapshot from a `Config`.

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod locate;
pub mod raw;
pub mod routing;
pub mod units;
pub mod watch;

pub use error::{ConfigError, ConfigIssue};
pub use locate::locate;
pub use routing::*;

use raw::*;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MAIN_FILE: &str = "smartllm.yaml";
pub const PROVIDERS_FILE: &str = "providers.yaml";
pub const MODELS_FILE: &str = "models.yaml";
pub const ROUTES_FILE: &str = "routes.yaml";
pub const CACHE_FILE: &str = "cache.yaml";
pub const KEYS_FILE: &str = "keys.yaml";
/// The files of a config directory, in load order. Only `smartllm.yaml` is required.
pub const FILES: [&str; 6] = [
    MAIN_FILE,
    PROVIDERS_FILE,
    MODELS_FILE,
    ROUTES_FILE,
    CACHE_FILE,
    KEYS_FILE,
];

/// Environment variables that override paths of `smartllm.yaml` (handy for
/// development and packaging; documented in the README).
pub const ENV_DATA_DIR: &str = "SMARTLLM_DATA_DIR";
pub const ENV_ASSETS_DIR: &str = "SMARTLLM_ASSETS_DIR";

/// The validated, resolved configuration. Not `Deserialize`: it only comes from
/// [`load_dir`].
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
    /// Where the admin API token comes from (None: no token required).
    pub admin_token: ApiKeySource,
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
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: FleetOnError,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreConfig {
    /// Bytes for RocksDB's shared block cache, memtables included.
    pub memory_budget: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    pub flush_interval: Duration,
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
    pub keys: Vec<VirtualKey>,
    /// Limits per `tenant/app`.
    pub apps: BTreeMap<String, Limits>,
    pub budgets: Vec<Budget>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    Email,
    Phone,
    Card,
    ApiKey,
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
    pub encryption_key_file: Option<PathBuf>,
    /// Validated regular expressions.
    pub exclude_patterns: Vec<String>,
    pub detectors: Vec<Detector>,
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
    pub http1_pipelining: bool,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub upstream_attempts: usize,
    pub max_in_flight: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedderConfig {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub onnxruntime: PathBuf,
    pub threads: usize,
    pub max_seq_len: usize,
    pub device: Device,
    pub queue_depth: usize,
    pub max_queue_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
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
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{s:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if authority.contains('@') {
            return Err(format!(
                "{s:?}: credentials in URLs are not supported; use api_key_env or api_key_file"
            ));
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            // [v6]:port
            let end = inner
                .find(']')
                .ok_or_else(|| format!("{s:?}: bad IPv6 host"))?;
            let host = &inner[..end];
            let port = match inner[end + 1..].strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?,
                None => default_port(tls),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?,
                ),
                None => (authority.to_string(), default_port(tls)),
            }
        };
        if path.contains('?') || path.contains('#') {
            return Err(format!(
                "{s:?}: query strings and fragments are not supported"
            ));
        }
        Ok(Url {
            tls,
            host,
            port,
            path: path.trim_end_matches('/').to_string(),
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
    pub tls_ca_file: Option<PathBuf>,
    pub stream_usage: bool,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentConfig {
    pub provider: String,
    pub upstream_model: String,
    pub weight: usize,
}

impl Config {
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Resolve a requested model name: a configured model, or a route alias.
    pub fn resolve_model(&self, requested: &str) -> Option<(&ModelConfig, Option<&RouteConfig>)> {
        if let Some(m) = self.model(requested) {
            return Some((m, None));
        }
        let route = self.routes.get(requested)?;
        Some((self.model(&route.model)?, Some(route)))
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
        check(
            "data_dir",
            self.data_dir.display().to_string(),
            new.data_dir.display().to_string(),
        );
        check(
            "store.memory_budget",
            self.store.memory_budget.to_string(),
            new.store.memory_budget.to_string(),
        );
        check(
            "embedder",
            format!("{:?}", self.embedder),
            format!("{:?}", new.embedder),
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
        new.data_dir = self.data_dir.clone();
        new.store = self.store;
        new.embedder = self.embedder.clone();
        new.logging.level = self.logging.level.clone();
        new.reload.watch = self.reload.watch;
        new.cache.encryption_key_file = self.cache.encryption_key_file.clone();
        new.cache.l1_entries = self.cache.l1_entries;
        new.ledger = self.ledger.clone();
        new
    }
}

/// Collects issues while validating, locating each key path in its file.
struct Issues<'a> {
    dir: &'a Path,
    texts: &'a BTreeMap<&'static str, String>,
    list: Vec<ConfigIssue>,
}

impl Issues<'_> {
    fn push(&mut self, file: &'static str, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.texts.get(file).and_then(|t| locate(t, &path));
        self.list.push(ConfigIssue {
            file: self.dir.join(file),
            path,
            line,
            message: message.into(),
        });
    }
}

/// serde_yaml numbers lines the way YAML breaks them (CR, LF and CRLF); an
/// editor, `grep -n` and `sed -n Np` count LF. A lone CR (found by the config
/// fuzzer) made the two disagree, so convert: find where YAML's line starts and
/// count the LFs before it.
fn file_line(text: &str, yaml_line: usize) -> usize {
    let b = text.as_bytes();
    let (mut line, mut i) = (1, 0);
    while line < yaml_line && i < b.len() {
        match b[i] {
            b'\r' => {
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line += 1;
            }
            b'\n' => line += 1,
            _ => {}
        }
        i += 1;
    }
    b[..i].iter().filter(|c| **c == b'\n').count() + 1
}

fn parse_file<T: DeserializeOwned + Default>(
    dir: &Path,
    file: &'static str,
    text: Option<&String>,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    let Some(text) = text else {
        return Some(T::default());
    };
    if text.trim().is_empty() {
        return Some(T::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .location()
                .map(|l| file_line(text, l.line()))
                .or_else(|| locate(text, &path));
            let mut message = inner.to_string();
            // serde_yaml appends " at line X column Y"; we print the line ourselves.
            if let Some(i) = message.find(" at line ") {
                message.truncate(i);
            }
            issues.push(ConfigIssue {
                file: dir.join(file),
                path: if path == "." { String::new() } else { path },
                line,
                message,
            });
            None
        }
    }
}

/// Read, parse and validate a config directory.
pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    let mut texts: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut issues = Vec::new();
    for file in FILES {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                texts.insert(file, t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != MAIN_FILE => {}
            Err(e) => issues.push(ConfigIssue {
                file: path,
                path: String::new(),
                line: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if !issues.is_empty() {
        return Err(ConfigError { issues });
    }
    load_texts(dir, texts)
}

/// Validates config files given as text (file name to contents), as
/// `load_dir` does after reading them; `dir` resolves relative paths. For
/// tools and the config fuzzer.
pub fn load_texts(
    dir: &Path,
    texts: BTreeMap<&'static str, String>,
) -> Result<Config, ConfigError> {
    let mut issues = Vec::new();
    let main: Option<RawMain> = parse_file(dir, MAIN_FILE, texts.get(MAIN_FILE), &mut issues);
    let providers: Option<RawProviders> =
        parse_file(dir, PROVIDERS_FILE, texts.get(PROVIDERS_FILE), &mut issues);
    let models: Option<RawModels> =
        parse_file(dir, MODELS_FILE, texts.get(MODELS_FILE), &mut issues);
    let routes: Option<RawRoutes> =
        parse_file(dir, ROUTES_FILE, texts.get(ROUTES_FILE), &mut issues);
    let cache: Option<RawCacheFile> =
        parse_file(dir, CACHE_FILE, texts.get(CACHE_FILE), &mut issues);
    let keys: Option<RawKeysFile> = parse_file(dir, KEYS_FILE, texts.get(KEYS_FILE), &mut issues);
    let (Some(main), Some(providers), Some(models), Some(routes), Some(cache), Some(keys)) =
        (main, providers, models, routes, cache, keys)
    else {
        return Err(ConfigError { issues });
    };

    let mut hasher = Sha256::new();
    for (name, text) in &texts {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    let digest = hex::encode(&hasher.finalize()[..8]);

    let mut v = Issues {
        dir,
        texts: &texts,
        list: issues,
    };
    let mut config = resolve(dir, digest, main, providers, models, routes, &mut v);
    // Files the routes refer to (classifier examples, learned routers) are part
    // of what runs: a change to one is a change of config.
    let mut hasher = Sha256::new();
    hasher.update(config.digest.as_bytes());
    for (key, path) in referenced_files(&config.classifier, &config.routes) {
        match std::fs::read(&path) {
            Ok(bytes) => {
                hasher.update(path.to_string_lossy().as_bytes());
                hasher.update([0]);
                hasher.update(&bytes);
            }
            Err(e) => v.push(
                ROUTES_FILE,
                key,
                format!("cannot read {}: {e}", path.display()),
            ),
        }
    }
    config.digest = hex::encode(&hasher.finalize()[..8]);
    config.cache = resolve_cache(dir, cache.cache, &config, &mut v);
    config.keys = resolve_keys(keys, &config, &mut v);
    if v.list.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { issues: v.list })
    }
}

fn resolve(
    dir: &Path,
    digest: String,
    main: RawMain,
    providers: RawProviders,
    models: RawModels,
    routes: RawRoutes,
    v: &mut Issues<'_>,
) -> Config {
    let s = main.server;
    let mut addr = |path: &str, value: Option<String>, default: &str| -> SocketAddr {
        let value = value.unwrap_or_else(|| default.to_string());
        value.parse().unwrap_or_else(|_| {
            v.push(
                MAIN_FILE,
                path,
                format!("{value:?} is not an address like 127.0.0.1:8080"),
            );
            default.parse().expect("default address")
        })
    };
    let listen = addr("server.listen", s.listen, "127.0.0.1:8080");
    let admin_listen = addr("server.admin_listen", s.admin_listen, "127.0.0.1:9090");
    if listen == admin_listen {
        v.push(
            MAIN_FILE,
            "server.admin_listen",
            "must differ from server.listen",
        );
    }
    let threads = s.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    if threads == 0 || threads > 1024 {
        v.push(MAIN_FILE, "server.threads", "must be between 1 and 1024");
    }
    let max_body_bytes = s.max_body_size.map(|b| b.0).unwrap_or(32 << 20);
    if max_body_bytes < 1024 {
        v.push(MAIN_FILE, "server.max_body_size", "must be at least 1KiB");
    }
    let max_header_bytes = s.max_header_size.map(|b| b.0).unwrap_or(32 << 10);
    if max_header_bytes < 1024 {
        v.push(MAIN_FILE, "server.max_header_size", "must be at least 1KiB");
    }
    let dur = |d: Option<units::ConfigDuration>, default: u64| {
        d.map(|d| d.0).unwrap_or(Duration::from_secs(default))
    };
    let upstream_attempts = s.upstream_attempts.unwrap_or(3);
    if upstream_attempts == 0 || upstream_attempts > 10 {
        v.push(
            MAIN_FILE,
            "server.upstream_attempts",
            "must be between 1 and 10",
        );
    }
    let max_in_flight = s.max_in_flight.unwrap_or(4096);
    if !(1..=1_000_000).contains(&max_in_flight) {
        v.push(
            MAIN_FILE,
            "server.max_in_flight",
            "must be between 1 and 1000000",
        );
    }
    for (key, value) in [
        ("server.client_body_timeout", &s.client_body_timeout),
        ("server.client_header_timeout", &s.client_header_timeout),
        ("server.client_body_deadline", &s.client_body_deadline),
        ("server.keepalive_timeout", &s.keepalive_timeout),
    ] {
        if value.as_ref().is_some_and(|d| d.0.is_zero()) {
            v.push(MAIN_FILE, key, "must be greater than 0");
        }
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        threads: threads.clamp(1, 1024),
        max_body_bytes,
        max_header_bytes,
        client_body_timeout: dur(s.client_body_timeout, 30),
        client_header_timeout: dur(s.client_header_timeout, 10),
        client_body_deadline: dur(s.client_body_deadline, 300),
        keepalive_timeout: dur(s.keepalive_timeout, 60),
        http1_pipelining: s.http1_pipelining.unwrap_or(true),
        upstream_connect_timeout: dur(s.upstream_connect_timeout, 5),
        upstream_first_byte_timeout: dur(s.upstream_first_byte_timeout, 600),
        upstream_idle_timeout: dur(s.upstream_idle_timeout, 120),
        upstream_attempts: upstream_attempts.clamp(1, 10),
        max_in_flight: max_in_flight.clamp(1, 1_000_000),
        grace_period: dur(s.grace_period, 0),
        graceful_shutdown_timeout: dur(s.graceful_shutdown_timeout, 30),
    };

    let data_dir = std::env::var(ENV_DATA_DIR)
        .ok()
        .filter(|s| !s.is_empty())
        .or(main.data_dir)
        .unwrap_or_else(|| "/var/lib/smartllm".to_string());
    let data_dir = relative_to(dir, &data_dir);

    let e = main.embedder;
    let assets_dir = std::env::var(ENV_ASSETS_DIR)
        .ok()
        .filter(|s| !s.is_empty())
        .or(e.assets_dir)
        .unwrap_or_else(|| "/usr/share/smartllm".to_string());
    let assets_dir = relative_to(dir, &assets_dir);
    let device = match e.device.as_deref().unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => {
            v.push(
                MAIN_FILE,
                "embedder.device",
                format!("unknown device {other:?}: use cpu or cuda"),
            );
            Device::Cpu
        }
    };
    let max_seq_len = e.max_seq_len.unwrap_or(256);
    if !(8..=512).contains(&max_seq_len) {
        v.push(
            MAIN_FILE,
            "embedder.max_seq_len",
            "must be between 8 and 512 (the model's limit)",
        );
    }
    let queue_depth = e.queue_depth.unwrap_or(256);
    if !(1..=65_536).contains(&queue_depth) {
        v.push(
            MAIN_FILE,
            "embedder.queue_depth",
            "must be between 1 and 65536",
        );
    }
    let max_queue_wait = e
        .max_queue_wait
        .map(|d| d.0)
        .unwrap_or(Duration::from_millis(250));
    if max_queue_wait.is_zero() {
        v.push(MAIN_FILE, "embedder.max_queue_wait", "must be above 0");
    }
    let embedder = EmbedderConfig {
        model: assets_dir.join(e.model.unwrap_or_else(|| "model.onnx".into())),
        tokenizer: assets_dir.join(e.tokenizer.unwrap_or_else(|| "tokenizer.json".into())),
        onnxruntime: assets_dir.join(
            e.onnxruntime
                .unwrap_or_else(|| "libonnxruntime.so.1.31.1".into()),
        ),
        threads: e.threads.unwrap_or(1).clamp(1, 64),
        max_seq_len: max_seq_len.clamp(8, 512),
        device,
        queue_depth: queue_depth.clamp(1, 65_536),
        max_queue_wait: max_queue_wait.max(Duration::from_millis(1)),
    };

    let level = main.logging.level.unwrap_or_else(|| "info".into());
    if !["trace", "debug", "info", "warn", "error"].contains(&level.as_str()) {
        v.push(
            MAIN_FILE,
            "logging.level",
            format!("unknown level {level:?}: use trace, debug, info, warn or error"),
        );
    }
    let logging = LoggingConfig {
        level,
        access_log: main.logging.access_log.unwrap_or(true),
    };

    let auto = match main.demo.mode.as_deref().unwrap_or("auto") {
        "auto" => true,
        "off" => false,
        other => {
            v.push(
                MAIN_FILE,
                "demo.mode",
                format!("unknown mode {other:?}: use auto or off"),
            );
            false
        }
    };
    let demo_upstream = main
        .demo
        .upstream
        .unwrap_or_else(|| "http://127.0.0.1:8000/v1".into());
    let demo = DemoConfig {
        auto,
        upstream: Url::parse(&demo_upstream).unwrap_or_else(|err| {
            v.push(MAIN_FILE, "demo.upstream", err);
            Url::parse("http://127.0.0.1:8000/v1").expect("default url")
        }),
    };

    let reload = ReloadConfig {
        watch: main.reload.watch.unwrap_or(true),
        debounce: dur(main.reload.debounce, 0)
            .max(Duration::from_millis(50))
            .min(Duration::from_secs(60)),
    };
    let reload = match main.reload.debounce {
        Some(_) => reload,
        None => ReloadConfig {
            debounce: Duration::from_millis(200),
            ..reload
        },
    };

    let mut resolved_providers = BTreeMap::new();
    for (name, p) in providers.providers {
        let at = format!("providers.{name}");
        if !valid_name(&name) {
            v.push(
                PROVIDERS_FILE,
                &at,
                "provider names may only use letters, digits, '-', '_' and '.'",
            );
        }
        let kind = match p.kind.as_str() {
            "openai" => ProviderKind::OpenAi,
            "anthropic" => ProviderKind::Anthropic,
            other => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.kind"),
                    format!("unknown kind {other:?}: use openai or anthropic"),
                );
                ProviderKind::OpenAi
            }
        };
        let base_url = match Url::parse(&p.base_url) {
            Ok(u) => u,
            Err(err) => {
                v.push(PROVIDERS_FILE, format!("{at}.base_url"), err);
                continue;
            }
        };
        if p.tls_ca_file.is_some() && !base_url.tls {
            v.push(
                PROVIDERS_FILE,
                format!("{at}.tls_ca_file"),
                "only applies to https:// base URLs",
            );
        }
        let api_key = match (p.api_key_env, p.api_key_file) {
            (Some(_), Some(_)) => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.api_key_file"),
                    "set api_key_env or api_key_file, not both",
                );
                ApiKeySource::None
            }
            (Some(env), None) => ApiKeySource::Env(env),
            (None, Some(file)) => ApiKeySource::File(relative_to(dir, &file)),
            (None, None) => ApiKeySource::None,
        };
        let mut headers = Vec::new();
        for (k, val) in p.headers {
            let lower = k.to_ascii_lowercase();
            if http_header_name_ok(&lower) && !val.contains(['\r', '\n']) {
                if [
                    "host",
                    "content-length",
                    "authorization",
                    "x-api-key",
                    "transfer-encoding",
                    "connection",
                ]
                .contains(&lower.as_str())
                {
                    v.push(
                        PROVIDERS_FILE,
                        format!("{at}.headers.{k}"),
                        "this header is set by the gateway and cannot be configured",
                    );
                } else {
                    headers.push((lower, val));
                }
            } else {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.headers.{k}"),
                    "not a valid HTTP header",
                );
            }
        }
        let hc = p.health_check;
        let hc_kind = match hc.as_ref().and_then(|h| h.kind.as_deref()).unwrap_or("tcp") {
            "tcp" => HealthCheckKind::Tcp,
            "http" => HealthCheckKind::Http,
            "none" => HealthCheckKind::None,
            other => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.health_check.kind"),
                    format!("unknown kind {other:?}: use tcp, http or none"),
                );
                HealthCheckKind::Tcp
            }
        };
        let health_check = HealthCheckConfig {
            kind: hc_kind,
            path: hc
                .as_ref()
                .and_then(|h| h.path.clone())
                .unwrap_or_else(|| format!("{}/models", base_url.path)),
            interval: hc
                .as_ref()
                .and_then(|h| h.interval)
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5))
                .max(Duration::from_millis(100)),
            failures: hc.as_ref().and_then(|h| h.failures).unwrap_or(2).max(1),
            successes: hc.as_ref().and_then(|h| h.successes).unwrap_or(1).max(1),
        };
        resolved_providers.insert(
            name.clone(),
            ProviderConfig {
                name,
                kind,
                base_url,
                api_key,
                headers,
                anthropic_version: p.anthropic_version.unwrap_or_else(|| "2023-06-01".into()),
                tls_ca_file: p.tls_ca_file.map(|f| relative_to(dir, &f)),
                stream_usage: p.stream_usage.unwrap_or(true),
                connect_timeout: p
                    .connect_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_connect_timeout),
                first_byte_timeout: p
                    .first_byte_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_first_byte_timeout),
                idle_timeout: p
                    .idle_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_idle_timeout),
                health_check,
                circuit_breaker: resolve_breaker(p.circuit_breaker.as_ref()),
            },
        );
    }

    let mut seen = BTreeSet::new();
    let mut resolved_models = Vec::new();
    for (i, m) in models.models.into_iter().enumerate() {
        let at = format!("models[{i}]");
        if !valid_name(&m.name) {
            v.push(
                MODELS_FILE,
                format!("{at}.name"),
                "model names may only use letters, digits, '-', '_', ':', '/' and '.'",
            );
        }
        if !seen.insert(m.name.clone()) {
            v.push(
                MODELS_FILE,
                format!("{at}.name"),
                format!("model {:?} is defined twice", m.name),
            );
        }
        if m.deployments.is_empty() {
            v.push(
                MODELS_FILE,
                format!("{at}.deployments"),
                "a model needs at least one deployment",
            );
        }
        let mut deployments = Vec::new();
        for (j, d) in m.deployments.into_iter().enumerate() {
            let dat = format!("{at}.deployments[{j}]");
            if !resolved_providers.contains_key(&d.provider) {
                let known: Vec<_> = resolved_providers.keys().cloned().collect();
                v.push(
                    MODELS_FILE,
                    format!("{dat}.provider"),
                    format!(
                        "unknown provider {:?} (providers.yaml defines: {})",
                        d.provider,
                        known.join(", ")
                    ),
                );
            }
            let weight = d.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                v.push(
                    MODELS_FILE,
                    format!("{dat}.weight"),
                    "must be between 1 and 1000",
                );
            }
            deployments.push(DeploymentConfig {
                provider: d.provider,
                upstream_model: d.model.unwrap_or_else(|| m.name.clone()),
                weight: weight.clamp(1, 1000),
            });
        }
        let owned_by = m.owned_by.unwrap_or_else(|| {
            deployments
                .first()
                .map(|d| d.provider.clone())
                .unwrap_or_else(|| "smartllm".into())
        });
        let pricing = m
            .pricing
            .as_ref()
            .map(|p| Pricing {
                input_per_1m: p.input.unwrap_or(0.0),
                output_per_1m: p.output.unwrap_or(0.0),
                cached_input_per_1m: p.cached_input.or(p.input).unwrap_or(0.0),
                per_request: p.per_request.unwrap_or(0.0),
            })
            .unwrap_or_default();
        for (field, value) in [
            ("input", pricing.input_per_1m),
            ("output", pricing.output_per_1m),
            ("cached_input", pricing.cached_input_per_1m),
            ("per_request", pricing.per_request),
        ] {
            if !value.is_finite() || !(0.0..=10_000.0).contains(&value) {
                v.push(
                    MODELS_FILE,
                    format!("{at}.pricing.{field}"),
                    "must be between 0 and 10000 (USD per 1M tokens, or per request)",
                );
            }
        }
        let profile = resolve_profile(&at, m.profile.as_ref(), v);
        resolved_models.push(ModelConfig {
            name: m.name,
            owned_by,
            deployments,
            pricing,
            profile,
        });
    }

    let mut resolved_routes = BTreeMap::new();
    for (name, r) in &routes.routes {
        if seen.contains(name) {
            v.push(
                ROUTES_FILE,
                format!("routes.{name}"),
                format!("route {name:?} has the name of a model; pick another alias"),
            );
        }
        resolved_routes.insert(name.clone(), resolve_route(dir, name, r, &seen, v));
    }
    let classifier = resolve_classifier(dir, &routes.classifier, v);

    let memory_budget = main.store.memory_budget.map(|b| b.0).unwrap_or(128 << 20);
    if memory_budget < 8 << 20 {
        v.push(MAIN_FILE, "store.memory_budget", "must be at least 8MiB");
    }
    Config {
        dir: dir.to_path_buf(),
        digest,
        server,
        data_dir,
        store: StoreConfig {
            memory_budget: memory_budget.max(8 << 20),
        },
        embedder,
        logging,
        demo,
        reload,
        providers: resolved_providers,
        models: resolved_models,
        routes: resolved_routes,
        classifier,
        keys: KeysConfig::default(),
        admin_token: match (main.admin.token_env, main.admin.token_file) {
            (None, None) if !admin_listen.ip().is_loopback() => {
                // Fail closed: the admin API (config, costs, cache purge) is
                // never open beyond this host.
                v.push(
                    MAIN_FILE,
                    "server.admin_listen",
                    format!(
                        "{admin_listen} is not a loopback address: set admin.token_env or admin.token_file so the admin API needs a token"
                    ),
                );
                ApiKeySource::None
            }
            (Some(_), Some(_)) => {
                v.push(
                    MAIN_FILE,
                    "admin.token_file",
                    "set admin.token_env or admin.token_file, not both",
                );
                ApiKeySource::None
            }
            (Some(e), None) => ApiKeySource::Env(e),
            (None, Some(f)) => ApiKeySource::File(relative_to(dir, &f)),
            (None, None) => ApiKeySource::None,
        },
        ledger: LedgerConfig {
            flush_interval: main
                .ledger
                .flush_interval
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(50), Duration::from_secs(60)),
        },
        fleet: resolve_fleet(main.fleet, v),
        cache: CacheConfig {
            enabled: false,
            defaults: DEFAULT_POLICY,
            routes: BTreeMap::new(),
            l1_entries: 10_000,
            top_k: 8,
            max_pending_inserts: 1024,
            ivf_threshold: 20_000,
            encryption_key_file: None,
            exclude_patterns: Vec::new(),
            detectors: Vec::new(),
        },
    }
}

fn resolve_keys(raw: RawKeysFile, config: &Config, v: &mut Issues<'_>) -> KeysConfig {
    let mut names = BTreeSet::new();
    let mut hashes = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        if !names.insert(k.name.clone()) {
            v.push(
                KEYS_FILE,
                format!("{at}.name"),
                format!("key name {:?} is used twice", k.name),
            );
        }
        let digest = hex::decode(k.sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        let Some(sha256) = digest else {
            v.push(
                KEYS_FILE,
                format!("{at}.sha256"),
                "must be 64 hex characters: the sha256 of the key (smartllm keys hash KEY)",
            );
            continue;
        };
        if !hashes.insert(sha256) {
            v.push(
                KEYS_FILE,
                format!("{at}.sha256"),
                "the same key is listed twice",
            );
        }
        if k.tenant.trim().is_empty() || k.tenant.contains('\0') {
            v.push(
                KEYS_FILE,
                format!("{at}.tenant"),
                "must be a non-empty name",
            );
        }
        for (j, m) in k.models.iter().enumerate() {
            if config.model(m).is_none() && !config.routes.contains_key(m) {
                v.push(
                    KEYS_FILE,
                    format!("{at}.models[{j}]"),
                    format!("{m:?} is neither a model nor a route alias"),
                );
            }
        }
        let limits = resolve_limits(&format!("{at}.limits"), &k.limits, v);
        keys.push(VirtualKey {
            name: k.name,
            sha256,
            tenant: k.tenant,
            app: k.app.unwrap_or_else(|| "default".into()),
            models: k.models,
            limits,
        });
    }
    let require_key = raw.require_key.unwrap_or(!keys.is_empty());
    if require_key && keys.is_empty() {
        v.push(
            KEYS_FILE,
            "require_key",
            "is true but no key is listed: every request would be refused",
        );
    }
    let mut apps = BTreeMap::new();
    for (name, a) in &raw.apps {
        if !name.contains('/') {
            v.push(
                KEYS_FILE,
                format!("apps.{name}"),
                "apps are named tenant/app",
            );
        }
        apps.insert(
            name.clone(),
            resolve_limits(&format!("apps.{name}.limits"), &a.limits, v),
        );
    }
    let mut budgets = Vec::new();
    for (i, b) in raw.budgets.into_iter().enumerate() {
        let at = format!("budgets[{i}]");
        let scope = match b.scope.as_str() {
            "tenant" => BudgetScope::Tenant,
            "app" => BudgetScope::App,
            "key" => BudgetScope::Key,
            other => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.scope"),
                    format!("unknown scope {other:?}: use tenant, app or key"),
                );
                continue;
            }
        };
        if scope == BudgetScope::App && !b.name.contains('/') {
            v.push(
                KEYS_FILE,
                format!("{at}.name"),
                "app budgets are named tenant/app",
            );
        }
        if b.daily_usd.is_none() && b.monthly_usd.is_none() && b.max_request_usd.is_none() {
            v.push(
                KEYS_FILE,
                &at,
                "set daily_usd, monthly_usd, max_request_usd or several",
            );
        }
        for (field, value) in [
            ("daily_usd", b.daily_usd),
            ("monthly_usd", b.monthly_usd),
            ("max_request_usd", b.max_request_usd),
        ] {
            if value.is_some_and(|x| !x.is_finite() || x <= 0.0) {
                v.push(
                    KEYS_FILE,
                    format!("{at}.{field}"),
                    "must be a positive amount of USD",
                );
            }
        }
        let alert_at = b.alert_at.unwrap_or_else(|| vec![50.0, 80.0, 100.0]);
        if alert_at.iter().any(|p| !(1.0..=1000.0).contains(p)) {
            v.push(
                KEYS_FILE,
                format!("{at}.alert_at"),
                "percentages must be between 1 and 1000",
            );
        }
        let on_exceed = match (b.on_exceed.as_deref().unwrap_or("reject"), b.degrade_to) {
            ("reject", None) => OnExceed::Reject,
            ("reject", Some(_)) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.degrade_to"),
                    "only applies with on_exceed: degrade",
                );
                OnExceed::Reject
            }
            ("degrade", Some(t)) => {
                if config.model(&t).is_none() && !config.routes.contains_key(&t) {
                    v.push(
                        KEYS_FILE,
                        format!("{at}.degrade_to"),
                        format!("{t:?} is neither a model nor a route alias"),
                    );
                }
                OnExceed::Degrade(t)
            }
            ("degrade", None) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.degrade_to"),
                    "on_exceed: degrade needs degrade_to (a cheaper model or route)",
                );
                OnExceed::Reject
            }
            (other, _) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.on_exceed"),
                    format!("unknown action {other:?}: use reject or degrade"),
                );
                OnExceed::Reject
            }
        };
        let webhook = b.webhook.and_then(|w| match Url::parse(&w) {
            Ok(u) => Some(u),
            Err(e) => {
                v.push(KEYS_FILE, format!("{at}.webhook"), e);
                None
            }
        });
        budgets.push(Budget {
            scope,
            name: b.name,
            daily_usd: b.daily_usd,
            monthly_usd: b.monthly_usd,
            max_request_usd: b.max_request_usd,
            alert_at,
            on_exceed,
            webhook,
        });
    }
    KeysConfig {
        require_key,
        keys,
        apps,
        budgets,
    }
}

fn resolve_fleet(raw: crate::raw::RawFleet, v: &mut Issues<'_>) -> FleetConfig {
    let redis = raw.redis.filter(|r| !r.trim().is_empty());
    if let Some(url) = &redis {
        if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
            v.push(
                MAIN_FILE,
                "fleet.redis",
                "must be a redis:// or redis+unix:// URL",
            );
        }
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "smartllm".into());
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c == '{' || c == '}')
    {
        v.push(
            MAIN_FILE,
            "fleet.key_prefix",
            "must be a non-empty word without spaces or braces",
        );
    }
    let on_error = match raw.on_error.as_deref().unwrap_or("local") {
        "local" => FleetOnError::Local,
        "reject" => FleetOnError::Reject,
        other => {
            v.push(
                MAIN_FILE,
                "fleet.on_error",
                format!("unknown action {other:?}: use local or reject"),
            );
            FleetOnError::Local
        }
    };
    let timeout = raw
        .timeout
        .map(|d| d.0)
        .unwrap_or(Duration::from_millis(250));
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        v.push(
            MAIN_FILE,
            "fleet.timeout",
            "must be between 1ms and 10s (it is paid by a request when Redis is slow)",
        );
    }
    FleetConfig {
        redis,
        key_prefix,
        timeout,
        on_error,
    }
}

fn resolve_limits(at: &str, raw: &RawLimits, v: &mut Issues<'_>) -> Limits {
    for (field, value) in [
        ("requests_per_minute", raw.requests_per_minute),
        ("tokens_per_minute", raw.tokens_per_minute),
    ] {
        if value == Some(0) {
            v.push(
                KEYS_FILE,
                format!("{at}.{field}"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    Limits {
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
    }
}

const DEFAULT_POLICY: CachePolicy = CachePolicy {
    enabled: true,
    semantic: true,
    similarity_threshold: 0.95,
    ttl: Duration::from_secs(24 * 3600),
    version: 1,
    max_temperature: 1.0,
};

fn resolve_policy(
    at: &str,
    raw: &RawCachePolicy,
    base: &CachePolicy,
    v: &mut Issues<'_>,
) -> CachePolicy {
    let threshold = raw
        .similarity_threshold
        .unwrap_or(base.similarity_threshold);
    if !(0.5..=1.0).contains(&threshold) {
        v.push(
            CACHE_FILE,
            format!("{at}similarity_threshold"),
            "must be between 0.5 and 1.0 (cosine similarity)",
        );
    }
    let max_temperature = raw.max_temperature.unwrap_or(base.max_temperature);
    if !(0.0..=2.0).contains(&max_temperature) {
        v.push(
            CACHE_FILE,
            format!("{at}max_temperature"),
            "must be between 0 and 2",
        );
    }
    let ttl = raw.ttl.map(|d| d.0).unwrap_or(base.ttl);
    if ttl < Duration::from_secs(1) {
        v.push(CACHE_FILE, format!("{at}ttl"), "must be at least 1s");
    }
    CachePolicy {
        enabled: raw.enabled.unwrap_or(base.enabled),
        semantic: raw.semantic.unwrap_or(base.semantic),
        similarity_threshold: threshold.clamp(0.5, 1.0),
        ttl: ttl.max(Duration::from_secs(1)),
        version: raw.version.unwrap_or(base.version),
        max_temperature: max_temperature.clamp(0.0, 2.0),
    }
}

fn resolve_cache(dir: &Path, raw: RawCache, config: &Config, v: &mut Issues<'_>) -> CacheConfig {
    let top = RawCachePolicy {
        enabled: Some(true),
        semantic: raw.semantic,
        similarity_threshold: raw.similarity_threshold,
        ttl: raw.ttl,
        version: raw.version,
        max_temperature: raw.max_temperature,
    };
    let defaults = resolve_policy("cache.", &top, &DEFAULT_POLICY, v);
    let mut routes = BTreeMap::new();
    for (name, p) in &raw.routes {
        if !config.routes.contains_key(name) && config.model(name).is_none() {
            v.push(
                CACHE_FILE,
                format!("cache.routes.{name}"),
                format!("{name:?} is neither a route alias nor a model"),
            );
        }
        routes.insert(
            name.clone(),
            resolve_policy(&format!("cache.routes.{name}."), p, &defaults, v),
        );
    }
    for (i, pat) in raw.exclude.patterns.iter().enumerate() {
        if let Err(e) = regex::Regex::new(pat) {
            v.push(
                CACHE_FILE,
                format!("cache.exclude.patterns[{i}]"),
                format!("invalid regular expression: {e}"),
            );
        }
    }
    let mut detectors = Vec::new();
    for (i, d) in raw.exclude.detectors.iter().enumerate() {
        match d.as_str() {
            "email" => detectors.push(Detector::Email),
            "phone" => detectors.push(Detector::Phone),
            "card" => detectors.push(Detector::Card),
            "api_key" => detectors.push(Detector::ApiKey),
            other => v.push(
                CACHE_FILE,
                format!("cache.exclude.detectors[{i}]"),
                format!("unknown detector {other:?}: use email, phone, card or api_key"),
            ),
        }
    }
    let top_k = raw.top_k.unwrap_or(8);
    if !(1..=256).contains(&top_k) {
        v.push(CACHE_FILE, "cache.top_k", "must be between 1 and 256");
    }
    CacheConfig {
        enabled: raw.enabled.unwrap_or(false),
        defaults,
        routes,
        l1_entries: raw.l1_entries.unwrap_or(10_000).max(1),
        top_k: top_k.clamp(1, 256),
        max_pending_inserts: raw.max_pending_inserts.unwrap_or(1024).max(1),
        ivf_threshold: raw.ivf_threshold.unwrap_or(20_000).max(1_000),
        encryption_key_file: raw.encryption_key_file.map(|f| relative_to(dir, &f)),
        exclude_patterns: raw.exclude.patterns,
        detectors,
    }
}

fn relative_to(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

fn http_header_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const PROVIDERS: &str =
        "providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:8000/v1\n";
    const MODELS: &str = "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n";

    #[test]
    fn loads_minimal_dir_with_defaults() {
        let dir = write_dir(&[
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 32 << 20);
        assert_eq!(c.models[0].deployments[0].upstream_model, "mock-small");
        assert_eq!(c.providers["mock"].base_url.path, "/v1");
        assert!(c.resolve_model("small").is_some());
        assert!(c.resolve_model("nope").is_none());
    }

    #[test]
    fn unknown_key_names_file_path_and_line() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  listen: 127.0.0.1:1\n  lisen: 127.0.0.1:2\n",
        )]);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.issues.len(), 1);
        let i = &err.issues[0];
        assert!(i.file.ends_with(MAIN_FILE));
        assert_eq!(i.line, Some(3));
        assert!(i.path.starts_with("server"), "{i}");
        assert!(i.message.contains("unknown field `lisen`"), "{i}");
    }

    #[test]
    fn wrong_type_is_reported_with_path() {
        let dir = write_dir(&[(MAIN_FILE, "server:\n  threads: many\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        let i = &err.issues[0];
        assert_eq!(i.path, "server.threads");
        assert_eq!(i.line, Some(2));
    }

    #[test]
    fn validation_reports_every_error_with_lines() {
        let models = "models:\n  - name: a\n    deployments:\n      - provider: nope\n  - name: a\n    deployments: []\n";
        let routes = "routes:\n  auto:\n    model: missing\n";
        let dir = write_dir(&[
            (MAIN_FILE, "server:\n  listen: nonsense\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
            (ROUTES_FILE, routes),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("smartllm.yaml:2: server.listen"), "{text}");
        assert!(
            text.contains(
                "models.yaml:4: models[0].deployments[0].provider: unknown provider \"nope\""
            ),
            "{text}"
        );
        assert!(
            text.contains("models.yaml:5: models[1].name: model \"a\" is defined twice"),
            "{text}"
        );
        assert!(
            text.contains("models.yaml:6: models[1].deployments"),
            "{text}"
        );
        assert!(
            text.contains("routes.yaml:3: routes.auto.model: unknown model \"missing\""),
            "{text}"
        );
        assert_eq!(err.issues.len(), 5, "{text}");
    }

    #[test]
    fn an_admin_listener_beyond_loopback_needs_a_token() {
        let main = "server:\n  admin_listen: 0.0.0.0:9090\n";
        let dir = write_dir(&[(MAIN_FILE, main)]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains(
                "smartllm.yaml:2: server.admin_listen: 0.0.0.0:9090 is not a loopback address"
            ),
            "{text}"
        );
        let with_token = format!("{main}admin:\n  token_env: SMARTLLM_ADMIN_TOKEN\n");
        let dir = write_dir(&[(MAIN_FILE, &with_token)]);
        assert!(load_dir(dir.path()).is_ok());
        // Loopback (the default) needs none.
        let dir = write_dir(&[(MAIN_FILE, "server:\n  admin_listen: '[::1]:9090'\n")]);
        assert!(load_dir(dir.path()).is_ok());
    }

    #[test]
    fn overload_bounds_are_validated() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  max_in_flight: 0\nembedder:\n  queue_depth: 0\n  max_queue_wait: 0s\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:2: server.max_in_flight"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:4: embedder.queue_depth"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:5: embedder.max_queue_wait"),
            "{text}"
        );
        let c = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert_eq!(c.server.max_in_flight, 4096);
        assert_eq!(c.embedder.queue_depth, 256);
        assert_eq!(c.embedder.max_queue_wait, Duration::from_millis(250));
        assert_eq!(c.cache.max_pending_inserts, 1024);
    }

    #[test]
    fn client_timeouts_are_validated_and_default_sensibly() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  client_header_timeout: 0s\n  client_body_deadline: 0ms\n  keepalive_timeout: 0s\n  http1_pipelining: false\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        for (line, key) in [
            (2, "client_header_timeout"),
            (3, "client_body_deadline"),
            (4, "keepalive_timeout"),
        ] {
            assert!(
                text.contains(&format!("smartllm.yaml:{line}: server.{key}")),
                "{text}"
            );
        }
        let c = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert_eq!(c.server.client_header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.client_body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.client_body_deadline, Duration::from_secs(300));
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(60));
        assert!(c.server.http1_pipelining);
        assert_eq!(c.store.memory_budget, 128 << 20);
        let dir = write_dir(&[(MAIN_FILE, "store:\n  memory_budget: 1MiB\n")]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:2: store.memory_budget"),
            "{text}"
        );
    }

    #[test]
    fn lines_are_counted_as_editors_count_them_even_with_a_lone_cr() {
        assert_eq!(file_line("a\nb\nc\n", 3), 3);
        assert_eq!(file_line("a\r\nb\r\nc", 3), 3);
        // YAML's line 3 starts after "b\r", which is still the file's line 2.
        assert_eq!(file_line("a\nb\rc: [\n", 3), 2);
        // CR CR LF: two YAML line breaks, one LF.
        let dir = write_dir(&[(MAIN_FILE, "# a\r\r\nserver:\n  threads: many\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.issues[0].line, Some(3), "{err}");
    }

    #[test]
    fn syntax_error_has_line() {
        let dir = write_dir(&[(MAIN_FILE, "server:\n  listen: [\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.issues[0].line.is_some(), "{err}");
    }

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

    #[test]
    fn cache_policies_resolve_per_route() {
        let cache = "cache:\n  enabled: true\n  ttl: 1h\n  exclude:\n    patterns: ['secret']\n    detectors: [email]\n  routes:\n    auto:\n      similarity_threshold: 0.97\n      version: 3\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (ROUTES_FILE, "routes:\n  auto:\n    model: small\n"),
            (CACHE_FILE, cache),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert!(c.cache.enabled);
        let p = c.cache.policy(Some("auto"), "small");
        assert_eq!(
            (p.similarity_threshold, p.version, p.ttl),
            (0.97, 3, Duration::from_secs(3600))
        );
        let d = c.cache.policy(None, "small");
        assert_eq!((d.similarity_threshold, d.version), (0.95, 1));
        assert_eq!(c.cache.detectors, vec![Detector::Email]);

        let bad = "cache:\n  similarity_threshold: 2\n  exclude:\n    patterns: ['(']\n    detectors: [dna]\n  routes:\n    ghost: {}\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (CACHE_FILE, bad),
        ]);
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("cache.yaml:2: cache.similarity_threshold"),
            "{err}"
        );
        assert!(
            err.contains("cache.exclude.patterns[0]: invalid regular expression"),
            "{err}"
        );
        assert!(
            err.contains("cache.exclude.detectors[0]: unknown detector"),
            "{err}"
        );
        assert!(err.contains("cache.routes.ghost"), "{err}");
    }

    #[test]
    fn keys_and_pricing() {
        let models = "models:\n  - name: small\n    pricing: { input: 0.15, output: 0.6 }\n    deployments:\n      - provider: mock\n";
        let keys = "keys:\n  - name: demo\n    sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n    tenant: acme\n    models: [small]\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
            (KEYS_FILE, keys),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert!(c.keys.require_key);
        assert_eq!(c.keys.keys[0].app, "default");
        assert_eq!(c.models[0].pricing.cached_input_per_1m, 0.15);
        let bad = "keys:\n  - name: a\n    sha256: xyz\n    tenant: t\n  - name: a\n    sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n    tenant: t\n    models: [ghost]\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, bad),
        ]);
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("keys.yaml:3: keys[0].sha256"), "{err}");
        assert!(
            err.contains("keys[1].name: key name \"a\" is used twice"),
            "{err}"
        );
        assert!(err.contains("keys[1].models[0]"), "{err}");
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
}
