//! Anthropic Messages inbound: Anthropic's SDKs and Claude Code talk to the
//! gateway as they talk to Anthropic. A `/v1/messages` request is validated
//! here (Anthropic-shaped errors), kept byte for byte for Anthropic providers
//! (only `model` is rewritten, see [`splice_model`]) and translated to the
//! gateway's canonical shape, OpenAI Chat Completions, for everything else:
//! routing, the cache and OpenAI-compatible providers. Their answers come back
//! through [`response_from_chat`] (JSON) and [`ChatToMessagesStream`] (SSE,
//! with Anthropic's event sequence).

use crate::error::ApiError;
use crate::openai::{Endpoint, ParsedRequest};
use crate::sse::{SseParser, SseTooLarge, StreamError};
use crate::usage::Usage;
use serde_json::{json, Map, Value};

/// Anthropic's error `type` for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`, Anthropic's error body.
pub fn error_body(e: &ApiError) -> Vec<u8> {
    serde_json::to_vec(&error_json(e.status, &e.message)).unwrap_or_default()
}

/// [`error_body`] with the request's id, as Anthropic's API adds it.
pub fn error_body_with_id(e: &ApiError, request_id: &str) -> Vec<u8> {
    let mut v = error_json(e.status, &e.message);
    v["request_id"] = Value::String(request_id.to_string());
    serde_json::to_vec(&v).unwrap_or_default()
}

fn error_json(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// The error as an Anthropic `event: error`, for streams that fail after
/// bytes reached the client.
pub fn error_event(status: u16, message: &str) -> Vec<u8> {
    event("error", &error_json(status, message))
}

/// An OpenAI-shaped error body (an OpenAI-compatible provider's) in Anthropic's shape.
pub fn error_from_openai(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message").or(Some(e)))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    serde_json::to_vec(&error_json(status, &message)).unwrap_or_default()
}

fn event(name: &str, data: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend(serde_json::to_vec(data).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request("invalid_request", message).with_param(param)
}

/// What a Messages request uses that only Anthropic providers take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnthropicOnly {
    /// Extended thinking asked for, or thinking blocks in the history.
    pub thinking: bool,
    /// Server tools (`web_search_*`, `bash_*`, ...) or blocks no
    /// OpenAI-compatible API has (documents, search results, server tool use):
    /// the first one, by its JSON path.
    pub untranslatable: Option<String>,
    /// Anthropic's `top_k` (no Chat Completions field carries it; the cache
    /// keys on it).
    pub top_k: Option<u64>,
    /// Top-level fields the canonical body does not carry (`output_format`,
    /// `service_tier`, `container`, ...: what Anthropic providers receive in
    /// the raw body), as canonical JSON: the cache keys on them.
    pub extra: Option<String>,
    /// A tool result with parts other than text and images (a document), or
    /// `mcp_servers`: the canonical body goes without them, so the cache is
    /// not used.
    pub lossy: bool,
    /// `role: "system"` messages among the turns (mid-conversation system
    /// messages, which Claude Opus 4.8 takes and Claude Code sends): as
    /// they are to models listed with the `system_messages` capability,
    /// folded into the top-level `system` for other Anthropic models
    /// ([`fold_system_messages`]); OpenAI-compatible providers take them in
    /// place.
    pub system_messages: bool,
    /// The current assistant turn (since the last user message that brings
    /// more than tool results) opened with tool calls and no thinking block
    /// (another model answered it, through a translation that has no place
    /// for one): with thinking on, Claude refuses such a history ("a final
    /// `assistant` message must start with a thinking block"), so an
    /// Anthropic provider gets the request without `thinking`. The later
    /// steps of a tool loop Claude began with its thinking need none.
    pub unsigned_tool_turn: bool,
}

/// The top-level fields of a Messages body that its canonical chat body
/// carries (or that never change the answer: `stream`, `metadata`).
const KNOWN_FIELDS: [&str; 13] = [
    "model",
    "max_tokens",
    "stream",
    "system",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
];

/// OpenAI refuses a `user` longer than 64 characters; Claude Code's
/// `metadata.user_id` runs to about 150. A longer id goes as its sha256
/// (64 hex digits): still one stable id per end user, never a 400.
fn openai_user(id: &str) -> String {
    const OPENAI_MAX_USER: usize = 64;
    if id.chars().count() <= OPENAI_MAX_USER {
        return id.to_string();
    }
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(id.as_bytes()))
}

/// Parse and validate a `/v1/messages` (or `/v1/messages/count_tokens`)
/// body. The canonical body is the Chat Completions request it amounts to;
/// the raw body is kept for Anthropic providers.
pub fn parse(endpoint: Endpoint, bytes: bytes::Bytes) -> Result<ParsedRequest, ApiError> {
    let body = crate::openai::read_object(&bytes)?;
    let count_only = endpoint == Endpoint::MessagesCountTokens;
    let model = match body.get("model") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(invalid("model", "model: must not be empty")),
        None | Some(Value::Null) => return Err(invalid("model", "model: Field required")),
        Some(v) => {
            return Err(invalid(
                "model",
                format!(
                    "model: Input should be a valid string, not {}",
                    type_name(v)
                ),
            ))
        }
    };
    let max_tokens = match body.get("max_tokens") {
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => v.as_u64(),
        None | Some(Value::Null) if count_only => None,
        None | Some(Value::Null) => {
            return Err(invalid("max_tokens", "max_tokens: Field required"))
        }
        Some(_) => {
            return Err(invalid(
                "max_tokens",
                "max_tokens: Input should be an integer greater than or equal to 1",
            ))
        }
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b && !count_only,
        Some(v) => {
            return Err(invalid(
                "stream",
                format!(
                    "stream: Input should be a valid boolean, not {}",
                    type_name(v)
                ),
            ))
        }
    };
    for (param, min, max) in [("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)] {
        if let Some(v) = body.get(param).filter(|v| !v.is_null()) {
            match v.as_f64() {
                Some(n) if (min..=max).contains(&n) => {}
                _ => {
                    return Err(invalid(
                        param,
                        format!("{param}: Input should be a number between {min} and {max}"),
                    ))
                }
            }
        }
    }
    let mut only = AnthropicOnly::default();
    let mut chat = Map::new();
    chat.insert("model".into(), Value::String(model.clone()));
    let mut messages = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                messages.push(json!({"role": "system", "content": s}));
            }
        }
        Some(Value::Array(blocks)) => {
            let mut text = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => text.push(b.get("text").and_then(Value::as_str).unwrap_or("")),
                    _ => {
                        return Err(invalid(
                            &format!("system.{i}"),
                            format!("system.{i}: system blocks must be of type 'text'"),
                        ))
                    }
                }
            }
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text.join("\n\n")}));
            }
        }
        Some(v) => {
            return Err(invalid(
                "system",
                format!(
                    "system: Input should be a valid string or a list of text blocks, not {}",
                    type_name(v)
                ),
            ))
        }
    }
    let Some(turns) = body.get("messages") else {
        return Err(invalid("messages", "messages: Field required"));
    };
    let Value::Array(turns) = turns else {
        return Err(invalid(
            "messages",
            format!(
                "messages: Input should be a valid list, not {}",
                type_name(turns)
            ),
        ));
    };
    if turns.is_empty() && !count_only {
        return Err(invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    // Whether the current turn (since the last user message that brings
    // more than tool results) has had its first assistant message: that
    // one opens with Claude's signed thinking; the later steps of its tool
    // loop need not.
    let mut turn_answered = false;
    for (i, m) in turns.iter().enumerate() {
        let path = format!("messages.{i}");
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            Some("user") => {
                if !carries_tool_results(content) {
                    turn_answered = false;
                    only.unsigned_tool_turn = false;
                }
                user_turn(&path, content, &mut messages, &mut only)?
            }
            Some("assistant") => {
                let unsigned = assistant_turn(&path, content, &mut messages, &mut only)?;
                if !turn_answered {
                    only.unsigned_tool_turn = unsigned;
                    turn_answered = true;
                }
            }
            Some("system") if i == 0 => {
                return Err(invalid(
                    &format!("{path}.role"),
                    format!("{path}.role: a system message cannot be the first message: put it in the top-level `system`"),
                ))
            }
            Some("system") => {
                let text = system_message_text(&path, content)?;
                only.system_messages = true;
                messages.push(json!({"role": "system", "content": text}));
            }
            _ => {
                return Err(invalid(
                    &format!("{path}.role"),
                    format!("{path}.role: Input should be 'user', 'assistant' or 'system'"),
                ))
            }
        }
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = max_tokens {
        chat.insert("max_tokens".into(), json!(n));
    }
    for k in ["temperature", "top_p"] {
        if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
            chat.insert(k.into(), v.clone());
        }
    }
    match body.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                chat.insert("stop".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => {
            return Err(invalid(
                "stop_sequences",
                "stop_sequences: Input should be a list of strings",
            ))
        }
    }
    if let Some(user) = body
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        chat.insert("user".into(), json!(openai_user(user)));
    }
    // Structured outputs (`output_config.format`, or the beta's top-level
    // `output_format`): OpenAI's `json_schema` response format, strict
    // where the schema allows it, so an OpenAI model's answer keeps to the
    // schema the client's parser expects.
    let (format, param) = match body.get("output_config").and_then(|c| c.get("format")) {
        Some(f) => (Some(f), "output_config.format.schema"),
        None => (body.get("output_format"), "output_format.schema"),
    };
    if let Some(format) =
        format.filter(|f| f.get("type").and_then(Value::as_str) == Some("json_schema"))
    {
        let Some(schema) = format.get("schema").filter(|s| s.is_object()) else {
            return Err(invalid(param, format!("{param}: Field required")));
        };
        chat.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {
                "name": "output",
                "schema": schema,
                "strict": strict_compatible(schema),
            }}),
        );
    }
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        let Value::Array(tools) = tools else {
            return Err(invalid("tools", "tools: Input should be a valid list"));
        };
        let mut out = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let custom = matches!(t.get("type").and_then(Value::as_str), None | Some("custom"));
            let Some(name) = t.get("name").and_then(Value::as_str) else {
                return Err(invalid(
                    &format!("tools.{i}.name"),
                    format!("tools.{i}.name: Field required"),
                ));
            };
            if !custom {
                only.untranslatable
                    .get_or_insert(format!("tools.{i} ({name})"));
                continue;
            }
            let mut f = json!({"name": name, "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            // Strict tool use: OpenAI's strict function calling, where the
            // schema allows it (its 400 otherwise).
            if t.get("strict").and_then(Value::as_bool) == Some(true)
                && strict_compatible(&f["parameters"])
            {
                f["strict"] = json!(true);
            }
            out.push(json!({"type": "function", "function": f}));
        }
        if !out.is_empty() {
            chat.insert("tools".into(), Value::Array(out));
        }
    }
    if let Some(tc) = body.get("tool_choice").filter(|v| !v.is_null()) {
        let choice = match tc.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => match tc
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                Some(name) => json!({"type": "function", "function": {"name": name}}),
                None => {
                    return Err(invalid(
                        "tool_choice.tool.name",
                        "tool_choice.tool.name: Field required",
                    ))
                }
            },
            _ => {
                return Err(invalid(
                    "tool_choice.type",
                    "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
                ))
            }
        };
        chat.insert("tool_choice".into(), choice);
        if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    // Any mode but `disabled` (`enabled` with a budget, `adaptive`, which
    // newer models take): thinking asked for, which the cache must neither
    // key away nor serve to a request without it.
    if body
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "disabled")
    {
        only.thinking = true;
    }
    // (Only a request with thinking has anything to drop.)
    only.unsigned_tool_turn &= only.thinking;
    only.top_k = body.get("top_k").and_then(Value::as_u64);
    let extra: serde_json::Map<String, Value> = body
        .iter()
        .filter(|(k, v)| !KNOWN_FIELDS.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // MCP servers answer with blocks the chat answer has no place for.
    only.lossy |= extra.contains_key("mcp_servers");
    // Anthropic's API itself runs these (MCP servers it connects to, the
    // code-execution container and its skills): an OpenAI-compatible
    // provider would answer without them, so they go to Anthropic models
    // only (`auto` routes them there).
    for field in ["mcp_servers", "container"] {
        let asked = match extra.get(field) {
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
            None => false,
        };
        if asked {
            only.untranslatable.get_or_insert(field.to_string());
        }
    }
    if !extra.is_empty() {
        // Keys of serde_json maps are sorted: canonical.
        only.extra = Some(Value::Object(extra).to_string());
    }
    if stream {
        chat.insert("stream".into(), json!(true));
    }
    Ok(ParsedRequest {
        endpoint,
        body: chat,
        model,
        stream,
        // The Messages stream always ends with its usage (message_delta).
        client_wants_usage: true,
        native: Some(bytes),
        anthropic_only: only,
        responses: None,
    })
}

