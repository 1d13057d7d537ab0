//! The stream relay: SSE passed on event by event (translated from
//! Anthropic's events when needed), usage taken from the stream (or
//! estimated), the answer assembled for the cache, and a clean end or an
//! error event whatever the provider does. How the stream ended goes back to
//! the attempt loop: any end but a clean one is a failure of the deployment
//! and the model, though the client already has its `200`. The `200` itself
//! waits for the first word (see [`Held`]).

use super::attempt::scrub;
use super::usage::{completion_text, estimate_tokens, estimate_usage, record_usage};
use super::{client_gone, Attempt, Exchange, Translate};
use crate::ctx::Ctx;
use crate::{metrics, respond};
use bytes::Bytes;
use opentelemetry::KeyValue;
use pingora_core::protocols::http::client::HttpSession;
use pingora_proxy::Session;
use smartllm_protocol::anthropic::AnthropicStream;
use smartllm_protocol::assemble::ChunkAssembler;
use smartllm_protocol::messages::ChatToMessagesStream;
use smartllm_protocol::responses::{ChatToResponsesStream, ResponsesStreamReader};
use smartllm_protocol::sse::{StreamError, DONE_EVENT};
use smartllm_protocol::usage::OpenAiStreamFilter;
use smartllm_protocol::{ApiError, Endpoint, Usage};
use std::time::Instant;

/// How an upstream event stream that failed ended (a clean end is no failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamEnd {
    /// The provider reported an error mid-stream: Anthropic's `event: error`,
    /// an OpenAI-compatible `data: {"error": ...}`.
    UpstreamError,
    /// The connection broke off (reset, closed inside a chunk).
    Broken,
    /// The provider sent something that is no event stream (an event past the bound).
    Malformed,
    /// The response ended before the provider's own end (Anthropic's `message_stop`).
    Truncated,
    /// The provider sent nothing for `idle_timeout`.
    IdleTimeout,
    /// The gateway's drain timeout ended it (a stop with streams in flight):
    /// no failure of the model.
    Shutdown,
}

impl StreamEnd {
    /// Its `reason` in `smartllm_upstream_errors_total`.
    pub(super) fn reason(self) -> &'static str {
        match self {
            StreamEnd::UpstreamError => "stream_error",
            StreamEnd::Broken => "stream_broken",
            StreamEnd::Malformed => "malformed_stream",
            StreamEnd::Truncated => "stream_incomplete",
            StreamEnd::IdleTimeout => "stream_timeout",
            StreamEnd::Shutdown => "shutdown",
        }
    }
}

/// A pass-through stream's bytes cut at event ends: the client gets whole
/// events only, so a stream that breaks mid-event never leaves half an event
/// before the gateway's own error event, and an event is scanned for the
/// provider key whole. Chunks that end on an event's end (nearly all) go
/// through untouched, without a copy.
#[derive(Default)]
struct EventFramer {
    pending: bytes::BytesMut,
}

impl EventFramer {
    /// The whole events `chunk` completes (with what was held before it).
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.pending.is_empty() {
            let end = smartllm_protocol::sse::complete_len(&chunk, 0);
            if end < chunk.len() {
                self.pending.extend_from_slice(&chunk[end..]);
            }
            return if end == chunk.len() {
                chunk
            } else {
                chunk.slice(..end)
            };
        }
        // An event end may straddle the old and the new bytes.
        let from = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(&chunk);
        let end = smartllm_protocol::sse::complete_len(&self.pending, from);
        self.pending.split_to(end).freeze()
    }

    /// What is left at the stream's clean end: a last event without its
    /// blank line, forwarded as the provider sent it.
    fn rest(&mut self) -> Bytes {
        self.pending.split().freeze()
    }
}

enum Translator {
    OpenAi(OpenAiStreamFilter),
    Anthropic(AnthropicStream),
    /// A Responses stream passed through: read, never translated.
    Responses(ResponsesStreamReader),
}

