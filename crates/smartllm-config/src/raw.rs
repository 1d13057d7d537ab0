//! Raw config as written in the files of the config directory. Every struct
//! denies unknown fields so a typo is an error naming the key, never a silently
//! ignored setting. These types are only deserialized; the rest of the gateway
//! sees the validated [`crate::Config`].

use crate::units::{ByteSize, ConfigDuration};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// A map whose keys are all different. serde reads a key given twice as the
/// last one, silently: a second `apps: acme/web` or `providers: openai`
/// block would replace the first with no word. Here it is an error naming
/// the key, at its line.
fn unique_keys<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visit<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut m = BTreeMap::new();
            while let Some(k) = a.next_key::<String>()? {
                if m.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "`{k}` is defined twice; each key may appear once"
                    )));
                }
                let v = a.next_value()?;
                m.insert(k, v);
            }
            Ok(m)
        }
    }
    d.deserialize_map(Visit(std::marker::PhantomData))
}

/// `smartllm.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMain {
    #[serde(default)]
    pub server: RawServer,
    pub data_dir: Option<String>,
    #[serde(default)]
    pub embedder: RawEmbedder,
    #[serde(default)]
    pub logging: RawLogging,
    #[serde(default)]
    pub demo: RawDemo,
    #[serde(default)]
    pub reload: RawReload,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub fleet: RawFleet,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub tracing: RawTracing,
}

/// OpenTelemetry spans exported by OTLP/HTTP (off without `otlp_endpoint`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// The collector's OTLP/HTTP base URL (`http://host:4318`; `/v1/traces` is appended).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept (0..1); a client's sampled flag is honoured.
    pub sample_ratio: Option<f64>,
    /// `service.name` of the exported spans.
    pub service_name: Option<String>,
}

/// What `/metrics` may say about callers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Distinct tenant (and app, and key) names in metric labels; later ones
    /// are reported as `__overflow__`.
    pub max_label_values: Option<usize>,
    /// `plain` (names as configured) or `hashed` (first 12 hex of their sha256).
    pub label_names: Option<String>,
}

/// Limits and budgets shared by a fleet of gateways through Redis.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// `redis://[user:password@]host:port/db`, `rediss://` (TLS) or
    /// `redis+unix:///path`; unset = per process.
    pub redis: Option<String>,
    /// PEM CA certificates a `rediss://` server's certificate must chain
    /// to, instead of the public roots.
    pub tls_ca_file: Option<String>,
    /// Prefix of every key the gateway writes (several fleets can share one Redis).
    pub key_prefix: Option<String>,
    /// Connect and reply timeout of one Redis call.
    pub timeout: Option<ConfigDuration>,
    /// When Redis cannot be reached: `local` (per-process limits and budgets) or `reject` (503).
    pub on_error: Option<String>,
    /// Replicate cache inserts, purges and version changes to every gateway.
    pub share_cache: Option<bool>,
    /// Entries the replication stream keeps for gateways that fall behind.
    pub cache_stream_len: Option<u64>,
    /// Add this gateway's ledger to the fleet's cost view (`?scope=fleet`).
    pub share_costs: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// The admin API's bearer token, from an environment variable...
    pub token_env: Option<String>,
    /// ...or a file. Without either, /admin/* is open to whoever reaches the admin listener.
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// How often aggregated counters are written (at most this much is lost on kill -9).
    pub flush_interval: Option<ConfigDuration>,
    /// `allow` (default) or `reject`: requests to models without any price.
    pub unpriced: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// RocksDB's memory: one block cache shared by every column family, with
    /// the memtables (at most half of it) and index/filter blocks inside.
    pub memory_budget: Option<ByteSize>,
    /// Keep Responses API conversations for `previous_response_id` (for
    /// providers that do not keep them).
    pub responses: Option<bool>,
    /// How long a kept conversation lives.
    pub responses_ttl: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub threads: Option<usize>,
    pub max_body_size: Option<ByteSize>,
    /// Request line plus headers; larger requests get 431.
    pub max_header_size: Option<ByteSize>,
    /// Longest pause between two chunks of a request body (408 beyond it).
    pub client_body_timeout: Option<ConfigDuration>,
    /// The request line and headers must be complete this long after the
    /// connection opens (or, on a keep-alive connection, after the idle
    /// timeout); a client that trickles them (slowloris) is disconnected.
    pub client_header_timeout: Option<ConfigDuration>,
    /// The whole request body must arrive within this of its headers (408),
    /// however steadily it trickles.
    pub client_body_deadline: Option<ConfigDuration>,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_timeout: Option<ConfigDuration>,
    /// Longest wait for a client to take the next part of an answer: one
    /// that stops reading is cut off after it.
    pub client_write_timeout: Option<ConfigDuration>,
    /// Serve HTTP/1.1 requests a client sends before reading the previous
    /// answer (in order, one at a time) instead of closing the connection.
    pub http1_pipelining: Option<bool>,
    pub upstream_connect_timeout: Option<ConfigDuration>,
    pub upstream_first_byte_timeout: Option<ConfigDuration>,
    pub upstream_idle_timeout: Option<ConfigDuration>,
    pub upstream_attempts: Option<usize>,
    /// Requests in progress at once; beyond it new ones get 503 + Retry-After.
    pub max_in_flight: Option<usize>,
    pub grace_period: Option<ConfigDuration>,
    pub graceful_shutdown_timeout: Option<ConfigDuration>,
    /// After SIGTERM, how long `/readyz` says 503 while requests are still
    /// served, before the drain refuses new ones.
    pub drain_delay: Option<ConfigDuration>,
    /// TLS on the API listener (ALPN h2 and http/1.1).
    pub tls: Option<RawTls>,
    /// Cleartext HTTP/2 with prior knowledge (h2c) on a plaintext API listener.
    pub h2c: Option<bool>,
    /// TLS on the admin listener (HTTP/1.1).
    pub admin_tls: Option<RawTls>,
}

