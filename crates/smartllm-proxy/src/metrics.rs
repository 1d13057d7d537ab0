//! Prometheus metrics: names as constants, described once at start, recorded
//! through small typed functions so call sites cannot misspell a label.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "smartllm_requests_total";
pub const REQUEST_DURATION: &str = "smartllm_request_duration_seconds";
pub const OVERHEAD: &str = "smartllm_gateway_overhead_seconds";
pub const TTFT: &str = "smartllm_upstream_ttft_seconds";
pub const UPSTREAM_ERRORS: &str = "smartllm_upstream_errors_total";
pub const UPSTREAM_HEALTHY: &str = "smartllm_upstream_healthy";
pub const UPSTREAM_ATTEMPTS: &str = "smartllm_upstream_attempts_total";
pub const TOKENS: &str = "smartllm_tokens_total";
pub const UNPRICED: &str = "smartllm_unpriced_requests_total";
pub const CONFIG_RELOADS: &str = "smartllm_config_reloads_total";
pub const CONFIG_VERSION: &str = "smartllm_config_version";
pub const CONFIG_RESTART_PENDING: &str = "smartllm_config_restart_required";
pub const CONFIG_LAST_RELOAD_OK: &str = "smartllm_config_last_reload_successful";
pub const DRAINING: &str = "smartllm_draining";
pub const INFLIGHT: &str = "smartllm_requests_in_flight";
pub const TLS_CERT_EXPIRY: &str = "smartllm_tls_certificate_expiry_timestamp_seconds";
/// Work refused under overload, by `reason`: `max_in_flight` (the request got
/// 503), `embedder` (its cache lookup was skipped), `cache_insert` (its answer
/// was not stored).
pub const SHED: &str = "smartllm_shed_total";
/// Answers to cache misses not stored because they are no answer to serve
/// again (filtered, refused, empty, cut short by a cost cap).
pub const CACHE_NOT_STORED: &str = "smartllm_cache_answers_not_stored_total";
/// Clients too slow to send a request, by phase (`header`: disconnected, `body`: 408).
pub const CLIENT_TIMEOUTS: &str = "smartllm_client_timeouts_total";
pub const BUILD_INFO: &str = "smartllm_build_info";
pub const EMBEDDER_READY: &str = "smartllm_embedder_ready";
pub const STORE_READY: &str = "smartllm_store_ready";
/// RocksDB memory by kind (block_cache, which includes the memtables; memtables).
pub const STORE_MEMORY: &str = "smartllm_store_memory_bytes";
/// Spans sent to the OTLP endpoint (`tracing:`).
pub const TRACE_SPANS_EXPORTED: &str = "smartllm_trace_spans_exported_total";
/// Spans lost, by `reason`: `queue_full`, `export_failed`, `shutdown`.
pub const TRACE_SPANS_DROPPED: &str = "smartllm_trace_spans_dropped_total";
/// Process heap (jemalloc, native libraries included) by kind: allocated, resident.
pub const HEAP: &str = "smartllm_heap_bytes";

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
const SIMILARITY_BUCKETS: &[f64] = &[
    0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0,
];
/// The gateway's own time, an embedding, a search: sub-millisecond as a
/// rule, up to the embedder's 250 ms shedding bound and a cold first
/// request (~150 ms) at worst, which the top buckets still tell apart.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Install the global recorder and describe every metric. Call once.
pub fn install() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TTFT.into()), LATENCY_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(OVERHEAD.into()), OVERHEAD_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_cache::metric_names::SEARCH_SECONDS.into()),
                OVERHEAD_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_cache::metric_names::EMBED_SECONDS.into()),
                OVERHEAD_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_cache::metric_names::SIMILARITY.into()),
                SIMILARITY_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_embed::METRIC_BATCH_SECONDS.into()),
                OVERHEAD_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_embed::METRIC_BATCH_SIZE.into()),
                BATCH_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(smartllm_router::metric_names::DECISION_SECONDS.into()),
                OVERHEAD_BUCKETS,
            )
        })
        .expect("static bucket lists are non-empty")
        .install_recorder()
        .expect("the metrics recorder is installed once");
    describe_counter!(
        REQUESTS,
        "Requests answered, by endpoint, route, model, provider and status."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request start to the last response byte."
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "Time spent in the gateway itself (total minus time waiting on the upstream)."
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Time from sending the upstream request to its first generated event (a stream; not its headers) or to the answer (buffered); errors are not counted."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures by provider, model and reason (connect, connect_timeout, timeout, reset, stale_connection, status_429, status_5xx, status_4xx, malformed_response, stream_broken, stream_timeout, ...)."
    );
    describe_gauge!(
        UPSTREAM_HEALTHY,
        "1 when the health check passes for a model deployment address, else 0."
    );
    describe_counter!(
        UPSTREAM_ATTEMPTS,
        "Upstream attempts by provider and outcome (ok, retried, failed, abandoned: the client left before the provider answered)."
    );
    describe_counter!(
        TOKENS,
        "Tokens reported by upstreams, by model and kind (prompt, completion, cached)."
    );
    describe_counter!(
        UNPRICED,
        "Requests served by a model without any price (no pricing in models.yaml, no catalog entry): recorded at $0."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Config reload attempts by result (ok, error, unchanged)."
    );
    describe_gauge!(
        CONFIG_VERSION,
        "Version of the running config; increases with every applied reload."
    );
    describe_gauge!(
        CONFIG_RESTART_PENDING,
        "1 when the config on disk changes settings that need a restart."
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_OK,
        "1 when the last reload attempt applied the config on disk (or found it unchanged), 0 while the files on disk are rejected and the previous config runs."
    );
    describe_gauge!(
        DRAINING,
        "1 once SIGTERM came: the instance reports not ready and drains."
    );
    describe_gauge!(INFLIGHT, "Requests being served now.");
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "When the certificate a TLS listener serves expires (Unix time), by listener."
    );
    describe_counter!(
        SHED,
        "Work refused under overload: requests answered 503 (max_in_flight), cache lookups skipped (embedder), answers not stored (cache_insert)."
    );
    describe_counter!(
        CACHE_NOT_STORED,
        "Answers to cache misses not stored: stopped by a content filter, refused, empty, or cut short by a cost cap."
    );
    describe_counter!(
        CLIENT_TIMEOUTS,
        "Clients too slow to send their request, by phase: header (disconnected after server.client_header_timeout), body (408 after server.client_body_timeout or client_body_deadline)."
    );
    describe_counter!(
        smartllm_embed::METRIC_SHED,
        "Embedding jobs refused (queue_full) or dropped after waiting past embedder.max_queue_wait (queue_wait)."
    );
    describe_gauge!(BUILD_INFO, "Build information.");
    describe_counter!(
        TRACE_SPANS_EXPORTED,
        "Trace spans accepted by the OTLP endpoint (tracing.otlp_endpoint)."
    );
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Sampled trace spans lost, by reason: queue_full (the export queue was full), export_failed (the OTLP endpoint refused or could not be reached), shutdown."
    );
    describe_gauge!(
        EMBEDDER_READY,
        "1 when the embedding model is loaded and passed its self-test."
    );
    describe_gauge!(STORE_READY, "1 when the RocksDB data dir is open.");
    describe_gauge!(
        HEAP,
        Unit::Bytes,
        "jemalloc, which serves Rust and the native libraries (ONNX Runtime, FAISS, RocksDB), at the last scrape: allocated (live objects) and resident (pages it holds)."
    );
    describe_gauge!(
        STORE_MEMORY,
        Unit::Bytes,
        "RocksDB memory at the last scrape: block_cache (the shared cache, memtable reservations included; bounded by store.memory_budget) and memtables (at most half of it)."
    );
    {
        use smartllm_router::metric_names as r;
        describe_counter!(
            r::DECISIONS,
            "Routing decisions of routed aliases, by route, chosen model and reason (utility, learned, rule:NAME, experiment:NAME, fallback, ...)."
        );
        describe_histogram!(
            r::DECISION_SECONDS,
            Unit::Seconds,
            "Time to decide a route: features and scoring (the embedding excluded)."
        );
        describe_counter!(
            r::FALLBACKS,
            "Requests that fell back to a later model of their chain (counted as they move on, whether or not that model then serves them), by route, the model that failed (from) and the one tried next (to)."
        );
        describe_gauge!(
            r::CIRCUIT_STATE,
            "Circuit breaker state per deployment: 0 closed, 1 half-open, 2 open."
        );
        describe_counter!(
            r::CIRCUIT_TRANSITIONS,
            "Circuit breaker state changes per deployment, by the state entered (to)."
        );
        describe_counter!(
            r::EXPERIMENT_REQUESTS,
            "Requests of A/B experiments, by experiment, arm and outcome."
        );
        describe_gauge!(
            r::EXPERIMENT_COST,
            "USD spent per experiment arm since start; only increases."
        );
    }
    {
        use smartllm_cache::metric_names as c;
        describe_counter!(
            c::LOOKUPS,
            "Cache lookups by result (hit_exact, hit_semantic, miss, miss_guard: refused by the precision guard, miss_verifier: refused by the verifier, bypass_*)."
        );
        describe_histogram!(
            c::SIMILARITY,
            "Cosine similarity of the best same-namespace candidate of semantic lookups."
        );
        describe_histogram!(
            c::SEARCH_SECONDS,
            Unit::Seconds,
            "FAISS search time per semantic lookup."
        );
        describe_histogram!(
            c::EMBED_SECONDS,
            Unit::Seconds,
            "Time to embed a lookup's query (queue + model)."
        );
        describe_gauge!(c::INDEX_VECTORS, "Vectors in the cache index.");
        describe_counter!(c::INDEX_REBUILDS, "Cache index rebuilds.");
        describe_counter!(c::INSERTS, "Answers stored in the cache.");
        describe_counter!(
            c::REMOVED,
            "Cache entries removed, by reason (expired, purge, unreadable: in the clear with a key set, or corrupt)."
        );
        describe_gauge!(
            c::UNREADABLE,
            "Cache entries sealed with a key that is not configured, as the last sweep counted them: kept, never served (a wrong cache.encryption_key_file)."
        );
        describe_gauge!(c::BYTES, "Estimated live bytes in RocksDB.");
        describe_gauge!(smartllm_ledger::METRIC_COST, "USD spent (from upstream usage and model prices), by tenant, app and model; only increases.");
        describe_gauge!(
            smartllm_ledger::METRIC_SAVED,
            "USD saved by cache hits, by tenant, app and model; only increases."
        );
        smartllm_quota::metrics::describe();
        describe_counter!(
            smartllm_ledger::METRIC_DROPPED,
            "Ledger records dropped because the writer queue was full."
        );
        describe_counter!(
            smartllm_ledger::METRIC_STORE_WRITE_ERRORS,
            "RocksDB writes that failed, by what (ledger, cache): a full or failing disk; RocksDB refuses writes after such an error until the gateway restarts."
        );
        describe_histogram!(
            smartllm_embed::METRIC_BATCH_SIZE,
            "Texts per embedding model run (micro-batch size)."
        );
        describe_histogram!(
            smartllm_embed::METRIC_BATCH_SECONDS,
            Unit::Seconds,
            "Embedding model run time per micro-batch."
        );
        describe_counter!(
            smartllm_embed::METRIC_RECENT,
            "Single-text embeddings looked up in the recent-embeddings cache, by result (hit, miss)."
        );
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Histogram samples pile up in the recorder until upkeep drains them; a
    // scrape does that too, but a gateway nobody scrapes must not grow, so a
    // thread runs it every 5 s (install_recorder leaves upkeep to the caller).
    // The failure series exist from the start, at 0: an alert on
    // `increase(...[10m]) > 0` fires on the first failure after a restart
    // too (a series first seen at 1 shows no increase).
    for result in ["ok", "error", "unchanged"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    // Nothing waits for a restart at the start: an alert on it has a
    // series to read before the first reload.
    gauge!(CONFIG_RESTART_PENDING).set(0.0);
    gauge!(CONFIG_LAST_RELOAD_OK).set(1.0);
    gauge!(DRAINING).set(0.0);
    for reason in ["max_in_flight", "embedder", "cache_insert"] {
        counter!(SHED, "reason" => reason).absolute(0);
    }
    // So are those of the ledger and the store: an alert on their increase
    // fires on the first dropped record or failed write.
    counter!(smartllm_ledger::METRIC_DROPPED).absolute(0);
    for what in ["ledger", "cache"] {
        counter!(smartllm_ledger::METRIC_STORE_WRITE_ERRORS, "what" => what).absolute(0);
    }
    for phase in ["header", "body"] {
        counter!(CLIENT_TIMEOUTS, "phase" => phase).absolute(0);
    }
    for reason in ["queue_full", "export_failed", "shutdown"] {
        counter!(TRACE_SPANS_DROPPED, "reason" => reason).absolute(0);
    }
    // The cache's outcomes too: a hit-rate or refusal-rate rule has series
    // to read before the first of each.
    use smartllm_cache::metric_names as cm;
    for result in [
        "hit_exact",
        "hit_semantic",
        "miss",
        "miss_guard",
        "miss_verifier",
    ] {
        counter!(cm::LOOKUPS, "result" => result).absolute(0);
    }
    for result in ["rejected", "unavailable"] {
        counter!(cm::VERIFIER, "result" => result).absolute(0);
    }
    let upkeep = handle.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("smartllm-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        })
    {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread");
    }
    handle
}

pub struct RequestRecord<'a> {
    pub endpoint: &'static str,
    pub route: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub status: u16,
    pub duration: f64,
    pub overhead: Option<f64>,
}

pub fn request(r: &RequestRecord<'_>) {
    let mut status = [0u8; 5];
    let status = decimal(r.status, &mut status);
    handles::counter(
        REQUESTS,
        &[r.endpoint, r.route, r.model, r.provider, status],
        || {
            counter!(REQUESTS, "endpoint" => r.endpoint, "route" => r.route.to_string(), "model" => r.model.to_string(),
                "provider" => r.provider.to_string(), "status" => status.to_string())
        },
    )
    .increment(1);
    handles::histogram(
        REQUEST_DURATION,
        &[r.endpoint, r.model, r.provider],
        || histogram!(REQUEST_DURATION, "endpoint" => r.endpoint, "model" => r.model.to_string(), "provider" => r.provider.to_string()),
    )
    .record(r.duration);
    if let Some(o) = r.overhead {
        handles::histogram(
            OVERHEAD,
            &[r.endpoint],
            || histogram!(OVERHEAD, "endpoint" => r.endpoint),
        )
        .record(o);
    }
}

pub fn ttft(model: &str, provider: &str, secs: f64) {
    handles::histogram(
        TTFT,
        &[model, provider],
        || histogram!(TTFT, "model" => model.to_string(), "provider" => provider.to_string()),
    )
    .record(secs);
}

/// `n` in decimal, in `buf`.
fn decimal(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Handles of the labelled metrics every request records, kept per thread
/// by metric name and label values: recording costs one hash lookup instead
/// of a registry lookup with freshly allocated label strings. The recorder
/// never drops a metric (no idle timeout is set), so a kept handle is the
/// one the exporter reads. Bounded: a thread that has seen more label sets
/// than [`handles::MAX`] starts over (label values come from the config, so
/// this is a backstop).
mod handles {
    use metrics::{Counter, Histogram};
    use std::cell::RefCell;
    use std::collections::HashMap;

    pub(super) const MAX: usize = 4096;

    /// Handles by key (metric name, then each label value length-prefixed).
    type Kept<H> = RefCell<HashMap<Box<[u8]>, H>>;

    thread_local! {
        static KEY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static COUNTERS: Kept<Counter> = RefCell::new(HashMap::new());
        static HISTOGRAMS: Kept<Histogram> = RefCell::new(HashMap::new());
    }

    fn key(buf: &mut Vec<u8>, name: &str, values: &[&str]) {
        buf.clear();
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        for v in values {
            // Length-prefixed: no two label sets make the same key.
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v.as_bytes());
        }
    }

    fn cached<H: Clone>(
        map: &'static std::thread::LocalKey<Kept<H>>,
        name: &str,
        values: &[&str],
        make: impl FnOnce() -> H,
    ) -> H {
        KEY.with_borrow_mut(|buf| {
            key(buf, name, values);
            map.with_borrow_mut(|m| {
                if let Some(h) = m.get(buf.as_slice()) {
                    return h.clone();
                }
                if m.len() >= MAX {
                    m.clear();
                }
                let h = make();
                m.insert(buf.as_slice().into(), h.clone());
                h
            })
        })
    }

    pub(super) fn counter(name: &str, values: &[&str], make: impl FnOnce() -> Counter) -> Counter {
        cached(&COUNTERS, name, values, make)
    }

    pub(super) fn histogram(
        name: &str,
        values: &[&str],
        make: impl FnOnce() -> Histogram,
    ) -> Histogram {
        cached(&HISTOGRAMS, name, values, make)
    }
}

pub fn upstream_error(provider: &str, model: &str, reason: &'static str) {
    counter!(UPSTREAM_ERRORS, "provider" => provider.to_string(), "model" => model.to_string(), "reason" => reason).increment(1);
}

pub fn upstream_attempt(provider: &str, outcome: &'static str) {
    handles::counter(
        UPSTREAM_ATTEMPTS,
        &[provider, outcome],
        || counter!(UPSTREAM_ATTEMPTS, "provider" => provider.to_string(), "outcome" => outcome),
    )
    .increment(1);
}

pub fn upstream_healthy(model: &str, address: &str, healthy: bool) {
    gauge!(UPSTREAM_HEALTHY, "model" => model.to_string(), "address" => address.to_string())
        .set(if healthy { 1.0 } else { 0.0 });
}

/// A request billed at $0 because its model has no price.
pub fn unpriced(model: &str) {
    counter!(UNPRICED, "model" => model.to_string()).increment(1);
}

pub fn tokens(model: &str, prompt: u64, completion: u64, cached: u64) {
    for (kind, n) in [
        ("prompt", prompt),
        ("completion", completion),
        ("cached", cached),
    ] {
        if kind == "cached" && n == 0 {
            continue;
        }
        handles::counter(
            TOKENS,
            &[model, kind],
            || counter!(TOKENS, "model" => model.to_string(), "kind" => kind),
        )
        .increment(n);
    }
}

pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
    gauge!(CONFIG_LAST_RELOAD_OK).set(if result == "error" { 0.0 } else { 1.0 });
}

