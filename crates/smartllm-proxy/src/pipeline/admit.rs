//! Admission: shed when draining or over `server.max_in_flight`, check the
//! request head, authenticate the virtual key, dispatch by method and path,
//! read the bounded body (never through Pingora's 64 KiB replay buffer), and
//! charge the rate limits of the key and app.

use crate::ctx::Ctx;
use crate::runtime::Runtime;
use crate::{metrics, Shared};
use bytes::BytesMut;
use pingora_proxy::Session;
use smartllm_protocol::{ApiError, Endpoint};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What an admitted request asks for.
pub enum Admitted {
    /// `GET /v1/models` (all) or `/v1/models/{id}` (one), in Anthropic's
    /// shape when the request carries `anthropic-version`.
    Models(Option<String>),
    /// `GET` (or `DELETE`, `delete`) `/v1/responses/{id}`: a response the
    /// gateway keeps.
    StoredResponse { id: String, delete: bool },
    /// `GET /v1/responses/{id}/input_items` (with its query): the
    /// conversation a response the gateway keeps answered.
    InputItems { id: String, query: Option<String> },
    /// An API call with its whole body.
    Api { endpoint: Endpoint, body: BytesMut },
    /// `GET /v1/smartllm/usage`: the key's own spend, limits and budgets.
    Usage,
    /// `POST /v1/feedback`: a score for an earlier answer, with its body.
    Feedback(BytesMut),
    /// `HEAD /` or `GET /`: the reachability probe clients make without a
    /// key (Claude Code at every start), answered before the key check.
    Root,
}

