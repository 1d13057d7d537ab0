//! OpenAI Responses API (`/v1/responses`) <-> Chat Completions, the gateway's
//! canonical shape, for providers that do not speak Responses themselves: a
//! create request becomes a chat request, a `chat.completion` becomes a
//! `response` object, and a stream of `chat.completion.chunk` events becomes
//! the Responses event stream (`response.created` ... `response.completed`).
//! Pure, no I/O: the caller keeps conversations ([`StoredResponse`]) so that
//! `previous_response_id` works against translated providers.
//!
//! Wire shapes follow openai-python `src/openai/types/responses/` (response.py,
//! response_create_params.py, response_input_item_param.py, response_stream_event.py).

use crate::error::ApiError;
use crate::sse::{SseEvent, SseParser, SseTooLarge, StreamError};
use crate::usage::Usage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Top-level create parameters that are Responses-only: handled here, echoed
/// into the `response` object, or left to the caller (`store`,
/// `previous_response_id`, `metadata`, `user`, `safety_identifier`); never put
/// into the chat body. Any other key is forwarded to the chat body untouched,
/// as the gateway does for chat requests.
const RESPONSES_ONLY: [&str; 31] = [
    "model",
    "input",
    "instructions",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_output_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "metadata",
    "user",
    "safety_identifier",
    "store",
    "previous_response_id",
    "include",
    "truncation",
    "background",
    "conversation",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    "context_management",
    "prompt_cache_retention",
    "prompt_cache_options",
    "moderation",
    "personality",
    "messages",
];

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid_type(param: &str, v: &Value, want: &str) -> ApiError {
    ApiError::invalid_param(
        param,
        format!(
            "Invalid type for '{param}': expected {want}, but got {}.",
            type_name(v)
        ),
    )
}

fn invalid_value(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request("invalid_value", message).with_param(param)
}

fn unsupported_value(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request("unsupported_value", message).with_param(param)
}

fn unsupported_parameter(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request("unsupported_parameter", message).with_param(param)
}

/// `o[key]` when it is a string; `None` when absent or null; an error otherwise.
fn opt_str<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid_type(param, v, "a string")),
    }
}

fn req_str<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    param: &str,
    what: &str,
) -> Result<&'a str, ApiError> {
    opt_str(o, key, param)?.ok_or_else(|| ApiError::missing_param(param, what))
}

fn opt_bool(o: &Map<String, Value>, key: &str, param: &str) -> Result<Option<bool>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid_type(param, v, "a boolean")),
    }
}

fn check_number(o: &Map<String, Value>, key: &str, min: f64, max: f64) -> Result<(), ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => {
            let n = v.as_f64().ok_or_else(|| invalid_type(key, v, "a number"))?;
            if !(min..=max).contains(&n) {
                return Err(invalid_value(
                    key,
                    format!("Invalid '{key}': must be between {min} and {max}, got {n}."),
                ));
            }
            Ok(())
        }
    }
}

fn check_type(
    o: &Map<String, Value>,
    key: &str,
    ok: fn(&Value) -> bool,
    want: &str,
) -> Result<(), ApiError> {
    match o.get(key) {
        Some(v) if !v.is_null() && !ok(v) => Err(invalid_type(key, v, want)),
        _ => Ok(()),
    }
}

/// A Responses request as the gateway carries it: its own response id, the
/// request as sent (echoed in the response object, and stored with the
/// answer), and what `previous_response_id` continues.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    /// `resp_...`, chosen by the gateway.
    pub id: String,
    pub created_at: u64,
    /// The Responses request body as the client sent it.
    pub original: Map<String, Value>,
    /// Keep the answer for `GET /v1/responses/{id}` and `previous_response_id`
    /// (`store`, default true as with OpenAI).
    pub store: bool,
    pub previous_response_id: Option<String>,
    /// The conversation `previous_response_id` names, when the gateway keeps
    /// it (it answered that response through a translated provider).
    pub previous: Option<StoredResponse>,
    /// `previous_response_id` names a response a provider that speaks
    /// Responses gave this tenant through the gateway (the provider keeps
    /// that conversation; the gateway only who it belongs to). Any other id
    /// the gateway does not keep is another tenant's, or none: a 404,
    /// never sent to a provider whose key all tenants share.
    pub native_owned: bool,
    /// The provider that answered the response `previous_response_id`
    /// names (when [`Self::native_owned`] and known): its account keeps the
    /// conversation, so the follow-up goes to a deployment of that provider
    /// where the model has one.
    pub native_provider: Option<String>,
    /// A Responses feature the translation to Chat Completions cannot carry
    /// (a built-in tool, `background`, an item reference, ...): a provider
    /// that speaks Responses takes the request as sent; any other gets this
    /// error. The canonical body is then only the request's text, for
    /// routing, limits and estimates.
    pub untranslatable: Option<ApiError>,
    /// The built-in tools (`web_search`, ...) of a request that only they
    /// keep from translation: a provider set with `drop_builtin_tools` is
    /// sent the canonical body, which is the translation without them.
    /// Empty otherwise.
    pub builtin_tools: Vec<String>,
}

/// The body of a Responses request as a JSON object (OpenAI-shaped errors).
pub fn read(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    crate::openai::read_object(bytes)
}

/// `previous_response_id`, when the request names one.
pub fn previous_response_id(body: &Map<String, Value>) -> Option<&str> {
    body.get("previous_response_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Parse a `/v1/responses` (or `/v1/responses/input_tokens`) request:
/// `body` is [`read`] of `raw`, `previous` the stored conversation its
/// `previous_response_id` names (if the gateway keeps it), `id` the new
/// response's id. The canonical body is the Chat Completions request it
/// amounts to (history included); `raw` is kept for providers that speak
/// Responses.
pub fn parse(
    endpoint: crate::openai::Endpoint,
    body: Map<String, Value>,
    raw: bytes::Bytes,
    previous: Option<StoredResponse>,
    id: String,
) -> Result<crate::openai::ParsedRequest, ApiError> {
    let create = endpoint == crate::openai::Endpoint::Responses;
    let translate = |b: &Map<String, Value>| {
        if create {
            request_to_chat_with_history(b, previous.as_ref())
        } else {
            input_tokens_request(b, previous.as_ref())
        }
    };
    let (chat, untranslatable, builtin_tools) = match translate(&body) {
        Ok(chat) => (chat, None, Vec::new()),
        Err(e) if matches!(e.code, "unsupported_parameter" | "unsupported_value") => {
            // When built-in tools are all that stands in the way, the
            // canonical body is the translation without them: what a
            // provider set to drop them (`drop_builtin_tools`) is sent.
            match without_builtin_tools(&body)
                .and_then(|(b, dropped)| Some((translate(&b).ok()?, dropped)))
            {
                Some((chat, dropped)) => (chat, Some(e), dropped),
                None => (text_only_chat(&body, create), Some(e), Vec::new()),
            }
        }
        Err(e) => return Err(e),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let stream = create && body.get("stream").and_then(Value::as_bool) == Some(true);
    if create && !stream && body.get("background").and_then(Value::as_bool) == Some(true) {
        // Its answer would come to a later `GET /v1/responses/{id}` from the
        // provider: never relayed, never billed. Streamed, both pass here.
        return Err(unsupported_parameter(
            "background",
            "A background response is fetched later with GET /v1/responses/{id}, which this gateway does not relay to providers (nor could it bill the answer). Omit 'background', or send it with \"stream\": true to a model whose provider speaks the Responses API (its events and bill then come through the gateway).",
        ));
    }
    let store = body.get("store").and_then(Value::as_bool) != Some(false);
    let previous_response_id = previous_response_id(&body).map(str::to_string);
    Ok(crate::openai::ParsedRequest {
        endpoint,
        body: chat,
        model,
        stream,
        // The Responses stream ends with its usage (`response.completed`).
        client_wants_usage: true,
        native: Some(raw),
        anthropic_only: Default::default(),
        responses: Some(Box::new(ResponsesRequest {
            id,
            created_at: crate::time::now_secs(),
            original: body,
            store,
            previous_response_id,
            previous,
            native_owned: false,
            native_provider: None,
            untranslatable,
            builtin_tools,
        })),
    })
}

/// The tool types a provider that speaks Responses runs itself (with or
/// without a version: `web_search_preview_2025_03_11`). Tools the client
/// runs (`function`, `custom`, `local_shell`, `computer_use_preview`) are
/// never among them: dropping one would leave its caller waiting for calls.
const BUILTIN_TOOLS: [&str; 5] = [
    "web_search",
    "file_search",
    "code_interpreter",
    "image_generation",
    "mcp",
];

/// The type of `tool` when it is a built-in one (a known name, or one with
/// a version after it: letters, digits and `_`, as OpenAI names them; the
/// type goes into a response header and the access log).
fn builtin_tool(tool: &Value) -> Option<&str> {
    let ty = tool.get("type")?.as_str()?;
    let versioned = |rest: &str| {
        rest.is_empty()
            || (rest.starts_with('_')
                && rest.len() <= 32
                && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    };
    BUILTIN_TOOLS
        .iter()
        .any(|b| ty.strip_prefix(b).is_some_and(versioned))
        .then_some(ty)
}

/// `body` without its built-in tools, and their types (None: it has none,
/// or its `tool_choice` is `required`: with them gone, the call it demands
/// could only be of the tools left, which is not what was asked).
fn without_builtin_tools(body: &Map<String, Value>) -> Option<(Map<String, Value>, Vec<String>)> {
    if body.get("tool_choice").and_then(Value::as_str) == Some("required") {
        return None;
    }
    let tools = body.get("tools")?.as_array()?;
    let dropped: Vec<String> = tools
        .iter()
        .filter_map(builtin_tool)
        .map(str::to_string)
        .collect();
    if dropped.is_empty() {
        return None;
    }
    let kept = tools
        .iter()
        .filter(|t| builtin_tool(t).is_none())
        .cloned()
        .collect();
    let mut b = body.clone();
    b.insert("tools".into(), Value::Array(kept));
    Some((b, dropped))
}

/// The text of a Responses request as a Chat Completions body (instructions
/// as the system message, every text of `input` as one user turn): what
/// routing, limits and estimates read when the request cannot be translated.
fn text_only_chat(body: &Map<String, Value>, create: bool) -> Map<String, Value> {
    fn texts(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| texts(i, out)),
            Value::Object(o) => {
                if let Some(t) = o.get("text").and_then(Value::as_str) {
                    out.push(t.to_string());
                }
                if let Some(c) = o.get("content") {
                    texts(c, out);
                }
            }
            _ => {}
        }
    }
    let mut chat = Map::new();
    if let Some(m) = body.get("model") {
        chat.insert("model".into(), m.clone());
    }
    let mut messages = Vec::new();
    if let Some(i) = body.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    let mut input = Vec::new();
    if let Some(v) = body.get("input") {
        texts(v, &mut input);
    }
    messages.push(json!({"role": "user", "content": input.join("\n")}));
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = body.get("max_output_tokens").filter(|v| v.is_u64()) {
        chat.insert("max_tokens".into(), n.clone());
    }
    if create && body.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), json!(true));
    }
    chat
}

/// Usage of a Responses `response` object (`usage.input_tokens`, ...).
pub fn usage_of(response: &Value) -> Option<Usage> {
    let u = response.get("usage").filter(|u| u.is_object())?;
    let get = |a: &str, b: Option<&str>| {
        let v = match b {
            Some(b) => u.get(a).and_then(|d| d.get(b)),
            None => u.get(a),
        };
        v.and_then(Value::as_u64).unwrap_or(0)
    };
    Some(Usage {
        prompt_tokens: get("input_tokens", None),
        completion_tokens: get("output_tokens", None),
        cached_tokens: get("input_tokens_details", Some("cached_tokens")),
        cache_write_tokens: get("input_tokens_details", Some("cache_write_tokens")),
        cache_write_1h_tokens: 0,
        reasoning_tokens: get("output_tokens_details", Some("reasoning_tokens")),
        tier: crate::usage::ServiceTier::of(response, "service_tier"),
        web_searches: response
            .get("output")
            .and_then(Value::as_array)
            .map_or(0, |o| {
                o.iter().filter(|i| i["type"] == "web_search_call").count() as u64
            }),
        ..Usage::default()
    })
}

/// Reads a Responses event stream passed through from a provider that
/// speaks Responses: its usage (from `response.completed` /
/// `response.incomplete`), its end, and its failure (`error`,
/// `response.failed`). The bytes themselves go to the client untouched.
#[derive(Debug, Default)]
pub struct ResponsesStreamReader {
    parser: SseParser,
    /// A `data:` event that is no JSON came: the stream is broken.
    pub malformed: bool,
    /// The response's id (from `response.created`, or its terminal event).
    pub id: Option<String>,
    pub usage: Option<Usage>,
    /// The terminal event came (`response.completed`, `.incomplete`, `.failed`).
    pub done: bool,
    pub error: Option<StreamError>,
    /// The response ended incomplete at the token limit (`max_output_tokens`).
    pub truncated: bool,
    /// Bytes of text, reasoning, refusal and call arguments generated so
    /// far (the `delta` of each `*.delta` event): what a stream cut before
    /// its usage is billed from.
    pub generated_bytes: u64,
}