/// The text of a `role: "system"` message: a string, or text blocks only
/// (as Anthropic takes them).
fn system_message_text(path: &str, content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push(t.as_str()),
                    _ => {
                        return Err(invalid(
                            &format!("{path}.content.{j}"),
                            format!("{path}.content.{j}: a system message takes text blocks only"),
                        ))
                    }
                }
            }
            Ok(text.join("\n\n"))
        }
        v => Err(invalid(
            &format!("{path}.content"),
            format!(
                "{path}.content: Input should be a valid string or list of text blocks, not {}",
                type_name(v)
            ),
        )),
    }
}

/// `raw` (a Messages body) with its `role: "system"` messages taken out of
/// `messages` and their text blocks appended, in order, to the top-level
/// `system` (a string there becomes its first text block), every other
/// byte unchanged: for Anthropic models that do not take mid-conversation
/// system messages (all but those listed with `system_messages`). The
/// instructions keep a system prompt's authority, though they then apply
/// from the start of the conversation (and the provider's prompt cache of
/// the turns is missed once when one is added). Their `cache_control` is
/// dropped. `None` when there is none to fold.
pub fn fold_system_messages(raw: &[u8]) -> Option<Vec<u8>> {
    let Value::Array(turns) = top_level(raw, "messages")? else {
        return None;
    };
    let is_system = |m: &Value| m.get("role").and_then(Value::as_str) == Some("system");
    if !turns.iter().any(is_system) {
        return None;
    }
    let mut system = match top_level(raw, "system") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(blocks)) => blocks,
        Some(_) => return None,
    };
    let mut kept = Vec::with_capacity(turns.len());
    for m in turns {
        if !is_system(&m) {
            kept.push(m);
            continue;
        }
        match m.get("content") {
            Some(Value::String(s)) if !s.is_empty() => {
                system.push(json!({"type": "text", "text": s}))
            }
            // Text only, without `cache_control`: a breakpoint moved ahead
            // of the turns could precede one with a longer `ttl`, which
            // Anthropic refuses.
            Some(Value::Array(blocks)) => system.extend(blocks.iter().filter_map(|b| {
                let text = b.get("text")?.as_str()?;
                Some(json!({"type": "text", "text": text}))
            })),
            _ => {}
        }
    }
    let out = set_top_level(raw, "messages", &Value::Array(kept))?;
    set_top_level(&out, "system", &Value::Array(system))
}

fn image_part(source: &Value) -> Option<Value> {
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = source.get("media_type").and_then(Value::as_str)?;
            let data = source.get("data").and_then(Value::as_str)?;
            Some(
                json!({"type": "image_url", "image_url": {"url": format!("data:{media};base64,{data}")}}),
            )
        }
        Some("url") => {
            let url = source.get("url").and_then(Value::as_str)?;
            Some(json!({"type": "image_url", "image_url": {"url": url}}))
        }
        _ => None,
    }
}

/// A turn's content blocks; a string content is pushed as the whole turn
/// (`None`: nothing left to do).
fn turn_blocks<'a>(
    path: &str,
    role: &str,
    content: &'a Value,
    out: &mut Vec<Value>,
) -> Result<Option<&'a Vec<Value>>, ApiError> {
    match content {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            Ok(None)
        }
        Value::Array(b) => Ok(Some(b)),
        v => Err(invalid(
            &format!("{path}.content"),
            format!(
                "{path}.content: Input should be a valid string or list of content blocks, not {}",
                type_name(v)
            ),
        )),
    }
}

/// A user turn: its `tool_result` blocks become `tool` messages (first, as
/// OpenAI wants them right after the assistant's calls), the rest one user
/// message.
fn user_turn(
    path: &str,
    content: &Value,
    out: &mut Vec<Value>,
    only: &mut AnthropicOnly,
) -> Result<(), ApiError> {
    let Some(blocks) = turn_blocks(path, "user", content, out)? else {
        return Ok(());
    };
    let mut parts = Vec::new();
    // Images a tool returned (Claude Code's Read of a PNG): a `tool` message
    // holds text only, so they follow in the user message after the results.
    let mut tool_images = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bpath = format!("{path}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                parts.push(json!({"type": "text", "text": b.get("text").and_then(Value::as_str).unwrap_or("")}))
            }
            Some("image") => match b.get("source").and_then(image_part) {
                Some(p) => parts.push(p),
                None => {
                    only.untranslatable.get_or_insert(bpath);
                }
            },
            Some("tool_result") => {
                let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                let text = match b.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => {
                        let mut text = Vec::new();
                        for (k, p) in inner.iter().enumerate() {
                            match p.get("type").and_then(Value::as_str) {
                                Some("text") => {
                                    text.push(p.get("text").and_then(Value::as_str).unwrap_or(""))
                                }
                                Some("image") => match p.get("source").and_then(image_part) {
                                    Some(img) => tool_images.push(img),
                                    None => {
                                        only.untranslatable
                                            .get_or_insert(format!("{bpath}.content.{k}"));
                                    }
                                },
                                // Documents, search results: their text is
                                // not in the block; the chat body goes
                                // without them (lossy: never cached), as a
                                // session's history keeps them for good.
                                _ => only.lossy = true,
                            }
                        }
                        text.join("\n")
                    }
                    _ => String::new(),
                };
                let text = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    format!("Error: {text}")
                } else {
                    text
                };
                out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
            }
            Some(_) => {
                only.untranslatable.get_or_insert(bpath);
            }
            None => {
                return Err(invalid(
                    &format!("{bpath}.type"),
                    format!("{bpath}.type: Field required"),
                ))
            }
        }
    }
    if !tool_images.is_empty() {
        tool_images.push(
            json!({"type": "text", "text": "(The images above were returned by the tool calls.)"}),
        );
        tool_images.append(&mut parts);
        parts = tool_images;
    }
    if !parts.is_empty() {
        let content = if parts.len() == 1 && parts[0]["type"] == "text" {
            parts[0]["text"].clone()
        } else {
            Value::Array(parts)
        };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

fn assistant_turn(
    path: &str,
    content: &Value,
    out: &mut Vec<Value>,
    only: &mut AnthropicOnly,
) -> Result<bool, ApiError> {
    let Some(blocks) = turn_blocks(path, "assistant", content, out)? else {
        return Ok(false);
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(json!("")),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(json!("")),
                    "arguments": serde_json::to_string(b.get("input").unwrap_or(&json!({}))).unwrap_or_default(),
                },
            })),
            Some("thinking") | Some("redacted_thinking") => only.thinking = true,
            _ => {
                only.untranslatable
                    .get_or_insert(format!("{path}.content.{j}"));
            }
        }
    }
    let opens_with_thinking = blocks.first().is_some_and(|b| {
        matches!(
            b.get("type").and_then(Value::as_str),
            Some("thinking" | "redacted_thinking")
        )
    });
    let unsigned = !calls.is_empty() && !opens_with_thinking;
    let mut m = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        if text.is_empty() {
            m["content"] = Value::Null;
        }
        m["tool_calls"] = Value::Array(calls);
    }
    out.push(m);
    Ok(unsigned)
}

/// Whether OpenAI's strict mode takes `schema` (its 400 otherwise, and the
/// schema goes as guidance): an object at the root; every object lists all
/// its properties as required and allows no others; only the keywords and
/// string formats strict mode supports (`allOf`, `oneOf`, `not`, `if`,
/// `prefixItems`, `patternProperties`, a `uri` format... are not).
pub fn strict_compatible(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object") && strict_node(schema)
}

fn strict_node(schema: &Value) -> bool {
    const KEYWORDS: [&str; 22] = [
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "anyOf",
        "$defs",
        "definitions",
        "$ref",
        "enum",
        "const",
        "description",
        "title",
        "format",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
    ];
    const FORMATS: [&str; 9] = [
        "date-time",
        "time",
        "date",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uuid",
    ];
    let Some(o) = schema.as_object() else {
        return false;
    };
    if !o.keys().all(|k| KEYWORDS.contains(&k.as_str())) {
        return false;
    }
    if o.get("format")
        .is_some_and(|f| !f.as_str().is_some_and(|f| FORMATS.contains(&f)))
    {
        return false;
    }
    let object =
        o.get("type").and_then(Value::as_str) == Some("object") || o.contains_key("properties");
    if object {
        if o.get("additionalProperties") != Some(&Value::Bool(false)) {
            return false;
        }
        let props = match o.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return false,
        };
        let required: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = props {
            if !props.keys().all(|k| required.contains(&k.as_str()))
                || !props.values().all(strict_node)
            {
                return false;
            }
        }
    }
    let all = |v: Option<&Value>, many: bool| match v {
        None => true,
        Some(Value::Array(a)) if many => a.iter().all(strict_node),
        Some(v) if !many => strict_node(v),
        Some(_) => false,
    };
    let defs = |k: &str| match o.get(k) {
        None => true,
        Some(Value::Object(m)) => m.values().all(strict_node),
        Some(_) => false,
    };
    all(o.get("items"), false) && all(o.get("anyOf"), true) && defs("$defs") && defs("definitions")
}

/// A user message that answers tool calls (and so goes on with the
/// assistant's turn rather than starting a new one).
fn carries_tool_results(content: &Value) -> bool {
    content.as_array().is_some_and(|blocks| {
        blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
    })
}

/// `raw` (a JSON object) with its top-level `model` set to `model`, every
/// other byte unchanged, so a provider's prompt cache (`cache_control`
/// blocks) sees exactly what the client sent. `None` when `raw` has no
/// top-level `model` string.
pub fn splice_model(raw: &[u8], model: &str) -> Option<Vec<u8>> {
    match splice(raw, model)? {
        None => Some(raw.to_vec()),
        Some(out) => Some(out),
    }
}

/// [`splice_model`] on a shared buffer: when the name is already `model`,
/// the same buffer (no copy of a large prompt).
pub fn splice_model_bytes(raw: &bytes::Bytes, model: &str) -> Option<bytes::Bytes> {
    match splice(raw, model)? {
        None => Some(raw.clone()),
        Some(out) => Some(out.into()),
    }
}

/// `Some(None)`: `raw`'s model is already `model`.
fn splice(raw: &[u8], model: &str) -> Option<Option<Vec<u8>>> {
    let (start, end) = top_level_value(raw, "model")?;
    if raw.get(start) != Some(&b'"') {
        return None;
    }
    let new = serde_json::to_vec(model).ok()?;
    if raw[start..end] == new[..] {
        return Some(None);
    }
    let mut out = Vec::with_capacity(raw.len() + new.len());
    out.extend_from_slice(&raw[..start]);
    out.extend_from_slice(&new);
    out.extend_from_slice(&raw[end..]);
    Some(Some(out))
}

