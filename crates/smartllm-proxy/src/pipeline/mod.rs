//! The request path, top to bottom. Every API request is answered here,
//! from Pingora's `request_filter`, in these phases (one module each):
//!
//! 1. [`admit`]: shed when draining or over `server.max_in_flight`, check the
//!    head, authenticate the virtual key, dispatch by path, read the bounded
//!    body, charge the rate limits;
//! 2. [`parse`]: the body into the API's request, the model or route it names,
//!    and the key's permission to use it;
//! 3. [`cache`]: exact then semantic lookup; a hit is answered here;
//! 4. [`route`]: the router's choice (or the fixed model) and its fallbacks,
//!    the budget (which may degrade or refuse) and the per-request cost cap;
//! 5. [`exchange`]: the upstream attempts and the buffered or stream relay;
//! 6. [`finish`] (Pingora's `logging`): limits charged for the real usage,
//!    metrics, access log, ledger, budgets.
//!
//! Errors of any phase are answered in the client's API shape by [`run`].

mod admit;
mod cache;
mod exchange;
mod feedback;
pub mod finish;
mod models;
mod parse;
mod responses;
mod route;
mod usage;

use crate::ctx::Ctx;
use crate::otel::Phase;
use crate::{respond, Shared};
use opentelemetry::KeyValue;
use pingora_proxy::Session;
use smartllm_protocol::{ApiError, Endpoint};