impl ResponsesStreamReader {
    /// Output tokens generated so far, about 4 bytes a token.
    pub fn generated_tokens_estimate(&self) -> u64 {
        self.generated_bytes.div_ceil(4)
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), SseTooLarge> {
        for ev in self.parser.feed(chunk)? {
            let kind = ev.event.clone().unwrap_or_default();
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                // (A `[DONE]` some servers add, or anything after the
                // terminal event, breaks nothing.)
                self.malformed |= !ev.data.trim().is_empty() && !ev.is_done() && !self.done;
                continue;
            };
            let kind = if kind.is_empty() {
                v["type"].as_str().unwrap_or_default().to_string()
            } else {
                kind
            };
            if self.id.is_none() {
                if let Some(id) = v["response"]["id"].as_str() {
                    self.id = Some(id.to_string());
                }
            }
            match kind.as_str() {
                "response.completed" | "response.incomplete" => {
                    self.usage = usage_of(&v["response"]);
                    self.done = true;
                    self.truncated =
                        v["response"]["incomplete_details"]["reason"] == "max_output_tokens";
                }
                "response.failed" => {
                    self.usage = usage_of(&v["response"]);
                    self.done = true;
                    if self.error.is_none() {
                        let e = &v["response"]["error"];
                        self.error = Some(StreamError {
                            kind: e["code"].as_str().map(str::to_string),
                            code: e["code"].as_str().map(str::to_string),
                            message: e["message"]
                                .as_str()
                                .unwrap_or("the response failed")
                                .to_string(),
                        });
                    }
                }
                "error" => {
                    self.error.get_or_insert(StreamError {
                        kind: v["code"].as_str().map(str::to_string),
                        code: v["code"].as_str().map(str::to_string),
                        message: v["message"].as_str().unwrap_or("error").to_string(),
                    });
                }
                k if k.ends_with(".delta") => {
                    if let Some(d) = v["delta"].as_str() {
                        self.generated_bytes += d.len() as u64;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Translate a Responses create request into a Chat Completions request body.
/// `instructions` becomes a leading system message, `input` the messages after
/// it. Errors are OpenAI-shaped and name the parameter.
pub fn request_to_chat(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    translate(body, None, true)
}

/// [`request_to_chat`] continuing a stored conversation (`previous_response_id`
/// resolved by the caller): the previous messages and answer come between this
/// request's `instructions` and its `input`. The previous request's
/// `instructions` are not carried over, as with OpenAI.
pub fn request_to_chat_with_history(
    body: &Map<String, Value>,
    previous: Option<&StoredResponse>,
) -> Result<Map<String, Value>, ApiError> {
    translate(body, previous.map(|p| p.messages.as_slice()), true)
}

/// For `POST /v1/responses/input_tokens`: the same validation and translation
/// as a create request, but `model` and `input` may be absent (as OpenAI
/// allows there) and nothing is streamed. Count the tokens of the returned
/// chat body's `messages` and `tools`; answer with [`input_tokens_object`].
pub fn input_tokens_request(
    body: &Map<String, Value>,
    previous: Option<&StoredResponse>,
) -> Result<Map<String, Value>, ApiError> {
    translate(body, previous.map(|p| p.messages.as_slice()), false)
}

/// The `POST /v1/responses/input_tokens` answer.
pub fn input_tokens_object(input_tokens: u64) -> Value {
    json!({"object": "response.input_tokens", "input_tokens": input_tokens})
}

/// The `DELETE /v1/responses/{id}` answer.
pub fn deleted_object(id: &str) -> Value {
    json!({"id": id, "object": "response", "deleted": true})
}

/// How `GET /v1/responses/{id}/input_items` pages: its query (`limit` 1 to
/// 100, default 20; `order` `desc` (the default, newest first) or `asc`;
/// `after` / `before` an item id of the list; `include` is taken and has
/// nothing to add here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemsQuery {
    pub limit: usize,
    pub ascending: bool,
    pub after: Option<String>,
    pub before: Option<String>,
}

impl ItemsQuery {
    /// Read the query string; a bad `limit` or `order` is OpenAI's 400
    /// naming it.
    pub fn parse(query: Option<&str>) -> Result<ItemsQuery, ApiError> {
        let mut q = ItemsQuery {
            limit: 20,
            ascending: false,
            after: None,
            before: None,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" => {
                    q.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            invalid_value(
                                "limit",
                                format!(
                                "Invalid 'limit': '{v}'. Expected an integer between 1 and 100."
                            ),
                            )
                        })?
                }
                "order" => {
                    q.ascending = match v {
                        "asc" => true,
                        "desc" => false,
                        _ => {
                            return Err(invalid_value(
                                "order",
                                format!(
                                "Invalid 'order': '{v}'. Supported values are: 'asc' and 'desc'."
                            ),
                            ))
                        }
                    }
                }
                "after" if !v.is_empty() => q.after = Some(v.to_string()),
                "before" if !v.is_empty() => q.before = Some(v.to_string()),
                _ => {}
            }
        }
        Ok(q)
    }
}

/// The input items of a kept response, oldest first, as the Responses API
/// lists them: the conversation it answered (the turns it continues, then
/// its own input; not its `instructions`, not its answer), each message an
/// item with `input_text` (or, the assistant's, `output_text`) parts, each
/// tool call a `function_call` and each result a `function_call_output`.
/// An item's id is made from its place in the conversation and its
/// content, so the same item has the same id in the listing of every
/// response of the conversation (a cursor from one works in another), and
/// no two items of a listing share one.
pub fn input_items(stored: &StoredResponse) -> Vec<Value> {
    use sha2::{Digest, Sha256};
    let answer = answer_messages(&stored.response).len();
    let turns = &stored.messages[..stored.messages.len().saturating_sub(answer)];
    let mut items = Vec::with_capacity(turns.len());
    for (place, m) in turns.iter().enumerate() {
        let mut h = Sha256::new();
        h.update((place as u64).to_be_bytes());
        h.update(serde_json::to_vec(m).unwrap_or_default());
        let tag = hex::encode(&h.finalize()[..12]);
        let mut sub = 0;
        let mut id = |kind: &str| {
            sub += 1;
            format!("{kind}_{tag}{:02x}", sub - 1)
        };
        let role = m["role"].as_str().unwrap_or("user");
        match role {
            "tool" => {
                let output = match &m["content"] {
                    Value::String(s) => s.clone(),
                    other => chat_text(other),
                };
                items.push(json!({
                    "id": id("fco"),
                    "type": "function_call_output",
                    "call_id": m["tool_call_id"],
                    "output": output,
                    "status": "completed",
                }));
            }
            _ => {
                let assistant = role == "assistant";
                let parts = item_parts(&m["content"], assistant);
                if !parts.is_empty() {
                    items.push(json!({
                        "id": id("msg"),
                        "type": "message",
                        "role": role,
                        "status": "completed",
                        "content": parts,
                    }));
                }
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    items.push(json!({
                        "id": id("fc"),
                        "type": "function_call",
                        "call_id": call["id"],
                        "name": call["function"]["name"],
                        "arguments": call["function"]["arguments"],
                        "status": "completed",
                    }));
                }
            }
        }
    }
    items
}

/// The text of chat content (a string, or the text of its parts).
fn chat_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// Chat content as Responses content parts (the reverse of the translation
/// of a request's input).
fn item_parts(content: &Value, assistant: bool) -> Vec<Value> {
    let text = |t: &Value| {
        if assistant {
            json!({"type": "output_text", "text": t, "annotations": []})
        } else {
            json!({"type": "input_text", "text": t})
        }
    };
    match content {
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(_) => vec![text(content)],
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p["type"].as_str() {
                Some("text") => text(&p["text"]),
                Some("image_url") => json!({
                    "type": "input_image",
                    "image_url": p["image_url"]["url"],
                    "detail": p["image_url"]["detail"].as_str().unwrap_or("auto"),
                }),
                Some("file") => {
                    let mut f = json!({"type": "input_file", "file_data": p["file"]["file_data"]});
                    if let Some(name) = p["file"]["filename"].as_str() {
                        f["filename"] = json!(name);
                    }
                    f
                }
                _ => p.clone(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The `GET /v1/responses/{id}/input_items` answer: a page of
/// [`input_items`] in `q`'s order, from after `q.after` (or up to
/// `q.before`), with `first_id`, `last_id` and `has_more`. A cursor that
/// names no item of the list is a 400 naming it.
pub fn input_item_list(stored: &StoredResponse, q: &ItemsQuery) -> Result<Value, ApiError> {
    let mut items = input_items(stored);
    if !q.ascending {
        items.reverse();
    }
    let position = |param: &str, cursor: &str| {
        items.iter().position(|i| i["id"] == cursor).ok_or_else(|| {
            invalid_value(
                param,
                format!(
                    "No input item with id '{cursor}' in response '{}'.",
                    stored.id()
                ),
            )
        })
    };
    let start = match &q.after {
        Some(a) => position("after", a)? + 1,
        None => 0,
    };
    let end = match &q.before {
        Some(b) => position("before", b)?,
        None => items.len(),
    }
    .max(start);
    // Before a cursor, the page is the items just before it.
    let (from, to) = if q.before.is_some() && q.after.is_none() {
        (end.saturating_sub(q.limit), end)
    } else {
        (start, (start + q.limit).min(end))
    };
    let has_more = if q.before.is_some() && q.after.is_none() {
        from > 0
    } else {
        to < end
    };
    let page: Vec<Value> = items.drain(from..to).collect();
    Ok(json!({
        "object": "list",
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": has_more,
        "data": page,
    }))
}

/// OpenAI's 400 for a `previous_response_id` it does not know (unknown,
/// expired or another tenant's): `previous_response_not_found`, the code
/// clients such as Codex read to send the whole conversation again.
pub fn previous_response_not_found(id: &str) -> ApiError {
    ApiError::new(
        400,
        "invalid_request_error",
        PREVIOUS_RESPONSE_NOT_FOUND,
        format!("Previous response with id '{id}' not found."),
    )
    .with_param("previous_response_id")
}

/// The error code of [`previous_response_not_found`].
pub const PREVIOUS_RESPONSE_NOT_FOUND: &str = "previous_response_not_found";

/// OpenAI's 404 for an unknown, expired or another tenant's response id.
/// `param` is `Some("previous_response_id")` when the id came from that field.
pub fn response_not_found(id: &str, param: Option<&str>) -> ApiError {
    let e = ApiError::new(
        404,
        "invalid_request_error",
        "response_not_found",
        format!("Response with id '{id}' not found."),
    );
    match param {
        Some(p) => e.with_param(p),
        None => e,
    }
}

fn translate(
    body: &Map<String, Value>,
    history: Option<&[Value]>,
    create: bool,
) -> Result<Map<String, Value>, ApiError> {
    let model = match body.get("model") {
        None | Some(Value::Null) if create => {
            return Err(ApiError::missing_param(
                "model",
                "the model or route alias to use",
            ))
        }
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(invalid_value("model", "'model' must not be empty."))
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(invalid_type("model", v, "a string")),
    };
    let stream = create && opt_bool(body, "stream", "stream")?.unwrap_or(false);
    if opt_bool(body, "background", "background")? == Some(true) {
        return Err(unsupported_parameter(
            "background",
            "Background responses are not supported by this gateway for this model: its provider takes Chat Completions, which has none. Omit 'background', or use a model served by a provider that speaks the Responses API (streamed).",
        ));
    }
    for key in ["conversation", "prompt"] {
        if body.get(key).is_some_and(|v| !v.is_null()) {
            return Err(unsupported_parameter(
                key,
                format!("'{key}' is not supported by this gateway for this model; send the conversation in 'input' or use 'previous_response_id'."),
            ));
        }
    }
    check_number(body, "temperature", 0.0, 2.0)?;
    check_number(body, "top_p", 0.0, 1.0)?;
    if let Some(v) = body.get("max_output_tokens").filter(|v| !v.is_null()) {
        if !(v.is_u64() || v.is_i64()) {
            return Err(invalid_type("max_output_tokens", v, "an integer"));
        }
        if v.as_u64().is_none_or(|n| n < 1) {
            return Err(invalid_value(
                "max_output_tokens",
                "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 1.",
            ));
        }
    }
    opt_bool(body, "store", "store")?;
    opt_bool(body, "parallel_tool_calls", "parallel_tool_calls")?;
    for key in [
        "instructions",
        "user",
        "safety_identifier",
        "previous_response_id",
        "truncation",
    ] {
        opt_str(body, key, key)?;
    }
    check_type(body, "metadata", Value::is_object, "an object")?;
    check_type(body, "include", Value::is_array, "an array")?;

    let mut messages = Vec::new();
    if let Some(text) = opt_str(body, "instructions", "instructions")? {
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let history = history.unwrap_or(&[]);
    messages.extend(history.iter().cloned());
    match body.get("input") {
        None | Some(Value::Null) if create && history.is_empty() => {
            return Err(ApiError::missing_param(
                "input",
                "the text or items the model responds to",
            ))
        }
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            if items.is_empty() && create && history.is_empty() {
                return Err(invalid_value(
                    "input",
                    "Invalid 'input': empty array. Expected an array with minimum length 1.",
                ));
            }
            push_input_items(items, &mut messages)?;
        }
        Some(v) => {
            return Err(invalid_type(
                "input",
                v,
                "a string or an array of input items",
            ))
        }
    }

    // A call the conversation goes on from without its output is OpenAI's
    // 400 (the chat providers refuse it too, in words a Responses client
    // does not know).
    if create {
        if let Some(call) = unanswered_call(&messages) {
            return Err(invalid_value(
                "input",
                format!("No tool output found for function call {call}."),
            ));
        }
    }
    let mut chat: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| !RESPONSES_ONLY.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(m) = model {
        chat.insert("model".into(), Value::String(m));
    }
    chat.insert("messages".into(), Value::Array(messages));

    let mut tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => chat_tools(a)?,
        Some(v) => return Err(invalid_type("tools", v, "an array")),
    };
    if let Some(choice) = body.get("tool_choice").filter(|v| !v.is_null()) {
        let chat_choice = chat_tool_choice(choice, &mut tools)?;
        // Chat providers (OpenAI, Anthropic) refuse a `tool_choice` without
        // tools. With none translated, `auto` and `none` mean what sending
        // no choice means and are dropped; a choice that demands a call
        // (`required`, a named function, `allowed_tools` matching none of
        // the tools) cannot be met, and is refused here as OpenAI would.
        if !tools.is_empty() {
            chat.insert("tool_choice".into(), chat_choice);
        } else if !matches!(choice.as_str(), Some("auto" | "none")) {
            return Err(invalid_value(
                "tool_choice",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            ));
        }
    }
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(tools));
        if let Some(p) = opt_bool(body, "parallel_tool_calls", "parallel_tool_calls")? {
            chat.insert("parallel_tool_calls".into(), Value::Bool(p));
        }
    }
    if let Some(v) = body.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_completion_tokens".into(), v.clone());
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            chat.insert(key.into(), v.clone());
        }
    }
    // The end user's id (`safety_identifier`, or the older `user`), as
    // chat's `user`, which every provider takes (and the cache key skips).
    if let Some(u) = ["safety_identifier", "user"]
        .iter()
        .find_map(|k| body.get(*k).filter(|v| v.is_string()))
    {
        chat.insert("user".into(), u.clone());
    }
    match body.get("text") {
        None | Some(Value::Null) => {}
        Some(Value::Object(text)) => {
            if let Some(f) = text.get("format").filter(|v| !v.is_null()) {
                if let Some(rf) = response_format(f)? {
                    chat.insert("response_format".into(), rf);
                }
            }
            if let Some(v) = opt_str(text, "verbosity", "text.verbosity")? {
                chat.insert("verbosity".into(), json!(v));
            }
        }
        Some(v) => return Err(invalid_type("text", v, "an object")),
    }
    match body.get("reasoning") {
        None | Some(Value::Null) => {}
        Some(Value::Object(r)) => {
            // (Its value is the provider's to judge, as in chat.)
            if let Some(effort) = opt_str(r, "effort", "reasoning.effort")? {
                chat.insert("reasoning_effort".into(), json!(effort));
            }
        }
        Some(v) => return Err(invalid_type("reasoning", v, "an object")),
    }
    if stream {
        // The usage chunk `response.completed` reports is asked for when
        // the body goes upstream, unless the provider takes no
        // `stream_options` (`ParsedRequest::upstream_body`).
        chat.insert("stream".into(), Value::Bool(true));
    }
    Ok(chat)
}

