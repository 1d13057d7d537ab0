//! The upstream exchange: pick a healthy deployment from the model's pool, send
//! the full request over Pingora's pooled connector, and relay the answer —
//! buffered and validated for JSON ([`buffered`]), event by event for SSE
//! ([`stream`]) — translating provider formats on the way. One [`Exchange`]
//! value carries an attempt's facts through [`attempt`] and the relays.
//! Connect failures (and stale pooled connections, and 429/5xx while another
//! deployment is untried) move on to the next deployment; nothing is retried
//! once a byte reached the client, and a stream's `200` waits for its first
//! word, so a provider that fails before it is passed over too. A stream
//! that fails after that (an error event from the provider, a broken or
//! truncated stream, a stall) is still a failure of the deployment and the
//! model. A client that leaves while the provider works cancels the
//! upstream request ([`client_left`]).

mod attempt;
mod buffered;
mod request;
mod stream;
mod usage;

use crate::ctx::Ctx;
use crate::runtime::{peer_for, DeploymentRuntime, ModelPool, Runtime};
use crate::{metrics, Shared};
use opentelemetry::KeyValue;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::ErrorType;
use pingora_proxy::Session;
use smartllm_protocol::{ApiError, ParsedRequest};
use std::time::{Duration, Instant};

const POOL_IDLE: Duration = Duration::from_secs(60);

/// How one attempt ended.
enum Attempt {
    Done,
    /// Try the next deployment.
    Retry(ApiError),
    /// Give up with this error (nothing was sent to the client yet).
    Fail(ApiError),
    /// A kept connection the provider had closed as the request went out:
    /// nothing was answered, so the request goes once more, on a new
    /// connection to the same deployment (not counted against it).
    Stale(ApiError),
    /// The answer had started (the client has its `200`), and the stream
    /// ended in `error`: the client got an error event, `ctx.error_code` is
    /// set and the failure counted in `smartllm_upstream_errors_total`. Not
    /// retried, but a failure of the deployment and the model.
    StreamFailed {
        end: stream::StreamEnd,
        error: ApiError,
    },
    /// The client left before the provider answered: the request was
    /// cancelled, and says nothing of the deployment either way.
    Abandoned,
}

/// What the provider speaks, and how its answer reaches the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Translate {
    /// OpenAI-compatible: passed on to OpenAI clients, translated from the
    /// canonical chat shape for Anthropic clients.
    OpenAi,
    /// Anthropic, asked by an OpenAI client: translated to the chat shape.
    Anthropic,
    /// Anthropic, asked by an Anthropic client: passed through as it comes
    /// (read on the side for usage, errors and the cache).
    AnthropicNative,
    /// A provider that speaks Responses, asked by a Responses client: passed
    /// through (read on the side for usage and errors; not cached).
    ResponsesNative,
}

/// One attempt at one deployment: where it goes, how to read the answer,
/// and what the relays need to report it.
struct Exchange<'a> {
    shared: &'a Shared,
    req: &'a ParsedRequest,
    dep: &'a DeploymentRuntime,
    peer: HttpPeer,
    translate: Translate,
    /// The provider key sent, to scrub from anything the provider echoes back.
    key: Option<String>,
    /// Another deployment or model can still answer if this one fails before
    /// a byte reached the client.
    more_left: bool,
    /// The provider's rate-limit headers, passed on to the client.
    passthrough: Vec<(String, String)>,
}

impl Exchange<'_> {
    fn provider(&self) -> &str {
        self.dep.provider.name()
    }

    /// How long the provider may stay silent mid-answer.
    fn idle_timeout(&self) -> Duration {
        self.dep.provider.cfg.idle_timeout
    }

    /// Retry on another deployment when one is left, else fail with `e`.
    fn retry_or_fail(&self, e: ApiError) -> Attempt {
        if self.more_left {
            Attempt::Retry(e)
        } else {
            Attempt::Fail(e)
        }
    }

    /// Return the connection to the pool when its response is complete.
    async fn release(&self, mut up: HttpSession) {
        if !up.response_done() {
            up.shutdown().await;
            return;
        }
        match up {
            // HTTP/1.1: kept in this thread's idle set (`upstream_pool`).
            HttpSession::H1(mut h1) => {
                h1.respect_keepalive();
                if let Some(stream) = h1.reuse().await {
                    crate::upstream_pool::put(self.peer.reuse_hash(), stream, POOL_IDLE);
                }
            }
            up => {
                self.shared
                    .connector
                    .release_http_session(up, &self.peer, Some(POOL_IDLE))
                    .await
            }
        }
    }
}