/// The upstream attempt series of every configured provider, at 0 (an
/// alert on their increase fires on the first failure after a start or
/// after a provider is added; a series first seen at 1 shows none).
pub fn providers_known<'a>(providers: impl IntoIterator<Item = &'a String>) {
    for p in providers {
        for outcome in ["ok", "retried", "failed", "abandoned"] {
            counter!(UPSTREAM_ATTEMPTS, "provider" => p.clone(), "outcome" => outcome).absolute(0);
        }
    }
}

/// SIGTERM came.
pub fn draining() {
    gauge!(DRAINING).set(1.0);
}

pub fn config_version(version: u64) {
    gauge!(CONFIG_VERSION).set(version as f64);
}

pub fn restart_pending(pending: bool) {
    gauge!(CONFIG_RESTART_PENDING).set(if pending { 1.0 } else { 0.0 });
}

pub fn inflight(delta: f64) {
    gauge!(INFLIGHT).increment(delta);
}

pub fn component_ready(name: &'static str, ready: bool) {
    gauge!(name).set(if ready { 1.0 } else { 0.0 });
}

/// Spans the OTLP endpoint accepted (see [`TRACE_SPANS_EXPORTED`]).
pub fn trace_spans_exported(n: u64) {
    counter!(TRACE_SPANS_EXPORTED).increment(n);
}