/// Input items -> chat messages, appended to `out`.
fn push_input_items(items: &[Value], out: &mut Vec<Value>) -> Result<(), ApiError> {
    // Images a function returned (a screenshot): a `tool` message holds
    // text only, so they follow the results in a user message, as the
    // Messages API's tool results with images do.
    let mut tool_images: Vec<Value> = Vec::new();
    let flush = |images: &mut Vec<Value>, out: &mut Vec<Value>| {
        if !images.is_empty() {
            images.push(
                json!({"type": "text", "text": "(The images above were returned by the tool calls.)"}),
            );
            out.push(json!({"role": "user", "content": std::mem::take(images)}));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let p = format!("input[{i}]");
        let Value::Object(o) = item else {
            return Err(invalid_type(&p, item, "an object"));
        };
        if o.get("type").and_then(Value::as_str) != Some("function_call_output") {
            flush(&mut tool_images, out);
        }
        let ty = match o.get("type") {
            // EasyInputMessage: `type` is optional.
            None | Some(Value::Null) if o.contains_key("role") => "message",
            None | Some(Value::Null) => {
                return Err(ApiError::missing_param(
                    &format!("{p}.type"),
                    "message, function_call or function_call_output",
                ))
            }
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(invalid_type(&format!("{p}.type"), v, "a string")),
        };
        match ty {
            "message" => {
                let msg = input_message(o, &p)?;
                // Assistant text after that turn's calls (a stream whose text
                // followed its tool-call deltas, replayed) joins the message
                // holding the calls: chat wants the tool results right after
                // it, and refuses an assistant message in between.
                match out.last_mut() {
                    Some(Value::Object(last))
                        if msg["role"] == "assistant"
                            && last.get("role").and_then(Value::as_str) == Some("assistant")
                            && last.get("tool_calls").is_some_and(|c| !c.is_null()) =>
                    {
                        let content = last.entry("content").or_insert(Value::Null);
                        *content = merge_content(std::mem::take(content), msg["content"].clone());
                    }
                    _ => out.push(msg),
                }
            }
            "function_call" => {
                let call_id = req_str(o, "call_id", &format!("{p}.call_id"), "the call's id")?;
                let name = req_str(o, "name", &format!("{p}.name"), "the function's name")?;
                let arguments = req_str(
                    o,
                    "arguments",
                    &format!("{p}.arguments"),
                    "the call's arguments as a JSON string",
                )?;
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls belong to the assistant turn right before them (a
                // `message` output item, or the calls before them).
                match out.last_mut() {
                    Some(Value::Object(last))
                        if last.get("role").and_then(Value::as_str) == Some("assistant") =>
                    {
                        match last.get_mut("tool_calls") {
                            Some(Value::Array(calls)) => calls.push(call),
                            _ => {
                                last.insert("tool_calls".into(), json!([call]));
                            }
                        }
                    }
                    _ => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let call_id = req_str(o, "call_id", &format!("{p}.call_id"), "the call's id")?;
                let param = format!("{p}.output");
                let content = match o.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            let pp = format!("{param}[{j}]");
                            let Value::Object(part) = part else {
                                return Err(invalid_type(&pp, part, "an object"));
                            };
                            match part.get("type").and_then(Value::as_str) {
                                Some("input_text") | Some("output_text") => text.push_str(req_str(
                                    part,
                                    "text",
                                    &format!("{pp}.text"),
                                    "the text",
                                )?),
                                Some("input_image") => {
                                    let mut parts = Vec::with_capacity(1);
                                    content_part(part, &pp, true, &mut parts)?;
                                    tool_images.append(&mut parts);
                                }
                                other => {
                                    return Err(unsupported_value(
                                        &format!("{pp}.type"),
                                        format!("Function call output parts of type {} are not supported by this gateway for this model; send 'output' as a string, 'input_text' or 'input_image' parts.", other.map_or_else(|| "null".to_string(), |t| format!("'{t}'"))),
                                    ))
                                }
                            }
                        }
                        text
                    }
                    None | Some(Value::Null) => {
                        return Err(ApiError::missing_param(&param, "the function's result"))
                    }
                    Some(v) => return Err(invalid_type(&param, v, "a string or an array")),
                };
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
            }
            // Reasoning carried over from an earlier answer has no chat form
            // (and this gateway's translated answers never contain any).
            "reasoning" => {}
            "item_reference" => {
                return Err(unsupported_value(
                    &format!("{p}.type"),
                    "Item references are not supported by this gateway for this model; send the items themselves or use 'previous_response_id'.",
                ))
            }
            other => {
                return Err(unsupported_value(
                    &format!("{p}.type"),
                    format!("Input items of type '{other}' are not supported by this gateway for this model. Supported: 'message', 'function_call', 'function_call_output'."),
                ))
            }
        }
    }
    // (The last items were a function's results: its images follow them.)
    flush(&mut tool_images, out);
    Ok(())
}

/// The id of the first tool call of `messages` (chat) that no `tool`
/// message answers before the conversation goes on (or ends).
fn unanswered_call(messages: &[Value]) -> Option<String> {
    let mut pending: Vec<&str> = Vec::new();
    for m in messages {
        match m["role"].as_str() {
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                pending.retain(|p| *p != id);
            }
            _ if !pending.is_empty() => return Some(pending[0].to_string()),
            Some("assistant") => {
                pending = m["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["id"].as_str())
                    .collect();
            }
            _ => {}
        }
    }
    pending.first().map(|p| p.to_string())
}

/// Two chat contents of one assistant turn as one: either alone when the
/// other is empty, else the text parts of both in order (no separator is
/// invented between them).
fn merge_content(a: Value, b: Value) -> Value {
    fn parts(v: Value) -> Vec<Value> {
        match v {
            Value::Null => Vec::new(),
            Value::String(s) if s.is_empty() => Vec::new(),
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(a) => a,
            v => vec![v],
        }
    }
    let mut all = parts(a);
    all.extend(parts(b));
    match all.len() {
        0 => Value::Null,
        1 if all[0]["type"] == "text" => all[0]["text"].clone(),
        _ => Value::Array(all),
    }
}

fn input_message(o: &Map<String, Value>, p: &str) -> Result<Value, ApiError> {
    let rp = format!("{p}.role");
    let role = match req_str(o, "role", &rp, "user, assistant, system or developer")? {
        "developer" | "system" => "system",
        r @ ("user" | "assistant") => r,
        r => {
            return Err(invalid_value(
                &rp,
                format!("Invalid value: '{r}'. Supported values are: 'user', 'assistant', 'system', and 'developer'."),
            ))
        }
    };
    let cp = format!("{p}.content");
    let content = match o.get("content") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => content_parts(parts, &cp, role == "user")?,
        None | Some(Value::Null) => {
            return Err(ApiError::missing_param(&cp, "a string or content parts"))
        }
        Some(v) => {
            return Err(invalid_type(
                &cp,
                v,
                "a string or an array of content parts",
            ))
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// Responses content parts -> chat content: one text part becomes a string,
/// anything else an array of chat parts.
fn content_parts(parts: &[Value], param: &str, user: bool) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let pp = format!("{param}[{j}]");
        let Value::Object(part) = part else {
            return Err(invalid_type(&pp, part, "an object"));
        };
        content_part(part, &pp, user, &mut out)?;
    }
    if out.len() == 1 && out[0]["type"] == "text" {
        return Ok(out[0]["text"].clone());
    }
    Ok(Value::Array(out))
}

/// One Responses content part -> its chat part(s), appended to `out`.
fn content_part(
    part: &Map<String, Value>,
    pp: &str,
    user: bool,
    out: &mut Vec<Value>,
) -> Result<(), ApiError> {
    let tp = format!("{pp}.type");
    match req_str(part, "type", &tp, "input_text, input_image or input_file")? {
        "input_text" | "output_text" => {
            let text = req_str(part, "text", &format!("{pp}.text"), "the text")?;
            out.push(json!({"type": "text", "text": text}));
        }
        "refusal" => {
            let text = req_str(part, "refusal", &format!("{pp}.refusal"), "the refusal")?;
            out.push(json!({"type": "text", "text": text}));
        }
        t @ ("input_image" | "input_file") if !user => {
            return Err(invalid_value(
                &tp,
                format!("'{t}' parts are only supported in user messages."),
            ))
        }
        "input_image" => {
            if part.get("file_id").is_some_and(|v| !v.is_null()) {
                return Err(unsupported_parameter(
                    &format!("{pp}.file_id"),
                    "Uploaded files ('file_id') are not available through this gateway for this model; send 'image_url' (an https URL or a data: URL).",
                ));
            }
            let url = req_str(
                part,
                "image_url",
                &format!("{pp}.image_url"),
                "an https URL or a data: URL",
            )?;
            let mut image = json!({"url": url});
            if let Some(d) = opt_str(part, "detail", &format!("{pp}.detail"))? {
                image["detail"] = json!(d);
            }
            out.push(json!({"type": "image_url", "image_url": image}));
        }
        "input_file" => {
            for key in ["file_id", "file_url"] {
                if part.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(unsupported_parameter(
                        &format!("{pp}.{key}"),
                        format!("'{key}' is not available through this gateway for this model; send the file inline as 'file_data' (a base64 data: URL) with a 'filename'."),
                    ));
                }
            }
            let data = req_str(
                part,
                "file_data",
                &format!("{pp}.file_data"),
                "the file as a base64 data: URL",
            )?;
            let mut file = json!({"file_data": data});
            if let Some(name) = opt_str(part, "filename", &format!("{pp}.filename"))? {
                file["filename"] = json!(name);
            }
            out.push(json!({"type": "file", "file": file}));
        }
        other => {
            return Err(unsupported_value(
                &tp,
                format!("Content parts of type '{other}' are not supported. Supported: 'input_text', 'input_image', 'input_file', 'output_text', 'refusal'."),
            ))
        }
    }
    Ok(())
}

/// Responses tools (flat `{type, name, description, parameters, strict}`) ->
/// chat tools. A `namespace` (a named group of function tools, as Codex
/// sends its sub-agent tools) is flattened into its functions, each under
/// its own name (answers' calls name their namespace again:
/// [`namespace_of`]); names must then be unique. Built-in tools cannot be
/// translated.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Value::Object(t) = t else {
            return Err(invalid_type(&p, t, "an object"));
        };
        let tp = format!("{p}.type");
        let ty = req_str(t, "type", &tp, "the tool type, 'function'")?;
        if ty == "namespace" {
            let ns = req_str(t, "name", &format!("{p}.name"), "the namespace's name")?;
            let about = opt_str(t, "description", &format!("{p}.description"))?;
            let inner = match t.get("tools") {
                Some(Value::Array(a)) => a,
                Some(v) => return Err(invalid_type(&format!("{p}.tools"), v, "an array")),
                None => {
                    return Err(ApiError::missing_param(
                        &format!("{p}.tools"),
                        "the namespace's tools",
                    ))
                }
            };
            for (j, f) in inner.iter().enumerate() {
                let fp = format!("{p}.tools[{j}]");
                let Value::Object(f) = f else {
                    return Err(invalid_type(&fp, f, "an object"));
                };
                let mut tool = function_tool(f, &fp)?;
                // The model sees what the group is for.
                if let Some(about) = about.filter(|a| !a.is_empty()) {
                    let own = tool["function"]["description"].as_str().unwrap_or_default();
                    tool["function"]["description"] = json!(if own.is_empty() {
                        format!("({ns}) {about}")
                    } else {
                        format!("({ns}) {about}\n\n{own}")
                    });
                }
                out.push(tool);
            }
            continue;
        }
        if ty != "function" {
            return Err(unsupported_value(
                &tp,
                format!("Tool type '{ty}' is not supported by this gateway for this model: only 'function' tools (and namespaces of them) can be translated to it. Remove the tool or use a model served by a provider that speaks the Responses API."),
            ));
        }
        out.push(function_tool(t, &p)?);
    }
    let mut names: Vec<&str> = out
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        // (A provider that speaks Responses takes them: calls name their
        // namespace there.)
        return Err(unsupported_value(
            "tools",
            format!("Two tools are named '{}' once namespaces are flattened for this model: function names must be unique. A model served by a provider that speaks the Responses API takes them as sent.", w[0]),
        ));
    }
    Ok(out)
}

/// One Responses function tool (at `p`) -> a chat tool.
fn function_tool(t: &Map<String, Value>, p: &str) -> Result<Value, ApiError> {
    let tp = format!("{p}.type");
    let ty = req_str(t, "type", &tp, "the tool type, 'function'")?;
    if ty != "function" {
        return Err(unsupported_value(
            &tp,
            format!("Tool type '{ty}' is not supported by this gateway for this model: only 'function' tools can be translated to it. Remove the tool or use a model served by a provider that speaks the Responses API."),
        ));
    }
    let name = req_str(t, "name", &format!("{p}.name"), "the function's name")?;
    if name.is_empty() {
        return Err(invalid_value(
            &format!("{p}.name"),
            "Invalid 'name': empty string.",
        ));
    }
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    if let Some(d) = opt_str(t, "description", &format!("{p}.description"))? {
        f.insert("description".into(), json!(d));
    }
    match t.get("parameters") {
        None | Some(Value::Null) => {}
        Some(v @ Value::Object(_)) => {
            f.insert("parameters".into(), v.clone());
        }
        Some(v) => return Err(invalid_type(&format!("{p}.parameters"), v, "an object")),
    }
    match t.get("strict") {
        None | Some(Value::Null) => {}
        Some(v @ Value::Bool(_)) => {
            f.insert("strict".into(), v.clone());
        }
        Some(v) => return Err(invalid_type(&format!("{p}.strict"), v, "a boolean")),
    }
    Ok(json!({"type": "function", "function": f}))
}

/// The namespace of the request's function `name`, when a `namespace` tool
/// holds it (the call then names it, as the Responses API does).
fn namespace_of<'a>(req: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    req.get("tools")?.as_array()?.iter().find_map(|t| {
        if t.get("type").and_then(Value::as_str) != Some("namespace") {
            return None;
        }
        let holds = t
            .get("tools")?
            .as_array()?
            .iter()
            .any(|f| f.get("name").and_then(Value::as_str) == Some(name));
        holds
            .then(|| t.get("name").and_then(Value::as_str))
            .flatten()
    })
}