/// The OpenAI `reasoning_effort` that an Anthropic `thinking` setting asks
/// of a reasoning model: by its budget, under 4,096 tokens `low`, under
/// 16,384 `medium`, else `high` (Claude Code's 31,999: `high`). `None` for
/// `disabled`, for `adaptive` (the model's own default then decides) and
/// for anything else.
pub fn effort_for_thinking(thinking: &Value) -> Option<&'static str> {
    if thinking.get("type").and_then(Value::as_str) != Some("enabled") {
        return None;
    }
    let budget = thinking.get("budget_tokens").and_then(Value::as_u64)?;
    Some(match budget {
        0..4096 => "low",
        4096..16384 => "medium",
        _ => "high",
    })
}

/// `raw` (a JSON object) with its top-level `key` set to `value` (added
/// first when absent), every other byte unchanged. `None` when `raw` is no
/// JSON object.
pub fn set_top_level(raw: &[u8], key: &str, value: &Value) -> Option<Vec<u8>> {
    let new = serde_json::to_vec(value).ok()?;
    let mut out = Vec::with_capacity(raw.len() + key.len() + new.len() + 4);
    match top_level_value(raw, key) {
        Some((start, end)) => {
            out.extend_from_slice(&raw[..start]);
            out.extend_from_slice(&new);
            out.extend_from_slice(&raw[end..]);
        }
        None => {
            let open = raw.iter().position(|b| !b.is_ascii_whitespace())?;
            if raw[open] != b'{' {
                return None;
            }
            let empty = raw[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b'}');
            out.extend_from_slice(&raw[..=open]);
            out.extend(serde_json::to_vec(key).ok()?);
            out.push(b':');
            out.extend_from_slice(&new);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(&raw[open + 1..]);
        }
    }
    Some(out)
}

/// `raw` (a JSON object) without its top-level member `key` (and the comma
/// that joined it), every other byte unchanged; every copy of the key goes.
/// `None` when there is no such member (or `raw` is no JSON object).
pub fn remove_top_level(raw: &[u8], key: &str) -> Option<Vec<u8>> {
    let (from, to) = top_level_member(raw, key)?;
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..from]);
    out.extend_from_slice(&raw[to..]);
    Some(remove_top_level(&out, key).unwrap_or(out))
}

/// The byte span of the top-level member `key` in the JSON object `raw`,
/// with the comma after it (or, for the last member, the one before it).
fn top_level_member(raw: &[u8], key: &str) -> Option<(usize, usize)> {
    let ws = |i: &mut usize| {
        while *i < raw.len() && raw[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let mut i = 0;
    ws(&mut i);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut comma_before = None;
    loop {
        ws(&mut i);
        if raw.get(i) != Some(&b'"') {
            return None;
        }
        let kstart = i;
        i = skip_string(raw, i)?;
        let name: String = serde_json::from_slice(&raw[kstart..i]).ok()?;
        ws(&mut i);
        if raw.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        i = skip_value(raw, i)?;
        let vend = i;
        ws(&mut i);
        if name == key {
            return match raw.get(i) {
                Some(b',') => Some((kstart, i + 1)),
                _ => Some((comma_before.unwrap_or(kstart), vend)),
            };
        }
        match raw.get(i) {
            Some(b',') => {
                comma_before = Some(i);
                i += 1;
            }
            _ => return None,
        }
    }
}

/// The value of `raw`'s top-level `key`, parsed (only that span is read).
pub fn top_level(raw: &[u8], key: &str) -> Option<Value> {
    let (start, end) = top_level_value(raw, key)?;
    serde_json::from_slice(&raw[start..end]).ok()
}

/// `raw` with its top-level `key`, when it is a number above `most`, set to
/// `most`; `None` when there is nothing to lower.
pub fn clamp_top_level(raw: &[u8], key: &str, most: u64) -> Option<Vec<u8>> {
    let (start, end) = top_level_value(raw, key)?;
    let n: u64 = std::str::from_utf8(&raw[start..end]).ok()?.parse().ok()?;
    if n <= most {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..start]);
    out.extend_from_slice(most.to_string().as_bytes());
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

/// The byte span of the value of top-level key `key` in the JSON object
/// `raw` (which has been parsed successfully, so it is well formed).
fn top_level_value(raw: &[u8], key: &str) -> Option<(usize, usize)> {
    let ws = |i: &mut usize| {
        while *i < raw.len() && raw[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let mut i = 0;
    ws(&mut i);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        ws(&mut i);
        if raw.get(i) != Some(&b'"') {
            return None;
        }
        let kstart = i;
        i = skip_string(raw, i)?;
        let name: String = serde_json::from_slice(&raw[kstart..i]).ok()?;
        ws(&mut i);
        if raw.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let vstart = i;
        i = skip_value(raw, i)?;
        if name == key {
            return Some((vstart, i));
        }
        ws(&mut i);
        match raw.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// Index just past the string starting at `i` (a `"`). Jumps from quote to
/// quote (SIMD `memchr`) over the text, escapes included: a quote ends the
/// string unless an odd run of backslashes comes before it. A prompt's text
/// is most of a large body, and the client's key order often puts `model`
/// after it.
fn skip_string(raw: &[u8], i: usize) -> Option<usize> {
    let mut at = i + 1;
    loop {
        let q = at + memchr::memchr(b'"', raw.get(at..)?)?;
        // The opening quote bounds the run.
        let run = raw[..q].iter().rev().take_while(|b| **b == b'\\').count();
        if run % 2 == 0 {
            return Some(q + 1);
        }
        at = q + 1;
    }
}

/// Index just past the value starting at `i`.
fn skip_value(raw: &[u8], mut i: usize) -> Option<usize> {
    match raw.get(i)? {
        b'"' => skip_string(raw, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            while i < raw.len() {
                match raw[i] {
                    b'"' => {
                        i = skip_string(raw, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            while i < raw.len()
                && !matches!(raw[i], b',' | b'}' | b']')
                && !raw[i].is_ascii_whitespace()
            {
                i += 1;
            }
            Some(i)
        }
    }
}

fn stop_reason(finish: Option<&str>) -> Value {
    match finish {
        Some("length") => json!("max_tokens"),
        Some("tool_calls") | Some("function_call") => json!("tool_use"),
        Some("content_filter") => json!("refusal"),
        Some(_) => json!("end_turn"),
        None => Value::Null,
    }
}

/// Anthropic's `usage` for a canonical usage (OpenAI's `prompt_tokens`
/// include cache reads; Anthropic's `input_tokens` do not).
pub fn usage_json(u: &Usage) -> Value {
    let mut v = json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens + u.cache_write_tokens),
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_tokens,
    });
    if u.cache_write_tokens > 0 {
        v["cache_creation"] = json!({
            "ephemeral_5m_input_tokens": u.cache_write_tokens - u.cache_write_1h_tokens.min(u.cache_write_tokens),
            "ephemeral_1h_input_tokens": u.cache_write_1h_tokens,
        });
    }
    // Reasoning inside the output, as Anthropic breaks it down.
    if u.reasoning_tokens > 0 {
        v["output_tokens_details"] = json!({"thinking_tokens": u.reasoning_tokens});
    }
    v
}

/// `msg_…` from a chat completion's id; a fresh one when the provider gave
/// none (or an empty one: Azure's first chunk).
fn message_id(chat_id: Option<&str>) -> String {
    let s = chat_id
        .map(|id| {
            id.strip_prefix("chatcmpl-")
                .unwrap_or(id)
                .trim_start_matches("msg_")
        })
        .unwrap_or_default();
    if s.is_empty() {
        return fresh_message_id();
    }
    format!("msg_{s}")
}

/// A message id no other answer has (`msg_` and 24 hex digits): the clock
/// in nanoseconds and a count kept for the whole process.
fn fresh_message_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("msg_{nanos:016x}{n:08x}")
}

/// A chat tool call's id, when it has one (not missing, null or empty).
fn call_id(call: &Value) -> Option<&str> {
    call.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
}

/// A `tool_use` id for a tool call that came without one (Anthropic's
/// clients need one, and a different one for each call): `toolu_`, the
/// message id's suffix and the call's block index.
fn fallback_tool_id(message: &str, block: u64) -> String {
    let s = message.strip_prefix("msg_").unwrap_or(message);
    format!("toolu_{s}_{block}")
}

/// A `chat.completion` as an Anthropic `message`.
pub fn response_from_chat(chat: &Value, model: &str) -> Value {
    let choice = &chat["choices"][0];
    let msg = &choice["message"];
    let id = message_id(chat.get("id").and_then(Value::as_str));
    let mut content = Vec::new();
    if let Some(t) = msg.get("content").and_then(crate::openai::content_text_of) {
        if !t.is_empty() {
            content.push(json!({"type": "text", "text": t}));
        }
    }
    // OpenAI's refusal is its own field; Anthropic's is the answer's text
    // with the `refusal` stop reason (else the client reads an empty answer).
    let refusal = msg
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    if let Some(r) = refusal {
        content.push(json!({"type": "text", "text": r}));
    }
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        for c in calls {
            let f = &c["function"];
            let input: Value = f
                .get("arguments")
                .and_then(Value::as_str)
                .and_then(arguments_object)
                .map_or_else(|| json!({}), Value::Object);
            let tool_id = call_id(c).map_or_else(
                || fallback_tool_id(&id, content.len() as u64),
                str::to_string,
            );
            content.push(json!({"type": "tool_use", "id": tool_id,
                "name": f.get("name").cloned().unwrap_or(json!("")), "input": input}));
        }
    }
    let usage = Usage::from_openai(chat).unwrap_or_default();
    // Some servers finish a tool call with "stop": an agent loop waits for
    // `tool_use`.
    let called = content.iter().any(|b| b["type"] == "tool_use");
    let finish = match choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .filter(|f| !f.is_empty())
    {
        Some("stop") | None if called => Some("tool_calls"),
        Some("stop") | None if refusal.is_some() => Some("content_filter"),
        f => f,
    };
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": chat.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()).unwrap_or(model),
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": usage_json(&usage),
    })
}

/// Which content block is open in a translated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    /// The tool call (its slot, see `ToolCallIndex`) this block carries.
    Tool(u64),
}

/// The streamed tool call's arguments, checked as they come: passed on
/// while they are a valid beginning of a JSON object ([`JsonPrefix`]), and
/// from the first byte that cannot continue one, left out (arguments that
/// are no object at all give `{}`; broken ones end at what was valid, which
/// Anthropic's SDKs close as they close a stream cut short), so the client's
/// SDK is never handed text it fails to parse partway through the stream.
/// Leading white space waits for what follows it.
#[derive(Debug, Default)]
struct LiveArgs {
    scan: JsonPrefix,
    /// White space before the object opens.
    pending: String,
    dropped: bool,
}

impl LiveArgs {
    /// What to send of `args`, the next part of the arguments.
    /// (Borrowed from `args` but for the chunk that opens the object after
    /// white space: no copy per chunk.)
    fn feed<'a>(&mut self, args: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        if self.dropped || args.is_empty() {
            return None;
        }
        let valid = self.scan.feed(args.as_bytes());
        let ok = &args[..valid];
        if valid < args.len() {
            self.dropped = true;
        }
        if !self.scan.opened {
            // Only white space so far (or nothing valid at all).
            self.pending.push_str(ok);
            return None;
        }
        if self.pending.is_empty() {
            return (!ok.is_empty()).then_some(std::borrow::Cow::Borrowed(ok));
        }
        let mut out = std::mem::take(&mut self.pending);
        out.push_str(ok);
        Some(std::borrow::Cow::Owned(out))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A value (the top level: an object only).
    Value,
    /// A value or `]` (right after `[`).
    ValueOrEnd,
    /// A key or `}` (right after `{`).
    KeyOrEnd,
    /// A key (after a `,` in an object).
    Key,
    Colon,
    CommaOrEnd,
}