/// Spans lost (see [`TRACE_SPANS_DROPPED`]).
pub fn trace_spans_dropped(reason: &'static str, n: u64) {
    counter!(TRACE_SPANS_DROPPED, "reason" => reason).increment(n);
}

/// Work refused under overload (see [`SHED`]).
pub fn shed(reason: &'static str) {
    counter!(SHED, "reason" => reason).increment(1);
}

/// An answer not stored in the cache (see [`CACHE_NOT_STORED`]).
pub fn cache_not_stored() {
    counter!(CACHE_NOT_STORED).increment(1);
}

/// A client too slow to send its request: `header` or `body`.
pub fn client_timeout(phase: &'static str) {
    counter!(CLIENT_TIMEOUTS, "phase" => phase).increment(1);
}

/// A request that did not use the cache, and why (`no_store`, `temperature`, …).
pub fn cache_bypass(why: &'static str) {
    counter!(smartllm_cache::metric_names::LOOKUPS, "result" => format!("bypass_{why}"))
        .increment(1);
}

/// The router's choice for a request on a routed alias.
pub fn route_decision(route: &str, model: &str, reason: &str) {
    counter!(smartllm_router::metric_names::DECISIONS, "route" => route.to_string(), "model" => model.to_string(), "reason" => reason.to_string())
        .increment(1);
}