/// Responses `tool_choice` -> chat `tool_choice`. `allowed_tools` narrows
/// `tools` to the allowed functions and becomes its mode.
fn chat_tool_choice(choice: &Value, tools: &mut Vec<Value>) -> Result<Value, ApiError> {
    const P: &str = "tool_choice";
    let o = match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            return Ok(choice.clone())
        }
        Value::String(s) => {
            return Err(invalid_value(
                P,
                format!(
                    "Invalid value: '{s}'. Supported values are: 'none', 'auto', and 'required'."
                ),
            ))
        }
        Value::Object(o) => o,
        v => return Err(invalid_type(P, v, "a string or an object")),
    };
    match req_str(o, "type", "tool_choice.type", "function or allowed_tools")? {
        "function" => {
            let name = req_str(o, "name", "tool_choice.name", "the function to call")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        "allowed_tools" => {
            let mode = match opt_str(o, "mode", "tool_choice.mode")? {
                Some(m @ ("auto" | "required")) => m,
                Some(m) => {
                    return Err(invalid_value(
                        "tool_choice.mode",
                        format!("Invalid value: '{m}'. Supported values are: 'auto' and 'required'."),
                    ))
                }
                None => return Err(ApiError::missing_param("tool_choice.mode", "auto or required")),
            };
            let allowed = match o.get("tools") {
                Some(Value::Array(a)) => a,
                None | Some(Value::Null) => {
                    return Err(ApiError::missing_param("tool_choice.tools", "the allowed tools"))
                }
                Some(v) => return Err(invalid_type("tool_choice.tools", v, "an array")),
            };
            let mut names = Vec::with_capacity(allowed.len());
            for (i, t) in allowed.iter().enumerate() {
                let tp = format!("tool_choice.tools[{i}]");
                let Value::Object(t) = t else {
                    return Err(invalid_type(&tp, t, "an object"));
                };
                match opt_str(t, "type", &format!("{tp}.type"))? {
                    Some("function") => names.push(req_str(
                        t,
                        "name",
                        &format!("{tp}.name"),
                        "the function's name",
                    )?),
                    other => {
                        return Err(unsupported_value(
                            &format!("{tp}.type"),
                            format!("Tool type {} is not supported by this gateway for this model; only 'function' tools can be allowed.", other.map_or_else(|| "null".to_string(), |t| format!("'{t}'"))),
                        ))
                    }
                }
            }
            tools.retain(|t| {
                t["function"]["name"]
                    .as_str()
                    .is_some_and(|n| names.contains(&n))
            });
            Ok(json!(mode))
        }
        other => Err(unsupported_value(
            "tool_choice.type",
            format!("tool_choice of type '{other}' is not supported by this gateway for this model; only 'function' tools can be translated to it."),
        )),
    }
}

/// `text.format` -> chat `response_format` (`None` for plain text).
fn response_format(f: &Value) -> Result<Option<Value>, ApiError> {
    const P: &str = "text.format";
    let Value::Object(o) = f else {
        return Err(invalid_type(P, f, "an object"));
    };
    match req_str(o, "type", "text.format.type", "text, json_object or json_schema")? {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "json_object"}))),
        "json_schema" => {
            let name = req_str(o, "name", "text.format.name", "the schema's name")?;
            let schema = match o.get("schema") {
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => {
                    return Err(ApiError::missing_param("text.format.schema", "a JSON schema"))
                }
                Some(v) => return Err(invalid_type("text.format.schema", v, "an object")),
            };
            let mut js = json!({"name": name, "schema": schema});
            if let Some(d) = opt_str(o, "description", "text.format.description")? {
                js["description"] = json!(d);
            }
            if let Some(s) = opt_bool(o, "strict", "text.format.strict")? {
                js["strict"] = json!(s);
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        other => Err(invalid_value(
            "text.format.type",
            format!("Invalid value: '{other}'. Supported values are: 'text', 'json_object', and 'json_schema'."),
        )),
    }
}

// ---------------------------------------------------------------------------
// Answers: chat.completion -> response

fn id_suffix(id: &str) -> &str {
    id.strip_prefix("resp_").unwrap_or(id)
}

/// The id of the `k`-th message item of response `id` (`msg_<suffix>`, then `msg_<suffix>_<k>`).
fn message_id(id: &str, k: usize) -> String {
    match k {
        0 => format!("msg_{}", id_suffix(id)),
        k => format!("msg_{}_{k}", id_suffix(id)),
    }
}

/// The id of the function-call item for chat tool call `n`.
fn call_item_id(id: &str, n: usize) -> String {
    format!("fc_{}_{n}", id_suffix(id))
}

/// A call id for a chat tool call that came without one.
fn fallback_call_id(id: &str, n: usize) -> String {
    format!("call_{}_{n}", id_suffix(id))
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn refusal_part(text: &str) -> Value {
    json!({"type": "refusal", "refusal": text})
}

fn message_item(id: String, content: Vec<Value>, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

/// A function call's arguments for a Responses client: `{}` for none (a
/// provider that streams no argument deltas for a call without any), as
/// OpenAI's own answers have; the client `json.loads` them.
fn non_empty_arguments(arguments: &str) -> &str {
    if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    }
}

fn call_item(
    id: String,
    call_id: &str,
    name: &str,
    namespace: Option<&str>,
    arguments: &str,
    status: &str,
) -> Value {
    let mut item = json!({"id": id, "type": "function_call", "status": status, "arguments": arguments, "call_id": call_id, "name": name});
    if let Some(ns) = namespace {
        item["namespace"] = json!(ns);
    }
    item
}

/// How an answer ended, from the chat `finish_reason`.
fn incomplete_reason(finish: Option<&str>) -> Option<&'static str> {
    match finish {
        Some("length") => Some("max_output_tokens"),
        Some("content_filter") => Some("content_filter"),
        _ => None,
    }
}

/// Chat `usage` -> Responses `usage`.
pub(crate) fn responses_usage(u: &Value) -> Value {
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = n(u, "prompt_tokens");
    let output = n(u, "completion_tokens");
    let pd = &u["prompt_tokens_details"];
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": n(pd, "cached_tokens"),
            "cache_write_tokens": n(pd, "cache_write_tokens"),
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": n(&u["completion_tokens_details"], "reasoning_tokens")},
        "total_tokens": u.get("total_tokens").and_then(Value::as_u64).unwrap_or(input + output),
    })
}

fn echo(req: &Map<String, Value>, key: &str, default: Value) -> Value {
    match req.get(key) {
        None | Some(Value::Null) => default,
        Some(v) => v.clone(),
    }
}

/// The `response` object, its request parameters echoed as OpenAI does.
#[allow(clippy::too_many_arguments)]
fn response_object(
    id: &str,
    created_at: u64,
    model: &str,
    req: &Map<String, Value>,
    status: &str,
    output: Vec<Value>,
    usage: Value,
    incomplete: Option<&str>,
    error: Value,
) -> Value {
    let text = req.get("text").and_then(Value::as_object);
    let reasoning = req.get("reasoning").and_then(Value::as_object);
    let sub = |o: Option<&Map<String, Value>>, k: &str, default: Value| {
        o.and_then(|o| o.get(k))
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    let service_tier = match req.get("service_tier").and_then(Value::as_str) {
        None | Some("auto") => json!("default"),
        Some(t) => json!(t),
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": false,
        "completed_at": if status == "completed" { json!(crate::time::now_secs().max(created_at)) } else { Value::Null },
        "error": error,
        "incomplete_details": incomplete.map(|r| json!({"reason": r})),
        "instructions": echo(req, "instructions", Value::Null),
        "max_output_tokens": echo(req, "max_output_tokens", Value::Null),
        "max_tool_calls": echo(req, "max_tool_calls", Value::Null),
        "model": model,
        "output": output,
        "parallel_tool_calls": echo(req, "parallel_tool_calls", json!(true)),
        "previous_response_id": echo(req, "previous_response_id", Value::Null),
        "prompt_cache_key": echo(req, "prompt_cache_key", Value::Null),
        "reasoning": {"effort": sub(reasoning, "effort", Value::Null), "summary": sub(reasoning, "summary", Value::Null)},
        "safety_identifier": echo(req, "safety_identifier", Value::Null),
        "service_tier": service_tier,
        "store": echo(req, "store", json!(true)),
        "temperature": echo(req, "temperature", json!(1.0)),
        "text": {"format": sub(text, "format", json!({"type": "text"})), "verbosity": sub(text, "verbosity", json!("medium"))},
        "tool_choice": echo(req, "tool_choice", json!("auto")),
        "tools": echo(req, "tools", json!([])),
        "top_logprobs": echo(req, "top_logprobs", json!(0)),
        "top_p": echo(req, "top_p", json!(1.0)),
        "truncation": echo(req, "truncation", json!("disabled")),
        "usage": usage,
        "user": echo(req, "user", Value::Null),
        "metadata": echo(req, "metadata", json!({})),
    })
}