/// An incremental check that bytes are a valid beginning of one JSON
/// object: strings with their escapes, literals, numbers (loosely),
/// nesting and separators; a trailing comma, single quotes, a raw control
/// character in a string or anything after the object ends are not.
#[derive(Debug)]
struct JsonPrefix {
    /// Open containers: true for an object.
    stack: Vec<bool>,
    expect: Expect,
    in_str: bool,
    str_is_key: bool,
    esc: bool,
    /// Hex digits of a `\u` escape still to come.
    hex: u8,
    /// A literal under way: its bytes and how many came.
    lit: Option<(&'static [u8], usize)>,
    num: bool,
    /// The object opened (its `{` came).
    opened: bool,
    /// The object closed: only white space may follow.
    closed: bool,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            stack: Vec::new(),
            expect: Expect::Value,
            in_str: false,
            str_is_key: false,
            esc: false,
            hex: 0,
            lit: None,
            num: false,
            opened: false,
            closed: false,
        }
    }
}

impl JsonPrefix {
    /// Take `bytes`; how many of them keep the text a valid beginning of
    /// an object (all of them, or up to the first that does not).
    fn feed(&mut self, bytes: &[u8]) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            if !self.byte(b) {
                return i;
            }
        }
        bytes.len()
    }

    fn byte(&mut self, b: u8) -> bool {
        if self.in_str {
            if self.hex > 0 {
                self.hex -= 1;
                return b.is_ascii_hexdigit();
            }
            if self.esc {
                self.esc = false;
                return match b {
                    b'u' => {
                        self.hex = 4;
                        true
                    }
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => true,
                    _ => false,
                };
            }
            match b {
                b'\\' => self.esc = true,
                b'"' => {
                    self.in_str = false;
                    self.expect = if self.str_is_key {
                        Expect::Colon
                    } else {
                        Expect::CommaOrEnd
                    };
                }
                0..=0x1f => return false,
                _ => {}
            }
            return true;
        }
        if let Some((word, n)) = self.lit {
            if word.get(n) != Some(&b) {
                return false;
            }
            self.lit = (n + 1 < word.len()).then_some((word, n + 1));
            if self.lit.is_none() {
                self.expect = Expect::CommaOrEnd;
            }
            return true;
        }
        if self.num {
            if matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                return true;
            }
            self.num = false;
            self.expect = Expect::CommaOrEnd;
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return true;
        }
        if self.closed {
            return false;
        }
        if !self.opened {
            // The top level is an object.
            if b != b'{' {
                return false;
            }
            self.opened = true;
        }
        match self.expect {
            Expect::ValueOrEnd if b == b']' => self.close(false),
            Expect::Value | Expect::ValueOrEnd => match b {
                b'{' => {
                    self.stack.push(true);
                    self.expect = Expect::KeyOrEnd;
                    true
                }
                b'[' => {
                    self.stack.push(false);
                    self.expect = Expect::ValueOrEnd;
                    true
                }
                b'"' => {
                    self.in_str = true;
                    self.str_is_key = false;
                    true
                }
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                b'n' => self.literal(b"null"),
                b'-' | b'0'..=b'9' => {
                    self.num = true;
                    true
                }
                _ => false,
            },
            Expect::KeyOrEnd if b == b'}' => self.close(true),
            Expect::KeyOrEnd | Expect::Key => {
                self.in_str = b == b'"';
                self.str_is_key = true;
                self.in_str
            }
            Expect::Colon => {
                self.expect = Expect::Value;
                b == b':'
            }
            Expect::CommaOrEnd => match (b, self.stack.last()) {
                (b',', Some(&object)) => {
                    self.expect = if object { Expect::Key } else { Expect::Value };
                    true
                }
                (b'}', Some(true)) => self.close(true),
                (b']', Some(false)) => self.close(false),
                _ => false,
            },
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> bool {
        self.lit = Some((word, 1));
        true
    }

    fn close(&mut self, object: bool) -> bool {
        if self.stack.pop() != Some(object) {
            return false;
        }
        self.expect = Expect::CommaOrEnd;
        self.closed = self.stack.is_empty();
        true
    }
}

/// A tool call held until the answer ends (see `ChatToMessagesStream`).
#[derive(Debug, Default)]
struct HeldCall {
    index: u64,
    id: String,
    name: String,
    arguments: String,
}

/// OpenAI `chat.completion.chunk` SSE in, Anthropic Messages events out:
/// `message_start`, `ping`, `content_block_start` / `_delta` / `_stop` for
/// text and each tool call, `message_delta` (stop reason and usage, input
/// tokens included) and `message_stop`. An error event becomes
/// `event: error` and ends the stream.
#[derive(Debug)]
pub struct ChatToMessagesStream {
    parser: SseParser,
    model: String,
    input_estimate: u64,
    started: bool,
    /// The message id `message_start` gave (tool calls without an id of
    /// their own are named after it).
    id: String,
    block: u64,
    open: Open,
    tool_index: crate::openai::ToolCallIndex,
    /// The tool call streamed live (its slot) and its block.
    live_tool: Option<(u64, u64)>,
    live_args: LiveArgs,
    /// The other tool calls, held whole until the answer ends.
    held: Vec<HeldCall>,
    /// Text that came while a tool call's block was open (a block, once
    /// stopped, is done: the call's later arguments still need it open),
    /// sent as a text block of its own after the tool calls.
    deferred: String,
    /// A tool call was streamed (its stop reason is `tool_use` whatever the
    /// provider's finish reason says).
    called: bool,
    /// The model refused (OpenAI's `refusal` deltas, sent as text): its
    /// stop reason is `refusal`.
    refused: bool,
    stop: Value,
    usage: Option<Usage>,
    /// Bytes of text and tool arguments streamed: the output estimated
    /// (about 4 bytes a token) for a provider that reports no usage.
    generated_bytes: usize,
    /// `message_stop` (or an error event) was sent: nothing more follows.
    pub done: bool,
}

impl ChatToMessagesStream {
    /// `input_estimate`: the input tokens `message_start` reports before the
    /// provider's usage arrives (the exact figure follows in `message_delta`).
    pub fn new(model: &str, input_estimate: u64) -> Self {
        ChatToMessagesStream {
            parser: SseParser::default(),
            model: model.to_string(),
            input_estimate,
            started: false,
            id: String::new(),
            block: 0,
            open: Open::None,
            tool_index: Default::default(),
            live_tool: None,
            live_args: LiveArgs::default(),
            held: Vec::new(),
            deferred: String::new(),
            called: false,
            refused: false,
            stop: Value::Null,
            usage: None,
            generated_bytes: 0,
            done: false,
        }
    }

    fn start(&mut self, chunk: Option<&Value>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = message_id(chunk.and_then(|c| c.get("id")).and_then(Value::as_str));
        if let Some(m) = chunk.and_then(|c| c.get("model")).and_then(Value::as_str) {
            if !m.is_empty() {
                self.model = m.to_string();
            }
        }
        out.extend(event(
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.input_estimate, "output_tokens": 0,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
        ));
        out.extend(event("ping", &json!({"type": "ping"})));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.open != Open::None {
            out.extend(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.block}),
            ));
            self.block += 1;
            self.open = Open::None;
        }
    }

    /// Send text: in the open text block, or in a new one.
    fn text(&mut self, t: &str, out: &mut Vec<u8>) {
        if self.open != Open::Text {
            self.close(out);
            out.extend(event(
                "content_block_start",
                &json!({"type": "content_block_start",
                "index": self.block, "content_block": {"type": "text", "text": ""}}),
            ));
            self.open = Open::Text;
        }
        out.extend(event(
            "content_block_delta",
            &json!({"type": "content_block_delta",
            "index": self.block, "delta": {"type": "text_delta", "text": t}}),
        ));
    }

    /// Close the open block, then send each held tool call whole, then the
    /// text that came while a tool call's block was open.
    fn flush_held(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        for h in std::mem::take(&mut self.held) {
            let id = if h.id.is_empty() {
                fallback_tool_id(&self.id, self.block)
            } else {
                h.id
            };
            out.extend(event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": self.block,
                    "content_block": {"type": "tool_use", "id": id, "name": h.name, "input": {}}}),
            ));
            // Whole by now: sent as an object (a truncated one closed, one
            // that is no object at all left out: `{}`), never as JSON the
            // client's SDK fails to parse.
            if let Some(args) = arguments_object(&h.arguments) {
                let args = Value::Object(args).to_string();
                out.extend(event("content_block_delta", &json!({"type": "content_block_delta",
                    "index": self.block, "delta": {"type": "input_json_delta", "partial_json": args}})));
            }
            out.extend(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.block}),
            ));
            self.block += 1;
        }
        let deferred = std::mem::take(&mut self.deferred);
        if !deferred.is_empty() {
            self.text(&deferred, out);
            self.close(out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.start(None, out);
        self.flush_held(out);
        // No finish reason came: an answer that called a tool ends for it.
        let stop = match &self.stop {
            Value::Null if self.called => stop_reason(Some("tool_calls")),
            Value::Null if self.refused => stop_reason(Some("content_filter")),
            Value::Null => json!("end_turn"),
            stop => stop.clone(),
        };
        // A provider that reports no usage (`stream_usage: false`): the
        // estimates (the gateway bills its own, marked as such).
        let usage = self.usage.unwrap_or(Usage {
            prompt_tokens: self.input_estimate,
            completion_tokens: (self.generated_bytes as u64).div_ceil(4),
            ..Usage::default()
        });
        out.extend(event(
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": usage_json(&usage)}),
        ));
        out.extend(event("message_stop", &json!({"type": "message_stop"})));
        self.done = true;
    }

    /// Feed chat SSE bytes; returns Messages SSE bytes to send now.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, SseTooLarge> {
        let mut out = Vec::new();
        for ev in self.parser.feed(chunk)? {
            if self.done {
                break;
            }
            if ev.is_done() {
                self.finish(&mut out);
                break;
            }
            if let Some(e) = StreamError::from_event(&ev) {
                // The provider's (or the gateway's own) error as the type an
                // Anthropic client retries on: its code first (more precise),
                // then its type.
                let status = match (e.code.as_deref(), e.kind.as_deref()) {
                    (Some("rate_limit_exceeded"), _) | (_, Some("rate_limit_error")) => 429,
                    (Some("upstream_timeout"), _) => 504,
                    (Some("server_shutting_down" | "overloaded"), _)
                    | (_, Some("overloaded_error")) => 529,
                    (Some("context_length_exceeded"), _) | (_, Some("invalid_request_error")) => {
                        400
                    }
                    _ => 500,
                };
                out.extend(error_event(status, &e.message));
                self.done = true;
                break;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            // `message_start` waits for a chunk that names the answer or
            // carries some of it: Azure's first chunk (prompt filter
            // results) has an empty id and no choices.
            let has_choices = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty());
            let named = v
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|i| !i.is_empty());
            if has_choices || named {
                self.start(Some(&v), &mut out);
            }
            if let Some(u) = Usage::from_openai(&v) {
                self.usage = Some(u);
            }
            let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
                continue;
            };
            let delta = &choice["delta"];
            if let Some(t) = delta
                .get("content")
                .and_then(crate::openai::content_text_of)
                .filter(|t| !t.is_empty())
            {
                self.generated_bytes += t.len();
                match self.open {
                    // A tool call's block stays open for the call's later
                    // arguments: text between them (often a bare newline)
                    // waits until the tool calls are sent; blank text is
                    // dropped.
                    Open::Tool(_) => {
                        if !t.trim().is_empty() {
                            self.deferred.push_str(&t);
                        }
                    }
                    Open::None | Open::Text => self.text(&t, &mut out),
                }
            }
            if let Some(t) = delta
                .get("refusal")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.generated_bytes += t.len();
                self.refused = true;
                match self.open {
                    Open::Tool(_) => self.deferred.push_str(t),
                    Open::None | Open::Text => self.text(t, &mut out),
                }
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for c in calls {
                    let idx = self.tool_index.of(c) as u64;
                    self.called = true;
                    let args = c["function"]
                        .get("arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    self.generated_bytes += args.len();
                    match self.live_tool {
                        // The first call streams as it comes (a file an
                        // agent writes shows as it is written).
                        None => {
                            self.close(&mut out);
                            let f = &c["function"];
                            let id = call_id(c).map_or_else(
                                || fallback_tool_id(&self.id, self.block),
                                str::to_string,
                            );
                            out.extend(event(
                                "content_block_start",
                                &json!({"type": "content_block_start",
                                "index": self.block, "content_block": {"type": "tool_use",
                                    "id": id,
                                    "name": f.get("name").cloned().unwrap_or(json!("")), "input": {}}}),
                            ));
                            self.open = Open::Tool(idx);
                            self.live_tool = Some((idx, self.block));
                            self.live_args = LiveArgs::default();
                            if let Some(a) = self.live_args.feed(args) {
                                out.extend(event("content_block_delta", &json!({"type": "content_block_delta",
                                    "index": self.block, "delta": {"type": "input_json_delta", "partial_json": a}})));
                            }
                        }
                        Some((live, block)) if live == idx => {
                            if let Some(a) = self.live_args.feed(args) {
                                out.extend(event("content_block_delta", &json!({"type": "content_block_delta",
                                    "index": block, "delta": {"type": "input_json_delta", "partial_json": a}})));
                            }
                        }
                        // Every other call is held whole until the answer
                        // ends: a provider may interleave the calls'
                        // arguments, and a block, once stopped, is done.
                        Some(_) => {
                            let at = match self.held.iter().position(|h| h.index == idx) {
                                Some(at) => at,
                                None => {
                                    self.held.push(HeldCall {
                                        index: idx,
                                        ..HeldCall::default()
                                    });
                                    self.held.len() - 1
                                }
                            };
                            let h = &mut self.held[at];
                            if let Some(id) = call_id(c) {
                                h.id = id.to_string();
                            }
                            if let Some(n) = c["function"]
                                .get("name")
                                .and_then(Value::as_str)
                                .filter(|s| !s.is_empty())
                            {
                                h.name = n.to_string();
                            }
                            h.arguments.push_str(args);
                        }
                    }
                }
            }
            // Some servers send an empty finish reason on every chunk.
            if let Some(f) = choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .filter(|f| !f.is_empty())
            {
                self.flush_held(&mut out);
                // Some servers finish a tool call with "stop": an agent loop
                // waits for `tool_use`.
                self.stop = if self.called && f == "stop" {
                    stop_reason(Some("tool_calls"))
                } else if self.refused && f == "stop" {
                    stop_reason(Some("content_filter"))
                } else {
                    stop_reason(Some(f))
                };
            }
        }
        Ok(out)
    }
}