impl Translator {
    /// The canonical chat stream of `chunk` (nothing for a Responses stream).
    fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, smartllm_protocol::sse::SseTooLarge> {
        match self {
            Translator::OpenAi(f) => f.feed(chunk),
            Translator::Anthropic(a) => a.feed(chunk),
            Translator::Responses(r) => r.feed(chunk).map(|()| Vec::new()),
        }
    }
    fn usage(&self) -> Option<Usage> {
        match self {
            Translator::OpenAi(f) => f.usage,
            Translator::Anthropic(a) => a.usage(),
            Translator::Responses(r) => r.usage,
        }
    }
    /// The provider's final usage came: OpenAI's usage chunk, Anthropic's
    /// `message_delta`, a terminal Responses event. (Anthropic's
    /// `message_start` gives the prompt and a placeholder output count.)
    fn usage_final(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.usage.is_some(),
            Translator::Anthropic(a) => a.usage_final(),
            Translator::Responses(r) => r.usage.is_some(),
        }
    }
    /// Output tokens generated so far, from the stream's events.
    fn generated_estimate(&self) -> u64 {
        match self {
            Translator::Anthropic(a) => a.generated_tokens_estimate(),
            Translator::OpenAi(f) => f.generated_tokens_estimate(),
            Translator::Responses(r) => r.generated_tokens_estimate(),
        }
    }
    /// The stream reached its own end (`[DONE]`, `message_stop`, a
    /// terminal Responses event).
    fn complete(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.saw_done,
            Translator::Anthropic(a) => a.done,
            Translator::Responses(r) => r.done,
        }
    }
    /// The answer reached its end: [`Translator::complete`], or (OpenAI
    /// compatible servers that omit `[DONE]`) a choice named its finish
    /// reason. A response that just stops before that was cut short.
    fn ended(&self, choices: u64) -> bool {
        self.complete() || matches!(self, Translator::OpenAi(f) if f.finished >= choices)
    }
    /// The answer has begun: something generated is in the stream. Before
    /// that, a failure loses the client nothing, and another deployment can
    /// still be asked. (A Responses stream passed through is not held back.)
    fn started(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.started || f.saw_done,
            Translator::Anthropic(a) => {
                a.generated_tokens_estimate() > 0 || a.done || a.usage_final()
            }
            Translator::Responses(_) => true,
        }
    }
    /// Something of the answer was generated (a Responses stream passed
    /// through counts only its deltas, not its being under way).
    fn generated(&self) -> bool {
        match self {
            Translator::Responses(r) => r.generated_bytes > 0,
            _ => self.started(),
        }
    }
    /// The answer stopped at the token limit.
    fn truncated(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.truncated,
            Translator::Anthropic(a) => a.truncated,
            Translator::Responses(r) => r.truncated,
        }
    }
    /// The answer stopped at the model's context window (not at a limit
    /// the client set, whatever it set).
    fn window_cut(&self) -> bool {
        matches!(self, Translator::Anthropic(a) if a.window_cut)
    }
    /// The provider sent a `data:` event that is no JSON.
    fn malformed(&self) -> bool {
        match self {
            Translator::OpenAi(f) => f.malformed,
            Translator::Anthropic(a) => a.malformed,
            Translator::Responses(r) => r.malformed,
        }
    }
    /// The error the provider reported mid-stream, if it did.
    fn upstream_error(&self) -> Option<&StreamError> {
        match self {
            Translator::OpenAi(f) => f.error.as_ref(),
            Translator::Anthropic(a) => a.error.as_ref(),
            Translator::Responses(r) => r.error.as_ref(),
        }
    }
    /// The id a provider speaking Responses gave its answer.
    fn response_id(&self) -> Option<&str> {
        match self {
            Translator::Responses(r) => r.id.as_deref(),
            _ => None,
        }
    }
}

