//! The upstream exchange: pick a healthy deployment from the model's pool, send
//! the full request over Pingora's pooled connector, and relay the answer —
//! buffered and validated for JSON, event by event for SSE — translating
//! provider formats on the way. Connect failures (and stale pooled
//! connections, and 429/5xx while another deployment is untried) move on to the
//! next deployment; nothing is retried once a byte reached the client.

use crate::ctx::Ctx;
use crate::routing::deployment_id;
use crate::runtime::{peer_for, DeploymentRuntime, ModelPool, Runtime};
use crate::{metrics, respond, Shared};
use bytes::Bytes;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_config::ProviderKind;
use smartllm_protocol::anthropic::{self, AnthropicStream};
use smartllm_protocol::assemble::ChunkAssembler;
use smartllm_protocol::sse::DONE_EVENT;
use smartllm_protocol::usage::OpenAiStreamFilter;
use smartllm_protocol::{ApiError, Endpoint, ParsedRequest, Usage};
use std::time::{Duration, Instant};

const MAX_BUFFERED_RESPONSE: usize = 64 << 20;
const MAX_ERROR_BODY: usize = 1 << 20;
const POOL_IDLE: Duration = Duration::from_secs(60);

enum Attempt {
    Done,
    /// Try the next deployment.
    Retry(ApiError),
    /// Give up with this error (nothing was sent to the client yet).
    Fail(ApiError),
}

#[derive(Clone, Copy)]
enum Translate {
    OpenAi,
    Anthropic,
}

struct Prepared {
    header: RequestHeader,
    body: Bytes,
    translate: Translate,
    /// The provider key sent, to scrub from anything the provider echoes back.
    key: Option<String>,
}