/// Why a phase stopped the request.
enum Failure {
    /// Answer with this error (nothing was sent yet).
    Api(ApiError),
    /// Writing to the client failed: nothing more can be sent.
    Io(Box<pingora_error::Error>),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<Box<pingora_error::Error>> for Failure {
    fn from(e: Box<pingora_error::Error>) -> Self {
        Failure::Io(e)
    }
}

/// Accept: take the config snapshot and a request id, and count the request
/// in flight (a drain waits for it). A client that stops reading the answer
/// (a zero TCP window, a host gone without a reset) is cut off after
/// `server.client_write_timeout` instead of holding its request, its
/// in-flight slot and its upstream connection for as long as TCP keeps
/// trying (Pingora sets no write timeout of its own).
pub fn begin(shared: &Shared, session: &mut Session, ctx: &mut Ctx) {
    crate::frontend::head_complete();
    let rt = shared.runtime.load_full();
    session
        .downstream_session
        .set_write_timeout(Some(rt.config.server.client_write_timeout));
    ctx.begin(session, rt);
    ctx.trace = shared
        .tracing
        .as_ref()
        .map(|t| t.request(session, &ctx.request_id));
    ctx.in_flight = Some(crate::ctx::InFlight::enter(&shared.in_flight));
}

/// Serve one request; errors are answered in the client's API shape.
pub async fn run(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
) -> pingora_error::Result<()> {
    match serve(shared, session, ctx).await {
        Ok(()) => Ok(()),
        // Nobody left to answer: logged as the client's leaving, not as a
        // failure of the request.
        Err(Failure::Api(err)) if err.code == admit::CLIENT_GONE => {
            ctx.client_gone = true;
            ctx.status = 499;
            ctx.error_code = Some(err.code);
            Ok(())
        }
        Err(Failure::Api(err)) => respond::error(session, ctx, &err).await,
        Err(Failure::Io(e)) => Err(e),
    }
}

async fn serve(shared: &Shared, session: &mut Session, ctx: &mut Ctx) -> Result<(), Failure> {
    let rt = ctx.runtime();
    let span = Phase::start(&ctx.trace, "admit");
    let admitted = admit::admit(shared, session, ctx, &rt, &span).await;
    if let Err(e) = &admitted {
        span.error(e.code);
    }
    span.end();
    let (endpoint, body) = match admitted? {
        admit::Admitted::Models(id) => return Ok(models::answer(session, ctx, &rt, id).await?),
        admit::Admitted::StoredResponse { id, delete } => {
            return responses::stored(shared, session, ctx, &id, delete).await
        }
        admit::Admitted::InputItems { id, query } => {
            return responses::input_items(shared, session, ctx, &id, query.as_deref()).await
        }
        admit::Admitted::Usage => return usage::answer(shared, session, ctx, &rt).await,
        admit::Admitted::Feedback(body) => {
            return feedback::answer(shared, session, ctx, &body).await
        }
        admit::Admitted::Root => return Ok(root(session, ctx).await?),
        admit::Admitted::Api { endpoint, body } => (endpoint, body),
    };
    let mut request = match endpoint {
        Endpoint::Responses | Endpoint::ResponsesInputTokens => {
            let req = responses::parse(shared, ctx, endpoint, body).await?;
            parse::resolve(ctx, &rt, req)?
        }
        _ => parse::parse(ctx, &rt, endpoint, body)?,
    };
    if let Some(t) = &ctx.trace {
        t.set(KeyValue::new(
            "gen_ai.request.model",
            request.req.model.clone(),
        ));
    }
    route::check_mode(&request)?;
    match endpoint {
        Endpoint::MessagesCountTokens => {
            return count_tokens(shared, session, ctx, &rt, &request).await
        }
        Endpoint::ResponsesInputTokens => {
            return responses::input_tokens(session, ctx, &request).await
        }
        _ => {}
    }
    // The cache first: a hit costs nothing, whatever the budget.
    if cache::phase(shared, session, ctx, &rt, &request)
        .await
        .map_err(|e| ApiError::internal(format!("answering from the cache: {e}")))?
    {
        return Ok(());
    }
    let span = Phase::start(&ctx.trace, "route");
    let chain = route::plan(shared, session, ctx, &rt, &mut request).await;
    match &chain {
        Ok(_) => {
            span.set(KeyValue::new(
                "smartllm.model",
                ctx.model().unwrap_or("-").to_string(),
            ));
            span.set(KeyValue::new(
                "smartllm.route.reason",
                ctx.route_reason.clone(),
            ));
        }
        Err(e) => span.error(e.code),
    }
    span.end();
    let chain = chain?;
    exchange::run(shared, session, ctx, &rt, &request.req, &chain).await?;
    Ok(())
}

/// `HEAD /` or `GET /`: 200, the gateway is up (no key needed, nothing
/// told but that).
async fn root(session: &mut Session, ctx: &mut Ctx) -> pingora_error::Result<()> {
    const BODY: &[u8] = br#"{"status":"ok"}"#;
    if session.req_header().method == http::Method::HEAD {
        let h = respond::header(200, ctx, "application/json", Some(BODY.len()))?;
        ctx.status = 200;
        return session.write_response_header(Box::new(h), true).await;
    }
    respond::json(session, ctx, 200, BODY.to_vec(), &[]).await
}

/// `POST /v1/messages/count_tokens`: Anthropic providers count exactly (the
/// request goes through, byte for byte); for others the gateway estimates
/// with the tokenizer heuristic its ledger uses for unreported usage.
async fn count_tokens(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &crate::runtime::Runtime,
    request: &parse::Parsed<'_>,
) -> Result<(), Failure> {
    let model = request.model;
    ctx.set_model(&model.name);
    let anthropic = !model.deployments.is_empty()
        && model.deployments.iter().all(|d| {
            rt.config
                .providers
                .get(&d.provider)
                .is_some_and(|p| p.kind == smartllm_config::ProviderKind::Anthropic)
        });
    if anthropic {
        let chain = [model.name.clone()];
        return Ok(exchange::run(shared, session, ctx, rt, &request.req, &chain).await?);
    }
    let n = prompt_tokens(&request.req.body).await;
    let body = serde_json::to_vec(&serde_json::json!({ "input_tokens": n })).unwrap_or_default();
    respond::json(
        session,
        ctx,
        200,
        body,
        &[("x-smartllm-estimated".to_string(), "true".to_string())],
    )
    .await?;
    Ok(())
}

/// The tokens of a request's prompt and tools, as the ledger estimates them
/// (tiktoken), counted on the blocking pool: a long prompt takes
/// milliseconds to encode.
async fn prompt_tokens(body: &serde_json::Map<String, serde_json::Value>) -> u64 {
    let mut text = smartllm_protocol::prompt::request_text(body);
    if let Some(tools) = body.get("tools") {
        text.push('\n');
        text.push_str(&tools.to_string());
    }
    tokio::task::spawn_blocking(move || smartllm_ledger::estimate_tokens(&text))
        .await
        .unwrap_or(0)
}

/// The API error of a request the quotas refuse.
fn refusal(r: smartllm_quota::Refusal) -> ApiError {
    use smartllm_quota::Refusal;
    let retry_after = r.retry_after();
    let message = r.to_string();
    let mut e = match r {
        Refusal::RateLimited { .. } => {
            ApiError::new(429, "rate_limit_error", "rate_limit_exceeded", message)
        }
        Refusal::TooLargeForLimit { .. } => ApiError::new(
            429,
            "rate_limit_error",
            "request_too_large_for_limit",
            message,
        ),
        // (What Redis said goes to the log, not to API clients.)
        Refusal::FleetUnavailable(why) => {
            tracing::warn!(error = %why, "fleet state unavailable: request refused (fleet.on_error: reject)");
            ApiError::unavailable(
                "fleet_state_unavailable",
                "Rate limits and budgets for this key are shared by the gateway fleet and cannot be checked right now; try again shortly.",
            )
        }
        // Room once requests in flight end: retryable, like a rate limit.
        Refusal::BudgetExceeded(e) if e.in_flight => {
            ApiError::new(429, "rate_limit_error", "budget_in_flight", message)
        }
        Refusal::BudgetExceeded(_) => {
            ApiError::new(429, "insufficient_quota", "budget_exceeded", message)
        }
        Refusal::CostCapExceeded { .. } => {
            ApiError::invalid_request("request_cost_cap_exceeded", message)
        }
        Refusal::CostCapUnbounded { .. } => {
            ApiError::invalid_request("request_cost_cap_unbounded", message).with_param("tools")
        }
    };
    e.retry_after = retry_after;
    e
}

#[cfg(test)]
mod tests {
    use smartllm_quota::Refusal;