/// A user's score of an answer (`POST /v1/feedback`).
pub fn feedback(model: &str, task: &'static str) {
    counter!("smartllm_feedback_total", "model" => model.to_string(), "task" => task).increment(1);
}

/// An answer the model cut off at its own output limit (no max-tokens limit
/// asked for), counted against it.
pub fn truncated(model: &str, task: &'static str) {
    counter!("smartllm_truncated_answers_total", "model" => model.to_string(), "task" => task)
        .increment(1);
}

/// An answer asked for again (a regenerate), counted against its model.
pub fn regenerate(model: &str, task: &'static str) {
    counter!("smartllm_regenerates_total", "model" => model.to_string(), "task" => task)
        .increment(1);
}

pub fn route_decision_seconds(secs: f64) {
    histogram!(smartllm_router::metric_names::DECISION_SECONDS).record(secs);
}

/// A request moving on to the next model of its chain.
pub fn fallback(route: &str, from: &str, to: &str) {
    counter!(smartllm_router::metric_names::FALLBACKS, "route" => route.to_string(), "from" => from.to_string(), "to" => to.to_string())
        .increment(1);
}

/// The outcome and cost of a request in an A/B experiment arm.
pub fn experiment(experiment: &str, arm: &str, ok: bool, cost_usd: f64) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(smartllm_router::metric_names::EXPERIMENT_REQUESTS, "experiment" => experiment.to_string(), "arm" => arm.to_string(), "outcome" => outcome)
        .increment(1);
    if cost_usd > 0.0 {
        gauge!(smartllm_router::metric_names::EXPERIMENT_COST, "experiment" => experiment.to_string(), "arm" => arm.to_string())
            .increment(cost_usd);
    }
}

