//! Per-request context: the config snapshot the request runs on, its id and
//! everything the access log and metrics report at the end.

use crate::runtime::Runtime;
use pingora_proxy::Session;
use smartllm_protocol::Usage;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Ctx {
    pub start: Instant,
    pub request_id: String,
    pub rt: Option<Arc<Runtime>>,
    pub endpoint: &'static str,
    /// The client speaks Anthropic's API: its errors and answers take
    /// Anthropic's shapes.
    pub anthropic: bool,
    pub route: Option<String>,
    /// The model a request named by name before a budget served a cheaper
    /// one: `x-smartllm-route` names it (the ledger's route stays "-").
    pub degraded_from: Option<String>,
    /// The model serving the request: read with [`Ctx::model`], set only
    /// by [`Ctx::set_model`].
    model: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    /// The provider's own id of the request (`x-request-id`, Anthropic's
    /// `request-id`), for its support: `x-smartllm-upstream-request-id`.
    pub upstream_request_id: Option<String>,
    pub status: u16,
    pub error_code: Option<&'static str>,
    pub stream: bool,
    pub usage: Option<Usage>,
    /// A Chat Completions request with `web_search_options`: OpenAI runs
    /// one search for it and bills it per call, which its usage does not
    /// report.
    pub web_search: bool,
    /// Time spent waiting on upstreams (connect, request, response reads).
    pub upstream_wait: Duration,
    pub ttft: Option<Duration>,
    pub attempts: u32,
    /// Models that failed this request before a fallback took it over.
    pub failed_models: Vec<String>,
    pub request_bytes: usize,
    /// What the provider is sent, about: the body, plus the conversation a
    /// Responses `previous_response_id` continues (the estimates' input).
    pub prompt_bytes: usize,
    /// The prompt's tokens, estimated before it is parsed: about 4 bytes a
    /// token of text, inline image data counted per image (a 4 MB
    /// screenshot is about 1,600 tokens, not a million: `prompt_bytes / 4`
    /// would hold $3 of a budget for it), plus a Responses conversation
    /// carried upstream. What budgets, message_start and Responses usage
    /// estimates read.
    pub prompt_tokens: u64,
    /// How the conversation `previous_response_id` continues is stored: a
    /// new response is kept as what it adds to it.
    pub previous_chain: Option<crate::responses_store::Chain>,
    pub client_gone: bool,
    /// The client sent bytes after its request (HTTP/1.1 pipelining): its
    /// connection is no longer watched for a close while the upstream works.
    pub client_unwatched: bool,
    pub counted: bool,
    /// `x-smartllm-cache`: hit-exact, hit-semantic, miss, bypass.
    pub cache_status: Option<&'static str>,
    pub cache_similarity: Option<f32>,
    /// The request's cache namespace (hex), for the access log: what
    /// `POST /admin/cache/purge?namespace=` takes after a complaint.
    pub cache_namespace: Option<String>,
    /// Why the nearest candidate was refused (a guard rule, `verifier`,
    /// `beyond_window`), for the access log.
    pub cache_refused: Option<&'static str>,
    /// The cache verifier's score of a semantic hit it judged.
    pub cache_verifier: Option<f32>,
    /// A miss whose best semantic match came close to the threshold.
    pub cache_near: bool,
    /// The router's task and complexity of the prompt (cost suggestions).
    pub task: Option<&'static str>,
    pub complexity: Option<f64>,
    /// Set on a cache miss: store the answer once it is complete.
    pub cache_insert: Option<crate::cache_insert::PendingInsert>,
    /// The prompt's task vector (the router's classifier view), from the
    /// cache's model run when it made one.
    pub task_vector: Option<Vec<f32>>,
    /// The cache's exact key of this request, folded to 64 bits (tenant,
    /// model or route, conversation, settings, question): what a regenerate
    /// is recognised by.
    pub question: Option<u64>,
    /// Asked with `Cache-Control: no-cache`: a fresh answer wanted.
    pub regenerate: bool,
    /// The answer stopped at the model's own output limit although no
    /// max-tokens limit was asked for (by the client or the cost cap): an
    /// outcome that counts against the model.
    pub cut_off: bool,
    /// This attempt's output limit was lowered to the model's own most
    /// (`profile.max_output_tokens`).
    pub limit_lowered: bool,
    /// The built-in tools this attempt's provider was sent the request
    /// without (`drop_builtin_tools`), for `x-smartllm-dropped-tools`.
    pub dropped_tools: Option<String>,
    /// The answer's stream broke after it started (the status was already
    /// 200): a failure of the model, not an answer.
    pub stream_failed: bool,
    /// Who is asking: from the virtual key (or anonymous).
    pub tenant: String,
    pub app: String,
    pub key_name: String,
    /// The start of the SHA-256 of the key presented (12 hex digits, as
    /// `smartllm keys list` shows them), known or not: a revoked or leaked
    /// key's callers can be found in the access log by it.
    pub key_sha256: Option<String>,
    /// The caller's virtual key, when it presented a known one.
    pub key: Option<Arc<smartllm_config::VirtualKey>>,
    /// Usage of the answer a cache hit replayed (its cost was saved).
    pub saved_usage: Option<Usage>,
    /// Usage was estimated (the upstream reported none).
    pub usage_estimated: bool,
    /// Tokens already charged against rate limits before the request.
    pub precharged_tokens: u64,
    /// What the key's rate limits leave it after this request (sent as
    /// `x-ratelimit-*`, or `anthropic-ratelimit-*` to Anthropic clients).
    pub ratelimit: smartllm_quota::Headroom,
    /// The request's estimated cost, held against its budgets until its
    /// cost is recorded (dropped then, or with the context).
    pub budget_hold: Option<smartllm_quota::budget::Hold>,
    /// The request's cost was recorded against its budgets (and its hold
    /// let go) before the answer's last bytes went out
    /// ([`crate::pipeline::finish::settle_budget`]): the end counts it no
    /// more.
    pub budget_settled: bool,
    /// Why this model serves the request (`alias`, `budget`, the router's
    /// reason, `fallback:MODEL`), for `x-smartllm-route`; `-` until the
    /// request names a model (a refusal before that chose none).
    pub route_reason: String,
    /// How the router weighed cost (`log`, `cheapest_within:2%`), for `x-smartllm-route`.
    pub route_cost_rule: Option<String>,
    /// (experiment, arm) of a routed request in an A/B experiment.
    pub experiment: Option<(String, String)>,
    /// Counted in `Shared::in_flight` (released in the logging phase, or
    /// when the context is dropped: a request whose task panicked is not
    /// waited on by every drain after it).
    pub in_flight: Option<InFlight>,
    /// The client's spend tag (`x-smartllm-tag`, else the body's
    /// `metadata.tag`), for `/admin/costs?group_by=tag`.
    pub tag: Option<String>,
    /// The request's spans (with `tracing.otlp_endpoint` set).
    pub trace: Option<crate::otel::RequestTrace>,
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}