/// A tool call's arguments as a JSON object: as written when they parse;
/// a truncated object (the model stopped mid-call at its token limit)
/// closed at its last complete member, as Anthropic's SDKs read a streamed
/// one (so a plain answer and a streamed one agree); `None` when they are
/// no JSON object at all.
pub(crate) fn arguments_object(arguments: &str) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(m)) = serde_json::from_str(arguments) {
        return Some(m);
    }
    let text = arguments.trim();
    // Repair is a few parses of the text: kept to what a tool call holds
    // (a larger broken one gives `{}`), on the proxy's thread.
    if !text.starts_with('{') || text.len() > 64 << 10 {
        return None;
    }
    // One pass: at each separator outside strings, and at the end, the
    // arrays and objects open there (their closers, innermost first).
    let mut cuts: Vec<(usize, String)> = Vec::new();
    let mut open: Vec<char> = Vec::new();
    let (mut in_str, mut esc) = (false, false);
    for (i, c) in text.char_indices() {
        if in_str {
            match c {
                _ if esc => esc = false,
                '\\' => esc = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => open.push('}'),
            '[' => open.push(']'),
            '}' | ']' => {
                open.pop();
            }
            ',' => cuts.push((i, open.iter().rev().collect())),
            _ => {}
        }
    }
    // The whole text first, unless it ends inside a string (a value would
    // be invented: "Os" for "Oslo") or right after a number (12 may be
    // 1234 cut short): Anthropic's SDKs drop an incomplete string, and this
    // drops both. Before a separator, a value is whole.
    let mut tail = text.chars().rev();
    let (last, before) = (tail.next(), tail.next());
    let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit() || c == '.');
    let in_number = digit(last)
        || (last.is_some_and(|c| matches!(c, 'e' | 'E' | '+' | '-'))
            && (digit(before) || before.is_some_and(|c| matches!(c, 'e' | 'E'))));
    if !in_str && !in_number {
        cuts.push((text.len(), open.iter().rev().collect()));
    }
    // Latest first; the first that parses as an object is taken.
    cuts.iter().rev().take(64).find_map(|(cut, closers)| {
        match serde_json::from_str(&format!("{}{closers}", &text[..*cut])) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::Messages, bytes::Bytes::from(s.to_string()))
    }

    #[test]
    fn a_messages_request_becomes_its_chat_request() {
        let r = parse_str(
            r#"{"model":"claude","max_tokens":100,"stream":true,
            "system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral","ttl":"1h"}}],
            "messages":[
              {"role":"user","content":[{"type":"text","text":"weather?"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAA"}}]},
              {"role":"assistant","content":[{"type":"text","text":"checking"},{"type":"tool_use","id":"t1","name":"get","input":{"city":"Oslo"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"rain"},{"type":"text","text":"so?"}]}
            ],
            "tools":[{"name":"get","description":"weather","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"any","disable_parallel_tool_use":true},
            "stop_sequences":["END"],"temperature":0.3,"metadata":{"user_id":"u1"}}"#,
        )
        .unwrap();
        assert!(r.stream && r.client_wants_usage);
        assert_eq!(r.model, "claude");
        let b = Value::Object(r.body.clone());
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            m[1]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAA"
        );
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(m[2]["content"], "checking");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "t1", "content": "rain"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "so?"}));
        assert_eq!(b["tools"][0]["function"]["name"], "get");
        assert_eq!(b["tool_choice"], "required");
        assert_eq!(b["parallel_tool_calls"], false);
        assert_eq!(b["stop"], json!(["END"]));
        assert_eq!(b["max_tokens"], 100);
        assert_eq!(b["user"], "u1");
        assert_eq!(r.anthropic_only, AnthropicOnly::default());
    }

    /// Claude Code's user ids run past OpenAI's 64-character limit on `user`.
    #[test]
    fn a_long_user_id_goes_to_openai_as_its_digest() {
        let long = format!(
            "user_{}_account__session_{}",
            "a".repeat(64),
            "b".repeat(36)
        );
        let body = format!(
            r#"{{"model":"c","max_tokens":5,"metadata":{{"user_id":"{long}"}},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let r = parse_str(&body).unwrap();
        let user = r.body["user"].as_str().unwrap();
        assert_eq!(user.len(), 64);
        assert!(user.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(user, &long[..64]);
        // The same id always maps to the same digest.
        assert_eq!(parse_str(&body).unwrap().body["user"], user);
    }

    #[test]
    fn top_k_is_kept_for_the_cache_key() {
        let r = parse_str(r#"{"model":"c","max_tokens":5,"top_k":40,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.anthropic_only.top_k, Some(40));
        assert!(r.body.get("top_k").is_none(), "no Chat Completions field");
        assert_eq!(r.anthropic_only.extra, None);
        // Fields the chat body does not carry are kept for the key (nulls
        // are no field); a tool result's image follows the results in the
        // user message (a `tool` message holds text only).
        let r = parse_str(r#"{"model":"c","max_tokens":5,"service_tier":null,"output_format":{"type":"json_schema","schema":{"type":"object"}},"container":"x","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(
            r.anthropic_only.extra.as_deref(),
            Some(
                r#"{"container":"x","output_format":{"schema":{"type":"object"},"type":"json_schema"}}"#
            )
        );
        assert!(!r.anthropic_only.lossy);
        // A container (code execution, skills) is Anthropic's to run.
        assert_eq!(
            r.anthropic_only.untranslatable.as_deref(),
            Some("container")
        );
        let r = parse_str(r#"{"model":"c","max_tokens":5,"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"shot","input":{}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AA=="}}]},{"type":"text","text":"What changed?"}]}]}"#).unwrap();
        assert!(!r.anthropic_only.lossy);
        assert_eq!(r.anthropic_only.untranslatable, None);
        let m = r.body["messages"].as_array().unwrap();
        assert_eq!(
            m[1],
            json!({"role": "tool", "tool_call_id": "t", "content": ""})
        );
        assert_eq!(m[2]["role"], "user");
        assert_eq!(
            m[2]["content"][0]["image_url"]["url"],
            "data:image/png;base64,AA=="
        );
        assert_eq!(
            m[2]["content"][2],
            json!({"type": "text", "text": "What changed?"})
        );
        // A document in a tool result: the chat body goes without it, and
        // is never cached (lossy); the session is not refused.
        let r = parse_str(r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"x"}}]}]}]}"#).unwrap();
        assert_eq!(r.anthropic_only.untranslatable, None);
        assert!(r.anthropic_only.lossy);
    }

    /// MCP servers are Anthropic's API's to connect to: an OpenAI model
    /// would answer without their tools (and `auto` must not pick one);
    /// an empty list asks for nothing. `context_management` only edits
    /// what the context holds, and passes.
    #[test]
    fn mcp_servers_go_to_anthropic_models_only() {
        let r = parse_str(r#"{"model":"c","max_tokens":5,"mcp_servers":[{"type":"url","url":"https://x.example/mcp","name":"x"}],"messages":[{"role":"user","content":"use my tools"}]}"#).unwrap();
        assert_eq!(
            r.anthropic_only.untranslatable.as_deref(),
            Some("mcp_servers")
        );
        assert!(r.anthropic_only.lossy);
        let r = parse_str(r#"{"model":"c","max_tokens":5,"mcp_servers":[],"context_management":{"edits":[{"type":"clear_tool_uses_20250919"}]},"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.anthropic_only.untranslatable, None);
    }

    /// Mid-conversation system messages: read in place (text only), and
    /// folded into the top-level system prompt for models that refuse them.
    #[test]
    fn system_messages_are_read_in_place_and_fold_into_the_system_prompt() {
        let raw = r#"{"model":"c","max_tokens":5,"system":"Base.","messages":[{"role":"user","content":"hi"},{"role":"system","content":[{"type":"text","text":"Now brief.","cache_control":{"type":"ephemeral"}}]},{"role":"assistant","content":"ok"},{"role":"user","content":"and?"},{"role":"system","content":"Later."}]}"#;
        let r = parse_str(raw).unwrap();
        assert!(r.anthropic_only.system_messages);
        let m = r.body["messages"].as_array().unwrap();
        assert_eq!(m[2], json!({"role": "system", "content": "Now brief."}));
        assert_eq!(m[5], json!({"role": "system", "content": "Later."}));
        let folded: Value =
            serde_json::from_slice(&fold_system_messages(raw.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            folded["system"],
            json!([{"type": "text", "text": "Base."},
                {"type": "text", "text": "Now brief."},
                {"type": "text", "text": "Later."}])
        );
        let roles: Vec<&str> = folded["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(folded["max_tokens"], 5);
        // Without a system prompt; and nothing to fold.
        let bare = r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"},{"role":"system","content":"Be brief."}]}"#;
        let folded: Value =
            serde_json::from_slice(&fold_system_messages(bare.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            folded["system"],
            json!([{"type": "text", "text": "Be brief."}])
        );
        let none = r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(fold_system_messages(none.as_bytes()).is_none());
        assert!(!parse_str(none).unwrap().anthropic_only.system_messages);
        // Text only; other roles named in the error.
        let e = parse_str(r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"},{"role":"system","content":[{"type":"image","source":{}}]}]}"#).unwrap_err();
        assert!(e.to_string().contains("messages.1.content.0"), "{e}");
        let e =
            parse_str(r#"{"model":"c","max_tokens":5,"messages":[{"role":"tool","content":"x"}]}"#)
                .unwrap_err();
        assert!(e.to_string().contains("'system'"), "{e}");
    }

    #[test]
    fn a_top_level_member_is_removed_with_its_comma() {
        for (raw, out) in [
            (
                r#"{"a":1,"reasoning":{"effort":"low"},"b":[2]}"#,
                r#"{"a":1,"b":[2]}"#,
            ),
            (r#"{"reasoning":{"effort":"low"}, "b":2}"#, r#"{ "b":2}"#),
            (r#"{ "a" : 1 , "reasoning" : null }"#, r#"{ "a" : 1  }"#),
            (r#"{"reasoning":1}"#, r#"{}"#),
            (
                r#"{"reasoning":1,"a":{"reasoning":2},"reasoning":3}"#,
                r#"{"a":{"reasoning":2}}"#,
            ),
        ] {
            let got = remove_top_level(raw.as_bytes(), "reasoning").unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), out, "{raw}");
            let v: Value = serde_json::from_str(out).unwrap();
            assert!(v.get("reasoning").is_none());
        }
        assert_eq!(
            remove_top_level(br#"{"a":{"reasoning":1}}"#, "reasoning"),
            None
        );
        assert_eq!(remove_top_level(b"[1]", "reasoning"), None);
    }

    #[test]
    fn thinking_asks_a_reasoning_model_for_an_effort_by_its_budget() {
        for (thinking, effort) in [
            (
                json!({"type": "enabled", "budget_tokens": 1024}),
                Some("low"),
            ),
            (
                json!({"type": "enabled", "budget_tokens": 4095}),
                Some("low"),
            ),
            (
                json!({"type": "enabled", "budget_tokens": 4096}),
                Some("medium"),
            ),
            (
                json!({"type": "enabled", "budget_tokens": 31999}),
                Some("high"),
            ),
            (json!({"type": "adaptive"}), None),
            (json!({"type": "disabled"}), None),
            (json!({"type": "enabled"}), None),
            (json!("enabled"), None),
        ] {
            assert_eq!(effort_for_thinking(&thinking), effort, "{thinking}");
        }
    }

    /// Structured outputs and strict tools reach an OpenAI model as its
    /// `json_schema` response format and strict functions, strict only
    /// where OpenAI's strict mode takes the schema.
    #[test]
    fn structured_outputs_and_strict_tools_become_openai_strict_mode() {
        let closed = json!({"type": "object", "properties": {"city": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"], "additionalProperties": false}}},
            "required": ["city", "tags"], "additionalProperties": false});
        let open = json!({"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
        assert!(strict_compatible(&closed));
        assert!(!strict_compatible(&open));
        // What strict mode refuses: a format it lacks, keywords it lacks, a
        // root that is no object.
        let mut uri = closed.clone();
        uri["properties"]["city"]["format"] = json!("uri");
        assert!(!strict_compatible(&uri));
        let mut when = closed.clone();
        when["properties"]["city"]["format"] = json!("date-time");
        assert!(strict_compatible(&when));
        let mut all_of = closed.clone();
        all_of["properties"]["city"] = json!({"allOf": [{"type": "string"}]});
        assert!(!strict_compatible(&all_of));
        assert!(!strict_compatible(&json!({"anyOf": [closed.clone()]})));
        let with_defs = json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"], "additionalProperties": false,
            "$defs": {"A": {"type": "object", "properties": {"x": {"type": ["string", "null"]}}, "required": ["x"], "additionalProperties": false}}});
        assert!(strict_compatible(&with_defs));
        let mut nested_open = closed.clone();
        nested_open["properties"]["tags"]["items"]["additionalProperties"] = json!(true);
        assert!(!strict_compatible(&nested_open));
        for (field, schema, strict) in [
            ("output_config", &closed, true),
            ("output_config", &open, false),
            ("output_format", &closed, true),
        ] {
            let fmt = json!({"type": "json_schema", "schema": schema});
            let value = if field == "output_config" {
                json!({"format": fmt})
            } else {
                fmt
            };
            let raw = json!({"model": "c", "max_tokens": 50, field: value,
                "messages": [{"role": "user", "content": "Oslo?"}],
                "tools": [{"name": "f", "input_schema": schema, "strict": true}]});
            let r = parse_str(&raw.to_string()).unwrap();
            let rf = &r.body["response_format"];
            assert_eq!(rf["type"], "json_schema", "{field}");
            assert_eq!(&rf["json_schema"]["schema"], schema);
            assert_eq!(rf["json_schema"]["strict"], strict);
            assert_eq!(
                r.body["tools"][0]["function"].get("strict").is_some(),
                strict
            );
        }
        let e = parse_str(r#"{"model":"c","max_tokens":5,"output_config":{"format":{"type":"json_schema"}},"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("output_config.format.schema"));
    }

    #[test]
    fn a_tool_turn_without_its_thinking_block_is_flagged() {
        let flag = |assistant: &str| {
            let raw = format!(
                r#"{{"model":"c","max_tokens":5,"thinking":{{"type":"enabled","budget_tokens":1024}},"messages":[{{"role":"user","content":"go"}},{assistant},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":"ok"}}]}}]}}"#
            );
            parse_str(&raw).unwrap().anthropic_only.unsigned_tool_turn
        };
        // Another model's tool call (translated: no thinking block).
        assert!(flag(
            r#"{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]}"#
        ));
        // Claude's own, opening with its signed thinking.
        assert!(!flag(
            r#"{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},{"type":"tool_use","id":"t1","name":"f","input":{}}]}"#
        ));
        assert!(!flag(
            r#"{"role":"assistant","content":[{"type":"redacted_thinking","data":"x"},{"type":"tool_use","id":"t1","name":"f","input":{}}]}"#
        ));
        // No tool call in the last assistant turn.
        assert!(!flag(r#"{"role":"assistant","content":"plain"}"#));

        // Later steps of a loop: the turn's first assistant message decides
        // (Claude's own second step carries no thinking block, and needs
        // none; another model's loop stays unsigned however long).
        let looped = |first: &str, second: &str, next_user: &str| {
            let raw = format!(
                r#"{{"model":"c","max_tokens":5,"thinking":{{"type":"enabled","budget_tokens":1024}},"messages":[{{"role":"user","content":"go"}},{{"role":"assistant","content":[{first}{{"type":"tool_use","id":"t1","name":"f","input":{{}}}}]}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":"ok"}},{{"type":"text","text":"<reminder>"}}]}},{{"role":"assistant","content":[{second}{{"type":"tool_use","id":"t2","name":"f","input":{{}}}}]}},{next_user}]}}"#
            );
            parse_str(&raw).unwrap().anthropic_only.unsigned_tool_turn
        };
        let signed = r#"{"type":"thinking","thinking":"hm","signature":"s"},"#;
        let result = r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"t2","content":"ok"}]}"#;
        assert!(!looped(signed, "", result));
        assert!(looped("", "", result));
        assert!(looped("", signed, result));
        // A new question starts a new turn: nothing to sign.
        assert!(!looped(
            "",
            "",
            r#"{"role":"user","content":"next question"}"#
        ));
    }

    #[test]
    fn thinking_and_server_tools_are_flagged() {
        let r = parse_str(
            r#"{"model":"c","max_tokens":5,"thinking":{"type":"enabled","budget_tokens":1024},
            "tools":[{"type":"web_search_20250305","name":"web_search"}],
            "messages":[{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},{"type":"text","text":"yo"}]},{"role":"user","content":"again"}]}"#,
        )
        .unwrap();
        assert!(r.anthropic_only.thinking);
        assert_eq!(
            r.anthropic_only.untranslatable.as_deref(),
            Some("tools.0 (web_search)")
        );
        for (mode, asked) in [("adaptive", true), ("disabled", false)] {
            let r = parse_str(&format!(
                r#"{{"model":"c","max_tokens":5,"thinking":{{"type":"{mode}"}},"messages":[{{"role":"user","content":"hi"}}]}}"#
            ))
            .unwrap();
            assert_eq!(r.anthropic_only.thinking, asked, "{mode}");
        }
    }

    #[test]
    fn invalid_requests_get_anthropic_errors_naming_the_field() {
        for (body, param) in [
            (r#"{"max_tokens":5,"messages":[]}"#, "model"),
            (
                r#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"c","max_tokens":0,"messages":[]}"#,
                "max_tokens",
            ),
            (r#"{"model":"c","max_tokens":5}"#, "messages"),
            (r#"{"model":"c","max_tokens":5,"messages":[]}"#, "messages"),
            (
                r#"{"model":"c","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
                "messages.0.role",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":5}]}"#,
                "messages.0.content",
            ),
            (
                r#"{"model":"c","max_tokens":5,"temperature":1.5,"messages":[{"role":"user","content":"x"}]}"#,
                "temperature",
            ),
            (
                r#"{"model":"c","max_tokens":5,"tool_choice":{"type":"tool"},"messages":[{"role":"user","content":"x"}]}"#,
                "tool_choice.tool.name",
            ),
        ] {
            let e = parse_str(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}");
            let v: Value = serde_json::from_slice(&error_body(&e)).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(
                v["error"]["message"].as_str().unwrap().starts_with(param),
                "{v}"
            );
        }
        assert_eq!(parse_str("[1]").unwrap_err().code, "invalid_json");
        assert_eq!(parse_str("{").unwrap_err().code, "invalid_json");
        // count_tokens takes no max_tokens.
        let r = parse(
            Endpoint::MessagesCountTokens,
            bytes::Bytes::from_static(
                br#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#,
            ),
        )
        .unwrap();
        assert!(!r.stream);
    }

    #[test]
    fn a_limit_above_the_models_most_is_lowered_and_nothing_else_touched() {
        let raw = br#"{"messages":[{"role":"user","content":"max_tokens: 99999"}], "max_tokens" : 32000,"x":1}"#;
        let out = clamp_top_level(raw, "max_tokens", 8192).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"messages":[{"role":"user","content":"max_tokens: 99999"}], "max_tokens" : 8192,"x":1}"#
        );
        assert_eq!(clamp_top_level(raw, "max_tokens", 32000), None, "not above");
        assert_eq!(
            clamp_top_level(raw, "max_output_tokens", 10),
            None,
            "absent"
        );
        assert_eq!(
            clamp_top_level(br#"{"max_tokens":null}"#, "max_tokens", 10),
            None
        );
    }

    #[test]
    fn the_model_is_spliced_in_and_every_other_byte_kept() {
        let raw = br#"{ "messages" : [{"role":"user","content":"a \"model\": x"}], "model":"claude" ,"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}]}"#;
        let out = splice_model(raw, "claude-x-2").unwrap();
        let expect =
            String::from_utf8_lossy(raw).replace(r#""model":"claude""#, r#""model":"claude-x-2""#);
        assert_eq!(String::from_utf8(out).unwrap(), expect);
        assert_eq!(splice_model(raw, "claude").unwrap(), raw.to_vec());
        // Nested "model" keys and escapes do not confuse it.
        let raw = br#"{"a":{"model":"no"},"b":"\\\"","model":"m","c":[1,{"model":2}]}"#;
        let out = splice_model(raw, "z").unwrap();
        assert_eq!(
            out,
            br#"{"a":{"model":"no"},"b":"\\\"","model":"z","c":[1,{"model":2}]}"#.to_vec()
        );
        assert!(splice_model(br#"{"model":5}"#, "z").is_none());
        // Any field, replaced or added first.
        let raw = br#"{"model":"m", "max_tokens": 4096 ,"x":{"max_tokens":1}}"#;
        assert_eq!(
            set_top_level(raw, "max_tokens", &json!(50)).unwrap(),
            br#"{"model":"m", "max_tokens": 50 ,"x":{"max_tokens":1}}"#.to_vec()
        );
        assert_eq!(
            set_top_level(br#" {"a":1}"#, "max_output_tokens", &json!(7)).unwrap(),
            br#" {"max_output_tokens":7,"a":1}"#.to_vec()
        );
        assert_eq!(
            set_top_level(b"{ }", "k", &json!(true)).unwrap(),
            br#"{"k":true }"#.to_vec()
        );
        assert!(set_top_level(b"[1]", "k", &json!(1)).is_none());
        assert!(splice_model(br#"{"x":1}"#, "z").is_none());
    }

    #[test]
    fn a_model_after_a_long_prompt_is_found_and_an_unchanged_body_not_copied() {
        // Quotes and backslashes at every distance from the SIMD scan's
        // blocks, a trailing backslash pair, then `model` last (as the
        // OpenAI SDKs order a chat request).
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&"x".repeat(i % 37));
            // JSON escapes: \" and \\ and \n.
            text.push_str([r#"\""#, r"\\", r"\n", "{[", "]}"][i % 5]);
        }
        text.push_str(r"\\");
        let raw =
            format!(r#"{{"messages":[{{"role":"user","content":"{text}"}}],"model":"m","n":1}}"#);
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["model"], "m");
        let out = splice_model(raw.as_bytes(), "m-2").unwrap();
        assert_eq!(
            out,
            raw.replace(r#""model":"m""#, r#""model":"m-2""#)
                .into_bytes()
        );
        let shared = bytes::Bytes::from(raw.clone().into_bytes());
        let same = splice_model_bytes(&shared, "m").unwrap();
        assert_eq!(
            same.as_ptr(),
            shared.as_ptr(),
            "no copy when the name stays"
        );
        assert_eq!(splice_model_bytes(&shared, "m-2").unwrap(), out);
        // Runs of backslashes before a quote: odd escapes it, even does not.
        for (raw, end) in [
            (r#""a\\\"b""#, 8),
            (r#""\\\\""#, 6),
            (r#""\\",1"#, 4),
            (r#""\"\"x","#, 7),
        ] {
            assert_eq!(skip_string(raw.as_bytes(), 0), Some(end), "{raw}");
        }
        // An unterminated string: no model, not a panic.
        assert!(splice_model(br#"{"messages":"abc\"#, "z").is_none());
    }

    #[test]
    fn a_chat_completion_becomes_a_message() {
        let chat = json!({"id": "chatcmpl-abc", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3}}});
        let m = response_from_chat(&chat, "claude");
        assert_eq!(m["id"], "msg_abc");
        assert_eq!(m["type"], "message");
        assert_eq!(m["model"], "claude");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "Hi"}));
        assert_eq!(m["content"][1]["input"], json!({"a": 1}));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 7, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3})
        );
        // An OpenAI model's reasoning tokens: Anthropic's thinking tokens.
        let mut chat = chat;
        chat["usage"]["completion_tokens_details"] = json!({"reasoning_tokens": 2});
        let m = response_from_chat(&chat, "claude");
        assert_eq!(
            m["usage"]["output_tokens_details"],
            json!({"thinking_tokens": 2})
        );
    }

    fn events(bytes: &[u8]) -> Vec<(String, Value)> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                (
                    name.strip_prefix("event: ").unwrap().to_string(),
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_becomes_the_messages_event_sequence() {
        let chat = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}});
        let sse = crate::assemble::replay_as_sse(&chat, true);
        for size in [1, 9, sse.len()] {
            let mut s = ChatToMessagesStream::new("claude", 11);
            let mut out = Vec::new();
            for c in sse.chunks(size) {
                out.extend(s.feed(c).unwrap());
            }
            assert!(s.done);
            let evs = events(&out);
            let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "message_start",
                    "ping",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop"
                ]
            );
            for (n, v) in &evs {
                assert_eq!(v["type"], n.as_str());
            }
            assert_eq!(evs[0].1["message"]["usage"]["input_tokens"], 11);
            assert_eq!(evs[3].1["delta"]["text"], "Hello there");
            assert_eq!(evs[5].1["content_block"]["name"], "f");
            assert_eq!(evs[5].1["index"], 1);
            assert_eq!(evs[6].1["delta"]["partial_json"], "{\"a\":1}");
            assert_eq!(evs[8].1["delta"]["stop_reason"], "tool_use");
            assert_eq!(evs[8].1["usage"]["input_tokens"], 12);
            assert_eq!(evs[8].1["usage"]["output_tokens"], 5);
        }
        // An error mid-stream ends it with Anthropic's error event.
        let mut s = ChatToMessagesStream::new("claude", 0);
        let out = s
            .feed(b"data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n")
            .unwrap();
        let evs = events(&out);
        let last = evs.last().unwrap();
        assert_eq!(last.0, "error");
        assert_eq!(
            last.1["error"],
            json!({"type": "api_error", "message": "boom"})
        );
        assert!(s.done);
        // The gateway's own errors and the provider's codes keep the type
        // an Anthropic client retries on.
        for (error, kind) in [
            (
                r#"{"message":"m","type":"upstream_error","code":"upstream_timeout"}"#,
                "timeout_error",
            ),
            (
                r#"{"message":"m","type":"server_error","code":"server_shutting_down"}"#,
                "overloaded_error",
            ),
            (
                r#"{"message":"m","type":"tokens","code":"rate_limit_exceeded"}"#,
                "rate_limit_error",
            ),
            (
                r#"{"message":"m","type":"invalid_request_error","code":"context_length_exceeded"}"#,
                "invalid_request_error",
            ),
            (
                r#"{"message":"m","type":"overloaded_error"}"#,
                "overloaded_error",
            ),
        ] {
            let mut s = ChatToMessagesStream::new("claude", 0);
            let out = s
                .feed(format!("data: {{\"id\":\"x\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"a\"}}}}]}}\n\ndata: {{\"error\":{error}}}\n\n").as_bytes())
                .unwrap();
            let evs = events(&out);
            assert_eq!(evs.last().unwrap().1["error"]["type"], kind, "{error}");
        }
    }

    /// An empty finish reason on every chunk is no finish: the call's
    /// arguments stay in its one block.
    /// OpenAI's `refusal` reaches an Anthropic client as the answer's text
    /// with the `refusal` stop reason, plain and streamed (it was an empty
    /// answer ending `end_turn`).
    #[test]
    fn a_refusal_is_the_answers_text_and_its_stop_reason() {
        let chat = json!({"id": "chatcmpl-r", "model": "gpt-4o", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 6}});
        let m = response_from_chat(&chat, "gpt-4o");
        assert_eq!(
            m["content"],
            json!([{"type": "text", "text": "I can't help with that."}])
        );
        assert_eq!(m["stop_reason"], "refusal");
        let mut s = ChatToMessagesStream::new("gpt-4o", 5);
        let mut out = Vec::new();
        for chunk in [
            json!({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {"role": "assistant", "refusal": ""}}]}),
            json!({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {"refusal": "I can't "}}]}),
            json!({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {"refusal": "help."}}]}),
            json!({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ] {
            out.extend(s.feed(format!("data: {chunk}\n\n").as_bytes()).unwrap());
        }
        out.extend(s.feed(b"data: [DONE]\n\n").unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#""text":"I can't ""#) && text.contains(r#""text":"help.""#),
            "{text}"
        );
        assert!(text.contains(r#""stop_reason":"refusal""#), "{text}");
    }

    #[test]
    fn an_empty_finish_reason_ends_nothing() {
        let sse = concat!(
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"finish_reason\":\"\",\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\"\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"finish_reason\":\"\",\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"finish_reason\":\"tool_calls\",\"delta\":{}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| **n == "content_block_stop").count(),
            1,
            "{names:?}"
        );
        let stop = names
            .iter()
            .position(|n| *n == "content_block_stop")
            .unwrap();
        let last_delta = names
            .iter()
            .rposition(|n| *n == "content_block_delta")
            .unwrap();
        assert!(last_delta < stop, "{names:?}");
    }

    /// Arguments a provider cut short (its token limit) or that are no
    /// JSON object: closed at the last complete member, or `{}`; a plain
    /// answer and a streamed one agree, and the streamed one never hands
    /// the client's SDK text it fails to parse.
    #[test]
    fn broken_tool_arguments_become_an_object() {
        let obj = |a: &str| arguments_object(a).map(Value::Object);
        assert_eq!(obj(r#"{"city": "Oslo"}"#), Some(json!({"city": "Oslo"})));
        assert_eq!(
            obj(r#"{"city": "Oslo", "unit"#),
            Some(json!({"city": "Oslo"}))
        );
        assert_eq!(
            obj(r#"{"city": "Oslo", "unit": "c"#),
            Some(json!({"city": "Oslo"}))
        );
        assert_eq!(
            obj(r#"{"a": {"b": 1, "c": [1, 2"#),
            Some(json!({"a": {"b": 1, "c": [1]}})),
            "the 2 may be cut short"
        );
        assert_eq!(obj(r#"{"note": "a, b"#), None, "no invented value");
        assert_eq!(
            obj(r#"{"k": "v", "n": 12"#),
            Some(json!({"k": "v"})),
            "12 of 1234?"
        );
        assert_eq!(
            obj(r#"{"n": [1, 2], "m": 3}"#),
            Some(json!({"n": [1, 2], "m": 3}))
        );
        assert_eq!(
            obj(r#"{"ok": true"#),
            Some(json!({"ok": true})),
            "a literal is whole"
        );
        assert_eq!(obj(r#"{"k": "v", "x": 1e"#), Some(json!({"k": "v"})));
        assert_eq!(obj("not json at all"), None);
        assert_eq!(obj("[1, 2]"), None);
        assert_eq!(obj(""), None);

        let answer = |args: &str| {
            let chat = json!({"id": "c", "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": args}}]}}]});
            response_from_chat(&chat, "m")["content"][0]["input"].clone()
        };
        assert_eq!(answer(r#"{"city": "Oslo", "unit"#), json!({"city": "Oslo"}));
        assert_eq!(answer("not json at all"), json!({}));

        // Streamed: the first call live, the second held whole.
        let chunk = |idx: u32, id: &str, args: &str| {
            format!(
                "data: {}\n\n",
                json!({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": idx, "id": id, "type": "function", "function": {"name": "f", "arguments": args}}]}}]})
            )
        };
        let sse = [
            chunk(0, "a", "  "),
            chunk(0, "a", "not json"),
            chunk(1, "b", r#"{"city": "Oslo", "un"#),
            chunk(0, "a", " at all"),
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n".into(),
        ]
        .concat();
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let args = |block: u64| -> String {
            evs.iter()
                .filter(|(n, v)| n == "content_block_delta" && v["index"] == block)
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(args(0), "", "no object: nothing sent, the input is {{}}");
        assert_eq!(args(1), r#"{"city":"Oslo"}"#);
        // What one live call streams of its arguments sent in `parts`.
        let live = |parts: &[&str]| -> String {
            let mut s = ChatToMessagesStream::new("claude", 1);
            let sse: String = parts.iter().map(|p| chunk(0, "a", p)).collect();
            events(&s.feed(sse.as_bytes()).unwrap())
                .iter()
                .filter(|(n, _)| n == "content_block_delta")
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect()
        };
        // A live call broken partway: what was valid is sent (the SDK
        // closes it as it closes a cut stream), nothing after.
        for (parts, want) in [
            (vec![r#"{"a": 1,"#, "}"], r#"{"a": 1,"#),
            (vec![r#"{'city': 'Oslo'}"#], "{"),
            (vec![r#"{"s": "line"#, "\n", r#"break"}"#], r#"{"s": "line"#),
            (
                vec![r#"{"x": [1, 2], "y": {"z": null}} trailing"#],
                r#"{"x": [1, 2], "y": {"z": null}} "#,
            ),
            (vec![r#"{"u": "\u00e9\q"}"#], r#"{"u": "\u00e9\"#),
        ] {
            assert_eq!(live(&parts), want, "{parts:?}");
        }
        // A live call's leading white space waits for what follows it.
        assert_eq!(live(&[" ", r#"{"x":"#, "1}"]), r#" {"x":1}"#);
    }

    /// A provider interleaving two calls' arguments: each block keeps its
    /// id and name, every argument reaches its own call's block, and no
    /// block gets a delta after its stop (the first call streams; the
    /// others are sent whole when the answer ends).
    #[test]
    fn interleaved_tool_call_arguments_go_to_their_own_blocks() {
        let sse = concat!(
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\"\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"b\",\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let starts: Vec<(u64, &Value)> = evs
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| (v["index"].as_u64().unwrap(), &v["content_block"]))
            .collect();
        assert_eq!(starts.len(), 2, "{evs:?}");
        assert_eq!(
            (
                starts[0].0,
                starts[0].1["id"].as_str(),
                starts[0].1["name"].as_str()
            ),
            (0, Some("a"), Some("f"))
        );
        assert_eq!(
            (
                starts[1].0,
                starts[1].1["id"].as_str(),
                starts[1].1["name"].as_str()
            ),
            (1, Some("b"), Some("g"))
        );
        let args = |block: u64| -> String {
            evs.iter()
                .filter(|(n, v)| n == "content_block_delta" && v["index"] == block)
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(args(0), "{\"x\":1}");
        assert_eq!(args(1), "{}");
        // Each block's events come between its start and its stop, blocks
        // one after another.
        let mut open: Option<u64> = None;
        for (name, v) in &evs {
            let i = v["index"].as_u64();
            match name.as_str() {
                "content_block_start" => {
                    assert_eq!(open, None, "{evs:?}");
                    open = i;
                }
                "content_block_delta" => assert_eq!(open, i, "{evs:?}"),
                "content_block_stop" => {
                    assert_eq!(open, i, "{evs:?}");
                    open = None;
                }
                _ => {}
            }
        }
    }

    /// Servers that send each tool call whole, with its own id and no
    /// `index` (Gemini's OpenAI endpoint), and finish with "stop": two calls
    /// stay two, in the Messages stream, the stored answer and Responses.
    #[test]
    fn tool_calls_without_an_index_stay_apart() {
        let sse = concat!(
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\\\"Sydney\\\"}\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"id\":\"c2\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let starts: Vec<&Value> = evs
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| &v["content_block"])
            .collect();
        assert_eq!(starts.len(), 2, "{evs:?}");
        assert_eq!(
            (starts[0]["id"].as_str(), starts[1]["id"].as_str()),
            (Some("c1"), Some("c2"))
        );
        let stop = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert_eq!(stop.1["delta"]["stop_reason"], "tool_use");
        // The answer the cache stores.
        let mut a = crate::assemble::ChunkAssembler::default();
        a.feed(sse.as_bytes());
        let done = a.finish().unwrap();
        let calls = done["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(calls.len(), 2, "{done}");
        assert_eq!(calls[1]["function"]["arguments"], "{\"city\":\"Paris\"}");
        // A buffered answer's stop reason too.
        let m = response_from_chat(&done, "claude");
        assert_eq!(m["stop_reason"], "tool_use");
        // Responses: two function calls, not one with both names.
        let mut r =
            crate::responses::ChatToResponsesStream::new("resp_1", 1, "m", &Default::default());
        r.feed(sse.as_bytes()).unwrap();
        r.finish();
        let resp = r.response().unwrap();
        let calls: Vec<&Value> = resp["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 2, "{resp}");
        assert_eq!(calls[0]["name"], "get_weather");
        assert_eq!(calls[1]["arguments"], "{\"city\":\"Paris\"}");
    }

    /// One chat chunk as an SSE event.
    fn sse_chunk(v: Value) -> String {
        format!("data: {v}\n\n")
    }

    /// Each event's name and block index (None for the message's events).
    fn names_and_blocks(evs: &[(String, Value)]) -> Vec<(&str, Option<u64>)> {
        evs.iter()
            .map(|(n, v)| (n.as_str(), v["index"].as_u64()))
            .collect()
    }

    /// Ollama streams parallel calls all with index 0, each with its own
    /// id: each gets its own block, with its own arguments.
    #[test]
    fn tool_calls_sharing_an_index_get_their_own_blocks() {
        let mut sse = String::new();
        for (id, p) in [("call_a", 1), ("call_b", 2)] {
            sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
                "tool_calls": [{"index": 0, "id": id, "type": "function",
                    "function": {"name": "file_write", "arguments": format!("{{\"p\":{p}}}")}}]}}]})));
        }
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})));
        sse.push_str("data: [DONE]\n\n");
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let starts: Vec<&Value> = evs
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(starts.len(), 2, "{evs:?}");
        assert_eq!(starts[0]["content_block"]["id"], "call_a");
        assert_eq!(starts[1]["content_block"]["id"], "call_b");
        assert_eq!(starts[1]["content_block"]["name"], "file_write");
        let args = |block: u64| -> String {
            evs.iter()
                .filter(|(n, v)| n == "content_block_delta" && v["index"] == block)
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(args(0), "{\"p\":1}");
        assert_eq!(args(1), "{\"p\":2}");
    }

    /// Tool calls with no id (SGLang's after the first; a null or empty
    /// one) get one of their own, in the stream and in a whole answer.
    #[test]
    fn tool_calls_without_an_id_get_one() {
        let mut sse = sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 0, "id": null, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}),
        );
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 1, "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}]})));
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 2, "id": "", "type": "function", "function": {"name": "h", "arguments": "{}"}}]}}]})));
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})));
        sse.push_str("data: [DONE]\n\n");
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let ids: Vec<&Value> = evs
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| &v["content_block"]["id"])
            .collect();
        assert_eq!(
            ids,
            [
                &json!("toolu_x_0"),
                &json!("toolu_x_1"),
                &json!("toolu_x_2")
            ]
        );
        // A whole answer.
        let chat = json!({"id": "chatcmpl-abc", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}},
                           {"id": null, "type": "function", "function": {"name": "g", "arguments": "{}"}},
                           {"id": "c3", "type": "function", "function": {"name": "h", "arguments": "{}"}}]},
            "finish_reason": "tool_calls"}]});
        let m = response_from_chat(&chat, "claude");
        assert_eq!(m["content"][1]["id"], "toolu_abc_1");
        assert_eq!(m["content"][2]["id"], "toolu_abc_2");
        assert_eq!(m["content"][3]["id"], "c3");
    }

    /// Mistral's reasoning models send `content` as a list of chunks: the
    /// text ones are the answer, the thinking ones are not.
    #[test]
    fn content_chunks_are_text() {
        let mut sse = sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"role": "assistant",
            "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]}}]}),
        );
        sse.push_str(&sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}}]}),
        ));
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
        sse.push_str("data: [DONE]\n\n");
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let text: Vec<&Value> = evs
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| &v["delta"]["text"])
            .collect();
        assert_eq!(text, [&json!("Hello")]);
        // A whole answer.
        let chat = json!({"id": "chatcmpl-abc", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}, {"type": "text", "text": "Hello"}]},
            "finish_reason": "stop"}]});
        let m = response_from_chat(&chat, "claude");
        assert_eq!(m["content"], json!([{"type": "text", "text": "Hello"}]));
    }

    /// Text between two argument chunks of the streamed call: the call's
    /// block stays open for the rest of its arguments, blank text is
    /// dropped and other text follows as a block of its own.
    #[test]
    fn text_between_a_calls_arguments_waits_for_its_block_to_end() {
        let mut sse = sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"role": "assistant",
            "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
        );
        sse.push_str(&sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "\n"}}]}),
        ));
        sse.push_str(&sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]}),
        ));
        sse.push_str(&sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "Done."}}]}),
        ));
        sse.push_str(&sse_chunk(json!({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})));
        sse.push_str("data: [DONE]\n\n");
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        assert_eq!(
            names_and_blocks(&evs),
            [
                ("message_start", None),
                ("ping", None),
                ("content_block_start", Some(0)),
                ("content_block_delta", Some(0)),
                ("content_block_delta", Some(0)),
                ("content_block_stop", Some(0)),
                ("content_block_start", Some(1)),
                ("content_block_delta", Some(1)),
                ("content_block_stop", Some(1)),
                ("message_delta", None),
                ("message_stop", None),
            ]
        );
        assert_eq!(evs[2].1["content_block"]["type"], "tool_use");
        assert_eq!(evs[3].1["delta"]["partial_json"], "{\"a\"");
        assert_eq!(evs[4].1["delta"]["partial_json"], ":1}");
        assert_eq!(evs[6].1["content_block"]["type"], "text");
        assert_eq!(evs[7].1["delta"]["text"], "Done.");
        assert_eq!(evs[9].1["delta"]["stop_reason"], "tool_use");
    }

    /// No finish reason on any chunk: an answer that called a tool still
    /// ends with `tool_use`.
    #[test]
    fn a_tool_call_with_no_finish_reason_ends_for_tool_use() {
        let mut sse = sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "finish_reason": null, "delta": {
            "tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}),
        );
        sse.push_str(&sse_chunk(
            json!({"id": "chatcmpl-x", "choices": [{"index": 0, "finish_reason": null, "delta": {}}]}),
        ));
        sse.push_str("data: [DONE]\n\n");
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let stop = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert_eq!(stop.1["delta"]["stop_reason"], "tool_use");
        // Text only: the end of a turn.
        let sse = concat!(
            "data: {\"id\":\"chatcmpl-x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut s = ChatToMessagesStream::new("claude", 1);
        let evs = events(&s.feed(sse.as_bytes()).unwrap());
        let stop = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert_eq!(stop.1["delta"]["stop_reason"], "end_turn");
    }

    /// Azure's first chunk has an empty id (and no choices): the message id
    /// comes from the next one. With no id at all, each answer gets a fresh
    /// one of its own.
    #[test]
    fn the_message_id_is_never_empty_or_shared() {
        let first = sse_chunk(json!({"id": "", "model": "", "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}));
        let mut s = ChatToMessagesStream::new("claude", 1);
        assert!(s.feed(first.as_bytes()).unwrap().is_empty());
        let rest = concat!(
            "data: {\"id\":\"chatcmpl-real\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-real\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let evs = events(&s.feed(rest.as_bytes()).unwrap());
        assert_eq!(evs[0].0, "message_start");
        assert_eq!(evs[0].1["message"]["id"], "msg_real");
        assert_eq!(evs[0].1["message"]["model"], "gpt-4o");
        // No id anywhere: `msg_` and 24 hex digits, different each time.
        let anonymous = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let mut s = ChatToMessagesStream::new("claude", 1);
                let evs = events(&s.feed(anonymous.as_bytes()).unwrap());
                evs[0].1["message"]["id"].as_str().unwrap().to_string()
            })
            .collect();
        for id in &ids {
            let hex = id.strip_prefix("msg_").unwrap();
            assert_eq!(hex.len(), 24, "{id}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(ids[0], ids[1]);
        // A whole answer with no id, or an empty one.
        let a = response_from_chat(
            &json!({"choices": [{"index": 0, "message": {"content": "Hi"}}]}),
            "m",
        );
        let b = response_from_chat(
            &json!({"id": "", "choices": [{"index": 0, "message": {"content": "Hi"}}]}),
            "m",
        );
        assert_eq!(a["id"].as_str().unwrap().len(), 28);
        assert_ne!(a["id"], b["id"]);
    }

    #[test]
    fn openai_errors_become_anthropic_errors() {
        let b = error_from_openai(
            429,
            br#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        );
        let v: Value = serde_json::from_slice(&error_from_openai(502, b"bad gateway")).unwrap();
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["message"], "bad gateway");
        // The SDKs' BillingError and GatewayTimeoutError.
        assert_eq!(error_type(402), "billing_error");
        assert_eq!(error_type(504), "timeout_error");
    }
}
