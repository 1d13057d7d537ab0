//! mock-llm: an OpenAI-compatible (and Anthropic Messages) mock LLM for tests,
//! benchmarks and the demo. Deterministic answers derived from the prompt,
//! `usage` in every answer (and a final usage chunk when streaming with
//! `stream_options.include_usage`), configurable latency and streaming speed, and
//! fault injection by header (`x-mock-*`), by a `mock` object in the JSON body
//! (which passes through the gateway untouched), or for every request by flags.
//!
//! Faults: `status=<code>`, `fault=reset|close|hang|drop-mid-stream|error-mid-stream|malformed-json|malformed-sse`,
//! `latency_ms`, `chunk_delay_ms`, `words`; or at random for a share of all
//! requests (`--fault-rate 0.3 --faults reset,500,hang`). A fault can also be
//! named in the last user message, `[mock-fault:error-mid-stream]`, which
//! reaches the mock through any translation (the `mock` object does not
//! survive the gateway's translation to Anthropic's API).
//!
//! `error-mid-stream`: half the answer, then the provider's error event in its
//! own shape: `event: error` (Anthropic), `data: {"error": {...}}` then
//! `[DONE]` (OpenAI); the HTTP response itself ends cleanly. `error-at-start`:
//! that error before any word (Anthropic: after `message_start`).
//! `end-mid-stream`: half the answer, then the response ends cleanly with
//! no end event (no finish reason, `[DONE]` or `message_stop`).
//! `reset-after-done` (OpenAI streams): the whole answer and `[DONE]`, then
//! the connection reset before the response's last chunk.
//! `--model-fault MODEL=FAULT` gives one upstream model a fault for every request.
//!
//! Models of different skill (`--skill-set FILE --skill MODEL:TASK=P,...`):
//! questions of a labelled set answered right with a probability per model
//! and task, deterministically (see `skills`).
//!
//! Chat requests to a model named like OpenAI's reasoning models (`o1`,
//! `o3`, `o4`, `gpt-5` prefixes) that carry `max_tokens` get OpenAI's 400
//! (`unsupported_parameter`: they take only `max_completion_tokens`).
//!
//! Tools: with tools offered (and no tool result yet in the last turn) the
//! answer calls the first one, in the real APIs' shape: an OpenAI chat
//! message with `content: null` and `tool_calls` (streamed: no content
//! deltas, only `tool_calls` deltas with their `index`), an Anthropic
//! `tool_use` block at index 0 (`stop_reason: tool_use`), a Responses
//! `function_call` item at output_index 0. `--tool-text` puts the answer's
//! text before the call, as before.
//!
//! Errors carry the provider's own `type` for the status (Anthropic:
//! `invalid_request_error`, `authentication_error`, `permission_error`,
//! `not_found_error`, `request_too_large`, `rate_limit_error`, `api_error`,
//! `overloaded_error`; OpenAI: a 429 is `requests` / `rate_limit_exceeded`,
//! a 401 `invalid_api_key`). A Messages request without `max_tokens`, or
//! with a `system` role among its messages, gets Anthropic's 400.
//!
//! Anthropic streams end with `message_delta` usage that is cumulative, as
//! the current API sends it (input, cache writes and reads, output);
//! `--anthropic-delta-output-only` sends the output tokens alone.
//!
//! Introspection: `GET /_mock/last` (the last request: path, headers, body length
//! and sha256), `GET /_mock/stats` (request count, connections accepted, streams cut short by the
//! client), `GET /health`.

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod skills;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mock-llm",
    about = "OpenAI-compatible mock LLM for SmartLLM Router tests and demos",
    after_help = "Faults per request: by header (x-mock-status: 503, x-mock-fault: reset), by a \
`mock` object in the JSON body (\"mock\": {\"fault\": \"drop-mid-stream\"}), or by a marker in the \
last user message ([mock-fault:error-mid-stream], which survives translation to Anthropic's API). \
Faults: reset, close, hang, malformed-json, drop-mid-stream (the connection is reset halfway), \
drop-mid-event (Anthropic: the connection is reset halfway, inside an event), \
error-mid-stream (halfway, the provider's error event: `event: error` for Anthropic, \
`data: {\"error\": ...}` then [DONE] for OpenAI), error-at-start (that error before any word), \
end-mid-stream (halfway, the response ends cleanly without an end event), malformed-sse. Other per-request settings: \
status, latency_ms, chunk_delay_ms, words, no_usage, truncate (or [mock-truncate] in the last user message: the answer ends as cut off at the token limit); [mock-filter] in the last user message ends the answer as stopped by a content filter (Anthropic: refusal). Token kinds in usage (body `mock` object or x-mock-* headers): cached_tokens, reasoning_tokens (OpenAI chat and Responses), audio_input_tokens, audio_output_tokens (OpenAI chat), cache_write_5m, cache_write_1h, web_search_requests (Anthropic; cached_tokens is its cache_read_input_tokens), also as [mock-usage:cached_tokens=5,cache_write_1h=2] in the last user message."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000", env = "MOCK_LLM_LISTEN")]
    listen: String,
    /// Delay before the response (or first stream chunk), in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Words in each answer (capped by max_tokens).
    #[arg(long, default_value_t = 12)]
    words: usize,
    /// Answer every completion request with this HTTP status (error injection).
    #[arg(long)]
    fail_status: Option<u16>,
    /// Inject a fault into this share (0.0-1.0) of completion requests that
    /// ask for none, picked at random from --faults.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Faults for --fault-rate: reset, close, hang, malformed-json,
    /// drop-mid-stream, error-mid-stream, malformed-sse, or an HTTP status code.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reset,close,malformed-json,500,503,429"
    )]
    faults: Vec<String>,
    /// Name reported in `system_fingerprint` and the `x-mock-instance` header.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Close a kept-alive connection idle this long (milliseconds), as
    /// servers with a keep-alive timeout do. Default: never.
    #[arg(long)]
    keepalive_ms: Option<u64>,
    /// After this many answers on a connection, read the next request and
    /// close the connection unanswered (the race of a server closing a
    /// kept-alive connection as a request arrives). Default: never.
    #[arg(long)]
    drop_after: Option<u64>,
    /// Also serve HTTPS on this address (same state as the plain listener).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<String>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// The labelled set (JSONL: task, question, answer, choices) whose
    /// questions skilled models (--skill) answer right or wrong.
    #[arg(long, requires = "skill")]
    skill_set: Option<std::path::PathBuf>,
    /// A model of given skill: MODEL:TASK=P[,TASK=P...] (`default` for the
    /// other tasks): a question of --skill-set asked of MODEL gets the gold
    /// answer with probability P, else a wrong one. Repeatable.
    #[arg(long, requires = "skill_set")]
    skill: Vec<String>,
    /// Picks which questions a skilled model gets right (same seed, same answers).
    #[arg(long, default_value_t = 0)]
    skill_seed: u64,
    /// Requests for this model answer with this status, as a provider does
    /// when one model is overloaded (529) or rate limited: MODEL=CODE. Repeatable.
    #[arg(long, value_parser = parse_model_status)]
    model_status: Vec<(String, u16)>,
    /// Requests for this model get this fault (as `x-mock-fault` would):
    /// MODEL=FAULT. Repeatable.
    #[arg(long, value_parser = parse_model_fault)]
    model_fault: Vec<(String, String)>,
    /// Answers that call a tool carry the answer's text too (the old
    /// shape: an OpenAI chat message with both `content` and `tool_calls`,
    /// an Anthropic text block before the `tool_use` block, a Responses
    /// message item before the `function_call` item). By default a turn
    /// that calls a tool is the call alone, as the real APIs send it.
    #[arg(long)]
    tool_text: bool,
    /// Anthropic streams: `message_delta`'s usage carries `output_tokens`
    /// alone (the older API's shape) rather than the cumulative usage
    /// (input, cache writes and reads, output) the current API sends.
    #[arg(long)]
    anthropic_delta_output_only: bool,
}