/// The response id of a `/v1/responses/{id}/input_items` path.
fn input_items_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/responses/")?
        .strip_suffix("/input_items")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Admit the request or say why not (with the connection marked not
/// reusable where the rest of the request is left unread).
pub async fn admit(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    span: &crate::otel::Phase,
) -> Result<Admitted, ApiError> {
    // Anthropic's clients get Anthropic's shapes, errors from here on included.
    {
        let h = session.req_header();
        // (Anthropic's SDKs send `anthropic-version` on every call: on a
        // path no OpenAI endpoint has, such as the Batches or Files API's,
        // the 404 comes in their shape too.)
        let path = h.uri.path();
        let endpoint = Endpoint::from_path(path.trim_end_matches('/'));
        ctx.anthropic = path.starts_with("/v1/messages")
            || (h.headers.contains_key("anthropic-version")
                && endpoint.is_none_or(|e| e.is_anthropic()));
        // Named before anything refuses it (a drain, shedding, the key
        // check): a refused call is logged and counted under its endpoint.
        if let Some(e) = endpoint {
            ctx.endpoint = e.as_str();
        }
    }
    if shared.draining.load(Ordering::SeqCst) {
        session.set_keepalive(None);
        return Err(ApiError::shutting_down(
            "This gateway instance is shutting down; retry the request (it will reach another instance).",
        ));
    }
    // Shed beyond the concurrency limit rather than queue without bound.
    if shared.in_flight.load(Ordering::SeqCst) > rt.config.server.max_in_flight {
        // A shed request gives its slot back at once: while its 503 is
        // written and logged it must not count against the requests that
        // arrive with it (under a burst, those would be shed too).
        ctx.in_flight = None;
        metrics::shed("max_in_flight");
        let mut err = ApiError::unavailable(
            "server_overloaded",
            "The gateway is at its concurrency limit (server.max_in_flight); retry shortly.",
        );
        err.retry_after = Some(1);
        return Err(err);
    }
    let header_size = head_size(session);
    if header_size as u64 > rt.config.server.max_header_bytes {
        session.set_keepalive(None);
        return Err(ApiError::header_too_large(
            header_size,
            rt.config.server.max_header_bytes,
        ));
    }
    {
        let h = session.req_header();
        let path = h.uri.path();
        if path == "/" && matches!(h.method.as_str(), "HEAD" | "GET") {
            ctx.endpoint = "root";
            return Ok(Admitted::Root);
        }
    }
    let auth = span.child("auth");
    if let Err(err) = crate::auth::authenticate(session, ctx, rt) {
        auth.error(err.code);
        // Unread body: do not reuse the connection.
        session.set_keepalive(None);
        return Err(err);
    }
    auth.end();
    let h = session.req_header();
    let method = h.method.as_str();
    let path = h.uri.path().trim_end_matches('/');
    let endpoint = match (method, path) {
        ("GET", "/v1/models") | ("GET", "/models") => {
            ctx.endpoint = "models";
            return Ok(Admitted::Models(None));
        }
        ("GET", p) if input_items_of(p).is_some() => {
            ctx.endpoint = "responses";
            let id = input_items_of(p).unwrap_or_default().to_string();
            rate_limit(shared, rt, ctx, 0).await?;
            return Ok(Admitted::InputItems {
                id,
                query: h.uri.query().map(str::to_string),
            });
        }
        ("GET" | "DELETE", p)
            if p.starts_with("/v1/responses/")
                && p != "/v1/responses/input_tokens"
                && !p["/v1/responses/".len()..].contains('/') =>
        {
            ctx.endpoint = "responses";
            let id = p["/v1/responses/".len()..].to_string();
            // Each costs a store read: a request for the key's rate limits.
            rate_limit(shared, rt, ctx, 0).await?;
            return Ok(Admitted::StoredResponse {
                id,
                delete: method == "DELETE",
            });
        }
        ("GET", "/v1/smartllm/usage") => {
            ctx.endpoint = "usage";
            // A ledger query (a month of rows): a request for the key's
            // rate limits, so a loop polling it is held back.
            rate_limit(shared, rt, ctx, 0).await?;
            return Ok(Admitted::Usage);
        }
        ("POST", "/v1/feedback") => {
            ctx.endpoint = "feedback";
            check_content_type(session)?;
            let cfg = &rt.config.server;
            let body = read_body(
                session,
                cfg.max_body_bytes.min(64 * 1024),
                cfg.client_body_timeout,
                cfg.client_body_deadline,
            )
            .await?;
            // A score is a request like any other for the key's rate limits
            // (one request, no tokens): a loop re-scoring one id is held back.
            rate_limit(shared, rt, ctx, 0).await?;
            return Ok(Admitted::Feedback(body));
        }
        ("GET", p) if p.starts_with("/v1/models/") => {
            ctx.endpoint = "models";
            let id = p.trim_start_matches("/v1/models/").to_string();
            return Ok(Admitted::Models(Some(id)));
        }
        (m, p) => match Endpoint::from_path(p) {
            Some(endpoint) if m == "POST" => endpoint,
            Some(_) => return Err(ApiError::method_not_allowed(m, p, "POST")),
            None if p == "/v1/models" || p == "/models" => {
                return Err(ApiError::method_not_allowed(m, p, "GET"))
            }
            None => return Err(ApiError::not_found_path(m, p)),
        },
    };
    ctx.endpoint = endpoint.as_str();
    check_content_type(session)?;
    let cfg = &rt.config.server;
    let body = read_body(
        session,
        cfg.max_body_bytes,
        cfg.client_body_timeout,
        cfg.client_body_deadline,
    )
    .await?;
    ctx.request_bytes = body.len();
    ctx.prompt_bytes = body.len();
    // Rate limits: one request and the estimated prompt (about 4 bytes a
    // token; inline image data counted per image, not per byte).
    let tokens = smartllm_quota::images::estimate_body_tokens(&body);
    ctx.prompt_tokens = tokens;
    rate_limit(shared, rt, ctx, tokens).await?;
    Ok(Admitted::Api { endpoint, body })
}

/// The key's rate limits: one request and `estimate` tokens, or the 429.
async fn rate_limit(
    shared: &Shared,
    rt: &Runtime,
    ctx: &mut Ctx,
    estimate: u64,
) -> Result<(), ApiError> {
    let scopes = smartllm_quota::limits_for(&rt.config, ctx.key.as_deref(), ctx.scope());
    if scopes.is_empty() {
        return Ok(());
    }
    match shared
        .quotas
        .admit(&rt.config.fleet, &scopes, estimate)
        .await
    {
        smartllm_quota::Admission::Admitted {
            precharged,
            headroom,
        } => {
            tracing::debug!(request_id = %ctx.request_id, ?scopes, estimate, admitted = true, "rate limit decision");
            ctx.precharged_tokens = precharged;
            ctx.ratelimit = headroom;
            Ok(())
        }
        smartllm_quota::Admission::Limited(r) => {
            tracing::debug!(request_id = %ctx.request_id, ?scopes, estimate, admitted = false, "rate limit decision");
            // The 429 says what the refusing limit holds, as a provider's does.
            match &r {
                smartllm_quota::Refusal::RateLimited {
                    headroom, limit, ..
                } => {
                    ctx.ratelimit = *headroom;
                    smartllm_quota::metrics::rate_limited(limit);
                }
                // More tokens than a minute's allowance: a tokens limit
                // refused it too (429 rate_limit_error).
                smartllm_quota::Refusal::TooLargeForLimit { scope, .. } => {
                    smartllm_quota::metrics::rate_limited(&format!("{scope}:tokens"));
                }
                _ => {}
            }
            Err(super::refusal(r))
        }
    }
}

/// The request head's size as it came on the wire, without allocating: the
/// request line's parts and the header lines.
fn head_size(session: &Session) -> usize {
    let h = session.req_header();
    h.method.as_str().len()
        + h.uri.authority().map_or(0, |a| a.as_str().len())
        + h.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + 12
        + h.headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

/// `Expect: 100-continue` on the request.
fn expects_continue(h: &pingora_http::RequestHeader) -> bool {
    h.headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// The code of [`client_gone`]'s error.
pub(super) const CLIENT_GONE: &str = "client_closed_request";

/// The client left before its request was read: logged as 499, nothing is
/// written (see [`super::run`]).
fn client_gone(e: &pingora_error::Error) -> ApiError {
    ApiError::new(
        499,
        "invalid_request_error",
        CLIENT_GONE,
        format!("The client closed the request before its body was read ({e})."),
    )
}

/// How a request body is encoded (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
}

/// The body's coding, or the 415 for one the gateway does not decode
/// (br, zstd, several codings). Checked before the body is read.
fn coding(session: &Session) -> Result<Coding, ApiError> {
    let Some(v) = session.req_header().headers.get("content-encoding") else {
        return Ok(Coding::Identity);
    };
    let v = v.to_str().unwrap_or("?").trim().to_ascii_lowercase();
    match v.as_str() {
        "" | "identity" => Ok(Coding::Identity),
        "gzip" | "x-gzip" => Ok(Coding::Gzip),
        "deflate" => Ok(Coding::Deflate),
        _ => Err(ApiError::unsupported_encoding(&v)),
    }
}

/// The body as sent, decoded when it came gzip- or deflate-encoded (on the
/// blocking pool; what it decodes to is held to the same `limit`).
async fn decode(session: &Session, body: BytesMut, limit: u64) -> Result<BytesMut, ApiError> {
    let how = coding(session)?;
    if how == Coding::Identity {
        return Ok(body);
    }
    tokio::task::spawn_blocking(move || decode_blocking(how, &body, limit))
        .await
        .map_err(|e| ApiError::internal(format!("decoding the request body: {e}")))?
}

fn decode_blocking(how: Coding, body: &[u8], limit: u64) -> Result<BytesMut, ApiError> {
    use std::io::Read;
    let reader: Box<dyn Read + '_> = match how {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
        Coding::Identity => Box::new(body),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(limit as usize));
    match reader.take(limit + 1).read_to_end(&mut out) {
        Ok(n) if n as u64 > limit => Err(ApiError::payload_too_large(limit)),
        Ok(_) => Ok(BytesMut::from(&out[..])),
        Err(e) => Err(ApiError::invalid_request(
            "invalid_content_encoding",
            format!(
                "The request body is not valid {} data ({e}); it says Content-Encoding: {}.",
                if how == Coding::Gzip {
                    "gzip"
                } else {
                    "deflate (zlib)"
                },
                if how == Coding::Gzip {
                    "gzip"
                } else {
                    "deflate"
                },
            ),
        )),
    }
}

/// JSON is what every endpoint here takes (a request without a Content-Type
/// is read as JSON too). Anything else, form posts and multipart (the audio
/// and files APIs) included, gets a clear 415 rather than a confusing parse
/// error.
fn check_content_type(session: &mut Session) -> Result<(), ApiError> {
    if let Err(e) = coding(session) {
        // Unread body: do not reuse the connection.
        session.set_keepalive(None);
        return Err(e);
    }
    let Some(ct) = session
        .req_header()
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(());
    };
    let ct = ct.to_ascii_lowercase();
    let media = ct.split(';').next().unwrap_or("").trim();
    let json = media.is_empty()
        || media == "application/json"
        || media == "text/json"
        || media.ends_with("+json");
    if json {
        return Ok(());
    }
    // The body is not read: the connection cannot be reused.
    session.set_keepalive(None);
    Err(ApiError::unsupported_media_type(&ct))
}