/// Try `chain` (the chosen model, then its fallbacks) until one answers: each
/// model's healthy deployments whose circuit is closed, up to
/// `server.upstream_attempts` per model. Connect errors, timeouts, resets,
/// 429 and 5xx move on while nothing has reached the client.
pub async fn forward(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &ParsedRequest,
    chain: &[String],
) -> Result<(), ApiError> {
    let attempts = rt.config.server.upstream_attempts;
    let pools: Vec<&ModelPool> = chain
        .iter()
        .filter_map(|m| rt.pool(m).map(|p| p.as_ref()))
        .collect();
    if pools.is_empty() {
        return Err(ApiError::internal(format!(
            "model {} has no deployment pool",
            chain.first().map_or("-", String::as_str)
        )));
    }
    let mut last_err = None;
    for (mi, pool) in pools.iter().enumerate() {
        if mi > 0 {
            let from = ctx.model.clone().unwrap_or_default();
            ::metrics::counter!(smartllm_router::metric_names::FALLBACKS, "route" => ctx.route.clone().unwrap_or_else(|| "-".into()),
                "from" => from.clone(), "to" => pool.model.clone())
            .increment(1);
            tracing::info!(request_id = %ctx.request_id, from = %from, to = %pool.model, error = ?last_err.as_ref().map(|e: &ApiError| e.message.clone()), "falling back to the next model");
            ctx.route_reason = format!("fallback:{from}");
            ctx.model = Some(pool.model.clone());
            if let Some(p) = ctx.cache_insert.as_mut() {
                p.model = pool.model.clone();
            }
        }
        let later_models = mi + 1 < pools.len();
        let total_backends = pool.lb.backends().get_backend().len();
        let mut tried = Vec::new();
        for attempt in 0..attempts {
            let usable = |b: &pingora_load_balancing::Backend| {
                !tried.contains(&b.addr)
                    && pool.deployment_for(b).is_none_or(|d| {
                        shared.breakers.is_available(
                            &deployment_id(d.provider.name(), &b.addr),
                            &d.provider.cfg.circuit_breaker,
                        )
                    })
            };
            let backend = pool
                .lb
                .select_with(b"", 256, |b, healthy| healthy && usable(b))
                .or_else(|| {
                    // Every usable backend failed its health check: with no other
                    // model to go to, try one anyway (fail open).
                    if later_models {
                        None
                    } else {
                        pool.lb.select_with(b"", 256, |b, _| usable(b))
                    }
                });
            let Some(backend) = backend else { break };
            tried.push(backend.addr.clone());
            let Some(dep) = pool.deployment_for(&backend) else {
                break;
            };
            let provider = &dep.provider;
            let breaker_id = deployment_id(provider.name(), &backend.addr);
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
            let prepared = match prepare(req, dep, key.as_deref(), session, ctx) {
                Ok(p) => p,
                // This model cannot take the request (e.g. an endpoint its provider lacks).
                Err(e) if later_models => {
                    last_err = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            };
            let Some(peer) = peer_for(provider, &backend.addr) else {
                continue;
            };
            // Claimed last, right before the attempt: a half-open circuit's one
            // trial is always followed by a recorded outcome.
            if !shared.breakers.allow(&breaker_id, &breaker_cfg) {
                continue;
            }
            let more_left =
                later_models || (attempt + 1 < attempts && tried.len() < total_backends);
            let started = Instant::now();
            let outcome =
                attempt_once(shared, session, ctx, dep, &peer, prepared, req, more_left).await;
            // A 5xx (refused, reset, timed out, or answered 5xx) counts against the
            // deployment's circuit; a 429 or 4xx does not. Either is a failure of the model.
            let failed = |e: &ApiError| {
                shared
                    .breakers
                    .record(&breaker_id, &breaker_cfg, e.status < 500);
                shared
                    .profiles
                    .record_failure(&pool.model, (e.status == 504).then(|| started.elapsed()));
            };
            match outcome {
                Attempt::Done => {
                    metrics::upstream_attempt(provider.name(), "ok");
                    shared
                        .breakers
                        .record(&breaker_id, &breaker_cfg, ctx.status < 500);
                    if ctx.status >= 500 || ctx.status == 429 {
                        shared.profiles.record_failure(&pool.model, None);
                    } else if let Some(ttft) = ctx.ttft {
                        shared.profiles.record_success(
                            &pool.model,
                            ttft,
                            started.elapsed(),
                            ctx.usage.map(|u| u.completion_tokens),
                        );
                    }
                    return Ok(());
                }
                Attempt::Retry(e) => {
                    metrics::upstream_attempt(provider.name(), "retried");
                    tracing::debug!(request_id = %ctx.request_id, provider = %provider.name(), error = %e, "upstream attempt failed; trying the next deployment");
                    failed(&e);
                    last_err = Some(e);
                }
                Attempt::Fail(e) => {
                    metrics::upstream_attempt(provider.name(), "failed");
                    failed(&e);
                    return Err(e);
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| {
        ApiError::unavailable(
            "no_upstream",
            format!(
                "No deployment of model '{}' is available right now (unhealthy or circuit open).",
                chain.join("', '")
            ),
        )
    }))
}

fn prepare(
    req: &ParsedRequest,
    dep: &DeploymentRuntime,
    key: Option<&str>,
    session: &Session,
    ctx: &Ctx,
) -> Result<Prepared, ApiError> {
    let p = &dep.provider;
    let (path, body, translate) = match p.cfg.kind {
        ProviderKind::OpenAi => (
            format!("{}{}", p.url.path, req.endpoint.upstream_suffix()),
            req.upstream_body(&dep.upstream_model, p.cfg.stream_usage),
            Translate::OpenAi,
        ),
        ProviderKind::Anthropic => {
            if req.endpoint != Endpoint::ChatCompletions {
                return Err(ApiError::invalid_request(
                    "unsupported_endpoint",
                    format!(
                        "Model '{}' is served by Anthropic, which has no {} endpoint; use /v1/chat/completions.",
                        req.model,
                        req.endpoint.upstream_suffix()
                    ),
                ));
            }
            let v = anthropic::request_to_anthropic(&req.body, &dep.upstream_model, req.stream)?;
            (
                format!("{}/messages", p.url.path),
                serde_json::to_vec(&v).unwrap_or_default(),
                Translate::Anthropic,
            )
        }
    };
    let internal = |e: pingora_error::BError| {
        ApiError::internal(format!("building the upstream request: {e}"))
    };
    let mut h = RequestHeader::build("POST", path.as_bytes(), Some(12)).map_err(internal)?;
    h.insert_header("host", p.url.host_header())
        .map_err(internal)?;
    h.insert_header("content-type", "application/json")
        .map_err(internal)?;
    h.insert_header("content-length", body.len().to_string())
        .map_err(internal)?;
    h.insert_header(
        "accept",
        if req.stream {
            "text/event-stream"
        } else {
            "application/json"
        },
    )
    .map_err(internal)?;
    h.insert_header(
        "user-agent",
        concat!("smartllm/", env!("CARGO_PKG_VERSION")),
    )
    .map_err(internal)?;
    h.insert_header("x-request-id", ctx.request_id.as_str())
        .map_err(internal)?;
    if let Some(tp) = session.req_header().headers.get("traceparent") {
        h.insert_header("traceparent", tp.clone())
            .map_err(internal)?;
    }
    match (p.cfg.kind, key) {
        (ProviderKind::OpenAi, Some(k)) => h
            .insert_header("authorization", format!("Bearer {k}"))
            .map_err(internal)?,
        (ProviderKind::Anthropic, Some(k)) => h.insert_header("x-api-key", k).map_err(internal)?,
        (_, None) => {}
    }
    if p.cfg.kind == ProviderKind::Anthropic {
        h.insert_header("anthropic-version", p.cfg.anthropic_version.as_str())
            .map_err(internal)?;
    }
    for (k, v) in &p.cfg.headers {
        h.insert_header(k.clone(), v.as_str()).map_err(internal)?;
    }
    Ok(Prepared {
        header: h,
        body: Bytes::from(body),
        translate,
        key: key.map(str::to_string),
    })
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

#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    dep: &DeploymentRuntime,
    peer: &HttpPeer,
    prepared: Prepared,
    req: &ParsedRequest,
    more_left: bool,
) -> Attempt {
    let p = &dep.provider;
    let pname = p.name().to_string();
    let addr = peer._address.to_string();
    let wait_start = Instant::now();

    let connect = tokio::time::timeout(
        p.cfg.connect_timeout + Duration::from_millis(250),
        shared.connector.get_http_session(peer),
    )
    .await;
    let (mut up, reused) = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.upstream_wait += wait_start.elapsed();
            let reason = if is_timeout(&e) {
                "connect_timeout"
            } else {
                "connect"
            };
            metrics::upstream_error(&pname, reason);
            return Attempt::Retry(ApiError::bad_gateway(
                "upstream_unreachable",
                format!(
                    "Could not connect to provider '{pname}' at {addr}: {}.",
                    e.etype().as_str()
                ),
            ));
        }
        Err(_) => {
            ctx.upstream_wait += wait_start.elapsed();
            metrics::upstream_error(&pname, "connect_timeout");
            return Attempt::Retry(ApiError::gateway_timeout(format!(
                "Connecting to provider '{pname}' at {addr} timed out after {:?}.",
                p.cfg.connect_timeout
            )));
        }
    };
    up.set_read_timeout(None);
    up.set_write_timeout(Some(Duration::from_secs(30)));

    let sent = async {
        up.write_request_header(Box::new(prepared.header)).await?;
        up.write_request_body(prepared.body, true).await?;
        up.finish_request_body().await
    }
    .await;
    if let Err(e) = sent {
        ctx.upstream_wait += wait_start.elapsed();
        metrics::upstream_error(&pname, "write");
        return Attempt::Retry(ApiError::bad_gateway(
            "upstream_write_failed",
            format!(
                "Sending the request to provider '{pname}' failed: {}.",
                e.etype().as_str()
            ),
        ));
    }
    let sent_at = Instant::now();

    match tokio::time::timeout(p.cfg.first_byte_timeout, up.read_response_header()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            ctx.upstream_wait += wait_start.elapsed();
            if reused && !is_timeout(&e) {
                // A pooled connection the upstream had already closed: safe to resend.
                metrics::upstream_error(&pname, "stale_connection");
                return Attempt::Retry(ApiError::bad_gateway(
                    "upstream_reset",
                    format!("Provider '{pname}' closed the connection."),
                ));
            }
            metrics::upstream_error(&pname, "reset");
            let err = ApiError::bad_gateway(
                "upstream_reset",
                format!("Provider '{pname}' at {addr} closed or reset the connection before answering ({}).", e.etype().as_str()),
            );
            // Nothing reached the client: another deployment or model may answer.
            return if more_left {
                Attempt::Retry(err)
            } else {
                Attempt::Fail(err)
            };
        }
        Err(_) => {
            ctx.upstream_wait += wait_start.elapsed();
            up.shutdown().await;
            metrics::upstream_error(&pname, "timeout");
            let err = ApiError::gateway_timeout(format!(
                "Provider '{pname}' did not answer within {:?} (first_byte_timeout).",
                p.cfg.first_byte_timeout
            ));
            return if more_left {
                Attempt::Retry(err)
            } else {
                Attempt::Fail(err)
            };
        }
    }
    let ttft = sent_at.elapsed();
    ctx.ttft = Some(ttft);
    ctx.upstream_wait += wait_start.elapsed();
    metrics::ttft(
        ctx.model.as_deref().unwrap_or("-"),
        &pname,
        ttft.as_secs_f64(),
    );

    let Some(resp) = up.response_header() else {
        return Attempt::Fail(ApiError::bad_gateway(
            "upstream_protocol",
            format!("Provider '{pname}' sent no response header."),
        ));
    };
    let status = resp.status.as_u16();
    let content_type = resp
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut passthrough: Vec<(String, String)> = Vec::new();
    for (name, value) in resp.headers.iter() {
        let n = name.as_str();
        if n == "retry-after"
            || n.starts_with("x-ratelimit-")
            || n.starts_with("anthropic-ratelimit-")
        {
            if let Ok(v) = value.to_str() {
                passthrough.push((n.to_string(), v.to_string()));
            }
        }
    }
    let idle = p.cfg.idle_timeout;

    if !(200..300).contains(&status) {
        let body = match read_all(&mut up, idle, MAX_ERROR_BODY, ctx).await {
            Ok(b) => b,
            Err(e) => {
                let err = upstream_body_error(&pname, e);
                return if more_left {
                    Attempt::Retry(err)
                } else {
                    Attempt::Fail(err)
                };
            }
        };
        release(shared, up, peer).await;
        metrics::upstream_error(
            &pname,
            if status == 429 {
                "status_429"
            } else if status >= 500 {
                "status_5xx"
            } else {
                "status_4xx"
            },
        );
        let body = match prepared.translate {
            Translate::Anthropic => anthropic::error_to_openai(status, &body),
            Translate::OpenAi => openai_error_body(status, &pname, &body),
        };
        // Some providers quote the key they were sent in auth errors: that is
        // the gateway's secret, never the client's to see.
        let body = scrub(body, prepared.key.as_deref());
        if (status == 429 || status >= 500) && more_left {
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Attempt::Retry(ApiError::new(
                status,
                "upstream_error",
                "upstream_status",
                format!("Provider '{pname}' answered {status}: {msg}"),
            ));
        }
        return match respond::json(session, ctx, status, body, &passthrough).await {
            Ok(()) => Attempt::Done,
            Err(_) => client_gone(ctx),
        };
    }

    let is_sse = content_type.starts_with("text/event-stream");
    if req.stream && is_sse {
        stream_response(
            shared,
            session,
            ctx,
            up,
            peer,
            prepared.translate,
            req,
            &pname,
            &passthrough,
        )
        .await
    } else {
        buffered_response(
            shared,
            session,
            ctx,
            up,
            peer,
            prepared.translate,
            req,
            &pname,
            &passthrough,
            more_left,
        )
        .await
    }
}