/// `server.tls`: PEM files, relative to the config directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The certificate chain, leaf first.
    pub cert_file: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CAs whose client certificates are accepted; when set, every client
    /// must present one (mutual TLS).
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbedder {
    pub assets_dir: Option<String>,
    pub model: Option<String>,
    pub tokenizer: Option<String>,
    pub onnxruntime: Option<String>,
    pub threads: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub device: Option<String>,
    /// Embedding jobs waiting for a worker; a lookup that finds it full skips the cache.
    pub queue_depth: Option<usize>,
    /// A job that waited longer than this is not run; its request skips the cache.
    pub max_queue_wait: Option<ConfigDuration>,
    /// Recent embeddings kept by text (0 = none).
    pub cache_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub level: Option<String>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemo {
    /// `auto`: when no provider that needs a key has one, send their traffic to `upstream`.
    pub mode: Option<String>,
    pub upstream: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub watch: Option<bool>,
    pub debounce: Option<ConfigDuration>,
}

/// `providers.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviders {
    #[serde(default, deserialize_with = "unique_keys")]
    pub providers: BTreeMap<String, RawProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: String,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub headers: BTreeMap<String, String>,
    pub anthropic_version: Option<String>,
    /// An OpenAI-compatible provider drops the thinking blocks of Anthropic
    /// Messages requests instead of refusing them.
    pub drop_thinking: Option<bool>,
    /// Responses requests with built-in tools (`web_search`, `file_search`,
    /// ...) reach this provider, which does not speak Responses, without
    /// them, rather than being refused with a 400.
    pub drop_builtin_tools: Option<bool>,
    /// The provider speaks OpenAI's Responses API (`/v1/responses` requests
    /// pass through to it instead of being translated).
    pub responses: Option<bool>,
    /// PEM bundle of CAs to trust for this provider instead of the system roots
    /// (private deployments behind their own CA).
    pub tls_ca_file: Option<String>,
    /// Ask streaming upstreams for a final usage chunk (`stream_options.include_usage`).
    pub stream_usage: Option<bool>,
    /// The name the provider takes for the answer's token limit:
    /// `max_tokens` or `max_completion_tokens`.
    pub max_tokens_field: Option<String>,
    pub connect_timeout: Option<ConfigDuration>,
    pub first_byte_timeout: Option<ConfigDuration>,
    pub idle_timeout: Option<ConfigDuration>,
    pub health_check: Option<RawHealthCheck>,
    pub circuit_breaker: Option<RawCircuitBreaker>,
}