/// The usage of a stream that ended before its end (the client left, or it
/// failed), and whether it is estimated: the provider's own figure when its
/// final one came; else the output generated so far, estimated from the
/// assembled text or the translator's count of what streamed, never under
/// a partial figure the provider gave, with the provider's prompt figures
/// where it gave them. The provider bills what it generated.
async fn early_end_usage(
    tr: &Translator,
    req: &smartllm_protocol::ParsedRequest,
    partial_text: Option<String>,
) -> (Usage, bool) {
    let reported = tr.usage();
    if let (true, Some(u)) = (tr.usage_final(), reported) {
        return (u, false);
    }
    // The assembled text has the answer's content and calls only; an
    // OpenAI stream's reasoning (`reasoning_content`, which the cache does
    // not keep) is added from its bytes, and every chunk that carried
    // text is at least a token (a refusal is not assembled either).
    let generated = match (partial_text, tr) {
        (Some(text), Translator::OpenAi(f)) => {
            (estimate_tokens(text).await + f.reasoning_tokens_estimate()).max(f.deltas)
        }
        (Some(text), _) => estimate_tokens(text).await.max(tr.generated_estimate()),
        (None, _) => tr.generated_estimate(),
    };
    // The tier the stream named, where the usage says none.
    let tier = match tr {
        Translator::OpenAi(f) => f.tier,
        _ => smartllm_protocol::usage::ServiceTier::Standard,
    };
    let usage = match reported {
        // The provider's prompt figures (Anthropic's message_start).
        Some(u) if u.prompt_tokens > 0 => Usage {
            completion_tokens: u.completion_tokens.max(generated),
            ..u
        },
        _ => Usage {
            completion_tokens: reported.map_or(0, |u| u.completion_tokens).max(generated),
            tier: reported.map_or(tier, |u| u.tier),
            ..estimate_usage(req, String::new()).await
        },
    };
    (usage, true)
}

/// Record [`early_end_usage`], from what `assembler` holds of the answer.
async fn bill_early_end(
    ctx: &mut Ctx,
    tr: &Translator,
    req: &smartllm_protocol::ParsedRequest,
    assembler: Option<ChunkAssembler>,
) {
    let partial = assembler
        .and_then(ChunkAssembler::finish)
        .map(|c| completion_text(&c));
    let (usage, estimated) = early_end_usage(tr, req, partial).await;
    ctx.usage_estimated |= estimated;
    record_usage(ctx, Some(usage));
}

/// What a request still waiting for its provider gets when the stop's drain
/// timeout is up (nothing reached the client yet).
pub(super) fn drain_refusal() -> ApiError {
    ApiError::shutting_down(
        "This gateway instance is stopping and its drain time (server.graceful_shutdown_timeout) ran out before the provider answered; send the request again (it will reach another instance).",
    )
}

/// A stream the stop's drain timeout ends: no failure of the model.
fn shutdown_end() -> (StreamEnd, ApiError) {
    (
        StreamEnd::Shutdown,
        ApiError::shutting_down(
            "This gateway instance is stopping and its drain time (server.graceful_shutdown_timeout) ended the stream; send the request again (it will reach another instance).",
        ),
    )
}