    #[test]
    fn refusals_map_to_their_status_type_code_and_retry_after() {
        let e = super::refusal(Refusal::RateLimited {
            retry_after: 2.3,
            what: "3 requests per minute for key 'k'".into(),
            headroom: smartllm_quota::Headroom::default(),
            limit: "key 'k':requests".into(),
        });
        assert_eq!(
            (e.status, e.kind, e.code),
            (429, "rate_limit_error", "rate_limit_exceeded")
        );
        assert_eq!(e.retry_after, Some(3));
        assert_eq!(
            e.message,
            "Rate limit reached: 3 requests per minute for key 'k'. Retry in 2.3s."
        );
        let e = super::refusal(Refusal::TooLargeForLimit {
            tokens: 5000,
            limit: 1000,
            scope: "app 'a/b'".into(),
        });
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (429, "request_too_large_for_limit", None)
        );
        let e = super::refusal(Refusal::FleetUnavailable("redis: down".into()));
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (503, "fleet_state_unavailable", Some(1))
        );
        let e = super::refusal(Refusal::BudgetExceeded(smartllm_quota::Exceeded {
            budget: "tenant:acme".into(),
            scope: "tenant",
            name: "acme".into(),
            period: "daily",
            spent: 1.5,
            held: 0.0,
            limit: 1.0,
            resets_in: 3 * 3600 + 5 * 60,
            in_flight: false,
            could_cost: 0.01,
        }));
        assert_eq!(
            (e.status, e.kind, e.code),
            (429, "insufficient_quota", "budget_exceeded")
        );
        assert_eq!(
            e.message,
            "The daily budget of $1.00 for tenant 'acme' is used up ($1.5000 spent); it resets in 3h05m (UTC)."
        );
        assert_eq!(e.retry_after, Some(3 * 3600 + 5 * 60));
        // A tiny budget refused on an estimate before it is spent.
        let e = super::refusal(Refusal::BudgetExceeded(smartllm_quota::Exceeded {
            budget: "tenant:acme".into(),
            scope: "tenant",
            name: "acme".into(),
            period: "daily",
            spent: 0.000144,
            held: 0.0,
            limit: 0.0002,
            resets_in: 3600,
            in_flight: false,
            could_cost: 0.00012,
        }));
        assert_eq!(
            e.message,
            "The daily budget of $0.0002 for tenant 'acme' has $0.000056 left, less than the $0.0001 this request could cost at most (its prompt and the output its token limit allows) ($0.0001 spent); it resets in 1h00m (UTC)."
        );
    }
}