/// Per deployment: open after `failures` consecutive failures, let one trial
/// request through after `cooldown`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    pub failures: Option<u32>,
    pub cooldown: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `tcp` (connect, and TLS handshake for https), `http` (GET `path` must answer 2xx) or `none`.
    pub kind: Option<String>,
    pub path: Option<String>,
    pub interval: Option<ConfigDuration>,
    pub failures: Option<usize>,
    pub successes: Option<usize>,
}

/// `models.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Benchmark name to the router's tasks it measures: added to (or
    /// replacing entries of) the shipped mapping `profile.benchmarks` uses.
    #[serde(default, deserialize_with = "unique_keys")]
    pub benchmark_tasks: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub owned_by: Option<String>,
    pub deployments: Vec<RawDeployment>,
    pub pricing: Option<RawPricing>,
    /// Price multipliers of the provider's processing tiers (`flex`,
    /// `priority`), on `pricing` or the catalog's prices.
    pub service_tiers: Option<RawServiceTiers>,
    /// What the model does: `chat` (also completions), `embedding`, `image`,
    /// `audio` or `rerank`; inferred from its names when absent.
    pub mode: Option<String>,
    /// What the router knows about the model before measuring it.
    pub profile: Option<RawProfile>,
}

/// Static model profile (`models.yaml`): the router's prior.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// Prompt plus completion tokens the model accepts.
    pub context_window: Option<u64>,
    /// The most completion tokens one answer may have (the provider's limit).
    pub max_output_tokens: Option<u64>,
    /// tools, vision, json, ...
    pub capabilities: Option<Vec<String>>,
    /// Quality per task from 0 to 1 (code, math, reasoning, summarisation,
    /// extraction, translation, creative, chat); `default` for the rest.
    #[serde(default, deserialize_with = "unique_keys")]
    pub quality: BTreeMap<String, f64>,
    /// Scores (0 to 1) on public benchmarks, as read off leaderboards
    /// (`gpqa: 0.65`); each task takes the mean of the benchmarks mapped to
    /// it, where `quality` does not name the task.
    #[serde(default, deserialize_with = "unique_keys")]
    pub benchmarks: BTreeMap<String, f64>,
    /// Typical output speed.
    pub tokens_per_second: Option<f64>,
    /// Typical time to first token.
    pub latency: Option<ConfigDuration>,
}

/// `profiles.yaml`: quality per task measured by `smartllm profile run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeasuredProfiles {
    /// The labelled set the answers were scored on.
    pub set: Option<String>,
    /// When the measurement ended (RFC 3339, for people).
    pub measured_at: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub models: BTreeMap<String, RawMeasuredModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeasuredModel {
    /// Share of answers scored right, per task (0 to 1).
    #[serde(deserialize_with = "unique_keys")]
    pub quality: BTreeMap<String, f64>,
    /// Questions asked per task (for people; not used by the router).
    #[serde(default, deserialize_with = "unique_keys")]
    pub answers: BTreeMap<String, u64>,
}

/// USD per million tokens, and per request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cached_input: Option<f64>,
    /// Prompt-cache writes (5 minutes); default: 1.25x input on Anthropic, else input.
    pub cache_write: Option<f64>,
    /// 1-hour prompt-cache writes; default: 2x input on Anthropic, else `cache_write`.
    pub cache_write_1h: Option<f64>,
    /// Reasoning tokens, when priced apart from output.
    pub reasoning: Option<f64>,
    /// Audio prompt tokens, when priced apart from text input.
    pub audio_input: Option<f64>,
    /// Audio answer tokens, when priced apart from text output.
    pub audio_output: Option<f64>,
    pub per_request: Option<f64>,
    /// USD per 1,000 server-side web searches (default 10).
    pub web_search: Option<f64>,
    pub long_context: Option<RawLongContext>,
}