fn parse_model_fault(s: &str) -> Result<(String, String), String> {
    let (m, f) = s.split_once('=').ok_or("use MODEL=FAULT")?;
    Ok((m.to_string(), f.to_string()))
}

fn parse_model_status(s: &str) -> Result<(String, u16), String> {
    let (m, c) = s.split_once('=').ok_or("use MODEL=CODE")?;
    let code = c.parse().map_err(|e| format!("{c:?}: {e}"))?;
    Ok((m.to_string(), code))
}

/// A client connection, plain or TLS, that fault injection can reset.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {
    /// Make the close a TCP reset (RST) instead of a FIN.
    fn reset(&self);
}

impl Conn for TcpStream {
    fn reset(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()
        .context("reading --tls-cert")?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))
        .context("reading --tls-key")?
        .context("no private key in --tls-key")?;
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("building the TLS config")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[derive(Default)]
struct State {
    /// Models of given skill on the labelled set (`--skill`).
    skills: Option<skills::Skills>,
    requests: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    /// Streams whose client (the gateway) went away before the end.
    streams_aborted: AtomicU64,
    last: Mutex<Value>,
    /// Prompt-cache prefixes (Anthropic `cache_control`) already written.
    prompt_cache: Mutex<std::collections::HashSet<String>>,
    /// Responses API answers kept (`store`), by id.
    responses: Mutex<std::collections::HashMap<String, Value>>,
}

#[derive(Debug, Clone, Default)]
struct Behaviour {
    latency_ms: u64,
    chunk_delay_ms: u64,
    words: usize,
    status: Option<u16>,
    fault: Option<String>,
    /// Omit `usage` (like upstreams that do not report it).
    no_usage: bool,
    /// End the answer as cut off at the token limit (`finish_reason:
    /// length`, Anthropic `max_tokens`) although none was asked for.
    truncate: bool,
    /// Token kinds to report on top of the counted prompt and answer.
    kinds: TokenKinds,
    /// The answer's words, as given (`mock.reply` or `x-mock-reply`; Chat
    /// Completions and Messages), instead of the made-up ones.
    reply: Option<String>,
}

/// Extra tokens of each kind a request asks the mock to report: cache reads
/// (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`), Anthropic
/// cache writes (5-minute and 1-hour), OpenAI reasoning and audio tokens.
/// They add to the counted prompt (reads, writes, audio in) and answer
/// (reasoning, audio out).
#[derive(Debug, Clone, Copy, Default)]
struct TokenKinds {
    cached: u64,
    reasoning: u64,
    write_5m: u64,
    write_1h: u64,
    audio_in: u64,
    audio_out: u64,
    /// Anthropic's server-side web searches (`usage.server_tool_use`).
    web_searches: u64,
}

impl TokenKinds {
    /// OpenAI's chat `usage` for a counted prompt and answer.
    fn openai_usage(&self, prompt: u64, completion: u64) -> Value {
        let p = prompt + self.cached + self.audio_in;
        let c = completion + self.reasoning + self.audio_out;
        let mut u = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
        if self.cached + self.reasoning + self.audio_in + self.audio_out > 0 {
            u["prompt_tokens_details"] =
                json!({"cached_tokens": self.cached, "audio_tokens": self.audio_in});
            u["completion_tokens_details"] =
                json!({"reasoning_tokens": self.reasoning, "audio_tokens": self.audio_out});
        }
        u
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!("mock-llm listening on {}", listener.local_addr()?);
    let skills = match &args.skill_set {
        Some(set) => Some(skills::Skills::load(set, &args.skill, args.skill_seed)?),
        None => None,
    };
    let args = Arc::new(args);
    let state = Arc::new(State {
        skills,
        ..State::default()
    });
    if let (Some(addr), Some(c), Some(k)) = (&args.tls_listen, &args.tls_cert, &args.tls_key) {
        let acceptor = tls_acceptor(c, k)?;
        let tls_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "mock-llm listening on {} (https)",
            tls_listener.local_addr()?
        );
        // The HTTPS accept loop lives as long as the process, as the plain one does.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(accept_loop(
            tls_listener,
            Some(acceptor),
            args.clone(),
            state.clone(),
        ));
    }
    accept_loop(listener, None, args, state).await
}

/// Accepts connections and serves each on its own task; a test server's
/// connections end with the process, so they are not tracked.
#[allow(clippy::disallowed_methods)]
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    args: Arc<Args>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        let (args, state, tls) = (args.clone(), state.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let _ = connection(sock, None, args, state).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(sock).await {
                        let sni = stream.get_ref().1.server_name().map(str::to_string);
                        let _ = connection(stream, sni, args, state).await;
                    }
                }
            }
        });
    }
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    keep_alive: bool,
}