fn model_of(v: &Value, req: &Map<String, Value>) -> String {
    v.get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .or_else(|| req.get("model").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string()
}

/// Translate a `chat.completion` into a Responses `response` object. `id` is
/// the response id (`resp_...`); item ids derive from it. `req` is the
/// Responses request, echoed as OpenAI does.
pub fn response_from_chat(
    chat: &Value,
    id: &str,
    created_at: u64,
    req: &Map<String, Value>,
) -> Value {
    let choice = &chat["choices"][0];
    let msg = &choice["message"];
    let text = crate::openai::content_text(&msg["content"]);
    let refusal = msg["refusal"].as_str().filter(|r| !r.is_empty());
    let empty = Vec::new();
    let calls = msg["tool_calls"].as_array().unwrap_or(&empty);
    let reason = incomplete_reason(choice["finish_reason"].as_str());
    let mut output = Vec::new();
    if !text.is_empty() || refusal.is_some() || calls.is_empty() {
        let mut content = Vec::new();
        if !text.is_empty() || refusal.is_none() {
            content.push(text_part(&text));
        }
        if let Some(r) = refusal {
            content.push(refusal_part(r));
        }
        output.push(message_item(message_id(id, 0), content, "completed"));
    }
    for (n, c) in calls.iter().enumerate() {
        let f = &c["function"];
        let call_id = c["id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map_or_else(|| fallback_call_id(id, n), str::to_string);
        let name = f["name"].as_str().unwrap_or_default();
        output.push(call_item(
            call_item_id(id, n),
            &call_id,
            name,
            namespace_of(req, name),
            non_empty_arguments(f["arguments"].as_str().unwrap_or_default()),
            "completed",
        ));
    }
    if reason.is_some() {
        if let Some(last) = output.last_mut() {
            last["status"] = json!("incomplete");
        }
    }
    let usage = chat
        .get("usage")
        .filter(|u| u.is_object())
        .map_or(Value::Null, responses_usage);
    response_object(
        id,
        created_at,
        &model_of(chat, req),
        req,
        if reason.is_some() {
            "incomplete"
        } else {
            "completed"
        },
        output,
        usage,
        reason,
        Value::Null,
    )
}

// ---------------------------------------------------------------------------
// Streams: chat.completion.chunk SSE -> Responses events

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Text,
    Refusal,
}

#[derive(Debug)]
enum ItemKind {
    Message {
        parts: Vec<(PartKind, String)>,
    },
    Call {
        call_id: String,
        name: String,
        /// The `namespace` tool holding the function, if any.
        namespace: Option<String>,
        arguments: String,
    },
}

#[derive(Debug)]
struct Item {
    id: String,
    kind: ItemKind,
    status: &'static str,
}

impl Item {
    fn to_json(&self) -> Value {
        match &self.kind {
            ItemKind::Message { parts } => message_item(
                self.id.clone(),
                parts.iter().map(|(k, t)| part_json(*k, t)).collect(),
                self.status,
            ),
            ItemKind::Call {
                call_id,
                name,
                namespace,
                arguments,
            } => call_item(
                self.id.clone(),
                call_id,
                name,
                namespace.as_deref(),
                arguments,
                self.status,
            ),
        }
    }
}

fn part_json(kind: PartKind, text: &str) -> Value {
    match kind {
        PartKind::Text => text_part(text),
        PartKind::Refusal => refusal_part(text),
    }
}

/// Numbers and serialises events: `event: <type>` and a `data:` object whose
/// `type` is the same name and whose `sequence_number` counts from 0.
#[derive(Debug, Default)]
struct Emitter {
    seq: u64,
}

impl Emitter {
    fn emit(&mut self, out: &mut Vec<u8>, ty: &str, mut ev: Value) {
        ev["type"] = json!(ty);
        ev["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(ty.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(ev.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

/// Streaming translation: OpenAI `chat.completion.chunk` SSE in (as the
/// gateway produces it: a usage chunk before `[DONE]`, perhaps an error event),
/// Responses SSE out. Items come out in order; an item is closed (its `done`
/// events sent) when the next one starts or the stream ends. Only choice 0 is
/// translated. No `[DONE]` is sent: a Responses stream ends with its terminal
/// event (`response.completed`, `response.incomplete` or `response.failed`).
#[derive(Debug)]
pub struct ChatToResponsesStream {
    parser: SseParser,
    em: Emitter,
    id: String,
    created_at: u64,
    model: String,
    req: Map<String, Value>,
    started: bool,
    items: Vec<Item>,
    /// Index into `items` of the message still receiving text deltas.
    /// Function calls are not tracked here: a provider may interleave the
    /// argument deltas of parallel calls, so every call stays open (status
    /// `in_progress`) until the stream ends.
    open: Option<usize>,
    /// Chat tool-call index -> index into `items`.
    calls: Vec<(usize, usize)>,
    tool_index: crate::openai::ToolCallIndex,
    messages: usize,
    finish: Option<String>,
    chat_usage: Option<Value>,
    usage: Option<Usage>,
    error: Option<StreamError>,
    response: Option<Value>,
    /// The input tokens reported when the provider reports no usage.
    input_estimate: u64,
}

impl ChatToResponsesStream {
    /// `id` is the response id (`resp_...`), `model` the model reported to the
    /// client, `req` the Responses request (echoed in the response object).
    pub fn new(id: &str, created_at: u64, model: &str, req: &Map<String, Value>) -> Self {
        ChatToResponsesStream {
            parser: SseParser::default(),
            em: Emitter::default(),
            id: id.to_string(),
            created_at,
            model: model.to_string(),
            req: req.clone(),
            started: false,
            items: Vec::new(),
            open: None,
            calls: Vec::new(),
            tool_index: Default::default(),
            messages: 0,
            finish: None,
            chat_usage: None,
            usage: None,
            error: None,
            response: None,
            input_estimate: 0,
        }
    }

    /// The terminal event was sent: nothing more will come out.
    pub fn done(&self) -> bool {
        self.response.is_some()
    }

    /// The usage the upstream reported (its usage chunk), if any.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The input tokens `response.completed` reports when the provider
    /// reports no usage (one that ignores `stream_options.include_usage`),
    /// with the output estimated from what was streamed, about 4 bytes a
    /// token: clients read `usage.input_tokens` without a null check.
    pub fn with_input_estimate(mut self, tokens: u64) -> Self {
        self.input_estimate = tokens;
        self
    }

    /// Chat usage estimated from the input estimate and what was streamed.
    fn estimated_chat_usage(&self) -> Value {
        let bytes: usize = self
            .items
            .iter()
            .map(|i| match &i.kind {
                ItemKind::Message { parts } => parts.iter().map(|(_, t)| t.len()).sum(),
                ItemKind::Call { arguments, .. } => arguments.len(),
            })
            .sum();
        let output = (bytes as u64).div_ceil(4);
        json!({"prompt_tokens": self.input_estimate, "completion_tokens": output,
            "total_tokens": self.input_estimate + output})
    }

    /// The error that failed the stream (an upstream error event, or its end
    /// before the answer was complete).
    pub fn error(&self) -> Option<&StreamError> {
        self.error.as_ref()
    }

    /// The final `response` object (status `completed`, `incomplete` or
    /// `failed`) once the stream is done: what `GET /v1/responses/{id}` returns.
    pub fn response(&self) -> Option<Value> {
        self.response.clone()
    }

    /// Feed chat SSE bytes; returns Responses SSE bytes to send now. The first
    /// call always yields `response.created` and `response.in_progress`.
    pub fn feed(&mut self, chat_sse: &[u8]) -> Result<Vec<u8>, SseTooLarge> {
        let events = self.parser.feed(chat_sse)?;
        let mut out = Vec::new();
        if !self.started {
            // The model that answers, as the upstream names it (what the
            // plain answer reports), rather than the alias asked for
            // (`auto`): read off the first chunk before `response.created`.
            let named = events.iter().find_map(|ev| {
                let v: Value = serde_json::from_str(&ev.data).ok()?;
                v.get("model")?
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
            });
            if let Some(m) = named {
                self.model = m;
            }
        }
        self.start(&mut out);
        for ev in events {
            if self.done() {
                break;
            }
            self.on_event(&ev, &mut out);
        }
        Ok(out)
    }

    /// The upstream ended. Completes the response if the answer had finished
    /// (a `finish_reason` came but no `[DONE]`), fails it otherwise; nothing
    /// when the stream is already done.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.done() {
            return out;
        }
        self.start(&mut out);
        if self.finish.is_some() {
            self.complete(&mut out);
        } else {
            self.fail(
                StreamError {
                    kind: Some("server_error".into()),
                    code: None,
                    message: "The upstream stream ended before the response was complete.".into(),
                },
                &mut out,
            );
        }
        out
    }

    fn snapshot(
        &self,
        status: &str,
        usage: Value,
        incomplete: Option<&str>,
        error: Value,
    ) -> Value {
        response_object(
            &self.id,
            self.created_at,
            &self.model,
            &self.req,
            status,
            self.items.iter().map(Item::to_json).collect(),
            usage,
            incomplete,
            error,
        )
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let r = self.snapshot("in_progress", Value::Null, None, Value::Null);
        self.em
            .emit(out, "response.created", json!({"response": r.clone()}));
        self.em
            .emit(out, "response.in_progress", json!({"response": r}));
    }

    fn on_event(&mut self, ev: &SseEvent, out: &mut Vec<u8>) {
        if ev.is_done() {
            self.complete(out);
            return;
        }
        if let Some(e) = StreamError::from_event(ev) {
            self.fail(e, out);
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        // A first chunk that named no model (Azure's prompt-filter chunk,
        // a first read without a whole chunk): a later one names it for the
        // final response and the stored one.
        if let Some(m) = v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty() && *m != self.model)
        {
            self.model = m.to_string();
        }
        if v.get("usage").is_some_and(Value::is_object) {
            self.usage = Usage::from_openai(&v);
            self.chat_usage = v.get("usage").cloned();
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            if c.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                continue;
            }
            let d = &c["delta"];
            let text = crate::openai::content_text_of(&d["content"]);
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                self.text_delta(PartKind::Text, &t, out);
            }
            if let Some(t) = d["refusal"].as_str().filter(|t| !t.is_empty()) {
                self.text_delta(PartKind::Refusal, t, out);
            }
            if let Some(calls) = d["tool_calls"].as_array() {
                for call in calls {
                    self.call_delta(call, out);
                }
            }
            // Some servers send an empty finish reason on every chunk: no
            // finish (a stream cut after it is not complete).
            if let Some(f) = c["finish_reason"].as_str().filter(|f| !f.is_empty()) {
                self.finish = Some(f.to_string());
            }
        }
    }

    fn text_delta(&mut self, kind: PartKind, delta: &str, out: &mut Vec<u8>) {
        let i = match self.open {
            Some(i) => i,
            None => {
                let item = Item {
                    id: message_id(&self.id, self.messages),
                    kind: ItemKind::Message { parts: Vec::new() },
                    status: "in_progress",
                };
                self.messages += 1;
                self.em.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": self.items.len(), "item": item.to_json()}),
                );
                self.items.push(item);
                self.open = Some(self.items.len() - 1);
                self.items.len() - 1
            }
        };
        let item = &mut self.items[i];
        let ItemKind::Message { parts } = &mut item.kind else {
            return;
        };
        if parts.last().map(|p| p.0) != Some(kind) {
            if let Some((k, t)) = parts.last() {
                close_part(&mut self.em, &item.id, i, parts.len() - 1, *k, t, out);
            }
            parts.push((kind, String::new()));
            self.em.emit(
                out,
                "response.content_part.added",
                json!({"item_id": item.id, "output_index": i, "content_index": parts.len() - 1, "part": part_json(kind, "")}),
            );
        }
        let content_index = parts.len() - 1;
        if let Some((_, t)) = parts.last_mut() {
            t.push_str(delta);
        }
        match kind {
            PartKind::Text => self.em.emit(
                out,
                "response.output_text.delta",
                json!({"item_id": item.id, "output_index": i, "content_index": content_index, "delta": delta, "logprobs": []}),
            ),
            PartKind::Refusal => self.em.emit(
                out,
                "response.refusal.delta",
                json!({"item_id": item.id, "output_index": i, "content_index": content_index, "delta": delta}),
            ),
        }
    }

    fn call_delta(&mut self, call: &Value, out: &mut Vec<u8>) {
        let n = self.tool_index.of(call);
        let f = &call["function"];
        let name = f["name"].as_str().unwrap_or_default();
        let args = f["arguments"].as_str().unwrap_or_default();
        let i = match self.calls.iter().find(|(k, _)| *k == n) {
            Some(&(_, i)) => {
                if let ItemKind::Call {
                    name: nm,
                    namespace,
                    ..
                } = &mut self.items[i].kind
                {
                    if !name.is_empty() {
                        nm.push_str(name);
                        *namespace = namespace_of(&self.req, nm).map(str::to_string);
                    }
                }
                i
            }
            None => {
                self.close_open("completed", out);
                let call_id = call["id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map_or_else(|| fallback_call_id(&self.id, n), str::to_string);
                let item = Item {
                    id: call_item_id(&self.id, n),
                    kind: ItemKind::Call {
                        call_id,
                        name: name.to_string(),
                        namespace: namespace_of(&self.req, name).map(str::to_string),
                        arguments: String::new(),
                    },
                    status: "in_progress",
                };
                let i = self.items.len();
                self.em.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": i, "item": item.to_json()}),
                );
                self.items.push(item);
                self.calls.push((n, i));
                i
            }
        };
        if args.is_empty() {
            return;
        }
        let item = &mut self.items[i];
        if let ItemKind::Call { arguments, .. } = &mut item.kind {
            arguments.push_str(args);
        }
        // The call is still open, whichever call came last: its deltas go
        // to its own output index.
        self.em.emit(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": item.id, "output_index": i, "delta": args}),
        );
    }

    /// Send the `done` events of the open message, with its final `status`.
    fn close_open(&mut self, status: &'static str, out: &mut Vec<u8>) {
        if let Some(i) = self.open.take() {
            self.close_item(i, status, out);
        }
    }

    /// Send the `done` events of every item still open, in output order; the
    /// last item gets `status` (the one a token limit cut), earlier ones
    /// `completed`.
    fn close_all(&mut self, status: &'static str, out: &mut Vec<u8>) {
        self.open = None;
        let last = self.items.len().saturating_sub(1);
        for i in 0..self.items.len() {
            if self.items[i].status == "in_progress" {
                self.close_item(i, if i == last { status } else { "completed" }, out);
            }
        }
    }

    /// Send the `done` events of item `i`, with its final `status`.
    fn close_item(&mut self, i: usize, status: &'static str, out: &mut Vec<u8>) {
        let item = &mut self.items[i];
        item.status = status;
        // A call with no arguments has `{}`, as OpenAI's own.
        if let ItemKind::Call { arguments, .. } = &mut item.kind {
            if arguments.trim().is_empty() {
                *arguments = "{}".into();
            }
        }
        match &item.kind {
            ItemKind::Message { parts } => {
                if let Some((k, t)) = parts.last() {
                    close_part(&mut self.em, &item.id, i, parts.len() - 1, *k, t, out);
                }
            }
            ItemKind::Call {
                name, arguments, ..
            } => self.em.emit(
                out,
                "response.function_call_arguments.done",
                json!({"item_id": item.id, "output_index": i, "name": name, "arguments": arguments}),
            ),
        }
        self.em.emit(
            out,
            "response.output_item.done",
            json!({"output_index": i, "item": item.to_json()}),
        );
    }

    fn complete(&mut self, out: &mut Vec<u8>) {
        let reason = incomplete_reason(self.finish.as_deref());
        if self.items.is_empty() {
            // An empty answer is still one (empty) message, as in `response_from_chat`.
            self.text_delta(PartKind::Text, "", out);
        }
        self.close_all(
            if reason.is_some() {
                "incomplete"
            } else {
                "completed"
            },
            out,
        );
        // A provider that reports no usage: the estimates (the gateway
        // bills its own, marked as such), as the Messages stream reports.
        let usage = match &self.chat_usage {
            Some(u) => responses_usage(u),
            None => responses_usage(&self.estimated_chat_usage()),
        };
        let (status, event) = match reason {
            Some(_) => ("incomplete", "response.incomplete"),
            None => ("completed", "response.completed"),
        };
        let r = self.snapshot(status, usage, reason, Value::Null);
        self.em.emit(out, event, json!({"response": r.clone()}));
        self.response = Some(r);
    }

    fn fail(&mut self, e: StreamError, out: &mut Vec<u8>) {
        // Every item still open (the message, any call) was cut short.
        self.open = None;
        for item in &mut self.items {
            if item.status == "in_progress" {
                item.status = "incomplete";
            }
        }
        // The provider's code (`context_length_exceeded`) says more than its
        // type (`invalid_request_error`): the client reads it to decide
        // whether to shorten the conversation or retry.
        self.em.emit(
            out,
            "error",
            json!({"code": e.code.as_ref().or(e.kind.as_ref()), "message": e.message, "param": null}),
        );
        // `response.error.code` is one of a fixed set: the codes a chat
        // provider shares with it pass through, the rest read as an outage.
        let code = match (e.code.as_deref(), e.kind.as_deref()) {
            (
                Some(c @ ("context_length_exceeded" | "rate_limit_exceeded" | "invalid_prompt")),
                _,
            ) => c,
            (_, Some("rate_limit_exceeded" | "rate_limit_error" | "requests" | "tokens")) => {
                "rate_limit_exceeded"
            }
            _ => "server_error",
        };
        let usage = self
            .chat_usage
            .as_ref()
            .map_or(Value::Null, responses_usage);
        let r = self.snapshot(
            "failed",
            usage,
            None,
            json!({"code": code, "message": e.message}),
        );
        self.em
            .emit(out, "response.failed", json!({"response": r.clone()}));
        self.response = Some(r);
        self.error = Some(e);
    }
}

fn close_part(
    em: &mut Emitter,
    item_id: &str,
    output_index: usize,
    content_index: usize,
    kind: PartKind,
    text: &str,
    out: &mut Vec<u8>,
) {
    match kind {
        PartKind::Text => em.emit(
            out,
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": output_index, "content_index": content_index, "text": text, "logprobs": []}),
        ),
        PartKind::Refusal => em.emit(
            out,
            "response.refusal.done",
            json!({"item_id": item_id, "output_index": output_index, "content_index": content_index, "refusal": text}),
        ),
    }
    em.emit(
        out,
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": output_index, "content_index": content_index, "part": part_json(kind, text)}),
    );
}

// ---------------------------------------------------------------------------
// Conversation state for `previous_response_id`

/// What the caller keeps per response id for translated providers (serialise
/// it with serde_json into RocksDB, scoped by tenant): the response as the
/// client got it, and the whole conversation through it as chat messages, so
/// a follow-up needs one read, not a walk of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The `response` object (`GET /v1/responses/{id}` returns it).
    pub response: Value,
    /// The previous chain's messages, this request's input (its
    /// `instructions` excluded, as OpenAI does not carry them over), and the
    /// answer as an assistant message (with `tool_calls`).
    pub messages: Vec<Value>,
}

/// About how many bytes `v` takes as JSON (strings and keys by their
/// length, without escapes), counted without serialising it.
fn json_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => a.iter().map(|x| json_size(x) + 1).sum::<usize>() + 2,
        Value::Object(o) => {
            o.iter()
                .map(|(k, x)| k.len() + 4 + json_size(x))
                .sum::<usize>()
                + 2
        }
    }
}

impl StoredResponse {
    /// About how many bytes the conversation a follow-up continues adds to
    /// its request upstream.
    pub fn history_bytes(&self) -> usize {
        self.messages.iter().map(json_size).sum()
    }

    /// The conversation after answering `body` with `response`, continuing
    /// `previous` (the response `body.previous_response_id` named, if any).
    pub fn new(
        previous: Option<&StoredResponse>,
        body: &Map<String, Value>,
        response: Value,
    ) -> Result<StoredResponse, ApiError> {
        let mut messages = match previous {
            Some(p) => input_items_for_history(p, body)?,
            None => {
                let mut m = Vec::new();
                match body.get("input") {
                    Some(Value::String(s)) => m.push(json!({"role": "user", "content": s})),
                    Some(Value::Array(items)) => push_input_items(items, &mut m)?,
                    _ => {}
                }
                m
            }
        };
        messages.extend(answer_messages(&response));
        Ok(StoredResponse { response, messages })
    }

    pub fn id(&self) -> &str {
        self.response["id"].as_str().unwrap_or_default()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<StoredResponse> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The chat messages of a follow-up: the stored conversation (previous
/// messages and answer) and the new request's `input`, without any
/// `instructions` (which [`request_to_chat_with_history`] puts first).
pub fn input_items_for_history(
    previous: &StoredResponse,
    body: &Map<String, Value>,
) -> Result<Vec<Value>, ApiError> {
    let mut messages = previous.messages.clone();
    match body.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => push_input_items(items, &mut messages)?,
        Some(v) => {
            return Err(invalid_type(
                "input",
                v,
                "a string or an array of input items",
            ))
        }
    }
    Ok(messages)
}

/// A response's output as chat messages: one assistant message with its text
/// and `tool_calls` (none for a response without output, e.g. a failed one).
pub fn answer_messages(response: &Value) -> Vec<Value> {
    let mut text = String::new();
    let mut calls = Vec::new();
    let empty = Vec::new();
    for item in response["output"].as_array().unwrap_or(&empty) {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().unwrap_or(&empty) {
                    if let Some(t) = part["text"].as_str().or_else(|| part["refusal"].as_str()) {
                        text.push_str(t);
                    }
                }
            }
            Some("function_call") => calls.push(json!({
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            })),
            _ => {}
        }
    }
    if text.is_empty() && calls.is_empty() {
        return if response["output"].as_array().is_some_and(|o| !o.is_empty()) {
            vec![json!({"role": "assistant", "content": ""})]
        } else {
            Vec::new()
        };
    }
    let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    vec![m]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follow-up's estimate counts the conversation it carries upstream.
    #[test]
    fn the_history_a_follow_up_carries_is_counted() {
        let long = "x".repeat(10_000);
        let s = StoredResponse {
            response: json!({"id": "resp_1"}),
            messages: vec![
                json!({"role": "user", "content": long}),
                json!({"role": "assistant", "content": "ok"}),
            ],
        };
        let exact: usize = s.messages.iter().map(|m| m.to_string().len()).sum();
        let n = s.history_bytes();
        assert!(n >= 10_000 && n.abs_diff(exact) < 64, "{n} vs {exact}");
    }
    use crate::assemble::ChunkAssembler;
    use crate::sse::data_event;