/// How a processing tier scales every token price (`flex: 0.5`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServiceTiers {
    pub flex: Option<f64>,
    pub priority: Option<f64>,
}

/// Prices for prompts above `above` tokens (every token of such a request).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLongContext {
    pub above: u64,
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cached_input: Option<f64>,
    pub cache_write: Option<f64>,
    pub cache_write_1h: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub provider: String,
    /// Model name sent upstream; defaults to the model's `name`.
    pub model: Option<String>,
    pub weight: Option<usize>,
}

/// `routes.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoutes {
    #[serde(default, deserialize_with = "unique_keys")]
    pub routes: BTreeMap<String, RawRoute>,
    /// The task classifier's labelled examples.
    #[serde(default)]
    pub classifier: RawClassifier,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassifier {
    /// TSV file (`task<TAB>prompt`), relative to the config directory.
    pub examples: Option<String>,
    /// Neighbours that vote on a prompt's task.
    pub k: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// A fixed alias: the model it resolves to.
    pub model: Option<String>,
    /// Other model names this alias answers to: patterns where `*` stands
    /// for any characters (`claude-sonnet-*`, the dated names clients send).
    #[serde(default, rename = "match")]
    pub patterns: Vec<String>,
    /// A routed alias: the models the router chooses from.
    pub candidates: Option<Vec<String>>,
    /// `utility` (profiles from models.yaml and live measurements) or `learned`.
    pub strategy: Option<String>,
    /// The learned router's file (`smartllm train-router`), for `strategy: learned`.
    pub learned: Option<String>,
    pub weights: Option<RawWeights>,
    #[serde(default)]
    pub constraints: RawConstraints,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// Models tried, in order, after the chosen one fails before any byte reached the client.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// How many other models a failed request may fall back to (default 2).
    pub max_fallbacks: Option<usize>,
    pub experiment: Option<RawExperiment>,
    /// Budget use (0-1) above which the router shifts towards cheaper
    /// candidates (default 0.8).
    pub budget_pressure_at: Option<f64>,
    /// `log` (default), `linear` or `cheapest_within`.
    pub cost_rule: Option<String>,
    /// For `cheapest_within`: how much lower (a share, 0-0.5) the chosen
    /// model's expected quality may be than the best candidate's (default 0.02).
    pub quality_tolerance: Option<f64>,
    /// Share of requests (0-0.5) on which the router explores: each
    /// candidate's quality is drawn from its posterior (profile + feedback)
    /// instead of taking its mean (Thompson sampling). Default 0.
    pub explore: Option<f64>,
    /// Candidates whose expected quality is under this are never explored.
    pub explore_floor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeights {
    pub quality: Option<f64>,
    pub cost: Option<f64>,
    pub latency: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConstraints {
    /// Expected time to the full answer must fit.
    pub latency_budget: Option<ConfigDuration>,
    /// Expected cost of one request must fit (USD).
    pub max_cost_usd: Option<f64>,
    /// Capabilities every candidate must have.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Minimum expected quality (0-1) for the prompt's task.
    pub min_quality: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<String>,
    #[serde(default)]
    pub when: RawWhen,
    /// Serve with this model.
    pub pin: Option<String>,
    /// Never use these models.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Use one of these when any meets the constraints.
    #[serde(default)]
    pub prefer: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    #[serde(default)]
    pub task: Vec<String>,
    pub min_complexity: Option<f64>,
    pub max_complexity: Option<f64>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    #[serde(default)]
    pub language: Vec<String>,
    pub has_code: Option<bool>,
    pub has_math: Option<bool>,
    pub has_tools: Option<bool>,
    pub has_images: Option<bool>,
    /// Request headers that must be present with these values (`*`: any value).
    #[serde(default, deserialize_with = "unique_keys")]
    pub headers: BTreeMap<String, String>,
    /// Apps (`tenant/app`, or the app's name).
    #[serde(default)]
    pub app: Vec<String>,
    #[serde(default)]
    pub tenant: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperiment {
    pub name: String,
    /// `user` (the body's `user`, else the key) or `key`.
    pub sticky_by: Option<String>,
    pub arms: Vec<RawArm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArm {
    pub name: String,
    pub weight: f64,
    /// Serve this arm with this model; without one the arm takes the route's own choice.
    pub model: Option<String>,
}

/// `cache.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheFile {
    #[serde(default)]
    pub cache: RawCache,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Global switch.
    pub enabled: Option<bool>,
    pub semantic: Option<bool>,
    pub similarity_threshold: Option<f32>,
    pub ttl: Option<ConfigDuration>,
    pub version: Option<u32>,
    pub max_temperature: Option<f64>,
    /// Whether semantic candidates get the verifier's second opinion.
    pub verifier: Option<bool>,
    /// The verifier's score (0..1) a candidate needs to be served.
    pub verifier_threshold: Option<f32>,
    /// Exact-match entries kept in memory.
    pub l1_entries: Option<usize>,
    /// ANN candidates verified per semantic lookup.
    pub top_k: Option<usize>,
    /// Answers waiting to be stored; beyond it new ones are not stored.
    pub max_pending_inserts: Option<usize>,
    /// Vectors at which the flat index is replaced by a trained IVF index.
    pub ivf_threshold: Option<usize>,
    /// Vectors from which an IVF build uses product quantisation (PQ)
    /// instead of 8-bit scalar codes.
    pub pq_threshold: Option<usize>,
    /// 32-byte key (raw, or 64 hex characters) for AES-256-GCM at rest.
    pub encryption_key_file: Option<String>,
    /// `tenant` (default), `app` or `key`: who shares cached answers.
    pub isolation: Option<String>,
    /// Keys of earlier rotations (same format): they open entries sealed
    /// before, never seal new ones.
    #[serde(default)]
    pub encryption_old_key_files: Vec<String>,
    #[serde(default)]
    pub exclude: RawCacheExclude,
    /// Overrides per route alias or model name.
    #[serde(default, deserialize_with = "unique_keys")]
    pub routes: BTreeMap<String, RawCachePolicy>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCachePolicy {
    pub enabled: Option<bool>,
    pub semantic: Option<bool>,
    pub similarity_threshold: Option<f32>,
    pub ttl: Option<ConfigDuration>,
    pub version: Option<u32>,
    pub max_temperature: Option<f64>,
    pub verifier: Option<bool>,
    pub verifier_threshold: Option<f32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheExclude {
    /// Regular expressions; a prompt matching any is never cached.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Built-in detectors: email, phone, card, api_key, ssn, iban.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Apply the patterns and detectors to answers too: an answer carrying
    /// one is not stored.
    pub answers: Option<bool>,
}

/// `keys.yaml`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeysFile {
    /// Refuse requests without a known virtual key (default true when keys are listed).
    pub require_key: Option<bool>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// Limits per application, keyed `tenant/app`.
    #[serde(default, deserialize_with = "unique_keys")]
    pub apps: BTreeMap<String, RawApp>,
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// tenant, app or key
    pub scope: String,
    /// The tenant, `tenant/app`, or key name.
    pub name: String,
    pub daily_usd: Option<f64>,
    pub monthly_usd: Option<f64>,
    /// No single request may cost more than this (max_tokens is capped to fit).
    pub max_request_usd: Option<f64>,
    /// Percentages of a budget that raise an alert (default 50, 80, 100).
    pub alert_at: Option<Vec<f64>>,
    /// At 100%: `reject` (429) or `degrade` (to `degrade_to`).
    pub on_exceed: Option<String>,
    pub degrade_to: Option<String>,
    /// Alerts are POSTed here as JSON (retried, never blocking a request).
    pub webhook: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: String,
    /// Hex sha256 of the key (`smartllm keys hash < key-file`); the key itself is never stored.
    pub sha256: String,
    /// The key it replaces, still accepted during a rotation (`smartllm
    /// keys rotate`; `--finish` removes it).
    pub previous_sha256: Option<String>,
    pub tenant: String,
    pub app: Option<String>,
    /// Models or route aliases this key may use; empty = all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: RawLimits,
}