fn client_gone(ctx: &mut Ctx) -> Attempt {
    ctx.client_gone = true;
    ctx.status = 499;
    Attempt::Done
}

enum BodyError {
    TooLarge,
    Timeout,
    Broken(String),
}

fn upstream_body_error(pname: &str, e: BodyError) -> ApiError {
    match e {
        BodyError::TooLarge => ApiError::bad_gateway(
            "upstream_response_too_large",
            format!("Provider '{pname}' sent a response larger than the gateway accepts."),
        ),
        BodyError::Timeout => ApiError::gateway_timeout(format!(
            "Provider '{pname}' stalled while sending its response (idle_timeout)."
        )),
        BodyError::Broken(why) => ApiError::bad_gateway(
            "upstream_reset",
            format!("Provider '{pname}' broke off its response: {why}."),
        ),
    }
}

async fn read_all(
    up: &mut HttpSession,
    idle: Duration,
    limit: usize,
    ctx: &mut Ctx,
) -> Result<Vec<u8>, BodyError> {
    let mut buf = Vec::new();
    loop {
        let t = Instant::now();
        let r = tokio::time::timeout(idle, up.read_response_body()).await;
        ctx.upstream_wait += t.elapsed();
        match r {
            Ok(Ok(Some(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Ok(buf),
            Ok(Err(e)) => return Err(BodyError::Broken(e.etype().as_str().to_string())),
            Err(_) => return Err(BodyError::Timeout),
        }
    }
}

async fn release(shared: &Shared, mut up: HttpSession, peer: &HttpPeer) {
    if up.response_done() {
        shared
            .connector
            .release_http_session(up, peer, Some(POOL_IDLE))
            .await;
    } else {
        up.shutdown().await;
    }
}

/// Keep OpenAI-shaped upstream errors as they are; wrap anything else.
/// `body` with every occurrence of `secret` replaced by `[redacted]`.
fn scrub(body: Vec<u8>, secret: Option<&str>) -> Vec<u8> {
    let Some(secret) = secret.filter(|s| s.len() >= 8) else {
        return body;
    };
    let needle = secret.as_bytes();
    if !body.windows(needle.len()).any(|w| w == needle) {
        return body;
    }
    String::from_utf8_lossy(&body)
        .replace(secret, "[redacted]")
        .into_bytes()
}

fn openai_error_body(status: u16, pname: &str, body: &[u8]) -> Vec<u8> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if v.get("error")
            .is_some_and(|e| e.is_object() && e.get("message").is_some())
        {
            return body.to_vec();
        }
    }
    let snippet = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string();
    let (kind, code) = match status {
        401 | 403 => ("authentication_error", "upstream_auth"),
        404 => ("invalid_request_error", "upstream_not_found"),
        429 => ("rate_limit_error", "upstream_rate_limited"),
        400..=499 => ("invalid_request_error", "upstream_rejected"),
        _ => ("upstream_error", "upstream_status"),
    };
    let mut e = ApiError::new(
        status,
        kind,
        code,
        format!("Provider '{pname}' answered HTTP {status}: {snippet}"),
    );
    e.status = status;
    e.body()
}

/// The text a request sends (messages, prompt or input), for estimates.
fn request_text(req: &ParsedRequest) -> String {
    let mut out = String::new();
    for field in ["messages", "prompt", "input"] {
        match req.body.get(field) {
            Some(Value::Array(items)) => {
                for it in items {
                    match it {
                        Value::String(s) => out.push_str(s),
                        Value::Object(m) => out.push_str(&smartllm_protocol::openai::content_text(
                            m.get("content").unwrap_or(&Value::Null),
                        )),
                        _ => {}
                    }
                    out.push('\n');
                }
            }
            Some(Value::String(s)) => out.push_str(s),
            _ => {}
        }
    }
    out
}

fn completion_text(v: &Value) -> String {
    v.get("choices")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let m = &c["message"];
                    let mut t = m
                        .get("content")
                        .and_then(Value::as_str)
                        .or_else(|| c.get("text").and_then(Value::as_str))
                        .unwrap_or("")
                        .to_string();
                    if let Some(calls) = m.get("tool_calls") {
                        t.push_str(&calls.to_string());
                    }
                    t
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// When an upstream reports no usage: count tokens ourselves (marked estimated).
fn estimate_usage(req: &ParsedRequest, completion: &str) -> Usage {
    Usage {
        prompt_tokens: smartllm_ledger::estimate_tokens(&request_text(req)),
        completion_tokens: if req.endpoint == Endpoint::Embeddings {
            0
        } else {
            smartllm_ledger::estimate_tokens(completion)
        },
        cached_tokens: 0,
    }
}

fn record_usage(ctx: &mut Ctx, usage: Option<Usage>) {
    if let Some(u) = usage {
        metrics::tokens(
            ctx.model.as_deref().unwrap_or("-"),
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
        );
        ctx.usage = Some(u);
    }
}

#[allow(clippy::too_many_arguments)]
async fn buffered_response(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    mut up: HttpSession,
    peer: &HttpPeer,
    translate: Translate,
    req: &ParsedRequest,
    pname: &str,
    passthrough: &[(String, String)],
    more_left: bool,
) -> Attempt {
    // Nothing has reached the client yet: a broken or unreadable answer moves
    // on to the next deployment like a refused connection does.
    let retry_or_fail = |e: ApiError| {
        if more_left {
            Attempt::Retry(e)
        } else {
            Attempt::Fail(e)
        }
    };
    let body = match read_all(&mut up, dep_idle(ctx), MAX_BUFFERED_RESPONSE, ctx).await {
        Ok(b) => b,
        Err(e) => {
            up.shutdown().await;
            metrics::upstream_error(pname, "body");
            return retry_or_fail(upstream_body_error(pname, e));
        }
    };
    release(shared, up, peer).await;
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        metrics::upstream_error(pname, "malformed_response");
        return retry_or_fail(ApiError::bad_gateway(
            "upstream_invalid_response",
            format!(
                "Provider '{pname}' returned a response that is not valid JSON ({} bytes).",
                body.len()
            ),
        ));
    };
    let (out, usage) = match translate {
        Translate::OpenAi => (body, Usage::from_openai(&v)),
        Translate::Anthropic => {
            let (o, u) = anthropic::response_to_openai(&v, ctx.model.as_deref().unwrap_or(""));
            (serde_json::to_vec(&o).unwrap_or_default(), Some(u))
        }
    };
    let usage = usage.or_else(|| {
        ctx.usage_estimated = true;
        Some(estimate_usage(req, &completion_text(&v)))
    });
    record_usage(ctx, usage);
    if let Some(pending) = ctx.cache_insert.take() {
        if v.get("choices").is_some_and(Value::is_array) {
            pending.spawn(String::from_utf8_lossy(&out).into_owned());
        }
    }
    match respond::json(session, ctx, 200, out, passthrough).await {
        Ok(()) => Attempt::Done,
        Err(_) => client_gone(ctx),
    }
}

fn dep_stream_usage(ctx: &Ctx) -> bool {
    ctx.rt
        .as_ref()
        .and_then(|rt| rt.providers.get(ctx.provider.as_deref()?))
        .is_some_and(|p| p.cfg.stream_usage)
}

fn dep_idle(ctx: &Ctx) -> Duration {
    ctx.rt
        .as_ref()
        .and_then(|rt| rt.providers.get(ctx.provider.as_deref()?))
        .map(|p| p.cfg.idle_timeout)
        .unwrap_or(Duration::from_secs(120))
}

enum Translator {
    OpenAi(OpenAiStreamFilter),
    Anthropic(AnthropicStream),
}

impl Translator {
    fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, smartllm_protocol::sse::SseTooLarge> {
        match self {
            Translator::OpenAi(f) => f.feed(chunk),
            Translator::Anthropic(a) => a.feed(chunk),
        }
    }
    fn usage(&self) -> Option<Usage> {
        match self {
            Translator::OpenAi(f) => f.usage,
            Translator::Anthropic(a) => a.usage(),
        }
    }
    fn complete(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.saw_done,
            Translator::Anthropic(a) => a.done,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_response(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    mut up: HttpSession,
    peer: &HttpPeer,
    translate: Translate,
    req: &ParsedRequest,
    pname: &str,
    passthrough: &[(String, String)],
) -> Attempt {
    let mut tr = match translate {
        Translate::OpenAi => Translator::OpenAi(OpenAiStreamFilter::new(req.client_wants_usage)),
        Translate::Anthropic => Translator::Anthropic(AnthropicStream::new(
            ctx.model.as_deref().unwrap_or(""),
            req.client_wants_usage,
        )),
    };
    let idle = dep_idle(ctx);
    let header = (|| {
        let mut h = respond::header(200, ctx, "text/event-stream; charset=utf-8", None)?;
        respond::frame_unsized(session, &mut h)?;
        h.insert_header("cache-control", "no-cache")?;
        h.insert_header("x-accel-buffering", "no")?;
        for (k, v) in passthrough {
            h.insert_header(k.clone(), v.as_str())?;
        }
        Ok::<_, pingora_error::BError>(h)
    })();
    let Ok(header) = header else {
        return Attempt::Fail(ApiError::internal("building the stream response header"));
    };
    ctx.status = 200;
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        up.shutdown().await;
        return client_gone(ctx);
    }
    let mut failure: Option<ApiError> = None;
    let mut clean_end = false;
    // Assemble the answer only when it is needed: to cache it, or to count its
    // tokens when the upstream will not report usage (not asked for it).
    let usage_expected = matches!(translate, Translate::Anthropic) || dep_stream_usage(ctx);
    let mut assembler = (ctx.cache_insert.is_some() || !usage_expected).then(ChunkAssembler::new);
    let mut streamed_bytes = 0usize;
    loop {
        let t = Instant::now();
        let r = tokio::time::timeout(idle, up.read_response_body()).await;
        ctx.upstream_wait += t.elapsed();
        match r {
            Ok(Ok(Some(chunk))) => match tr.feed(&chunk) {
                Ok(out) if out.is_empty() => {}
                Ok(out) => {
                    streamed_bytes += out.len();
                    if let Some(a) = assembler.as_mut() {
                        a.feed(&out);
                    }
                    if session
                        .write_response_body(Some(Bytes::from(out)), false)
                        .await
                        .is_err()
                    {
                        // The client left: cancel the upstream request, and
                        // bill what was generated up to here (estimated when
                        // the upstream had not reported usage yet).
                        up.shutdown().await;
                        let usage = tr.usage().or_else(|| {
                            ctx.usage_estimated = true;
                            let partial = assembler
                                .take()
                                .and_then(ChunkAssembler::finish)
                                .map(|c| completion_text(&c));
                            Some(match partial {
                                Some(text) => estimate_usage(req, &text),
                                None => Usage {
                                    completion_tokens: (streamed_bytes as u64).div_ceil(20),
                                    ..estimate_usage(req, "")
                                },
                            })
                        });
                        record_usage(ctx, usage);
                        return client_gone(ctx);
                    }
                }
                Err(e) => {
                    metrics::upstream_error(pname, "malformed_stream");
                    failure = Some(ApiError::bad_gateway(
                        "upstream_invalid_stream",
                        format!("Provider '{pname}' sent an invalid event stream: {e}."),
                    ));
                    break;
                }
            },
            Ok(Ok(None)) => {
                clean_end = true;
                break;
            }
            Ok(Err(e)) => {
                metrics::upstream_error(pname, "stream_broken");
                failure = Some(ApiError::bad_gateway(
                    "upstream_stream_broken",
                    format!(
                        "Provider '{pname}' broke off the stream: {}.",
                        e.etype().as_str()
                    ),
                ));
                break;
            }
            Err(_) => {
                metrics::upstream_error(pname, "stream_timeout");
                failure = Some(ApiError::gateway_timeout(format!(
                    "Provider '{pname}' sent nothing for {:?} mid-stream (idle_timeout).",
                    idle
                )));
                break;
            }
        }
    }
    record_usage(ctx, tr.usage());
    let mut tail = Vec::new();
    if failure.is_none() && clean_end && !tr.complete() {
        match translate {
            // A complete HTTP response without [DONE]: finish it the way clients expect.
            Translate::OpenAi => tail.extend_from_slice(DONE_EVENT),
            Translate::Anthropic => {
                failure = Some(ApiError::bad_gateway(
                    "upstream_stream_incomplete",
                    format!("Provider '{pname}' ended the stream before message_stop."),
                ));
            }
        }
    }
    if let Some(err) = &failure {
        ctx.error_code = Some(err.code);
        tail.extend(err.sse_event());
        tail.extend_from_slice(DONE_EVENT);
        up.shutdown().await;
    } else {
        release(shared, up, peer).await;
    }
    let assembled = match (assembler, &failure) {
        (Some(mut a), None) => {
            a.feed(&tail);
            a.finish()
        }
        _ => None,
    };
    if tr.usage().is_none() && failure.is_none() {
        ctx.usage_estimated = true;
        let usage = match &assembled {
            Some(c) => estimate_usage(req, &completion_text(c)),
            // No assembled text: about a fifth of SSE bytes are content, ~4 bytes a token.
            None => Usage {
                completion_tokens: (streamed_bytes as u64).div_ceil(20),
                ..estimate_usage(req, "")
            },
        };
        record_usage(ctx, Some(usage));
    }
    if let (Some(mut completion), Some(pending)) = (assembled, ctx.cache_insert.take()) {
        // Only a complete, successful stream is stored.
        if completion.get("usage").is_none() {
            if let Some(u) = ctx.usage {
                completion["usage"] = serde_json::json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                    "total_tokens": u.total(), "prompt_tokens_details": {"cached_tokens": u.cached_tokens}});
            }
        }
        pending.spawn(completion.to_string());
    }
    if !tail.is_empty()
        && session
            .write_response_body(Some(Bytes::from(tail)), false)
            .await
            .is_err()
    {
        return client_gone(ctx);
    }
    if session.write_response_body(None, true).await.is_err() {
        return client_gone(ctx);
    }
    Attempt::Done
}

#[cfg(test)]
mod tests {
    #[test]
    fn provider_keys_are_scrubbed_from_what_providers_echo() {
        let body =
            br#"{"error":{"message":"bad key sk-live-0123456789 (sk-live-0123456789)"}}"#.to_vec();
        let out = String::from_utf8(super::scrub(body, Some("sk-live-0123456789"))).unwrap();
        assert_eq!(
            out,
            r#"{"error":{"message":"bad key [redacted] ([redacted])"}}"#
        );
        let clean = b"nothing here".to_vec();
        assert_eq!(
            super::scrub(clean.clone(), Some("sk-live-0123456789")),
            clean
        );
        // No key, or one too short to be a secret: untouched.
        assert_eq!(super::scrub(clean.clone(), None), clean);
        assert_eq!(super::scrub(b"abc".to_vec(), Some("abc")), b"abc".to_vec());
    }
}