    /// A Responses stream cut before its usage is billed from what its
    /// deltas generated (text, reasoning, call arguments), not from its
    /// bytes, most of which are envelope.
    #[test]
    fn a_cut_responses_stream_counts_what_its_deltas_generated() {
        let mut r = ResponsesStreamReader::default();
        let created = json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}});
        let mut stream = format!("event: response.created\ndata: {created}\n\n");
        for (kind, delta) in [
            (
                "response.reasoning_summary_text.delta",
                "Thinking it through",
            ),
            ("response.output_text.delta", "The answer"),
            ("response.output_text.delta", " is 42."),
            ("response.function_call_arguments.delta", "{\"x\":1}"),
        ] {
            let ev = json!({"type": kind, "item_id": "msg_1", "output_index": 0, "content_index": 0, "sequence_number": 3, "delta": delta});
            stream.push_str(&format!("event: {kind}\ndata: {ev}\n\n"));
        }
        r.feed(stream.as_bytes()).unwrap();
        let generated = "Thinking it through".len() + "The answer is 42.".len() + 7;
        assert_eq!(r.generated_bytes, generated as u64);
        assert_eq!(
            r.generated_tokens_estimate(),
            (generated as u64).div_ceil(4)
        );
        assert!(r.usage.is_none() && !r.done);
        // Many times fewer than the stream's bytes would say (a fifth of them).
        assert!((stream.len() as u64).div_ceil(20) > 2 * r.generated_tokens_estimate());
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    fn err(v: Value) -> ApiError {
        request_to_chat(&obj(v)).unwrap_err()
    }

    #[test]
    fn what_cannot_be_translated_is_kept_for_providers_that_speak_responses() {
        let raw = br#"{"model":"m","instructions":"Be brief.","input":[{"role":"user","content":[{"type":"input_text","text":"News today?"}]}],"tools":[{"type":"web_search"}]}"#;
        let parse_raw = |raw: &'static [u8]| {
            parse(
                crate::openai::Endpoint::Responses,
                read(raw).unwrap(),
                bytes::Bytes::from_static(raw),
                None,
                "resp_1".into(),
            )
        };
        let r = parse_raw(raw).unwrap();
        let e = r
            .responses
            .as_ref()
            .unwrap()
            .untranslatable
            .clone()
            .unwrap();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("unsupported_value", Some("tools[0].type"))
        );
        // The text is still there for routing, limits and estimates.
        assert_eq!(
            r.body["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "News today?"}])
        );
        // A background response streamed goes to such a provider; one to be
        // fetched later (never relayed, never billed) is refused for all.
        let bg = br#"{"model":"m","input":"x","background":true,"stream":true}"#;
        assert_eq!(
            parse_raw(bg)
                .unwrap()
                .responses
                .unwrap()
                .untranslatable
                .unwrap()
                .param
                .as_deref(),
            Some("background")
        );
        let bg = br#"{"model":"m","input":"x","background":true}"#;
        let e = parse_raw(bg).unwrap_err();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("unsupported_parameter", Some("background"))
        );
        // A malformed request is still refused at once.
        let bad = br#"{"model":"m","input":"x","temperature":"hot"}"#;
        assert_eq!(
            parse_raw(bad).unwrap_err().param.as_deref(),
            Some("temperature")
        );
    }

    #[test]
    fn built_in_tools_alone_leave_a_translation_without_them() {
        let parse_value = |v: Value| {
            let raw = serde_json::to_vec(&v).unwrap();
            parse(
                crate::openai::Endpoint::Responses,
                read(&raw).unwrap(),
                raw.into(),
                None,
                "resp_1".into(),
            )
            .unwrap()
        };
        let tools = json!([
            {"type": "function", "name": "shell", "parameters": {"type": "object"}},
            {"type": "web_search", "external_web_access": false},
            {"type": "web_search_preview_2025_03_11"},
            {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example"},
        ]);
        let r = parse_value(
            json!({"model": "m", "input": "Fix the build.", "tools": tools, "tool_choice": "auto"}),
        );
        let rr = r.responses.as_deref().unwrap();
        // Still untranslatable as sent (a provider that speaks Responses
        // takes it whole; others refuse it unless set to drop them).
        assert_eq!(
            rr.untranslatable.as_ref().map(|e| e.code),
            Some("unsupported_value")
        );
        assert_eq!(
            rr.builtin_tools,
            ["web_search", "web_search_preview_2025_03_11", "mcp"]
        );
        assert_eq!(r.body["tools"].as_array().unwrap().len(), 1);
        assert_eq!(r.body["tools"][0]["function"]["name"], "shell");
        assert_eq!(r.body["tool_choice"], "auto");
        assert_eq!(r.body["messages"][0]["content"], "Fix the build.");

        // Only built-in tools: the translation has none (and no choice).
        let r = parse_value(
            json!({"model": "m", "input": "News?", "tools": [{"type": "web_search"}], "tool_choice": "auto"}),
        );
        assert_eq!(
            r.responses.as_deref().unwrap().builtin_tools,
            ["web_search"]
        );
        assert!(r.body.get("tools").is_none() && r.body.get("tool_choice").is_none());

        // Not droppable: a choice that demands a built-in tool, a call
        // that must be made with only built-in tools given, a client-run
        // tool the translation lacks, a built-in tool's call in the input.
        for v in [
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}),
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required"}),
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}, {"type": "custom", "name": "apply_patch"}]}),
            json!({"model": "m", "input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}], "tools": [{"type": "web_search"}]}),
            json!({"model": "m", "input": "x", "tools": [{"type": "web_searcher"}]}),
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search_\n"}]}),
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}], "tool_choice": "required"}),
        ] {
            let r = parse_value(v.clone());
            let rr = r.responses.as_deref().unwrap();
            assert!(rr.untranslatable.is_some(), "{v}");
            assert!(rr.builtin_tools.is_empty(), "{v}");
        }
    }

    /// A function's images (a screenshot) follow its results in a user
    /// message, as the Messages API's tool results with images do (they
    /// used to be refused for every model).
    #[test]
    fn images_a_function_returned_follow_its_results() {
        let chat = request_to_chat(&obj(json!({
            "model": "m",
            "input": [
                {"role": "user", "content": "Take a screenshot and say what is on it."},
                {"type": "function_call", "call_id": "a", "name": "shot", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "title", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": [
                    {"type": "input_text", "text": "taken"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "high"}]},
                {"type": "function_call_output", "call_id": "b", "output": "Home"},
                {"role": "user", "content": "And the colour?"},
            ],
        })))
        .unwrap();
        // The results last (a follow-up sending only them, as an agent
        // does): the images still follow.
        let last = request_to_chat(&obj(json!({
            "model": "m",
            "input": [
                {"type": "function_call", "call_id": "a", "name": "shot", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": [
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            ],
        })))
        .unwrap();
        let lm = last["messages"].as_array().unwrap();
        assert_eq!(lm.len(), 3, "{lm:#?}");
        assert_eq!(lm[2]["role"], "user");
        assert_eq!(lm[2]["content"][0]["type"], "image_url");
        let m = chat["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(
            roles,
            ["user", "assistant", "tool", "tool", "user", "user"],
            "{m:#?}"
        );
        assert_eq!(m[2]["content"], "taken");
        assert_eq!(
            m[4]["content"][0],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}})
        );
        assert_eq!(m[5]["content"], "And the colour?");
        // Still refused: a part of another kind, or an image by file id.
        for part in [
            json!({"type": "input_file", "file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}),
            json!({"type": "input_image", "file_id": "file-1"}),
        ] {
            let e = request_to_chat(&obj(json!({"model": "m", "input": [
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": [part]}]})))
            .unwrap_err();
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn request_translation() {
        let body = obj(json!({
            "model": "auto",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use metric units."},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "What is in this image?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                    {"type": "input_file", "file_data": "data:application/pdf;base64,BBBB", "filename": "a.pdf"},
                ]},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "weather", "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call", "call_id": "call_b", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_a", "output": "12C"},
                {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            "tools": [
                {"type": "function", "name": "weather", "description": "Weather", "parameters": {"type": "object"}, "strict": true},
                {"type": "function", "name": "time", "parameters": null, "strict": null},
            ],
            "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": false,
            "max_output_tokens": 300,
            "temperature": 0.2,
            "top_p": 0.9,
            "stream": true,
            "stream_options": {"include_obfuscation": false},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}, "verbosity": "low"},
            "reasoning": {"effort": "low", "summary": "auto"},
            "metadata": {"k": "v"},
            "user": "u1",
            "safety_identifier": "s1",
            "store": true,
            "previous_response_id": null,
            "include": ["message.output_text.logprobs"],
            "truncation": "disabled",
            "service_tier": "flex",
        }));
        let chat = request_to_chat(&body).unwrap();
        assert_eq!(
            Value::Object(chat.clone()),
            json!({
                "model": "auto",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "system", "content": "Use metric units."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                        {"type": "file", "file": {"file_data": "data:application/pdf;base64,BBBB", "filename": "a.pdf"}},
                    ]},
                    {"role": "assistant", "content": "Let me check.", "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "call_a", "content": "12C"},
                    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
                ],
                "tools": [
                    {"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": {"type": "object"}, "strict": true}},
                    {"type": "function", "function": {"name": "time"}},
                ],
                "tool_choice": {"type": "function", "function": {"name": "weather"}},
                "parallel_tool_calls": false,
                "max_completion_tokens": 300,
                "temperature": 0.2,
                "top_p": 0.9,
                "user": "s1",
                "stream": true,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
                "verbosity": "low",
                "reasoning_effort": "low",
                "service_tier": "flex",
            })
        );
        // The chat body is one the chat validator takes.
        let parsed = crate::openai::parse_request(
            crate::Endpoint::ChatCompletions,
            &serde_json::to_vec(&chat).unwrap(),
        )
        .unwrap();
        assert!(parsed.stream);
    }

    #[test]
    fn simple_requests() {
        let chat = request_to_chat(&obj(json!({"model": "m", "input": "Hi"}))).unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        );
        // A function call with no assistant message before it opens one;
        // parallel_tool_calls without tools is not sent; text format "text" is no response_format.
        let chat = request_to_chat(&obj(json!({
            "model": "m",
            "input": [
                {"role": "user", "content": "x"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "1"},
            ],
            "parallel_tool_calls": true,
            "text": {"format": {"type": "text"}},
            "stream": false,
        })))
        .unwrap();
        assert_eq!(
            chat["messages"][1],
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        for k in [
            "parallel_tool_calls",
            "response_format",
            "stream",
            "stream_options",
        ] {
            assert!(!chat.contains_key(k), "{k}");
        }
        // json_object; allowed_tools narrows the tools and becomes the mode.
        let chat = request_to_chat(&obj(json!({
            "model": "m", "input": "x",
            "text": {"format": {"type": "json_object"}},
            "tools": [{"type": "function", "name": "a"}, {"type": "function", "name": "b"}],
            "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]},
        })))
        .unwrap();
        assert_eq!(chat["response_format"], json!({"type": "json_object"}));
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "b"}}])
        );
        // Without tools, `auto` and `none` are dropped: chat providers
        // refuse a `tool_choice` with no tools.
        for body in [
            json!({"model": "m", "input": "x", "tool_choice": "none"}),
            json!({"model": "m", "input": "x", "tool_choice": "auto", "tools": []}),
        ] {
            let chat = request_to_chat(&obj(body.clone())).unwrap();
            assert!(!chat.contains_key("tool_choice"), "{body}");
            assert!(!chat.contains_key("tools"), "{body}");
        }
        let chat = request_to_chat(&obj(json!({
            "model": "m", "input": "x", "tool_choice": "none",
            "tools": [{"type": "function", "name": "a"}],
        })))
        .unwrap();
        assert_eq!(chat["tool_choice"], "none");
    }

    /// Assistant text after its turn's calls joins the message with the
    /// calls, so the tool results still follow it directly.
    #[test]
    fn assistant_text_after_calls_joins_their_message() {
        let chat = request_to_chat(&obj(json!({"model": "m", "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call_output", "call_id": "c1", "output": "12C"},
        ]})))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12C"},
            ])
        );
        // Text before and after the calls: both kept, in order.
        let chat = request_to_chat(&obj(json!({"model": "m", "input": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me see."},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"role": "assistant", "content": "Checking."},
            {"type": "function_call_output", "call_id": "c1", "output": "12C"},
        ]})))
        .unwrap();
        let m = &chat["messages"];
        assert_eq!(m.as_array().unwrap().len(), 3, "{m}");
        assert_eq!(
            m[1]["content"],
            json!([{"type": "text", "text": "Let me see."}, {"type": "text", "text": "Checking."}])
        );
        assert_eq!(m[1]["tool_calls"][0]["id"], "c1");
    }

    #[test]
    fn errors_name_the_parameter() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({"input": "x"}), "model", "missing_required_parameter"),
            (json!({"model": 5, "input": "x"}), "model", "invalid_type"),
            (
                json!({"model": " ", "input": "x"}),
                "model",
                "invalid_value",
            ),
            (json!({"model": "m"}), "input", "missing_required_parameter"),
            (json!({"model": "m", "input": 3}), "input", "invalid_type"),
            (json!({"model": "m", "input": []}), "input", "invalid_value"),
            (
                json!({"model": "m", "input": ["x"]}),
                "input[0]",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": [{"content": "x"}]}),
                "input[0].type",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}),
                "input[0].role",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": [{"role": "user"}]}),
                "input[0].content",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "input[0].content[0].type",
                "unsupported_value",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}),
                "input[0].content[0].file_id",
                "unsupported_parameter",
            ),
            (
                json!({"model": "m", "input": [{"role": "system", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}),
                "input[0].content[0].type",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}),
                "input[0].type",
                "unsupported_value",
            ),
            (
                json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
                "input[0].type",
                "unsupported_value",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}),
                "input[0].output",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]}),
                "tools[1].type",
                "unsupported_value",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function"}]}),
                "tools[0].name",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": "x", "tools": {}}),
                "tools",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": "x", "tool_choice": "sometimes"}),
                "tool_choice",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}),
                "tool_choice.type",
                "unsupported_value",
            ),
            // A choice that demands a call, with no tool to call.
            (
                json!({"model": "m", "input": "x", "tool_choice": "required"}),
                "tool_choice",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [], "tool_choice": {"type": "function", "name": "f"}}),
                "tool_choice",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a"}],
                       "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "b"}]}}),
                "tool_choice",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "temperature": 3}),
                "temperature",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "top_p": "high"}),
                "top_p",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "max_output_tokens": 1.5}),
                "max_output_tokens",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": "x", "stream": "yes"}),
                "stream",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}),
                "text.format.type",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
                "text.format.schema",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "input": "x", "reasoning": "high"}),
                "reasoning",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": "x", "reasoning": {"effort": 3}}),
                "reasoning.effort",
                "invalid_type",
            ),
            (
                json!({"model": "m", "input": [
                    {"role": "user", "content": "Weather?"},
                    {"type": "function_call", "call_id": "call_9", "name": "w", "arguments": "{}"},
                    {"role": "user", "content": "never mind"}]}),
                "input",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": [
                    {"role": "user", "content": "Weather?"},
                    {"type": "function_call", "call_id": "call_9", "name": "w", "arguments": "{}"}]}),
                "input",
                "invalid_value",
            ),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
                "unsupported_parameter",
            ),
            (
                json!({"model": "m", "input": "x", "conversation": "conv_1"}),
                "conversation",
                "unsupported_parameter",
            ),
            (
                json!({"model": "m", "input": "x", "metadata": "k"}),
                "metadata",
                "invalid_type",
            ),
        ];
        for (body, param, code) in cases {
            let e = err(body.clone());
            assert_eq!(
                (e.status, e.param.as_deref(), e.code),
                (400, Some(param), code),
                "{body} -> {e}"
            );
            let v = e.to_json();
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
        let e = err(json!({"model": "m", "input": "x", "tools": [{"type": "web_search_preview"}]}));
        assert!(e.message.contains("'web_search_preview'"), "{e}");
        assert_eq!(response_not_found("resp_x", None).status, 404);
        let e = previous_response_not_found("resp_x").to_json();
        assert_eq!(e["error"]["code"], "previous_response_not_found");
        assert_eq!(e["error"]["param"], "previous_response_id");
        assert_eq!(
            e["error"]["message"],
            "Previous response with id 'resp_x' not found."
        );
    }

    #[test]
    fn input_tokens_take_what_create_takes() {
        let chat = input_tokens_request(
            &obj(json!({"input": "Hi", "instructions": "Sys", "stream": true})),
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}]})
        );
        assert!(input_tokens_request(
            &obj(json!({"model": "m", "tools": [{"type": "mcp"}]})),
            None
        )
        .is_err());
        assert_eq!(
            input_tokens_object(7),
            json!({"object": "response.input_tokens", "input_tokens": 7})
        );
    }

    fn req() -> Map<String, Value> {
        obj(
            json!({"model": "auto", "input": "Hi", "instructions": "Be brief.", "temperature": 0.5, "metadata": {"a": "b"},
                   "tools": [{"type": "function", "name": "f", "parameters": {}, "strict": true}]}),
        )
    }

    fn chat_completion(message: Value, finish: &str) -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                      "prompt_tokens_details": {"cached_tokens": 6}, "completion_tokens_details": {"reasoning_tokens": 1}},
        })
    }

    #[test]
    fn answer_translation() {
        let chat = chat_completion(json!({"role": "assistant", "content": "Hello!"}), "stop");
        let r = response_from_chat(&chat, "resp_abc", 100, &req());
        assert_eq!(r["object"], "response");
        assert_eq!(r["id"], "resp_abc");
        assert_eq!(r["created_at"], 100);
        assert_eq!(r["status"], "completed");
        assert!(r["completed_at"].as_u64().unwrap() >= 100);
        assert_eq!(r["model"], "gpt-x");
        assert_eq!(
            r["output"],
            json!([{"id": "msg_abc", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]}])
        );
        assert_eq!(
            r["usage"],
            json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
                   "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 14})
        );
        assert_eq!(r["instructions"], "Be brief.");
        assert_eq!(r["temperature"], 0.5);
        assert_eq!(r["top_p"], 1.0);
        assert_eq!(r["metadata"], json!({"a": "b"}));
        assert_eq!(r["tools"][0]["name"], "f");
        assert_eq!(r["tool_choice"], "auto");
        assert_eq!(
            r["text"],
            json!({"format": {"type": "text"}, "verbosity": "medium"})
        );
        assert!(r["error"].is_null() && r["incomplete_details"].is_null());
        assert!(r.get("output_text").is_none());

        let chat = chat_completion(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                {"type": "function", "function": {"name": "g", "arguments": "{}"}},
            ]}),
            "tool_calls",
        );
        let r = response_from_chat(&chat, "resp_abc", 100, &req());
        assert_eq!(
            r["output"],
            json!([
                {"id": "fc_abc_0", "type": "function_call", "status": "completed", "arguments": "{\"a\":1}", "call_id": "call_1", "name": "f"},
                {"id": "fc_abc_1", "type": "function_call", "status": "completed", "arguments": "{}", "call_id": "call_abc_1", "name": "g"},
            ])
        );

        let chat = chat_completion(json!({"role": "assistant", "content": "Hel"}), "length");
        let r = response_from_chat(&chat, "resp_abc", 100, &req());
        assert_eq!(r["status"], "incomplete");
        assert_eq!(
            r["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(r["output"][0]["status"], "incomplete");
        assert!(r["completed_at"].is_null());

        let chat = chat_completion(
            json!({"role": "assistant", "content": null, "refusal": "No."}),
            "stop",
        );
        let r = response_from_chat(&chat, "resp_abc", 100, &req());
        assert_eq!(
            r["output"][0]["content"],
            json!([{"type": "refusal", "refusal": "No."}])
        );
    }

    fn chunk(delta: Value, finish: Value) -> Vec<u8> {
        data_event(
            &json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "gpt-x",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
            .to_string(),
        )
    }

    fn usage_chunk() -> Vec<u8> {
        data_event(
            &json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "gpt-x", "choices": [],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                              "prompt_tokens_details": {"cached_tokens": 6}, "completion_tokens_details": {"reasoning_tokens": 1}}})
            .to_string(),
        )
    }

    fn text_stream() -> Vec<u8> {
        let mut s = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        s.extend(chunk(json!({"content": "Hel"}), Value::Null));
        s.extend(chunk(json!({"content": "lo!"}), Value::Null));
        s.extend(chunk(json!({}), json!("stop")));
        s.extend(usage_chunk());
        s.extend_from_slice(crate::sse::DONE_EVENT);
        s
    }

    /// Feed `input` in pieces of `size`; the events as (name, data), checked
    /// for the framing every Responses event has.
    fn run(s: &mut ChatToResponsesStream, input: &[u8], size: usize) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for c in input.chunks(size) {
            out.extend(s.feed(c).unwrap());
        }
        out.extend(s.finish());
        let mut p = SseParser::default();
        let events: Vec<(String, Value)> = p
            .feed(&out)
            .unwrap()
            .into_iter()
            .map(|e| (e.event.unwrap(), serde_json::from_str(&e.data).unwrap()))
            .collect();
        assert!(p.pending().is_empty());
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i as u64, "{name}");
        }
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
        events
    }

    fn names(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn without_completed_at(mut v: Value) -> Value {
        v.as_object_mut().unwrap().remove("completed_at");
        v
    }

    #[test]
    fn text_stream_events() {
        let input = text_stream();
        for size in [1, 7, input.len()] {
            let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
            let events = run(&mut s, &input, size);
            assert_eq!(
                names(&events),
                [
                    "response.created",
                    "response.in_progress",
                    "response.output_item.added",
                    "response.content_part.added",
                    "response.output_text.delta",
                    "response.output_text.delta",
                    "response.output_text.done",
                    "response.content_part.done",
                    "response.output_item.done",
                    "response.completed",
                ]
            );
            let created = &events[0].1["response"];
            assert_eq!(created["status"], "in_progress");
            assert_eq!(created["output"], json!([]));
            assert!(created["usage"].is_null());
            assert_eq!(
                events[2].1,
                json!({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                       "item": {"id": "msg_abc", "type": "message", "status": "in_progress", "role": "assistant", "content": []}})
            );
            assert_eq!(
                events[4].1,
                json!({"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_abc",
                       "output_index": 0, "content_index": 0, "delta": "Hel", "logprobs": []})
            );
            assert_eq!(events[6].1["text"], "Hello!");
            assert_eq!(events[7].1["part"]["text"], "Hello!");
            assert_eq!(events[8].1["item"]["status"], "completed");
            assert!(s.done());
            assert_eq!(s.usage().unwrap().total(), 14);
            assert!(s.error().is_none());
            // The streamed answer is the one `response_from_chat` gives for the assembled chat answer.
            let mut a = ChunkAssembler::new();
            a.feed(&input);
            let chat = a.finish().unwrap();
            let expected = response_from_chat(&chat, "resp_abc", 100, &req());
            let got = s.response().unwrap();
            assert_eq!(
                without_completed_at(got.clone()),
                without_completed_at(expected)
            );
            assert_eq!(events[9].1["response"], got);
            // Nothing after the end.
            assert!(s
                .feed(&chunk(json!({"content": "x"}), Value::Null))
                .unwrap()
                .is_empty());
        }
    }

    #[test]
    fn tool_call_stream_events() {
        let mut input = chunk(
            json!({"role": "assistant", "content": "Checking."}),
            Value::Null,
        );
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
            Value::Null,
        ));
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
            Value::Null,
        ));
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(json!({}), json!("tool_calls")));
        input.extend(usage_chunk());
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, 5);
        assert_eq!(
            names(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                // Calls stay open until the stream ends, then close in order.
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(
            events[8].1["item"],
            json!({"id": "fc_abc_0", "type": "function_call", "status": "in_progress", "arguments": "", "call_id": "call_1", "name": "f"})
        );
        assert_eq!(events[9].1["item_id"], "fc_abc_0");
        assert_eq!(events[9].1["output_index"], 1);
        assert_eq!(
            events[13].1,
            json!({"type": "response.function_call_arguments.done", "sequence_number": 13, "item_id": "fc_abc_0",
                   "output_index": 1, "name": "f", "arguments": "{\"a\":1}"})
        );
        assert_eq!(events[16].1["item"]["call_id"], "call_2");
        let mut a = ChunkAssembler::new();
        a.feed(&input);
        let expected = response_from_chat(&a.finish().unwrap(), "resp_abc", 100, &req());
        assert_eq!(
            without_completed_at(s.response().unwrap()),
            without_completed_at(expected)
        );
    }

    /// Codex's `namespace` tools: flattened into their functions for chat
    /// providers (the group's description leading each one's), and the
    /// answer's calls name their namespace again, plain and streamed.
    #[test]
    fn namespace_tools_are_flattened_and_calls_name_them() {
        let req = obj(json!({"model": "auto", "input": "Spawn a helper",
            "tools": [
                {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
                 "tools": [{"type": "function", "name": "spawn_agent", "description": "Start one.", "strict": false,
                            "parameters": {"type": "object"}}]},
                {"type": "function", "name": "get_goal"}]}));
        let chat = request_to_chat(&req).unwrap();
        let names: Vec<&str> = chat["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["exec_command", "spawn_agent", "get_goal"]);
        assert_eq!(
            chat["tools"][1]["function"]["description"],
            "(multi_agent_v1) Sub-agents.\n\nStart one."
        );
        let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "spawn_agent", "arguments": "{}"}},
                               {"id": "call_2", "type": "function", "function": {"name": "get_goal", "arguments": "{}"}}]}}]});
        let r = response_from_chat(&answer, "resp_abc", 1, &req);
        assert_eq!(r["output"][0]["namespace"], "multi_agent_v1");
        assert!(r["output"][1].get("namespace").is_none(), "{r}");
        let mut input = chunk(
            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "spawn", "arguments": ""}}]}),
            Value::Null,
        );
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"name": "_agent", "arguments": "{}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(json!({}), json!("tool_calls")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 1, "gpt-x", &req);
        let events = run(&mut s, &input, 7);
        let done = events
            .iter()
            .find(|(n, _)| n == "response.output_item.done")
            .unwrap();
        assert_eq!(done.1["item"]["name"], "spawn_agent");
        assert_eq!(done.1["item"]["namespace"], "multi_agent_v1");
        // Names must stay unique once flattened; inner tools are functions.
        let mut twice = req.clone();
        twice["tools"][2]["name"] = json!("spawn_agent");
        let e = request_to_chat(&twice).unwrap_err();
        assert!(e.message.contains("'spawn_agent'"), "{e}");
        let mut custom = req.clone();
        custom["tools"][1]["tools"][0]["type"] = json!("custom");
        let e = request_to_chat(&custom).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[1].tools[0].type"), "{e}");
    }

    /// Ollama streams parallel calls all with index 0, each with its own
    /// id: two function calls, not one named "file_writefile_write".
    #[test]
    fn tool_calls_sharing_an_index_stay_apart() {
        let mut input = chunk(
            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                "function": {"name": "file_write", "arguments": "{\"p\":1}"}}]}),
            Value::Null,
        );
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                "function": {"name": "file_write", "arguments": "{\"p\":2}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(json!({}), json!("tool_calls")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        run(&mut s, &input, input.len());
        let r = s.response().unwrap();
        let calls: Vec<&Value> = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 2, "{r}");
        assert_eq!(
            (
                &calls[0]["call_id"],
                &calls[0]["name"],
                &calls[0]["arguments"]
            ),
            (&json!("call_a"), &json!("file_write"), &json!("{\"p\":1}"))
        );
        assert_eq!(
            (
                &calls[1]["call_id"],
                &calls[1]["name"],
                &calls[1]["arguments"]
            ),
            (&json!("call_b"), &json!("file_write"), &json!("{\"p\":2}"))
        );
    }

    /// A provider interleaving the argument deltas of parallel calls: each
    /// call stays open until the stream ends, its deltas at its own output
    /// index, its `done` events carrying its whole arguments.
    #[test]
    fn interleaved_call_arguments_stay_with_their_call() {
        let mut input = chunk(
            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\":"}}]}),
            Value::Null,
        );
        input.extend(chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                "function": {"name": "g", "arguments": "{\"b\":"}}]}),
            Value::Null,
        ));
        input.extend(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "2}"}}]}),
            Value::Null,
        ));
        input.extend(chunk(json!({}), json!("tool_calls")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, 7);
        assert_eq!(
            names(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, args) in [(0, "{\"a\":1}"), (1, "{\"b\":2}")] {
            let deltas: String = events
                .iter()
                .filter(|(n, v)| {
                    n == "response.function_call_arguments.delta" && v["output_index"] == i
                })
                .map(|(_, v)| v["delta"].as_str().unwrap())
                .collect();
            assert_eq!(deltas, args);
            let done = events
                .iter()
                .position(|(n, v)| {
                    n == "response.function_call_arguments.done" && v["output_index"] == i
                })
                .unwrap();
            assert_eq!(events[done].1["arguments"], args);
            let (name, item_done) = &events[done + 1];
            assert_eq!(name, "response.output_item.done");
            assert_eq!(item_done["output_index"], i);
            assert_eq!(item_done["item"]["arguments"], args);
            assert_eq!(item_done["item"]["status"], "completed");
        }
        let r = s.response().unwrap();
        assert_eq!(r["output"][0]["arguments"], "{\"a\":1}");
        assert_eq!(r["output"][1]["arguments"], "{\"b\":2}");
    }

    /// Mistral's reasoning models stream `content` as a list of chunks: the
    /// text ones reach the answer, the thinking ones do not.
    #[test]
    fn content_chunks_stream_as_text() {
        let mut input = chunk(
            json!({"role": "assistant", "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]}),
            Value::Null,
        );
        input.extend(chunk(
            json!({"content": [{"type": "text", "text": "Hel"}]}),
            Value::Null,
        ));
        input.extend(chunk(json!({"content": "lo!"}), json!("stop")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, input.len());
        let deltas: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, v)| &v["delta"])
            .collect();
        assert_eq!(deltas, [&json!("Hel"), &json!("lo!")]);
        let r = s.response().unwrap();
        assert_eq!(r["output"][0]["content"][0]["text"], "Hello!");
    }

    /// A call without arguments (a provider that streams none for it) has
    /// `{}`, as OpenAI's own answers have: the client parses them.
    #[test]
    fn a_call_without_arguments_has_an_empty_object() {
        let chat = json!({"id": "c", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]});
        let r = response_from_chat(&chat, "resp_abc", 100, &req());
        assert_eq!(r["output"][0]["arguments"], "{}");
        let mut input = chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
            Value::Null,
        );
        input.extend(chunk(json!({}), json!("tool_calls")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, 7);
        let done = events
            .iter()
            .find(|(n, _)| n == "response.function_call_arguments.done")
            .unwrap();
        assert_eq!(done.1["arguments"], "{}");
        assert_eq!(s.response().unwrap()["output"][0]["arguments"], "{}");
    }

    /// A stream names the model that answered (the upstream's), as the
    /// plain answer does, not the alias asked for (`auto`).
    #[test]
    fn a_stream_names_the_model_that_answered() {
        let mut input = chunk(json!({"content": "Hi"}), Value::Null);
        input.extend(chunk(json!({}), json!("stop")));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "auto", &req());
        let events = run(&mut s, &input, input.len());
        assert_eq!(events[0].0, "response.created");
        assert_eq!(events[0].1["response"]["model"], "gpt-x");
        assert_eq!(events.last().unwrap().1["response"]["model"], "gpt-x");
        assert_eq!(s.response().unwrap()["model"], "gpt-x");
    }

    #[test]
    fn truncated_and_empty_streams() {
        let mut input = chunk(json!({"content": "Hel"}), Value::Null);
        input.extend(chunk(json!({}), json!("length")));
        input.extend(usage_chunk());
        input.extend_from_slice(crate::sse::DONE_EVENT);
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, input.len());
        let (name, last) = events.last().unwrap();
        assert_eq!(name, "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["output"][0]["status"], "incomplete");
        assert_eq!(last["response"]["usage"]["output_tokens"], 4);

        // An empty answer is one empty message, as in response_from_chat; no
        // usage chunk means usage null.
        let mut input = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        input.extend(chunk(json!({}), json!("stop")));
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, 3);
        let r = s.response().unwrap();
        assert_eq!(
            r["status"], "completed",
            "finish() completes a finished answer without [DONE]"
        );
        assert_eq!(r["output"][0]["content"][0]["text"], "");
        // No usage from the provider: the client's is estimated (never
        // null), the billed one is left to the gateway.
        assert_eq!(r["usage"]["input_tokens"], 0);
        assert_eq!(r["usage"]["output_tokens"], 0);
        assert!(s.usage().is_none());
        let mut input = chunk(
            json!({"role": "assistant", "content": "Hello world!"}),
            Value::Null,
        );
        input.extend(chunk(json!({}), json!("stop")));
        input.extend_from_slice(b"data: [DONE]\n\n");
        let mut s =
            ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req()).with_input_estimate(7);
        run(&mut s, &input, 3);
        let r = s.response().unwrap();
        assert_eq!(r["status"], "completed");
        assert_eq!(
            (
                &r["usage"]["input_tokens"],
                &r["usage"]["output_tokens"],
                &r["usage"]["total_tokens"]
            ),
            (&json!(7), &json!(3), &json!(10))
        );
        assert_eq!(names(&events).last(), Some(&"response.completed"));

        // An empty finish reason on every chunk is no finish: cut before a
        // real one, the stream fails rather than reads as complete.
        let mut input = chunk(json!({"content": "Hel"}), json!(""));
        input.extend(chunk(json!({"content": "lo"}), json!("")));
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &input, 3);
        assert_eq!(
            names(&events).last(),
            Some(&"response.failed"),
            "{events:?}"
        );
    }

    #[test]
    fn error_event_fails_the_stream() {
        let mut input = chunk(json!({"content": "Hel"}), Value::Null);
        input.extend(data_event(
            "{\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}",
        ));
        input.extend(chunk(json!({"content": "lo"}), Value::Null));
        input.extend_from_slice(crate::sse::DONE_EVENT);
        for size in [1, 9, input.len()] {
            let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
            let events = run(&mut s, &input, size);
            let n = events.len();
            assert_eq!(events[n - 2].0, "error");
            assert_eq!(
                events[n - 2].1,
                json!({"type": "error", "sequence_number": n - 2, "code": "server_error",
                       "message": "The server had an error", "param": null})
            );
            let failed = &events[n - 1];
            assert_eq!(failed.0, "response.failed");
            assert_eq!(failed.1["response"]["status"], "failed");
            assert_eq!(
                failed.1["response"]["error"],
                json!({"code": "server_error", "message": "The server had an error"})
            );
            assert_eq!(failed.1["response"]["output"][0]["status"], "incomplete");
            assert_eq!(
                failed.1["response"]["output"][0]["content"][0]["text"],
                "Hel"
            );
            assert!(s.done());
            assert_eq!(s.error().unwrap().message, "The server had an error");
            assert_eq!(s.response().unwrap()["status"], "failed");
            assert!(!events.iter().any(|(_, d)| d["delta"] == "lo"));
        }
        // The upstream ending mid-answer fails it too.
        let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
        let events = run(&mut s, &chunk(json!({"content": "Hel"}), Value::Null), 4);
        assert_eq!(
            names(&events)[events.len() - 2..],
            ["error", "response.failed"]
        );
        assert!(s.error().is_some());
    }

    /// The provider's error code reaches the client: a full context window
    /// is not an outage, and the client reads the code to tell them apart.
    #[test]
    fn an_upstream_error_code_reaches_the_client() {
        for (code, failed_code) in [
            ("context_length_exceeded", "context_length_exceeded"),
            ("some_other_code", "server_error"),
        ] {
            let mut input = chunk(json!({"content": "Hel"}), Value::Null);
            input.extend(data_event(
                &json!({"error": {"message": "too long", "type": "invalid_request_error", "param": null, "code": code}})
                    .to_string(),
            ));
            let mut s = ChatToResponsesStream::new("resp_abc", 100, "gpt-x", &req());
            let events = run(&mut s, &input, input.len());
            let n = events.len();
            assert_eq!(events[n - 2].0, "error");
            assert_eq!(events[n - 2].1["code"], code);
            assert_eq!(events[n - 1].0, "response.failed");
            assert_eq!(
                events[n - 1].1["response"]["error"],
                json!({"code": failed_code, "message": "too long"})
            );
            assert_eq!(s.error().unwrap().code.as_deref(), Some(code));
        }
    }

    #[test]
    fn previous_response_id_conversation() {
        // Turn 1: a question answered with a tool call.
        let body1 = obj(
            json!({"model": "m", "instructions": "Old rules.", "input": "Weather in Oslo?",
                               "tools": [{"type": "function", "name": "weather"}]}),
        );
        let chat1 = request_to_chat_with_history(&body1, None).unwrap();
        assert_eq!(chat1["messages"][0]["content"], "Old rules.");
        let answer1 = chat_completion(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}),
            "tool_calls",
        );
        let resp1 = response_from_chat(&answer1, "resp_1", 100, &body1);
        let stored1 = StoredResponse::new(None, &body1, resp1).unwrap();
        assert_eq!(stored1.id(), "resp_1");
        let stored1 = StoredResponse::from_bytes(&stored1.to_bytes()).unwrap();
        assert_eq!(
            stored1.messages,
            vec![
                json!({"role": "user", "content": "Weather in Oslo?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}),
            ]
        );
        // Turn 2: the tool's output, continuing turn 1; new instructions replace the old.
        let body2 = obj(
            json!({"model": "m", "previous_response_id": "resp_1", "instructions": "New rules.",
                               "input": [{"type": "function_call_output", "call_id": "call_1", "output": "12C"}]}),
        );
        let chat2 = request_to_chat_with_history(&body2, Some(&stored1)).unwrap();
        let msgs = chat2["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0], json!({"role": "system", "content": "New rules."}));
        assert_eq!(msgs[1..3], stored1.messages[..]);
        assert_eq!(
            msgs[3],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "12C"})
        );
        assert!(!chat2.contains_key("previous_response_id"));
        let answer2 = chat_completion(
            json!({"role": "assistant", "content": "12C in Oslo."}),
            "stop",
        );
        let resp2 = response_from_chat(&answer2, "resp_2", 101, &body2);
        assert_eq!(resp2["previous_response_id"], "resp_1");
        let stored2 = StoredResponse::new(Some(&stored1), &body2, resp2).unwrap();
        assert_eq!(stored2.messages.len(), 4);
        assert_eq!(
            stored2.messages[3],
            json!({"role": "assistant", "content": "12C in Oslo."})
        );
        assert_eq!(
            input_items_for_history(&stored2, &obj(json!({"input": "Thanks"})))
                .unwrap()
                .len(),
            5
        );
        // With history, an absent input is allowed.
        assert!(request_to_chat_with_history(&obj(json!({"model": "m"})), Some(&stored2)).is_ok());
        // A failed response adds no answer.
        assert!(answer_messages(&json!({"output": []})).is_empty());
        assert_eq!(deleted_object("resp_2")["deleted"], true);
    }

    #[test]
    fn input_items_list_the_conversation_a_response_answered() {
        let body1 = obj(json!({"model": "m", "instructions": "Rules.", "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {"type": "input_image", "image_url": "https://x.test/a.png"}]}]}));
        let answer1 = chat_completion(
            json!({"role": "assistant", "content": "A cat.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]}),
            "tool_calls",
        );
        let stored1 = StoredResponse::new(
            None,
            &body1,
            response_from_chat(&answer1, "resp_ab", 1, &body1),
        )
        .unwrap();
        // The first response's input: its user message only (no
        // instructions, no answer).
        let first = input_items(&stored1);
        assert_eq!(first.len(), 1);
        let mut item = first[0].clone();
        let id = item.as_object_mut().unwrap().remove("id").unwrap();
        assert!(id.as_str().unwrap().starts_with("msg_"), "{id}");
        assert_eq!(
            item,
            json!({"type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": "What is in this picture?"},
                            {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "auto"}]})
        );
        let body2 = obj(
            json!({"model": "m", "previous_response_id": "resp_ab", "input": [
            {"type": "function_call_output", "call_id": "call_1", "output": "whiskers"},
            {"role": "user", "content": "And its colour?"}]}),
        );
        let answer2 = chat_completion(json!({"role": "assistant", "content": "Grey."}), "stop");
        let stored2 = StoredResponse::new(
            Some(&stored1),
            &body2,
            response_from_chat(&answer2, "resp_cd", 2, &body2),
        )
        .unwrap();
        let items = input_items(&stored2);
        let kinds: Vec<_> = items.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "message",
                "message",
                "function_call",
                "function_call_output",
                "message"
            ]
        );
        // The same item keeps its id in every response's listing; ids differ.
        assert_eq!(items[0]["id"], first[0]["id"]);
        let ids: std::collections::BTreeSet<_> =
            items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 5);
        for (i, prefix) in [(1, "msg_"), (2, "fc_"), (3, "fco_"), (4, "msg_")] {
            assert!(
                items[i]["id"].as_str().unwrap().starts_with(prefix),
                "{}",
                items[i]
            );
        }
        assert_eq!(
            items[1]["content"],
            json!([{"type": "output_text", "text": "A cat.", "annotations": []}])
        );
        assert_eq!(items[1]["role"], "assistant");
        assert_eq!(items[2]["call_id"], "call_1");
        assert_eq!(items[2]["name"], "look");
        assert_eq!(items[3]["output"], "whiskers");
        assert_eq!(items[4]["content"][0]["text"], "And its colour?");

        // Pages: newest first by default, then on from the cursor.
        let id = |i: usize| items[i]["id"].as_str().unwrap().to_string();
        let page =
            |q: &str| input_item_list(&stored2, &ItemsQuery::parse(Some(q)).unwrap()).unwrap();
        let ids = |v: &Value| -> Vec<String> {
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        };
        let p1 = page("limit=2");
        assert_eq!(ids(&p1), [id(4), id(3)]);
        assert_eq!(
            (
                p1["first_id"].clone(),
                p1["last_id"].clone(),
                p1["has_more"].clone()
            ),
            (json!(id(4)), json!(id(3)), json!(true))
        );
        assert_eq!(p1["object"], "list");
        let p2 = page(&format!("limit=2&after={}", id(3)));
        assert_eq!(ids(&p2), [id(2), id(1)]);
        assert_eq!(p2["has_more"], true);
        let p3 = page(&format!("limit=2&after={}", id(1)));
        assert_eq!(ids(&p3), [id(0)]);
        assert_eq!(p3["has_more"], false);
        assert_eq!(ids(&page("order=asc&limit=100")).len(), 5);
        let before = page(&format!("order=asc&before={}&limit=1", id(2)));
        assert_eq!(ids(&before), [id(1)]);
        assert_eq!(before["has_more"], true);
        assert_eq!(ids(&page("")).len(), 5);
        let empty = page(&format!("after={}", id(0)));
        assert_eq!(ids(&empty).len(), 0);
        assert_eq!(empty["first_id"], Value::Null);
        // Bad paging is a 400 naming the parameter.
        for (q, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("limit=x", "limit"),
            ("order=up", "order"),
        ] {
            let e = ItemsQuery::parse(Some(q)).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{q}");
        }
        let e = input_item_list(
            &stored2,
            &ItemsQuery::parse(Some("after=msg_zz_1")).unwrap(),
        )
        .unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("after")));
    }
}