impl Ctx {
    pub fn new() -> Self {
        Ctx {
            start: Instant::now(),
            request_id: String::new(),
            rt: None,
            endpoint: "other",
            anthropic: false,
            web_search: false,
            route: None,
            degraded_from: None,
            model: None,
            provider: None,
            upstream_model: None,
            upstream_request_id: None,
            status: 0,
            error_code: None,
            stream: false,
            usage: None,
            upstream_wait: Duration::ZERO,
            ttft: None,
            attempts: 0,
            failed_models: Vec::new(),
            request_bytes: 0,
            prompt_bytes: 0,
            prompt_tokens: 0,
            previous_chain: None,
            client_gone: false,
            client_unwatched: false,
            counted: false,
            cache_status: None,
            cache_similarity: None,
            cache_namespace: None,
            cache_refused: None,
            cache_verifier: None,
            cache_near: false,
            task: None,
            complexity: None,
            cache_insert: None,
            task_vector: None,
            question: None,
            regenerate: false,
            cut_off: false,
            limit_lowered: false,
            dropped_tools: None,
            stream_failed: false,
            tenant: "anonymous".into(),
            app: "-".into(),
            key_name: "-".into(),
            key_sha256: None,
            key: None,
            saved_usage: None,
            usage_estimated: false,
            precharged_tokens: 0,
            ratelimit: smartllm_quota::Headroom::default(),
            budget_hold: None,
            budget_settled: false,
            route_reason: "-".into(),
            route_cost_rule: None,
            experiment: None,
            in_flight: None,
            tag: None,
            trace: None,
        }
    }

    /// Take the config snapshot and the request id.
    pub fn begin(&mut self, session: &Session, rt: Arc<Runtime>) {
        self.start = Instant::now();
        self.rt = Some(rt);
        crate::metrics::inflight(1.0);
        self.counted = true;
        let given = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
        self.request_id = match given {
            Some(v) => v.to_string(),
            None => random_id(),
        };
        self.tag = session
            .req_header()
            .headers
            .get("x-smartllm-tag")
            .and_then(|v| v.to_str().ok())
            .and_then(smartllm_ledger::clean_tag);
    }

    /// The model that serves the request: the one place it is set, so the
    /// response headers, the ledger and a pending cache write always agree.
    pub fn set_model(&mut self, model: &str) {
        if self.model.as_deref() != Some(model) {
            self.model = Some(model.to_string());
        }
        match self.cache_insert.as_mut() {
            // Another model than the one asked for answers: its answer is
            // not stored under the asked model's key.
            Some(p) if p.model != model && p.fixed_model => self.cache_insert = None,
            Some(p) if p.model != model => p.model = model.to_string(),
            _ => {}
        }
    }

    /// The model serving the request, once known.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The model, taken out at the very end of a request (the ring of
    /// recent requests keeps it).
    pub fn take_model(&mut self) -> Option<String> {
        self.model.take()
    }

    /// Who the request is for, as limits, budgets and spend see it.
    pub fn scope(&self) -> smartllm_quota::Scope<'_> {
        smartllm_quota::Scope {
            tenant: &self.tenant,
            app: &self.app,
            key: &self.key_name,
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.rt
            .clone()
            .expect("early_request_filter sets the runtime snapshot")
    }
}

/// 32 random hex digits (128 bits), written without the formatting machinery:
/// every request without an `x-request-id` of its own gets one.
pub(crate) fn random_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for word in [fastrand::u64(..), fastrand::u64(..)] {
        for shift in (0..16).rev() {
            out.push(HEX[((word >> (shift * 4)) & 0xf) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod random_id_tests {
    #[test]
    fn random_ids_are_32_hex_digits_and_differ() {
        let a = super::random_id();
        let b = super::random_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
        // Same digits as the formatting machinery would write.
        fastrand::seed(7);
        let (x, y) = (fastrand::u64(..), fastrand::u64(..));
        fastrand::seed(7);
        assert_eq!(super::random_id(), format!("{x:016x}{y:016x}"));
    }
}

/// One request counted in `Shared::in_flight`, for as long as this lives.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    pub fn enter(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    /// A request whose task ends without its logging phase (a panic drops
    /// its context) gives its slot back: drains do not wait on it.
    #[test]
    fn a_dropped_context_gives_its_slot_back() {
        let count = std::sync::Arc::default();
        let mut ctx = Ctx::new();
        ctx.in_flight = Some(InFlight::enter(&count));
        let other = InFlight::enter(&count);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(ctx);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(other);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