/// Process heap by kind (`allocated`, `resident`), at a scrape.
pub fn heap(kind: &'static str, bytes: u64) {
    gauge!(HEAP, "kind" => kind).set(bytes as f64);
}

/// RocksDB memory by kind (`block_cache`, `memtables`), at a scrape.
pub fn store_memory(kind: &'static str, bytes: u64) {
    gauge!(STORE_MEMORY, "kind" => kind).set(bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_status() {
        let mut b = [0u8; 5];
        assert_eq!(decimal(0, &mut b), "0");
        assert_eq!(decimal(200, &mut b), "200");
        assert_eq!(decimal(u16::MAX, &mut b), "65535");
    }

    #[test]
    fn kept_handles_are_per_label_set() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for (model, n) in [("a", 1), ("b", 2), ("a", 3)] {
                upstream_attempt(model, "ok");
                tokens(model, n, 0, 0);
            }
        });
        // Handles made under another recorder are not reused here: the
        // cache is per thread, and this test's thread made them.
        let text = handle.render();
        assert!(
            text.contains(r#"smartllm_upstream_attempts_total{provider="a",outcome="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"smartllm_upstream_attempts_total{provider="b",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"smartllm_tokens_total{model="a",kind="prompt"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"smartllm_tokens_total{model="b",kind="prompt"} 2"#),
            "{text}"
        );
        assert!(!text.contains(r#"kind="cached""#), "{text}");
    }
}