async fn read_request<S: Conn>(sock: &mut S, buf: &mut Vec<u8>) -> anyhow::Result<Option<Request>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf)? {
            httparse::Status::Complete(n) => {
                let method = req.method.unwrap_or("GET").to_string();
                let path = req.path.unwrap_or("/").to_string();
                let http10 = req.version == Some(0);
                let mut map = BTreeMap::new();
                for h in req.headers.iter() {
                    map.insert(
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    );
                }
                buf.drain(..n);
                let chunked = map
                    .get("transfer-encoding")
                    .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
                let body = if chunked {
                    read_chunked(sock, buf).await?
                } else {
                    let len: usize = map
                        .get("content-length")
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < len {
                        if read_more(sock, buf).await? == 0 {
                            anyhow::bail!("eof in body");
                        }
                    }
                    buf.drain(..len).collect()
                };
                let conn = map
                    .get("connection")
                    .map(|v| v.to_ascii_lowercase())
                    .unwrap_or_default();
                let keep_alive = if http10 {
                    conn.contains("keep-alive")
                } else {
                    !conn.contains("close")
                };
                return Ok(Some(Request {
                    method,
                    path,
                    headers: map,
                    body,
                    keep_alive,
                }));
            }
            httparse::Status::Partial => {
                if buf.len() > 1 << 20 {
                    anyhow::bail!("header too large");
                }
                if read_more(sock, buf).await? == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

async fn read_more<S: Conn>(sock: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut tmp = [0u8; 64 * 1024];
    let n = sock.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

async fn read_chunked<S: Conn>(sock: &mut S, buf: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = memchr::memmem::find(buf, b"\r\n") {
                break i;
            }
            if read_more(sock, buf).await? == 0 {
                anyhow::bail!("eof in chunk size");
            }
        };
        let size_str = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            if read_more(sock, buf).await? == 0 {
                anyhow::bail!("eof in chunk");
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

async fn connection<S: Conn>(
    mut sock: S,
    sni: Option<String>,
    args: Arc<Args>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    state.connections.fetch_add(1, Ordering::Relaxed);
    let mut answered = 0u64;
    let mut buf = Vec::with_capacity(8192);
    loop {
        // An idle keep-alive connection is closed after --keepalive-ms, as
        // servers do (nothing buffered: no request has begun).
        let idle = buf.is_empty();
        let next = read_request(&mut sock, &mut buf);
        let req = match args.keepalive_ms {
            Some(ms) if idle => match tokio::time::timeout(Duration::from_millis(ms), next).await {
                Ok(r) => r?,
                Err(_) => break,
            },
            _ => next.await?,
        };
        let Some(req) = req else { break };
        if args.drop_after.is_some_and(|n| answered >= n) {
            // A server closing a kept connection just as a request arrives.
            break;
        }
        answered += 1;
        let keep = req.keep_alive;
        if !handle(&mut sock, req, sni.as_deref(), &args, &state).await? || !keep {
            break;
        }
    }
    Ok(())
}

fn behaviour(args: &Args, req: &Request, body: &Value) -> Behaviour {
    let mut b = Behaviour {
        latency_ms: args.latency_ms,
        chunk_delay_ms: args.chunk_delay_ms,
        words: args.words,
        status: args.fail_status,
        fault: None,
        no_usage: false,
        truncate: false,
        kinds: TokenKinds::default(),
        reply: None,
    };
    // The last user message (Chat Completions, Messages) or input
    // (Responses), where the `[mock-…]` marks are read.
    let user = match last_user_text(body) {
        t if t.is_empty() => responses_input_text(body),
        t => t,
    };
    let h = |k: &str| req.headers.get(k).cloned();
    let m = body.get("mock");
    let get = |k: &str| -> Option<String> {
        h(&format!("x-mock-{}", k.replace('_', "-"))).or_else(|| {
            m.and_then(|m| m.get(k)).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        })
    };
    if let Some(v) = get("latency_ms").and_then(|v| v.parse().ok()) {
        b.latency_ms = v;
    }
    if let Some(v) = get("chunk_delay_ms").and_then(|v| v.parse().ok()) {
        b.chunk_delay_ms = v;
    }
    if let Some(v) = get("words").and_then(|v| v.parse().ok()) {
        b.words = v;
    }
    if let Some(v) = get("status").and_then(|v| v.parse().ok()) {
        b.status = Some(v);
    }
    b.fault = get("fault").or_else(|| prompt_mark(&user, "[mock-fault:"));
    if let Some(s) = prompt_mark(&user, "[mock-status:").and_then(|s| s.parse().ok()) {
        b.status = Some(s);
    }
    b.no_usage = get("no_usage").is_some_and(|v| v == "true" || v == "1");
    b.reply = get("reply");
    b.truncate = get("truncate").is_some_and(|v| v == "true" || v == "1")
        || user.contains("[mock-truncate]");
    // Or `[mock-usage:cached_tokens=5,cache_write_1h=2]` in the last user
    // message, which survives translation to Anthropic's API.
    let marked: Vec<(String, String)> = prompt_mark(&user, "[mock-usage:")
        .map(|m| {
            m.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let n = |k: &str| {
        get(k)
            .or_else(|| marked.iter().find(|(m, _)| m == k).map(|(_, v)| v.clone()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    b.kinds = TokenKinds {
        cached: n("cached_tokens"),
        reasoning: n("reasoning_tokens"),
        write_5m: n("cache_write_5m"),
        write_1h: n("cache_write_1h"),
        audio_in: n("audio_input_tokens"),
        audio_out: n("audio_output_tokens"),
        web_searches: n("web_search_requests"),
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if b.status.is_none() {
        if let Some((_, code)) = args.model_status.iter().find(|(m, _)| m == model) {
            b.status = Some(*code);
        }
    }
    if b.fault.is_none() {
        if let Some((_, fault)) = args.model_fault.iter().find(|(m, _)| m == model) {
            b.fault = Some(fault.clone());
        }
    }
    if b.fault.is_none()
        && b.status.is_none()
        && !args.faults.is_empty()
        && fastrand::f64() < args.fault_rate
    {
        let f = &args.faults[fastrand::usize(..args.faults.len())];
        match f.parse::<u16>() {
            Ok(code) => b.status = Some(code),
            Err(_) => b.fault = Some(f.clone()),
        }
    }
    b
}

/// A fault or status named in a prompt: `[mock-fault:NAME]`, `[mock-status:429]`.
fn prompt_mark(text: &str, mark: &str) -> Option<String> {
    let rest = &text[text.find(mark)? + mark.len()..];
    let name = rest[..rest.find(']')?].trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Numbers the answers' request ids.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// The provider error `fault=error-mid-stream` sends in place of the rest of the answer.
const STREAM_ERROR_MESSAGE: &str = "mock-llm injected an error mid-stream";

/// [`STREAM_ERROR_MESSAGE`], quoting the key the request carried (as a
/// careless provider's error might), so the gateway's scrubbing is tested.
fn stream_error_message(req: &Request) -> String {
    match req
        .headers
        .get("authorization")
        .or_else(|| req.headers.get("x-api-key"))
    {
        Some(sent) => format!("{STREAM_ERROR_MESSAGE} (key: {sent})"),
        None => STREAM_ERROR_MESSAGE.to_string(),
    }
}

/// A mid-stream fault of an OpenAI stream, where half the answer is out
/// (`drop-mid-stream`, `end-mid-stream`, `error-mid-stream`): Some(whether
/// the connection may be kept) when it ended the response, None when the
/// request named none of them.
async fn openai_mid_stream_fault<S: Conn>(
    sock: &mut S,
    fault: Option<&str>,
    req: &Request,
) -> std::io::Result<Option<bool>> {
    match fault {
        Some("drop-mid-stream") => {
            sock.reset();
            Ok(Some(false))
        }
        Some("end-mid-stream") => {
            write_chunk(sock, b"").await?;
            Ok(Some(true))
        }
        Some("error-mid-stream") => {
            let v = json!({"error": {"message": stream_error_message(req), "type": "server_error", "param": null, "code": null}});
            write_chunk(sock, format!("data: {v}\n\n").as_bytes()).await?;
            write_chunk(sock, b"data: [DONE]\n\n").await?;
            write_chunk(sock, b"").await?;
            Ok(Some(true))
        }
        _ => Ok(None),
    }
}

async fn write_json<S: Conn>(
    sock: &mut S,
    status: u16,
    body: &Value,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    write_raw(sock, status, "application/json", &body, extra).await
}

async fn write_raw<S: Conn>(
    sock: &mut S,
    status: u16,
    ctype: &str,
    body: &[u8],
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    sock.write_all(&out).await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Status",
    }
}

async fn start_stream<S: Conn>(sock: &mut S, extra: &[(&str, String)]) -> std::io::Result<()> {
    let mut head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n".to_string();
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await
}

async fn write_chunk<S: Conn>(sock: &mut S, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    sock.write_all(&out).await
}

const VOCAB: [&str; 32] = [
    "the", "model", "answer", "gateway", "routes", "tokens", "quickly", "cache", "semantic",
    "latency", "cost", "budget", "stream", "response", "prompt", "vector", "index", "request",
    "upstream", "provider", "result", "simple", "clear", "useful", "data", "value", "system",
    "fast", "reliable", "test", "mock", "reply",
];

fn answer_words(prompt: &str, n: usize) -> Vec<String> {
    let digest = Sha256::digest(prompt.as_bytes());
    let snippet: Vec<&str> = prompt.split_whitespace().take(6).collect();
    let mut words = vec!["Mock".to_string(), "reply".to_string(), "to:".to_string()];
    words.extend(snippet.iter().map(|s| s.to_string()));
    words.push("--".into());
    let mut i = 0usize;
    while words.len() < n.max(1) + 4 {
        let b = digest[i % digest.len()] as usize + i;
        words.push(VOCAB[b % VOCAB.len()].to_string());
        i += 1;
    }
    words.truncate(n.max(1));
    words
}

fn count_tokens(s: &str) -> u64 {
    // ~4 characters a token, at least one per word: stable and deterministic.
    let chars = s.chars().count() as u64;
    chars.div_ceil(4).max(s.split_whitespace().count() as u64)
}

fn prompt_text(path: &str, body: &Value) -> String {
    if path.ends_with("/completions") && !path.ends_with("/chat/completions") {
        return match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
    }
    let mut out = Vec::new();
    match body.get("system") {
        Some(Value::String(s)) => out.push(s.clone()),
        Some(Value::Array(blocks)) => {
            for b in blocks {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    out.push(t.to_string());
                }
            }
        }
        _ => {}
    }
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for m in msgs {
            match m.get("content") {
                Some(Value::String(s)) => out.push(s.clone()),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push(t.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out.join("\n")
}

fn last_user_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|msgs| {
            msgs.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .map(|c| match c {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default()
}

/// The text of a Responses request's last user input.
fn responses_input_text(body: &Value) -> String {
    match body.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .rev()
            .find(|i| i.get("role").and_then(Value::as_str) == Some("user"))
            .map(|i| match &i["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            })
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// `POST /v1/responses`, as a provider that speaks the Responses API and
/// keeps state: `previous_response_id` must name a response it stored.
/// With a function tool offered (and no `function_call_output` as the last
/// input) the answer calls it: a `function_call` item at output_index 0,
/// or after the message item with `tool_text` (`--tool-text`).
async fn responses_api<S: Conn>(
    sock: &mut S,
    body: &Value,
    b: &Behaviour,
    state: &State,
    inst: &[(&str, String)],
    tool_text: bool,
) -> anyhow::Result<()> {
    let model = body.get("model").and_then(Value::as_str).unwrap_or("mock");
    // The conversation so far is read again as input, as OpenAI bills it.
    let mut history_tokens = 0;
    if let Some(prev) = body.get("previous_response_id").and_then(Value::as_str) {
        let known = state
            .responses
            .lock()
            .ok()
            .and_then(|r| r.get(prev).map(|p| p["usage"].clone()));
        if let Some(u) = &known {
            history_tokens =
                u["input_tokens"].as_u64().unwrap_or(0) + u["output_tokens"].as_u64().unwrap_or(0);
        }
        if known.is_none() {
            write_json(sock, 400, &json!({"error": {"message": format!("Previous response with id '{prev}' not found."),
                "type": "invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}}), inst).await?;
            return Ok(());
        }
    }
    let question = responses_input_text(body);
    let tool = responses_tool(body);
    let limit = body.get("max_output_tokens").and_then(Value::as_u64);
    let n_words = limit.map_or(b.words, |m| b.words.min(m as usize));
    // A call ends the turn (as chat's `tool_calls` finish does).
    let truncated = tool.is_none() && (b.truncate || limit.is_some_and(|m| (m as usize) < b.words));
    // The message item: always without a call, with one only if asked.
    let with_text = tool.is_none() || tool_text;
    let words = answer_words(&question, n_words);
    let text = words.join(" ");
    let input_tokens = history_tokens
        + count_tokens(&question)
        + count_tokens(
            body.get("instructions")
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
    let k = b.kinds;
    let input_tokens = input_tokens + k.cached;
    let output_tokens = words.len() as u64 + k.reasoning;
    let id = format!(
        "resp_mock{}",
        &hex::encode(Sha256::digest(
            format!("{question}{}", fastrand::u64(..)).as_bytes()
        ))[..24]
    );
    let msg_id = format!("msg_{}", &id[5..]);
    let item = json!({"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]});
    let call = tool.as_ref().map(|(name, input)| {
        json!({"type": "function_call", "id": format!("fc_{}", &id[5..]), "call_id": format!("call_{}", &id[5..]),
            "name": name, "arguments": input.to_string(), "status": "completed"})
    });
    let mut output = Vec::new();
    if with_text {
        output.push(item.clone());
    }
    if let Some(c) = &call {
        output.push(c.clone());
    }
    let (status, incomplete) = if truncated {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let response = json!({"id": id, "object": "response", "created_at": now(), "status": status,
        "model": model, "output": output, "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store").and_then(Value::as_bool).unwrap_or(true), "error": null, "incomplete_details": incomplete,
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": k.cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": k.reasoning},
            "total_tokens": input_tokens + output_tokens}});
    if body.get("store").and_then(Value::as_bool) != Some(false) {
        if let Ok(mut r) = state.responses.lock() {
            r.insert(id.clone(), response.clone());
        }
    }
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        write_json(sock, 200, &response, inst).await?;
        return Ok(());
    }
    start_stream(sock, inst).await?;
    let mut seq = 0u64;
    let mut send = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        format!("event: {kind}\ndata: {v}\n\n")
    };
    let mut pending = response.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    let mut out = vec![
        send("response.created", json!({"response": pending})),
        send("response.in_progress", json!({"response": pending})),
    ];
    if with_text {
        let mut empty_item = item.clone();
        empty_item["status"] = json!("in_progress");
        empty_item["content"] = json!([]);
        out.push(send(
            "response.output_item.added",
            json!({"output_index": 0, "item": empty_item}),
        ));
        out.push(send(
            "response.content_part.added",
            json!({"item_id": msg_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}}),
        ));
        let half = words.len() / 2;
        for (i, w) in words.iter().enumerate() {
            if i == half {
                if let Some(end) = responses_fault_events(b.fault.as_deref(), &pending, &mut send) {
                    out.extend(end);
                    return write_events(sock, b, out).await;
                }
            }
            let t = if i == 0 { w.clone() } else { format!(" {w}") };
            out.push(send("response.output_text.delta", json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": t, "logprobs": []})));
        }
        out.push(send("response.output_text.done", json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []})));
        out.push(send("response.content_part.done", json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "part": item["content"][0]})));
        out.push(send(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        ));
    }
    if let Some(c) = &call {
        let index = usize::from(with_text);
        let mut empty_call = c.clone();
        empty_call["status"] = json!("in_progress");
        empty_call["arguments"] = json!("");
        out.push(send(
            "response.output_item.added",
            json!({"output_index": index, "item": empty_call}),
        ));
        let arguments = c["arguments"].as_str().unwrap_or("{}");
        let (head, tail) = halves(arguments);
        for (i, part) in [head, tail].into_iter().enumerate() {
            // A call alone has its mid-stream faults halfway through its arguments.
            if i == 1 && !with_text {
                if let Some(end) = responses_fault_events(b.fault.as_deref(), &pending, &mut send) {
                    out.extend(end);
                    return write_events(sock, b, out).await;
                }
            }
            out.push(send(
                "response.function_call_arguments.delta",
                json!({"item_id": c["id"], "output_index": index, "delta": part}),
            ));
        }
        out.push(send(
            "response.function_call_arguments.done",
            json!({"item_id": c["id"], "output_index": index, "name": c["name"], "arguments": arguments}),
        ));
        out.push(send(
            "response.output_item.done",
            json!({"output_index": index, "item": c}),
        ));
    }
    let end = if truncated {
        "response.incomplete"
    } else {
        "response.completed"
    };
    out.push(send(end, json!({"response": response})));
    write_events(sock, b, out).await
}

/// The events a Responses stream's mid-stream fault ends it with:
/// `error-mid-stream`, OpenAI's `error` then `response.failed`;
/// `end-mid-stream`, none (the response ends cleanly, before the answer's
/// end). None when the request named neither.
fn responses_fault_events(
    fault: Option<&str>,
    pending: &Value,
    send: &mut impl FnMut(&str, Value) -> String,
) -> Option<Vec<String>> {
    match fault {
        Some("error-mid-stream") => {
            // What OpenAI sends when the response fails mid-answer.
            let message = "The server had an error while processing your request.";
            let mut failed = pending.clone();
            failed["status"] = json!("failed");
            failed["error"] = json!({"code": "server_error", "message": message});
            Some(vec![
                send(
                    "error",
                    json!({"code": "server_error", "message": message, "param": null}),
                ),
                send("response.failed", json!({"response": failed})),
            ])
        }
        Some("end-mid-stream") => Some(Vec::new()),
        _ => None,
    }
}

/// A tool call's arguments in two halves (split on a character boundary:
/// the question they quote may be any text), streamed as two deltas.
fn halves(s: &str) -> (&str, &str) {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid -= 1;
    }
    s.split_at(mid)
}

/// A function tool a Responses request offers, called with the question as
/// input unless the last input item is a `function_call_output` (the
/// call was answered) or `tool_choice` is `none`. Built-in tools
/// (`web_search`, ...) are never called.
fn responses_tool(body: &Value) -> Option<(String, Value)> {
    let tools = body.get("tools")?.as_array()?;
    let name = tools
        .iter()
        .find(|t| t.get("type").and_then(Value::as_str) == Some("function"))?
        .get("name")?
        .as_str()?;
    if body
        .get("tool_choice")
        .and_then(|c| c.get("type").or(Some(c)))
        == Some(&json!("none"))
    {
        return None;
    }
    let answered = match body.get("input") {
        Some(Value::Array(items)) => items
            .last()
            .is_some_and(|i| i.get("type").and_then(Value::as_str) == Some("function_call_output")),
        _ => false,
    };
    if answered {
        return None;
    }
    let question: String = responses_input_text(body).chars().take(40).collect();
    Some((name.to_string(), json!({"query": question})))
}

/// Write a stream's events, then its end.
async fn write_events<S: Conn>(
    sock: &mut S,
    b: &Behaviour,
    events: Vec<String>,
) -> anyhow::Result<()> {
    for e in events {
        if b.chunk_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(b.chunk_delay_ms)).await;
        }
        write_chunk(sock, e.as_bytes()).await?;
    }
    write_chunk(sock, b"").await?;
    Ok(())
}

/// Anthropic's error `type` for an HTTP status.
fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// Why Anthropic would refuse a Messages request the mock can read: no
/// `max_tokens` (required), or a `system` role among the messages: refused
/// by every model but Claude Opus 4.8 (the only one that takes
/// mid-conversation system messages), and by it where Anthropic's placement
/// rules do not allow one (first, not right after a user turn, next to
/// another, or followed by anything but an assistant turn).
fn messages_request_error(body: &Value) -> Option<String> {
    match body.get("max_tokens") {
        None | Some(Value::Null) => return Some("max_tokens: Field required".to_string()),
        Some(v) if v.as_u64().is_none() => {
            return Some("max_tokens: Input should be a valid integer".to_string())
        }
        _ => {}
    }
    let msgs = body.get("messages").and_then(Value::as_array)?;
    let role = |i: usize| {
        msgs.get(i)
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
    };
    let takes_them = body
        .get("model")
        .and_then(Value::as_str)
        .is_some_and(|m| m.contains("opus-4-8"));
    (0..msgs.len()).filter(|i| role(*i) == Some("system")).find_map(|i| {
        if !takes_them {
            return Some(format!(
                "messages.{i}.role: Unexpected role \"system\". The Messages API accepts a top-level `system` parameter, not \"system\" as an input message role."
            ));
        }
        let placed = i > 0
            && role(i - 1) == Some("user")
            && matches!(role(i + 1), None | Some("assistant"));
        (!placed).then(|| format!("messages.{i}: a system message must follow a user message and be last or followed by an assistant message"))
    })
}

/// A tool the answer calls: with `tools` offered and no tool result yet in
/// the last turn, the mock calls the first tool with the question as input.
fn wanted_tool(body: &Value, anthropic: bool) -> Option<(String, Value)> {
    let tools = body.get("tools")?.as_array()?;
    let first = tools.first()?;
    let name = if anthropic {
        first.get("name")
    } else {
        first.get("function").and_then(|f| f.get("name"))
    }
    .and_then(Value::as_str)?;
    let last = body.get("messages")?.as_array()?.last()?;
    let answered = if anthropic {
        last.get("content")
            .and_then(Value::as_array)
            .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"))
    } else {
        last.get("role").and_then(Value::as_str) == Some("tool")
    };
    if answered
        || body
            .get("tool_choice")
            .and_then(|c| c.get("type").or(Some(c)))
            == Some(&json!("none"))
    {
        return None;
    }
    let question: String = last_user_text(body).chars().take(40).collect();
    Some((name.to_string(), json!({"query": question})))
}

/// Anthropic's usage, prompt cache included: with `cache_control` in the
/// request, the system prompt is the cached prefix, written the first time
/// it is seen and read afterwards.
fn anthropic_usage(body: &Value, prompt_tokens: u64, state: &State, k: TokenKinds) -> Value {
    if k.cached + k.write_5m + k.write_1h > 0 {
        // Asked for: the counted prompt is the uncached input, plus these.
        return json!({"input_tokens": prompt_tokens, "cache_creation_input_tokens": k.write_5m + k.write_1h,
            "cache_read_input_tokens": k.cached, "output_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": k.write_5m, "ephemeral_1h_input_tokens": k.write_1h}});
    }
    let marked = body.to_string().contains("\"cache_control\"");
    let (mut written, mut read) = (0, 0);
    if marked {
        let system = body.get("system").map(Value::to_string).unwrap_or_default();
        let prefix = hex::encode(Sha256::digest(system.as_bytes()));
        let system_text = prompt_text("/v1/messages", &json!({"system": body.get("system")}));
        let cached = count_tokens(&system_text).min(prompt_tokens);
        let seen = state
            .prompt_cache
            .lock()
            .map(|mut s| !s.insert(prefix))
            .unwrap_or(false);
        if seen {
            read = cached;
        } else {
            written = cached;
        }
    }
    json!({"input_tokens": prompt_tokens - written - read, "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read, "output_tokens": 0})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Returns whether the connection may be kept.
async fn handle<S: Conn>(
    sock: &mut S,
    req: Request,
    sni: Option<&str>,
    args: &Args,
    state: &State,
) -> anyhow::Result<bool> {
    let path = req.path.split('?').next().unwrap_or("/").to_string();
    // The provider's id of the request, in its own header: Anthropic's
    // `request-id`, OpenAI's `x-request-id`.
    let id_header = if path.contains("/messages") {
        "request-id"
    } else {
        "x-request-id"
    };
    // The account's rate limits, as the real APIs report them on every
    // answer (fixed figures: the gateway passes them on, or sends its own
    // under a key limit).
    let (limit_header, remaining_header, limit) = if path.contains("/messages") {
        (
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            4000,
        )
    } else {
        (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            10000,
        )
    };
    let inst = [
        ("x-mock-instance", args.name.clone()),
        (
            id_header,
            format!("req_mock_{}", REQUEST_IDS.fetch_add(1, Ordering::Relaxed)),
        ),
        (limit_header, limit.to_string()),
        (remaining_header, (limit - 1).to_string()),
    ];
    match (req.method.as_str(), path.as_str()) {
        ("GET", "/health") => {
            write_json(sock, 200, &json!({"status": "ok"}), &inst).await?;
            return Ok(true);
        }
        ("GET", "/_mock/last") => {
            let last = state.last.lock().map(|l| l.clone()).unwrap_or(Value::Null);
            write_json(sock, 200, &last, &inst).await?;
            return Ok(true);
        }
        ("GET", "/_mock/stats") => {
            write_json(
                sock,
                200,
                &json!({"requests": state.requests.load(Ordering::Relaxed),
                    "connections": state.connections.load(Ordering::Relaxed),
                    "streams_aborted": state.streams_aborted.load(Ordering::Relaxed), "name": args.name}),
                &inst,
            )
            .await?;
            return Ok(true);
        }
        ("GET", p) if p.starts_with("/v1/responses/") => {
            let id = &p["/v1/responses/".len()..];
            let found = state.responses.lock().ok().and_then(|r| r.get(id).cloned());
            match found {
                Some(r) => write_json(sock, 200, &r, &inst).await?,
                None => write_json(sock, 404, &json!({"error": {"message": format!("Response with id '{id}' not found."), "type": "invalid_request_error", "param": null, "code": null}}), &inst).await?,
            }
            return Ok(true);
        }
        ("GET", "/v1/models") | ("GET", "/models") => {
            let data: Vec<Value> = ["mock-small", "mock-large", "mock-embed"]
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
                .collect();
            write_json(sock, 200, &json!({"object": "list", "data": data}), &inst).await?;
            return Ok(true);
        }
        _ => {}
    }
    if req.method != "POST" {
        write_json(sock, 404, &json!({"error": {"message": format!("no route {} {path}", req.method), "type": "invalid_request_error", "param": null, "code": null}}), &inst).await?;
        return Ok(true);
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    if let Ok(mut last) = state.last.lock() {
        *last = json!({
            "method": req.method,
            "path": path,
            "tls_sni": sni,
            "json": if req.body.len() <= 16 * 1024 { body.clone() } else { Value::Null },
            "headers": req.headers,
            "body_len": req.body.len(),
            "body_sha256": hex::encode(Sha256::digest(&req.body)),
            "model": body.get("model"),
            "stream_options": body.get("stream_options"),
            "last_user_len": last_user_text(&body).len(),
            "last_user_sha256": hex::encode(Sha256::digest(last_user_text(&body).as_bytes())),
        });
    }
    let b = behaviour(args, &req, &body);
    if b.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(b.latency_ms)).await;
    }
    match b.fault.as_deref() {
        Some("reset") => {
            sock.reset();
            return Ok(false);
        }
        Some("close") => return Ok(false),
        Some("hang") => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(false);
        }
        Some("malformed-json") => {
            write_raw(sock, 200, "application/json", b"{\"id\": \"broken", &inst).await?;
            return Ok(true);
        }
        _ => {}
    }
    if path.ends_with("/messages/count_tokens") {
        let n = count_tokens(&prompt_text(&path, &body));
        write_json(sock, 200, &json!({"input_tokens": n}), &inst).await?;
        return Ok(true);
    }
    let anthropic = path.ends_with("/messages");
    if body.is_null() {
        let msg = "mock-llm: request body is not JSON";
        write_json(sock, 400, &json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}), &inst).await?;
        return Ok(true);
    }
    if anthropic {
        if let Some(msg) = messages_request_error(&body) {
            let err = json!({"type": "error", "error": {"type": "invalid_request_error", "message": msg}});
            write_json(sock, 400, &err, &inst).await?;
            return Ok(true);
        }
    }
    if let Some(status) = b.status {
        let mut extra = inst.to_vec();
        if status == 429 {
            extra.push(("retry-after", "1".into()));
        }
        // Like a careless provider, a 401 quotes the key it was sent.
        let message = if status == 401 {
            let sent = req
                .headers
                .get("authorization")
                .or_else(|| req.headers.get("x-api-key"))
                .cloned()
                .unwrap_or_default();
            format!("mock-llm injected status 401: incorrect API key provided: {sent}")
        } else {
            format!("mock-llm injected status {status}")
        };
        let err = if anthropic {
            json!({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
        } else {
            // OpenAI's own: a rate limit names what ran out (`requests`),
            // a refused key says so in its code.
            let (kind, code) = match status {
                429 => ("requests", json!("rate_limit_exceeded")),
                401 => ("invalid_request_error", json!("invalid_api_key")),
                _ => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        };
        write_json(sock, status, &err, &extra).await?;
        return Ok(true);
    }
    if path.ends_with("/responses") {
        responses_api(sock, &body, &b, state, &inst, args.tool_text).await?;
        return Ok(true);
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    // Like OpenAI's reasoning models, which refuse the deprecated name.
    let reasoning = ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|p| model.starts_with(p));
    if reasoning && path.ends_with("/chat/completions") && body.get("max_tokens").is_some() {
        let err = json!({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}});
        write_json(sock, 400, &err, &inst).await?;
        return Ok(true);
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let n_words = max_tokens.map(|m| m.min(b.words)).unwrap_or(b.words);
    let prompt = prompt_text(&path, &body);
    let prompt_tokens = count_tokens(&prompt);

    if path.ends_with("/embeddings") {
        let inputs: Vec<String> = match body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect(),
            _ => vec![],
        };
        let dims = body.get("dimensions").and_then(Value::as_u64).unwrap_or(8) as usize;
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let d = Sha256::digest(t.as_bytes());
                let v: Vec<f64> = (0..dims)
                    .map(|j| (d[j % 32] as f64 / 255.0) * 2.0 - 1.0)
                    .collect();
                json!({"object": "embedding", "index": i, "embedding": v})
            })
            .collect();
        let tokens: u64 = inputs.iter().map(|t| count_tokens(t)).sum();
        write_json(sock, 200, &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}), &inst).await?;
        return Ok(true);
    }

    let seed_text = if path.ends_with("/chat/completions") || anthropic {
        last_user_text(&body)
    } else {
        prompt.clone()
    };
    let skilled = state.skills.as_ref().and_then(|s| {
        let model = body.get("model").and_then(Value::as_str)?;
        s.answer(model, &seed_text)
    });
    let words = match (&b.reply, skilled) {
        (Some(reply), _) => reply.split(' ').map(str::to_string).collect(),
        (None, Some(answer)) => answer.split(' ').map(str::to_string).collect(),
        (None, None) => answer_words(&seed_text, n_words),
    };
    let completion_tokens = words.len() as u64;
    let id = format!(
        "mock-{}",
        &hex::encode(Sha256::digest(prompt.as_bytes()))[..12]
    );
    let finish = if b.truncate || max_tokens.is_some_and(|m| m < b.words) {
        "length"
    } else if last_user_text(&body).contains("[mock-filter]") {
        // A provider's content filter stopped the answer.
        "content_filter"
    } else {
        "stop"
    };
    let usage = b.kinds.openai_usage(prompt_tokens, completion_tokens);
    let chat = path.ends_with("/chat/completions");

    if anthropic {
        let text = words.join(" ");
        let tool = wanted_tool(&body, true);
        let thinking = body
            .get("thinking")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            == Some("enabled");
        let stop = if tool.is_some() {
            "tool_use"
        } else if finish == "length" {
            "max_tokens"
        } else if finish == "content_filter" {
            "refusal"
        } else {
            "end_turn"
        };
        let mut usage = anthropic_usage(&body, prompt_tokens, state, b.kinds);
        if b.kinds.web_searches > 0 {
            usage["server_tool_use"] = json!({"web_search_requests": b.kinds.web_searches});
        }
        let mut blocks = Vec::new();
        if thinking {
            blocks.push(json!({"type": "thinking", "thinking": format!("The user asks: {}", seed_text.chars().take(40).collect::<String>()), "signature": "mock-signature"}));
        }
        // A turn that calls a tool is the call alone (its `tool_use` block
        // first but for thinking), unless --tool-text asks for text before it.
        if tool.is_none() || args.tool_text {
            blocks.push(json!({"type": "text", "text": text}));
        }
        if let Some((name, args)) = &tool {
            blocks.push(json!({"type": "tool_use", "id": format!("toolu_{}", &id[5..]), "name": name, "input": args}));
        }
        if !stream {
            let mut u = usage.clone();
            u["output_tokens"] = json!(completion_tokens);
            let out = json!({"id": id, "type": "message", "role": "assistant", "model": model,
                "content": blocks, "stop_reason": stop, "stop_sequence": null, "usage": u});
            write_json(sock, 200, &out, &inst).await?;
            return Ok(true);
        }
        start_stream(sock, &inst).await?;
        let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
        let mut start_usage = usage.clone();
        start_usage["output_tokens"] = json!(1);
        write_chunk(sock, ev("message_start", json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}})).as_bytes()).await?;
        write_chunk(sock, ev("ping", json!({"type": "ping"})).as_bytes()).await?;
        if b.fault.as_deref() == Some("error-at-start") {
            // Overloaded before a word was generated.
            write_chunk(sock, ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": stream_error_message(&req)}})).as_bytes()).await?;
            write_chunk(sock, b"").await?;
            return Ok(true);
        }
        let error_at = (b.fault.as_deref() == Some("error-mid-stream")).then_some(words.len() / 2);
        let end_at = (b.fault.as_deref() == Some("end-mid-stream")).then_some(words.len() / 2);
        let cut_at = (b.fault.as_deref() == Some("drop-mid-event")).then_some(words.len() / 2);
        for (index, block) in blocks.iter().enumerate() {
            let kind = block["type"].as_str().unwrap_or("text");
            let empty = match kind {
                "thinking" => json!({"type": "thinking", "thinking": "", "signature": ""}),
                "tool_use" => {
                    json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}})
                }
                _ => json!({"type": "text", "text": ""}),
            };
            write_chunk(
                sock,
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": empty}),
                )
                .as_bytes(),
            )
            .await?;
            let delta = |d: Value| {
                ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": d}),
                )
            };
            match kind {
                "thinking" => {
                    write_chunk(
                        sock,
                        delta(json!({"type": "thinking_delta", "thinking": block["thinking"]}))
                            .as_bytes(),
                    )
                    .await?;
                    write_chunk(
                        sock,
                        delta(json!({"type": "signature_delta", "signature": block["signature"]}))
                            .as_bytes(),
                    )
                    .await?;
                }
                "tool_use" => {
                    let args = block["input"].to_string();
                    let (head, tail) = halves(&args);
                    for part in [head, tail] {
                        write_chunk(
                            sock,
                            delta(json!({"type": "input_json_delta", "partial_json": part}))
                                .as_bytes(),
                        )
                        .await?;
                    }
                }
                _ => {
                    for (i, w) in words.iter().enumerate() {
                        if error_at == Some(i) {
                            // What Anthropic sends when it fails mid-answer (e.g. overloaded).
                            write_chunk(sock, ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": stream_error_message(&req)}})).as_bytes()).await?;
                            write_chunk(sock, b"").await?;
                            return Ok(true);
                        }
                        if end_at == Some(i) {
                            // The response ends cleanly, before the answer's end.
                            write_chunk(sock, b"").await?;
                            return Ok(true);
                        }
                        if cut_at == Some(i) {
                            // The connection breaks inside an event: half of
                            // it is read before the reset.
                            let e = delta(json!({"type": "text_delta", "text": " cut"}));
                            write_chunk(sock, &e.as_bytes()[..e.len() / 2]).await?;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            sock.reset();
                            return Ok(false);
                        }
                        if b.chunk_delay_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(b.chunk_delay_ms)).await;
                        }
                        let t = if i == 0 { w.clone() } else { format!(" {w}") };
                        write_chunk(
                            sock,
                            delta(json!({"type": "text_delta", "text": t})).as_bytes(),
                        )
                        .await?;
                    }
                }
            }
            write_chunk(
                sock,
                ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                )
                .as_bytes(),
            )
            .await?;
        }
        // The current API's message_delta usage is cumulative: the input
        // figures message_start gave, and the output tokens.
        let mut delta_usage = if args.anthropic_delta_output_only {
            json!({"output_tokens": completion_tokens})
        } else {
            json!({"input_tokens": usage["input_tokens"],
                "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                "cache_read_input_tokens": usage["cache_read_input_tokens"],
                "output_tokens": completion_tokens})
        };
        if b.kinds.web_searches > 0 {
            delta_usage["server_tool_use"] = json!({"web_search_requests": b.kinds.web_searches});
        }
        write_chunk(sock, ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": delta_usage})).as_bytes()).await?;
        write_chunk(
            sock,
            ev("message_stop", json!({"type": "message_stop"})).as_bytes(),
        )
        .await?;
        write_chunk(sock, b"").await?;
        return Ok(true);
    }

    let tool = if chat {
        wanted_tool(&body, false)
    } else {
        None
    };
    let finish = if tool.is_some() { "tool_calls" } else { finish };
    let tool_call = tool.as_ref().map(|(name, args)| {
        json!({"id": format!("call_{}", &id[5..]), "type": "function", "function": {"name": name, "arguments": args.to_string()}})
    });
    // A turn that calls a tool is the call alone, as OpenAI sends it
    // (`content: null`, no content deltas), unless --tool-text.
    let tool_only = tool_call.is_some() && !args.tool_text;

    // The tier asked for, as OpenAI reports the one it served on.
    let tier = body
        .get("service_tier")
        .and_then(Value::as_str)
        .filter(|t| matches!(*t, "flex" | "priority"))
        .unwrap_or("default");
    if !stream {
        let text = words.join(" ");
        let content = if tool_only { Value::Null } else { json!(text) };
        let out = if chat {
            json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": now(), "model": model,
                "system_fingerprint": args.name, "service_tier": tier,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish, "logprobs": null}],
                "usage": usage})
        } else {
            json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": now(), "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}], "usage": usage})
        };
        let mut out = out;
        if let Some(call) = &tool_call {
            out["choices"][0]["message"]["tool_calls"] = json!([call]);
        }
        if b.no_usage {
            if let Some(o) = out.as_object_mut() {
                o.remove("usage");
            }
        }
        write_json(sock, 200, &out, &inst).await?;
        return Ok(true);
    }

    let include_usage = !b.no_usage
        && body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    start_stream(sock, &inst).await?;
    if b.fault.as_deref() == Some("error-at-start") {
        // The provider's error as its first event (an overloaded server).
        let v = json!({"error": {"message": stream_error_message(&req), "type": "server_error", "param": null, "code": null}});
        write_chunk(sock, format!("data: {v}\n\n").as_bytes()).await?;
        write_chunk(sock, b"data: [DONE]\n\n").await?;
        write_chunk(sock, b"").await?;
        return Ok(true);
    }
    let created = now();
    let chunk = |delta: Value, finish: Value| -> Vec<u8> {
        let v = if chat {
            json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": args.name, "service_tier": tier, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
        } else {
            json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null}]})
        };
        format!("data: {v}\n\n").into_bytes()
    };
    if chat {
        let content = if tool_only { Value::Null } else { json!("") };
        write_chunk(
            sock,
            &chunk(
                json!({"role": "assistant", "content": content}),
                Value::Null,
            ),
        )
        .await?;
    }
    // A turn that only calls a tool streams no content deltas: its
    // mid-stream faults fall between the call's two argument chunks.
    let streamed: &[String] = if tool_only { &words[..0] } else { &words[..] };
    let malformed = b.fault.as_deref() == Some("malformed-sse");
    let drop_at = (b.fault.as_deref() == Some("drop-mid-stream")).then_some(streamed.len() / 2);
    let error_at = (b.fault.as_deref() == Some("error-mid-stream")).then_some(streamed.len() / 2);
    let end_at = (b.fault.as_deref() == Some("end-mid-stream")).then_some(streamed.len() / 2);
    for (i, w) in streamed.iter().enumerate() {
        if drop_at == Some(i) {
            sock.reset();
            return Ok(false);
        }
        if end_at == Some(i) {
            // The response ends cleanly (its last chunk), with neither a
            // finish reason nor [DONE]: a stream cut short by a proxy.
            write_chunk(sock, b"").await?;
            return Ok(true);
        }
        if error_at == Some(i) {
            // What OpenAI-compatible servers send when they fail mid-answer.
            let v = json!({"error": {"message": stream_error_message(&req), "type": "server_error", "param": null, "code": null}});
            write_chunk(sock, format!("data: {v}\n\n").as_bytes()).await?;
            write_chunk(sock, b"data: [DONE]\n\n").await?;
            write_chunk(sock, b"").await?;
            return Ok(true);
        }
        if b.chunk_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(b.chunk_delay_ms)).await;
        }
        if malformed && i == 1 {
            write_chunk(sock, b"data: {\"choices\": [garbage\n\n").await?;
        }
        let t = if i == 0 { w.clone() } else { format!(" {w}") };
        if let Err(e) = write_chunk(sock, &chunk(json!({"content": t}), Value::Null)).await {
            state.streams_aborted.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
    }
    if let Some(call) = &tool_call {
        let args = call["function"]["arguments"].as_str().unwrap_or("{}");
        let (head, tail) = halves(args);
        write_chunk(sock, &chunk(json!({"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": head}}]}), Value::Null)).await?;
        if tool_only {
            if let Some(keep) = openai_mid_stream_fault(sock, b.fault.as_deref(), &req).await? {
                return Ok(keep);
            }
        }
        write_chunk(
            sock,
            &chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": tail}}]}),
                Value::Null,
            ),
        )
        .await?;
    }
    write_chunk(sock, &chunk(json!({}), json!(finish))).await?;
    if include_usage {
        let v = json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created, "model": model, "service_tier": tier, "choices": [], "usage": usage});
        write_chunk(sock, format!("data: {v}\n\n").as_bytes()).await?;
    }
    write_chunk(sock, b"data: [DONE]\n\n").await?;
    if b.fault.as_deref() == Some("reset-after-done") {
        // The whole answer, then the connection reset before the response's
        // last chunk: what a proxy that drops idle streams does.
        sock.reset();
        return Ok(false);
    }
    write_chunk(sock, b"").await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_answers() {
        let a = answer_words("What is the capital of France?", 12);
        assert_eq!(a, answer_words("What is the capital of France?", 12));
        assert_eq!(a.len(), 12);
        assert_ne!(a, answer_words("What is the capital of Spain?", 12));
        assert_eq!(answer_words("x", 3).len(), 3);
    }

    #[test]
    fn faults_named_in_prompts() {
        assert_eq!(
            prompt_mark(
                "tell me [mock-fault:error-mid-stream] please",
                "[mock-fault:"
            )
            .as_deref(),
            Some("error-mid-stream")
        );
        assert_eq!(prompt_mark("no fault here", "[mock-fault:"), None);
        assert_eq!(prompt_mark("[mock-fault:]", "[mock-fault:"), None);
        assert_eq!(prompt_mark("[mock-fault:reset", "[mock-fault:"), None);
        assert_eq!(
            prompt_mark("x [mock-status:429]", "[mock-status:").as_deref(),
            Some("429")
        );
    }

    #[test]
    fn messages_requests_are_checked_as_anthropic_does() {
        let ok =
            json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(messages_request_error(&ok), None);
        let no_limit = json!({"model": "c", "messages": [{"role": "user", "content": "x"}]});
        assert!(messages_request_error(&no_limit).is_some_and(|m| m.contains("max_tokens")));
        let system = json!({"model": "c", "max_tokens": 5,
            "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]});
        assert!(messages_request_error(&system).is_some_and(|m| m.contains("system")));
        // Claude Opus 4.8 takes them after a user turn, last or before an answer.
        let mid = |model: &str, roles: &[&str]| {
            let msgs: Vec<Value> = roles
                .iter()
                .map(|r| json!({"role": r, "content": "x"}))
                .collect();
            messages_request_error(&json!({"model": model, "max_tokens": 5, "messages": msgs}))
        };
        assert_eq!(mid("claude-opus-4-8", &["user", "system"]), None);
        assert_eq!(
            mid("claude-opus-4-8", &["user", "system", "assistant", "user"]),
            None
        );
        assert!(mid("claude-sonnet-4-20250514", &["user", "system"]).is_some());
        assert!(mid("claude-opus-4-8", &["system", "user"]).is_some());
        assert!(mid("claude-opus-4-8", &["user", "system", "user"]).is_some());
        assert!(mid("claude-opus-4-8", &["user", "assistant", "system"]).is_some());
        assert_eq!(anthropic_error_type(529), "overloaded_error");
        assert_eq!(anthropic_error_type(413), "request_too_large");
        assert_eq!(anthropic_error_type(503), "api_error");
    }

    #[test]
    fn responses_call_function_tools_only_until_answered() {
        let tools = json!([{"type": "web_search"}, {"type": "function", "name": "get_weather"}]);
        let ask = json!({"input": "Weather in Oslo?", "tools": tools});
        assert_eq!(
            responses_tool(&ask),
            Some((
                "get_weather".to_string(),
                json!({"query": "Weather in Oslo?"})
            ))
        );
        let answered = json!({"tools": tools, "input": [{"type": "function_call_output", "call_id": "c", "output": "Rain"}]});
        assert_eq!(responses_tool(&answered), None);
        let builtin = json!({"input": "News?", "tools": [{"type": "web_search"}]});
        assert_eq!(responses_tool(&builtin), None);
        let none = json!({"input": "x", "tools": tools, "tool_choice": "none"});
        assert_eq!(responses_tool(&none), None);
    }

    #[test]
    fn arguments_split_on_a_character_boundary() {
        assert_eq!(halves("abcd"), ("ab", "cd"));
        let (head, tail) = halves("{\"q\":\"æøå\"}");
        assert_eq!(format!("{head}{tail}"), "{\"q\":\"æøå\"}");
    }

    #[test]
    fn token_counts() {
        assert_eq!(count_tokens("abcd efgh"), 3);
        assert_eq!(count_tokens(""), 0);
    }
}