/// Returns once the stop's drain timeout is up (never if it never is).
pub(super) async fn drain_over(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let over = *rx.borrow_and_update();
        if over {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// How long a Responses stream's end (`response.failed`) is waited for
/// after its `error` event.
const AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(5);

/// The client's `200` and the events before the answer began, not yet sent.
struct Held {
    header: Box<pingora_http::ResponseHeader>,
    events: Vec<u8>,
    since: Instant,
}

impl Held {
    /// At most this much is held back: a provider that sends more, or takes
    /// longer, before its first word is passed on as it comes.
    const BYTES: usize = 64 << 10;
    const TIME: std::time::Duration = std::time::Duration::from_secs(10);

    fn holds(&self, more: usize) -> bool {
        self.events.len() + more <= Self::BYTES && self.since.elapsed() < Self::TIME
    }

    /// Send the header and the held events: the stream is the client's now.
    async fn open(self, session: &mut Session, ctx: &mut Ctx) -> pingora_error::Result<()> {
        ctx.status = 200;
        session.write_response_header(self.header, false).await?;
        if !self.events.is_empty() {
            session
                .write_response_body(Some(Bytes::from(self.events)), false)
                .await?;
        }
        Ok(())
    }
}

/// The error a provider reported in its stream, as the gateway's. Before the
/// answer began (it may reach the client as the HTTP status) rate limits
/// stay 429 and overload 503, statuses SDKs retry on; anything else, and
/// any error mid-answer, is a 502.
fn stream_error(x: &Exchange<'_>, tr: &Translator, before_start: bool) -> ApiError {
    let pname = x.provider();
    let Some(e) = tr.upstream_error() else {
        return ApiError::bad_gateway(
            "upstream_stream_error",
            format!("Provider '{pname}' reported an error mid-stream."),
        );
    };
    let kind = e.kind.as_deref().unwrap_or("");
    let message = format!(
        "Provider '{pname}' reported an error {}{}: {}",
        if before_start {
            "before its answer"
        } else {
            "mid-stream"
        },
        if kind.is_empty() {
            String::new()
        } else {
            format!(" ({kind})")
        },
        e.message
    );
    // The key a provider may quote never reaches the client or the log.
    let message = match x.key.as_deref().filter(|k| k.len() >= 8) {
        Some(k) => message.replace(k, "[redacted]"),
        None => message,
    };
    match kind {
        _ if !before_start => ApiError::bad_gateway("upstream_stream_error", message),
        "invalid_request_error" | "context_length_exceeded" | "request_too_large" => {
            ApiError::new(400, "invalid_request_error", "upstream_rejected", message)
        }
        "rate_limit_error" | "rate_limit_exceeded" => {
            ApiError::new(429, "rate_limit_error", "upstream_rate_limited", message)
        }
        "overloaded_error" => ApiError::unavailable("upstream_overloaded", message),
        _ => ApiError::bad_gateway("upstream_stream_error", message),
    }
}

/// The client's shape, when it is not the canonical chat stream.
enum Encoder {
    Messages(Box<ChatToMessagesStream>),
    Responses(Box<ChatToResponsesStream>),
}

impl Encoder {
    fn feed(&mut self, chat: &[u8]) -> Vec<u8> {
        // Well-formed events in, so no event can exceed the bound.
        match self {
            Encoder::Messages(m) => m.feed(chat).unwrap_or_default(),
            Encoder::Responses(r) => r.feed(chat).unwrap_or_default(),
        }
    }

    /// The last bytes after the canonical tail.
    fn end(&mut self) -> Vec<u8> {
        match self {
            Encoder::Messages(_) => Vec::new(),
            Encoder::Responses(r) => r.finish(),
        }
    }
}

/// Relay the event stream as it comes, translating it, counting its usage
/// and assembling it for the cache when needed.
pub(super) async fn relay(
    x: &Exchange<'_>,
    session: &mut Session,
    ctx: &mut Ctx,
    mut up: HttpSession,
    sent_at: Instant,
) -> Attempt {
    // When the request left: the first generated event sets the TTFT.
    let mut first_token_from = Some(sent_at);
    let (req, translate, pname) = (x.req, x.translate, x.provider());
    // `tr` reads the provider's stream into the canonical chat stream (for
    // usage, errors and the cache); what the client gets is that stream, or
    // it re-encoded as Anthropic or Responses events (`encoder`), or the
    // provider's own bytes (`native`: an Anthropic client of an Anthropic
    // provider, a Responses client of a provider that speaks Responses).
    let native = matches!(
        translate,
        Translate::AnthropicNative | Translate::ResponsesNative
    );
    // The provider keeps these answers itself (decided when the stream
    // opens: a retry elsewhere may still store its answer).
    let keep_cache = translate != Translate::ResponsesNative;
    // Assemble the answer only when it is needed: to cache it, or to count its
    // tokens when the upstream will not report usage (not asked for it).
    let usage_expected = translate != Translate::OpenAi || x.dep.provider.cfg.stream_usage;
    let mut assembler =
        ((ctx.cache_insert.is_some() && keep_cache) || !usage_expected).then(ChunkAssembler::new);
    let mut tr = match translate {
        Translate::OpenAi => Translator::OpenAi(OpenAiStreamFilter::new(req.client_wants_usage)),
        Translate::Anthropic => Translator::Anthropic(AnthropicStream::new(
            ctx.model().unwrap_or(""),
            req.client_wants_usage,
        )),
        // The client gets the provider's own events: the canonical chunks
        // are built only for the cache's assembler.
        Translate::AnthropicNative => {
            let reader = AnthropicStream::new(ctx.model().unwrap_or(""), false);
            Translator::Anthropic(if assembler.is_some() {
                reader
            } else {
                reader.reading_only()
            })
        }
        Translate::ResponsesNative => Translator::Responses(ResponsesStreamReader::default()),
    };
    let mut framer = native.then(EventFramer::default);
    let mut encoder = match (req.endpoint, native) {
        (Endpoint::Messages, false) => {
            // message_start's figure, before the provider's usage (the exact
            // one follows in message_delta): about 4 bytes a token of text,
            // images per image, no tokenizer on the proxy's thread.
            let input = ctx.prompt_tokens;
            Some(Encoder::Messages(Box::new(ChatToMessagesStream::new(
                &req.model, input,
            ))))
        }
        (Endpoint::Responses, false) => req.responses.as_deref().map(|r| {
            // As message_start's.
            let input = ctx.prompt_tokens;
            Encoder::Responses(Box::new(
                ChatToResponsesStream::new(&r.id, r.created_at, &req.model, &r.original)
                    .with_input_estimate(input),
            ))
        }),
        _ => None,
    };
    // The answer's choices: each must name its end.
    let choices = smartllm_protocol::openai::choices_returned(&req.body);
    let idle = x.idle_timeout();
    // The stream's span: from the upstream's answer to the last byte out.
    let span = crate::otel::Phase::under_attempt(&ctx.trace, "stream");
    let header = (|| {
        let mut h = respond::header(200, ctx, "text/event-stream; charset=utf-8", None)?;
        respond::frame_unsized(session, &mut h)?;
        h.insert_header("cache-control", "no-cache")?;
        h.insert_header("x-accel-buffering", "no")?;
        for (k, v) in &x.passthrough {
            h.insert_header(k.clone(), v.as_str())?;
        }
        Ok::<_, pingora_error::BError>(h)
    })();
    let Ok(header) = header else {
        return Attempt::Fail(ApiError::internal("building the stream response header"));
    };
    // The client's `200` and the events before the answer begins (a role
    // chunk, `message_start`, pings) are held until it does: a provider that
    // fails first (overloaded, rate limited, a stream that breaks or ends at
    // once) has then sent the client nothing, and the request goes to the
    // next deployment or fails with a status its SDK retries on.
    let mut held = Some(Held {
        header: Box::new(header),
        events: Vec::new(),
        since: Instant::now(),
    });
    let mut streamed_bytes = 0usize;
    // A provider-kept response's id was marked the tenant's.
    let mut owned = false;
    // `idle_timeout` counts from the provider's last bytes (a held stream's
    // opening in between does not restart it).
    let mut last_bytes = Instant::now();
    // The stop's drain timeout (see `Shared::drain_expired`).
    let mut drain = x.shared.drain_expired.subscribe();
    // None: a clean end.
    let failure: Option<(StreamEnd, ApiError)> = loop {
        // (Checked here too: with a slow client the provider's next bytes
        // are always ready, and the biased select below never polls it.)
        if *drain.borrow() {
            break Some(shutdown_end());
        }
        let t = Instant::now();
        // A held stream opens after `Held::TIME` even while the provider is
        // silent (a model thinking before its first word).
        let open_at = held.as_ref().map(|h| h.since + Held::TIME);
        // After a Responses stream's `error` event, its `response.failed`
        // comes at once or not at all: a short wait, not `idle_timeout`.
        let wait = if tr.upstream_error().is_some() {
            idle.min(AFTER_ERROR)
        } else {
            idle
        };
        let r = tokio::select! {
            biased;
            r = pingora_timeout::timeout(
                wait.saturating_sub(last_bytes.elapsed()),
                up.read_response_body()
            ) => r,
            // The client left during a silent stretch (a model thinking).
            () = super::client_left(session, &mut ctx.client_unwatched) => {
                ctx.upstream_wait += t.elapsed();
                up.shutdown().await;
                bill_early_end(ctx, &tr, req, assembler.take()).await;
                return client_gone(ctx);
            }
            () = drain_over(&mut drain) => {
                ctx.upstream_wait += t.elapsed();
                break Some(shutdown_end());
            }
            () = sleep_until(open_at) => {
                ctx.upstream_wait += t.elapsed();
                if let Some(h) = held.take() {
                    streamed_bytes += h.events.len();
                    if h.open(session, ctx).await.is_err() {
                        up.shutdown().await;
                        bill_early_end(ctx, &tr, req, assembler.take()).await;
                        return client_gone(ctx);
                    }
                }
                continue;
            }
        };
        ctx.upstream_wait += t.elapsed();
        if matches!(r, Ok(Ok(Some(_)))) {
            last_bytes = Instant::now();
        }
        match r {
            Ok(Ok(Some(chunk))) => {
                match tr.feed(&chunk) {
                    // An event that is no JSON: not passed on (nor the rest of
                    // its chunk; a client SDK would choke on it), and the stream
                    // ends with the gateway's error.
                    Ok(_) if tr.malformed() => {
                        break Some((
                        StreamEnd::Malformed,
                        ApiError::bad_gateway(
                            "upstream_invalid_stream",
                            format!("Provider '{pname}' sent an event that is not JSON in its stream."),
                        ),
                    ));
                    }
                    Ok(canonical) => {
                        if let Some(from) = first_token_from.filter(|_| tr.generated()) {
                            let ttft = from.elapsed();
                            ctx.ttft = Some(ttft);
                            metrics::ttft(ctx.model().unwrap_or("-"), pname, ttft.as_secs_f64());
                            first_token_from = None;
                        }
                        // The tenant's own, before the client can ask to go on
                        // from it (`previous_response_id` right after
                        // `response.completed`).
                        if !owned {
                            if let Some(id) = tr.response_id() {
                                crate::pipeline::responses::own(x.shared, ctx, req, id);
                                owned = true;
                            }
                        }
                        if let Some(a) = assembler.as_mut() {
                            a.feed(&canonical);
                        }
                        let mut out = if let Some(f) = framer.as_mut() {
                            f.feed(chunk)
                        } else if let Some(enc) = encoder.as_mut() {
                            Bytes::from(enc.feed(&canonical))
                        } else {
                            Bytes::from(canonical)
                        };
                        // A provider may quote the key it was sent in its error
                        // event, as in an error body: the client never sees it.
                        // Only the events that carry the error are scanned
                        // (whole: a pass-through stream is cut at event ends).
                        if tr.upstream_error().is_some() {
                            out = Bytes::from(scrub(out.to_vec(), x.key.as_deref()));
                        }
                        if let Some(h) = held.as_mut() {
                            if tr.upstream_error().is_some() {
                                // Failed before the answer began: nothing sent.
                                break Some((StreamEnd::UpstreamError, stream_error(x, &tr, true)));
                            }
                            if !tr.started() && h.holds(out.len()) {
                                h.events.extend_from_slice(&out);
                                continue;
                            }
                        }
                        if let Some(h) = held.take() {
                            streamed_bytes += h.events.len();
                            if h.open(session, ctx).await.is_err() {
                                up.shutdown().await;
                                bill_early_end(ctx, &tr, req, assembler.take()).await;
                                return client_gone(ctx);
                            }
                        }
                        if !out.is_empty() {
                            streamed_bytes += out.len();
                            if session.write_response_body(Some(out), false).await.is_err() {
                                // The client left: cancel the upstream request, and
                                // bill what was generated up to here (estimated when
                                // the upstream had not reported usage yet).
                                up.shutdown().await;
                                bill_early_end(ctx, &tr, req, assembler.take()).await;
                                return client_gone(ctx);
                            }
                        }
                        // The provider's error event went to the client (in the
                        // client's shape): the answer is over, and failed. (A
                        // Responses stream's `error` event is followed by its
                        // `response.failed`, which the client waits for.)
                        if tr.upstream_error().is_some()
                            && (tr.complete() || translate != Translate::ResponsesNative)
                        {
                            break Some((StreamEnd::UpstreamError, stream_error(x, &tr, false)));
                        }
                    }
                    Err(e) => {
                        break Some((
                            StreamEnd::Malformed,
                            ApiError::bad_gateway(
                                "upstream_invalid_stream",
                                format!("Provider '{pname}' sent an invalid event stream: {e}."),
                            ),
                        ));
                    }
                }
            }
            Ok(Ok(None)) => {
                // A response that ends after the answer's end but without
                // [DONE] is finished below the way clients expect; one that
                // ends before it was cut short (never stored in the cache).
                // One that ends after the provider's error event (which the
                // client has) failed with it.
                if tr.upstream_error().is_some() {
                    break Some((StreamEnd::UpstreamError, stream_error(x, &tr, false)));
                }
                break (!tr.ended(choices)).then(|| {
                    (
                        StreamEnd::Truncated,
                        ApiError::bad_gateway(
                            "upstream_stream_incomplete",
                            format!("Provider '{pname}' ended the stream before its end event."),
                        ),
                    )
                });
            }
            // A connection that breaks, or goes quiet, after the answer's
            // end event ([DONE], `message_stop`): the answer is whole, and
            // finished as after a clean end (not a failure of the model,
            // nor an error event after the end for the client).
            Ok(Err(_)) | Err(_) if tr.upstream_error().is_none() && tr.complete() => {
                break None;
            }
            Ok(Err(e)) => {
                break Some((
                    StreamEnd::Broken,
                    ApiError::bad_gateway(
                        "upstream_stream_broken",
                        format!(
                            "Provider '{pname}' broke off the stream: {}.",
                            e.etype().as_str()
                        ),
                    ),
                ));
            }
            // The provider's error event (which the client has) and no
            // end after it: failed with it.
            Err(_) if tr.upstream_error().is_some() => {
                break Some((StreamEnd::UpstreamError, stream_error(x, &tr, false)));
            }
            Err(_) => {
                break Some((
                    StreamEnd::IdleTimeout,
                    ApiError::gateway_timeout(format!(
                        "Provider '{pname}' sent nothing for {:?} mid-stream (idle_timeout).",
                        idle
                    )),
                ));
            }
        }
    };
    if let Some(h) = held.take() {
        match failure {
            // Nothing reached the client: another deployment may answer, or
            // the client gets the failure as an HTTP error.
            Some((end, error)) => {
                if end != StreamEnd::Shutdown {
                    metrics::upstream_error(pname, ctx.model().unwrap_or("-"), end.reason());
                }
                span.set(KeyValue::new("smartllm.stream.end", end.reason()));
                span.error(error.code);
                span.end();
                up.shutdown().await;
                if end == StreamEnd::Shutdown {
                    // The stop's drain time is up: no other deployment is
                    // tried; the client gets the 503 (with Retry-After).
                    return Attempt::Fail(error);
                }
                if (400..500).contains(&error.status) && error.status != 429 {
                    // The provider refused the request itself (too long,
                    // invalid): no other deployment would take it, and it
                    // is no fault of this one. The client gets it in its shape.
                    let body = if req.endpoint.is_anthropic() {
                        smartllm_protocol::messages::error_from_openai(error.status, &error.body())
                    } else {
                        error.body()
                    };
                    ctx.error_code = Some(error.code);
                    return match respond::json(session, ctx, error.status, body, &x.passthrough)
                        .await
                    {
                        Ok(()) => Attempt::Done,
                        Err(_) => client_gone(ctx),
                    };
                }
                return x.retry_or_fail(error);
            }
            None => {
                streamed_bytes += h.events.len();
                if h.open(session, ctx).await.is_err() {
                    up.shutdown().await;
                    bill_early_end(ctx, &tr, req, assembler.take()).await;
                    return client_gone(ctx);
                }
            }
        }
    }
    if failure.as_ref().is_some_and(|(end, _)| {
        *end != StreamEnd::UpstreamError || tr.usage().is_some() || tr.generated()
    }) {
        // Billed for what was generated before it broke off, an answer a
        // provider's error event cut as much as a broken connection. (An
        // error event before any answer, with no usage: nothing to bill.)
        bill_early_end(ctx, &tr, req, assembler.take()).await;
    } else {
        record_usage(ctx, tr.usage());
    }
    ctx.cut_off = tr.truncated() && (!super::output_limited(req, ctx) || tr.window_cut());
    let mut tail = Vec::new();
    match &failure {
        // The provider's own error event already reached the client: end with
        // [DONE] unless that did too.
        None | Some((StreamEnd::UpstreamError, _)) => {
            if !tr.complete() {
                tail.extend_from_slice(DONE_EVENT);
            }
        }
        // The gateway tells the client why the stream stops here.
        Some((_, err)) => {
            tail.extend(err.sse_event());
            tail.extend_from_slice(DONE_EVENT);
        }
    }
    span.set(KeyValue::new(
        "smartllm.stream.bytes",
        streamed_bytes as i64,
    ));
    span.set(KeyValue::new(
        "smartllm.stream.end",
        failure.as_ref().map_or("complete", |(end, _)| end.reason()),
    ));
    if let Some((end, err)) = &failure {
        span.error(err.code);
        if *end != StreamEnd::Shutdown {
            metrics::upstream_error(pname, ctx.model().unwrap_or("-"), end.reason());
        }
        ctx.error_code = Some(err.code);
        up.shutdown().await;
    } else {
        x.release(up).await;
    }
    let assembled = match (assembler, &failure) {
        (Some(mut a), None) => {
            a.feed(&tail);
            a.finish()
        }
        _ => None,
    };
    // The tail in the client's shape (the canonical one goes to the assembler).
    let client_tail = if native {
        match &failure {
            // Half an event the provider broke off in is dropped (above).
            None => framer.as_mut().map_or_else(Vec::new, |f| f.rest().to_vec()),
            Some((StreamEnd::UpstreamError, _)) => Vec::new(),
            Some((_, err)) if translate == Translate::AnthropicNative => {
                smartllm_protocol::messages::error_event(err.status, &err.message)
            }
            Some((_, err)) => {
                let v = serde_json::json!({"type": "error", "code": err.code, "message": err.message, "param": null});
                format!("event: error\ndata: {v}\n\n").into_bytes()
            }
        }
    } else if let Some(enc) = encoder.as_mut() {
        let mut out = enc.feed(&tail);
        out.extend(enc.end());
        if let Encoder::Responses(r) = enc {
            if let (Some(resp), None) = (r.response(), &failure) {
                crate::pipeline::responses::keep(x.shared, ctx, req, &resp);
            }
        }
        out
    } else {
        tail
    };
    if tr.usage().is_none() && failure.is_none() {
        // The upstream reported none: estimated as for a stream cut early.
        let text = assembled.as_ref().map(completion_text);
        let (usage, _) = early_end_usage(&tr, req, text).await;
        ctx.usage_estimated = true;
        record_usage(ctx, Some(usage));
    }
    let pending = ctx
        .cache_insert
        .take()
        .filter(|_| !ctx.cut_off && keep_cache);
    if let (Some(mut completion), Some(pending)) = (assembled, pending) {
        // Only a complete, successful stream is stored, and not one cut at
        // the model's own limit (no max tokens asked for).
        if completion.get("usage").is_none() {
            if let Some(u) = ctx.usage {
                completion["usage"] = serde_json::json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                    "total_tokens": u.total(), "prompt_tokens_details": {"cached_tokens": u.cached_tokens}});
            }
        }
        pending.spawn(completion.to_string());
    }
    let outcome = |ctx: &mut Ctx, failure: Option<(StreamEnd, ApiError)>, client_left: bool| {
        if client_left {
            client_gone(ctx);
        }
        match failure {
            Some((end, error)) => Attempt::StreamFailed { end, error },
            None => Attempt::Done,
        }
    };
    // The usage is known: the budgets count it before the last bytes go
    // out (a failed stream is left to the end of the request).
    if failure.is_none() {
        crate::pipeline::finish::settle_budget(x.shared, ctx);
    }
    if !client_tail.is_empty()
        && session
            .write_response_body(Some(Bytes::from(client_tail)), false)
            .await
            .is_err()
    {
        return outcome(ctx, failure, true);
    }
    let client_left = session.write_response_body(None, true).await.is_err();
    span.end();
    outcome(ctx, failure, client_left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framer_passes_whole_events_and_holds_half_ones() {
        let mut f = EventFramer::default();
        // Whole events go through as they are (the same buffer).
        let whole = Bytes::from_static(b"event: a\ndata: {}\n\n");
        let out = f.feed(whole.clone());
        assert_eq!(out.as_ptr(), whole.as_ptr());
        assert_eq!(out, whole);
        // An event cut across reads comes out once it is whole.
        assert_eq!(
            f.feed(Bytes::from_static(b"event: b\ndata: {\"x\"")),
            Bytes::new()
        );
        assert_eq!(
            f.feed(Bytes::from_static(b":1}\n")),
            Bytes::new(),
            "no blank line yet"
        );
        assert_eq!(
            f.feed(Bytes::from_static(b"\nevent: c\ndata: 1")),
            Bytes::from_static(b"event: b\ndata: {\"x\":1}\n\n")
        );
        assert_eq!(
            f.feed(Bytes::from_static(b"\r\n\r\n")),
            Bytes::from_static(b"event: c\ndata: 1\r\n\r\n")
        );
        // A last event without its blank line is left for a clean end.
        assert_eq!(f.feed(Bytes::from_static(b"data: z")), Bytes::new());
        assert_eq!(f.rest(), Bytes::from_static(b"data: z"));
        assert_eq!(f.rest(), Bytes::new());
    }
}