/// Try `chain` (the chosen model, then its fallbacks) until one answers: each
/// model's healthy deployments whose circuit is closed, up to
/// `server.upstream_attempts` per model. Connect errors, timeouts, resets,
/// 429 and 5xx move on while nothing has reached the client.
pub async fn run(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &ParsedRequest,
    chain: &[String],
) -> Result<(), ApiError> {
    let attempts = rt.config.server.upstream_attempts;
    let chain_pools: Vec<&ModelPool> = chain
        .iter()
        .filter_map(|m| rt.pool(m).map(|p| p.as_ref()))
        .collect();
    // A model whose every deployment is cooling after a 429 (until its
    // Retry-After) goes after the other models of the chain, so it costs
    // no refused attempt first while another can answer, and is still
    // tried when none did; within a model, cooling deployments go after
    // the others (below). Each model is walked once.
    let all_cooling = |p: &ModelPool| {
        let mut any = false;
        for b in p.lb.backends().get_backend().iter() {
            for (_, _, id) in p.deployments_on(b, false) {
                if !shared.breakers.cooling(id) {
                    return false;
                }
                any = true;
            }
        }
        any
    };
    let (mut pools, cooling): (Vec<&ModelPool>, Vec<&ModelPool>) =
        chain_pools.iter().partition(|p| !all_cooling(p));
    pools.extend(cooling);
    if pools.is_empty() {
        return Err(ApiError::internal(format!(
            "model {} has no deployment pool",
            chain.first().map_or("-", String::as_str)
        )));
    }
    let mut last_err = None;
    // The provider of a failed attempt not yet known to be retried.
    let mut unretried: Option<String> = None;
    // The soonest any deployment that refused for now said to come back.
    let mut soonest: Option<u64> = None;
    for (mi, pool) in pools.iter().enumerate() {
        // (A model moved after the others for its 429s is a fallback too.)
        if mi > 0 || chain.first() != Some(&pool.model) {
            let from = ctx.model().unwrap_or_default().to_string();
            metrics::fallback(ctx.route.as_deref().unwrap_or("-"), &from, &pool.model);
            tracing::info!(request_id = %ctx.request_id, from = %from, to = %pool.model, error = last_err.as_ref().map_or("no deployment available", |e: &ApiError| e.message.as_str()), "falling back to the next model");
            ctx.route_reason = format!("fallback:{from}");
            // The model failed it (not an endpoint it lacks, not a rate limit
            // or a missing key): the router learns from that (finish.rs).
            if last_err
                .as_ref()
                .is_some_and(|e: &ApiError| e.status >= 500 && e.code != "provider_key_missing")
            {
                ctx.failed_models.push(from);
            }
            ctx.set_model(&pool.model);
        }
        let later_models = mi + 1 < pools.len();
        // Deployments, not addresses, are tried in turn: two deployments on
        // one address (two organisations' keys on one provider) are two
        // chances; a host with several addresses is as many.
        let total_slots = pool.deployment_slots();
        // A follow-up of a response a provider keeps goes to that provider
        // (its account holds the conversation) where the model has one.
        let pin = req
            .responses
            .as_deref()
            .and_then(|r| r.native_provider.as_deref())
            .filter(|p| pool.deployments.iter().any(|d| d.provider.name() == *p));
        let mut tried: Vec<(pingora_core::protocols::l4::socket::SocketAddr, usize)> = Vec::new();
        for attempt in 0..attempts {
            // The stop's drain time is up: no new attempt starts (and the
            // failure before, if any, was never retried).
            if *shared.drain_expired.borrow() {
                if let Some(p) = unretried.take() {
                    metrics::upstream_attempt(&p, "failed");
                }
                return Err(ApiError::shutting_down(
                    "This gateway instance is stopping (its drain time is up); send the request again (it will reach another instance).",
                ));
            }
            // `warm`: only deployments not cooling after a 429, which go
            // first.
            let open = |b: &pingora_load_balancing::Backend,
                        i: usize,
                        id: &str,
                        d: &DeploymentRuntime,
                        warm: bool| {
                pin.is_none_or(|p| d.provider.name() == p)
                    && !tried.iter().any(|(a, j)| *j == i && *a == b.addr)
                    && shared
                        .breakers
                        .is_available(id, &d.provider.cfg.circuit_breaker)
                    && !(warm && shared.breakers.cooling(id))
            };
            let usable = |b: &pingora_load_balancing::Backend, warm: bool| {
                pool.deployments_on(b, false)
                    .any(|(i, d, id)| open(b, i, id, d, warm))
            };
            let backend = pool
                .lb
                .select_with(b"", 256, |b, healthy| healthy && usable(b, true))
                .or_else(|| {
                    pool.lb
                        .select_with(b"", 256, |b, healthy| healthy && usable(b, false))
                })
                .or_else(|| {
                    // Every usable backend failed its health check: with no other
                    // model to go to, try one anyway (fail open).
                    if later_models {
                        None
                    } else {
                        pool.lb.select_with(b"", 256, |b, _| usable(b, false))
                    }
                });
            let Some(backend) = backend else { break };
            let Some((index, dep, breaker_id)) = pool
                .deployments_on(&backend, true)
                .find(|(i, d, id)| open(&backend, *i, id, d, true))
                .or_else(|| {
                    pool.deployments_on(&backend, true)
                        .find(|(i, d, id)| open(&backend, *i, id, d, false))
                })
            else {
                break;
            };
            tried.push((backend.addr.clone(), index));
            let provider = &dep.provider;
            let breaker_cfg = provider.cfg.circuit_breaker;
            ctx.provider = Some(provider.name().to_string());
            ctx.upstream_model = Some(dep.upstream_model.clone());
            ctx.attempts += 1;
            let key = match &provider.key {
                Ok(k) => k.clone(),
                Err(msg) => {
                    last_err = Some(ApiError::unavailable(
                        "provider_key_missing",
                        format!(
                            "Provider '{}' serving model '{}' has no API key: {msg}.",
                            provider.name(),
                            pool.model
                        ),
                    ));
                    continue;
                }
            };
            ctx.limit_lowered = pool
                .max_output_tokens
                .is_some_and(|m| request::asks_more_than(req, m));
            ctx.dropped_tools = None;
            let prepared = match request::build(req, dep, pool, key.as_deref(), session, ctx) {
                Ok(p) => p,
                // This deployment cannot take the request (e.g. an endpoint
                // its provider lacks): another deployment or model may; when
                // none can, this is the answer.
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let Some(peer) = peer_for(provider, &backend.addr) else {
                continue;
            };
            // Claimed last, right before the attempt: a half-open circuit's one
            // trial is always followed by a recorded outcome.
            let Some(permit) = shared.breakers.admit(breaker_id, &breaker_cfg) else {
                continue;
            };
            let more_left = later_models || (attempt + 1 < attempts && tried.len() < total_slots);
            let started = Instant::now();
            // The profile times the upstream alone: the time spent writing
            // to the client (a slow reader sets a stream's pace) is not the
            // model's, and one client must not slow a model for every tenant.
            let waited_before = ctx.upstream_wait;
            let mut header = prepared.header;
            ctx.dropped_tools = prepared.dropped_tools;
            if let Some(t) = ctx.trace.as_mut() {
                let operation = crate::otel::gen_ai_operation(req.endpoint);
                t.start_attempt(
                    operation,
                    &dep.upstream_model,
                    vec![
                        KeyValue::new("gen_ai.operation.name", operation),
                        KeyValue::new("http.request.method", "POST"),
                        KeyValue::new("smartllm.provider", provider.name().to_string()),
                        KeyValue::new("gen_ai.provider.name", provider_system(provider.cfg.kind)),
                        KeyValue::new("gen_ai.request.model", dep.upstream_model.clone()),
                        KeyValue::new("smartllm.model", pool.model.clone()),
                        KeyValue::new("server.address", provider.url.host.clone()),
                        KeyValue::new("server.port", i64::from(provider.url.port)),
                        KeyValue::new("smartllm.attempt", i64::from(ctx.attempts)),
                    ],
                );
                // The upstream's parent span is this attempt.
                if let Err(e) = t.inject(&mut header) {
                    tracing::debug!(request_id = %ctx.request_id, error = %e, "traceparent not set");
                }
            }
            let mut exchange = Exchange {
                shared,
                req,
                dep,
                peer,
                translate: prepared.translate,
                key: prepared.key,
                more_left,
                passthrough: Vec::new(),
            };
            // The attempt before this one failed in a way another attempt
            // may mend, and this is that attempt: it was retried.
            if let Some(p) = unretried.take() {
                metrics::upstream_attempt(&p, "retried");
            }
            let mut outcome =
                attempt::once(&mut exchange, session, ctx, header, prepared.body, false).await;
            if let Attempt::Stale(e) = outcome {
                outcome = match request::build(req, dep, pool, key.as_deref(), session, ctx) {
                    Ok(again) => {
                        let mut header = again.header;
                        if let Some(t) = ctx.trace.as_mut() {
                            if let Err(e) = t.inject(&mut header) {
                                tracing::debug!(request_id = %ctx.request_id, error = %e, "traceparent not set");
                            }
                        }
                        match attempt::once(&mut exchange, session, ctx, header, again.body, true)
                            .await
                        {
                            Attempt::Stale(e) => Attempt::Retry(e),
                            o => o,
                        }
                    }
                    Err(_) => Attempt::Retry(e),
                };
            }
            if let Some(t) = ctx.trace.as_mut() {
                let (name, error) = match &outcome {
                    // A provider's 5xx or 429 passed on (the last attempt):
                    // answered, but failed.
                    Attempt::Done if ctx.status >= 500 || ctx.status == 429 => {
                        ("failed", Some(crate::otel::UPSTREAM_STATUS))
                    }
                    Attempt::Done => ("ok", None),
                    Attempt::Retry(e) | Attempt::Stale(e) => ("retried", Some(e.code)),
                    Attempt::Fail(e) if e.code == "server_shutting_down" => {
                        ("abandoned", Some(e.code))
                    }
                    Attempt::Fail(e) => ("failed", Some(e.code)),
                    Attempt::StreamFailed { error, .. } => ("failed", Some(error.code)),
                    Attempt::Abandoned => ("abandoned", None),
                };
                // A provider's 5xx or 429 retried elsewhere was not passed
                // on: its status is the error's.
                let status = match &outcome {
                    Attempt::Retry(e) if e.code == crate::otel::UPSTREAM_STATUS => e.status,
                    _ => ctx.status,
                };
                t.end_attempt(name, status, error);
            }
            // A 5xx (refused, reset, timed out, or answered 5xx) counts against the
            // deployment's circuit; a 429 or 4xx does not. Either is a failure of the model.
            // Except a 404 the gateway turned into `upstream_not_found`: a
            // client can draw that at will (a chat model asked on
            // /v1/completions), and a few such requests must not open the
            // circuits of a model for every tenant; the attempt counts for
            // nothing either way (a wrong upstream model name still fails
            // over, request by request).
            let failed = |e: &ApiError| {
                // (The gateway's own stop is no fault of the deployment.)
                if e.code == "upstream_not_found" || e.code == "server_shutting_down" {
                    shared.breakers.abandon(breaker_id, permit);
                    return;
                }
                shared
                    .breakers
                    .record(breaker_id, &breaker_cfg, permit, e.status < 500);
                shared
                    .profiles
                    .record_failure(&pool.model, (e.status == 504).then(|| started.elapsed()));
            };
            match outcome {
                Attempt::Done => {
                    let failed = ctx.status >= 500 || ctx.status == 429;
                    metrics::upstream_attempt(
                        provider.name(),
                        if failed { "failed" } else { "ok" },
                    );
                    shared
                        .breakers
                        .record(breaker_id, &breaker_cfg, permit, ctx.status < 500);
                    if ctx.status >= 500 || ctx.status == 429 {
                        shared.profiles.record_failure(&pool.model, None);
                    } else if ctx.status >= 400 {
                        // The client's own error (400, 422): says nothing
                        // of the model's speed or health.
                    } else {
                        // A buffered answer's headers come with its last
                        // token: no first-token time to record (nor for a
                        // stream that generated nothing).
                        let streamed = ctx.ttft.filter(|_| req.stream);
                        let default_tps = rt
                            .config
                            .model(&pool.model)
                            .map_or(50.0, |m| m.profile.tokens_per_second);
                        shared.profiles.record_success(
                            &pool.model,
                            streamed,
                            ctx.upstream_wait.saturating_sub(waited_before),
                            ctx.usage.map(|u| u.completion_tokens),
                            default_tps,
                        );
                    }
                    return Ok(());
                }
                Attempt::Retry(e) | Attempt::Stale(e) => {
                    if let Some(s) = e.retry_after {
                        soonest = Some(soonest.map_or(s, |t| t.min(s)));
                    }
                    if e.status == 429 {
                        shared
                            .breakers
                            .cool(breaker_id, Duration::from_secs(e.retry_after.unwrap_or(1)));
                    }
                    // Counted as retried when another attempt follows, as
                    // failed when none does (a lone deployment refusing
                    // connections is an outage, not a retry).
                    unretried = Some(provider.name().to_string());
                    // At info: the access line names only the deployment
                    // that answered in the end (`attempts` counts them).
                    tracing::info!(request_id = %ctx.request_id, model = %pool.model, provider = %provider.name(), status = e.status, code = e.code, error = %e, "upstream attempt failed; trying the next deployment");
                    failed(&e);
                    last_err = Some(e);
                }
                Attempt::Fail(e) => {
                    // (The gateway's own stop is no failure of the provider.)
                    let outcome = if e.code == "server_shutting_down" {
                        "abandoned"
                    } else {
                        "failed"
                    };
                    metrics::upstream_attempt(provider.name(), outcome);
                    failed(&e);
                    return Err(e);
                }
                Attempt::Abandoned => {
                    metrics::upstream_attempt(provider.name(), "abandoned");
                    shared.breakers.abandon(breaker_id, permit);
                    return Ok(());
                }
                Attempt::StreamFailed {
                    end: stream::StreamEnd::Shutdown,
                    error,
                } => {
                    // The gateway's own stop ended it: no fault of the model.
                    metrics::upstream_attempt(provider.name(), "abandoned");
                    tracing::info!(request_id = %ctx.request_id, provider = %provider.name(), error = %error, "stream ended by the drain timeout");
                    shared.breakers.abandon(breaker_id, permit);
                    ctx.stream_failed = true;
                    return Ok(());
                }
                Attempt::StreamFailed { end, error } => {
                    // A 5xx-class failure of the deployment, whatever the
                    // error says; the time to first byte was fine, so the
                    // profile's TTFT is left alone.
                    metrics::upstream_attempt(provider.name(), "failed");
                    tracing::info!(request_id = %ctx.request_id, provider = %provider.name(), end = end.reason(), error = %error, "upstream stream ended in an error");
                    shared
                        .breakers
                        .record(breaker_id, &breaker_cfg, permit, false);
                    shared.profiles.record_failure(&pool.model, None);
                    ctx.stream_failed = true;
                    return Ok(());
                }
            }
        }
    }
    // The last attempt's failure was never retried.
    if let Some(p) = unretried.take() {
        metrics::upstream_attempt(&p, "failed");
    }
    // Nothing was tried (every circuit open, or unhealthy): the soonest
    // circuit to let a trial through is when to come back.
    if last_err.is_none() {
        let reopen = pools
            .iter()
            .flat_map(|pool| {
                pool.lb
                    .backends()
                    .get_backend()
                    .iter()
                    .flat_map(|b| {
                        pool.deployments_on(b, false)
                            .filter_map(|(_, d, id)| {
                                shared
                                    .breakers
                                    .reopens_in(id, &d.provider.cfg.circuit_breaker)
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .min();
        if let Some(d) = reopen {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            soonest = Some(soonest.map_or(secs, |t| t.min(secs)));
        }
    }
    let mut err = last_err.unwrap_or_else(|| {
        ApiError::unavailable(
            "no_upstream",
            format!(
                "No deployment of model '{}' is available right now (unhealthy or circuit open).",
                chain.join("', '")
            ),
        )
    });
    // Every deployment was rate limited or unavailable: the client's SDK
    // waits as long as the soonest of them asked.
    if matches!(err.status, 429 | 503)
        && matches!(err.code, "upstream_status" | "no_upstream")
        && soonest.is_some()
    {
        err.retry_after = soonest;
    }
    Err(err)
}

/// The request carries a limit on the answer's length (the client's, or the
/// one the cost cap wrote): an answer it cut short is no fault of the model.
/// Not when the gateway lowered it to the model's own most
/// (`ctx.limit_lowered`): an answer cut there is cut at the model's limit
/// (not stored, counted against the model).
pub(super) fn output_limited(req: &ParsedRequest, ctx: &Ctx) -> bool {
    !ctx.limit_lowered
        && ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .any(|k| req.body.get(*k).is_some_and(|v| !v.is_null()))
}

/// `gen_ai.provider.name` of a provider kind.
fn provider_system(kind: smartllm_config::ProviderKind) -> &'static str {
    match kind {
        smartllm_config::ProviderKind::OpenAi => "openai",
        smartllm_config::ProviderKind::Anthropic => "anthropic",
    }
}

fn is_timeout(e: &pingora_error::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout
    )
}

fn client_gone(ctx: &mut Ctx) -> Attempt {
    ctx.client_gone = true;
    ctx.status = 499;
    // Named in the access log and the trace, as a client that leaves
    // during its upload is.
    ctx.error_code.get_or_insert(super::admit::CLIENT_GONE);
    Attempt::Done
}

/// Resolves once the client has gone while the gateway waits on the
/// upstream: its HTTP/1.1 connection closed, its h2 stream reset. Pending
/// while it is there. Polled only while the upstream has nothing to read
/// (`biased` selects put the upstream first), so a busy stream pays nothing.
async fn client_left(session: &mut Session, unwatched: &mut bool) {
    if !*unwatched {
        match session.downstream_session.read_body_or_idle(true).await {
            // Bytes after the request (a pipelined one, which the gateway
            // does not serve): not a close; stop reading them.
            Err(e) if *e.etype() == ErrorType::ConnectError => {
                *unwatched = true;
                session.set_keepalive(None);
            }
            Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// An upstream request given up before its answer: its connection is
/// closed (the provider stops generating) and the prompt, which the
/// provider has read, is billed at its estimate (a token count costs
/// nothing).
async fn cancel_billing_the_prompt(ctx: &mut Ctx, req: &ParsedRequest, mut up: HttpSession) {
    up.shutdown().await;
    if !matches!(
        req.endpoint,
        smartllm_protocol::Endpoint::MessagesCountTokens
            | smartllm_protocol::Endpoint::ResponsesInputTokens
    ) {
        ctx.usage_estimated = true;
        usage::record_usage(ctx, Some(usage::estimate_usage(req, String::new()).await));
    }
}

/// The stop's drain time ran out while the provider worked on the request
/// (nothing reached the client): the upstream request is cancelled, the
/// prompt billed at its estimate (the provider read it), and the client
/// gets a 503 it may send again.
async fn stopped_while_waiting(ctx: &mut Ctx, req: &ParsedRequest, up: HttpSession) -> Attempt {
    cancel_billing_the_prompt(ctx, req, up).await;
    tracing::info!(request_id = %ctx.request_id, provider = ?ctx.provider, "the drain time ran out before the provider answered; the upstream request is cancelled");
    Attempt::Fail(stream::drain_refusal())
}

/// The client left before the answer began: the upstream request is
/// cancelled (its connection closed, so the provider stops generating), and
/// the prompt, which the provider has read, is billed, estimated. Before the
/// provider answered at all (`answered`: its header came) the attempt says
/// nothing of the deployment ([`Attempt::Abandoned`]).
async fn left_while_waiting(
    ctx: &mut Ctx,
    req: &ParsedRequest,
    up: HttpSession,
    answered: bool,
) -> Attempt {
    cancel_billing_the_prompt(ctx, req, up).await;
    tracing::info!(request_id = %ctx.request_id, provider = ?ctx.provider, "the client left before the answer; the upstream request is cancelled");
    let done = client_gone(ctx);
    if answered {
        done
    } else {
        Attempt::Abandoned
    }
}