/// Read the request body, refusing more than `limit` bytes (413), bodies
/// that stall longer than `stall` between chunks, and bodies that take longer
/// than `total` however steadily they trickle (408: slowloris bodies).
async fn read_body(
    session: &mut Session,
    limit: u64,
    stall: Duration,
    total: Duration,
) -> Result<BytesMut, ApiError> {
    let declared = crate::drain::declared_length(session.req_header());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    // A client that waits for "100 Continue" before it sends the body
    // (curl does, for a second, with bodies over 1 MB; some clients wait
    // until their own timeout) is told to go on, now that the head passed.
    // (HTTP/2 sends none: the h2 crate cannot write a 1xx.)
    // (Pingora turns keep-alive off when it writes a response before the
    // body is read, a 100 too: put back once the whole body is in.)
    let mut keepalive_after_body = None;
    if session.req_header().version == http::Version::HTTP_11
        && expects_continue(session.req_header())
    {
        let keepalive = session.downstream_session.get_keepalive();
        if let Err(e) = session.downstream_session.write_continue_response().await {
            session.set_keepalive(None);
            return Err(client_gone(&e));
        }
        keepalive_after_body = Some(keepalive);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(4096).min(limit) as usize);
    let deadline = tokio::time::Instant::now() + total;
    loop {
        let now = tokio::time::Instant::now();
        let (wait, key) = if deadline.saturating_duration_since(now) < stall {
            (
                deadline.saturating_duration_since(now),
                "server.client_body_deadline",
            )
        } else {
            (stall, "server.client_body_timeout")
        };
        match pingora_timeout::timeout(wait, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => {
                if body.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ApiError::payload_too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => {
                if let Some(k) = keepalive_after_body {
                    session.set_keepalive(k);
                }
                return decode(session, body, limit).await;
            }
            // The client went away (closed, reset, cancelled its stream)
            // before its body was in: nobody to answer.
            Ok(Err(e))
                if matches!(
                    e.etype(),
                    pingora_error::ErrorType::ConnectionClosed
                        | pingora_error::ErrorType::ReadError
                ) =>
            {
                session.set_keepalive(None);
                return Err(client_gone(&e));
            }
            Ok(Err(e)) => {
                return Err(ApiError::invalid_request(
                    "body_read_error",
                    format!("The request body could not be read: {e}."),
                ))
            }
            Err(_) => {
                metrics::client_timeout("body");
                // The rest of the body is still on the wire: no reuse.
                session.set_keepalive(None);
                let message = if key == "server.client_body_deadline" {
                    format!(
                        "The request body did not arrive within {} of its headers ({key}).",
                        humantime(total)
                    )
                } else {
                    format!(
                        "The request body stalled for more than {} ({key}).",
                        humantime(stall)
                    )
                };
                return Err(ApiError::new(
                    408,
                    "invalid_request_error",
                    "request_timeout",
                    message,
                ));
            }
        }
    }
}

/// `1.5s`, `30s`, `250ms`: durations as a person reads them in an error.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn input_items_paths_name_one_response() {
        use super::input_items_of;
        assert_eq!(
            input_items_of("/v1/responses/resp_1/input_items"),
            Some("resp_1")
        );
        for p in [
            "/v1/responses/input_items",
            "/v1/responses//input_items",
            "/v1/responses/a/b/input_items",
            "/v1/responses/resp_1",
            "/v1/responses/resp_1/input_itemsx",
        ] {
            assert_eq!(input_items_of(p), None, "{p}");
        }
    }
}
