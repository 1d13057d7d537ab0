//! OpenAI request parsing and validation. Bodies stay `serde_json` objects so that
//! fields this gateway does not know are forwarded untouched; the fields it relies
//! on are checked with errors that name the parameter.

use crate::error::ApiError;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// Anthropic Messages (`/v1/messages`), inbound.
    Messages,
    /// Anthropic's `/v1/messages/count_tokens`.
    MessagesCountTokens,
    /// OpenAI Responses (`/v1/responses`), inbound.
    Responses,
    /// `/v1/responses/input_tokens`.
    ResponsesInputTokens,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" | "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" | "/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" | "/embeddings" => Some(Endpoint::Embeddings),
            "/v1/messages" => Some(Endpoint::Messages),
            "/v1/messages/count_tokens" => Some(Endpoint::MessagesCountTokens),
            "/v1/responses" | "/responses" => Some(Endpoint::Responses),
            "/v1/responses/input_tokens" | "/responses/input_tokens" => {
                Some(Endpoint::ResponsesInputTokens)
            }
            _ => None,
        }
    }

    /// Path below an OpenAI-compatible provider's base URL (which carries
    /// the `/v1`). Messages requests go there translated to Chat Completions.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses => {
                "/chat/completions"
            }
            Endpoint::ResponsesInputTokens => "/responses/input_tokens",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::MessagesCountTokens => "/messages/count_tokens",
        }
    }

    /// The client speaks Anthropic's API (and gets its shapes and errors).
    pub fn is_anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::MessagesCountTokens)
    }

    /// A chat request in the canonical shape (what the cache and the router read).
    pub fn is_chat(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::MessagesCountTokens => "messages_count_tokens",
            Endpoint::Responses => "responses",
            Endpoint::ResponsesInputTokens => "responses_input_tokens",
        }
    }
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client asked for a usage chunk at the end of the stream.
    pub client_wants_usage: bool,
    /// The client's own body, for a provider that speaks its API (passed
    /// through byte for byte but for the model name).
    pub native: Option<bytes::Bytes>,
    /// What an Anthropic Messages request uses that only Anthropic takes.
    pub anthropic_only: crate::messages::AnthropicOnly,
    /// A Responses request: its id, the request as sent, and the stored
    /// conversation it continues.
    pub responses: Option<Box<crate::responses::ResponsesRequest>>,
}

impl ParsedRequest {
    /// The body with `model` replaced by the upstream's model name and, for streams,
    /// `stream_options.include_usage` set when `force_usage` (so cost is exact).
    ///
    /// When the client's own OpenAI body is kept (`native`), it is edited in
    /// place — the model spliced in, `stream_options` set — and every other
    /// byte goes as sent: no clone of the parsed body, no re-serialising
    /// (a large prompt's cost on the proxy).
    ///
    /// A chat request's token limit goes in `limit_field`, the name the
    /// provider takes (`max_tokens` or `max_completion_tokens`), when it has
    /// one: a limit given under the other name is renamed (given under
    /// both, the smaller goes). None: the names go as given.
    pub fn upstream_body(
        &self,
        upstream_model: &str,
        force_usage: bool,
        limit_field: Option<&str>,
    ) -> bytes::Bytes {
        self.upstream_body_without(upstream_model, force_usage, limit_field, &[])
    }

    /// [`Self::upstream_body`] without the top-level fields `leave_out`
    /// (parameters the chosen model does not take).
    pub fn upstream_body_without(
        &self,
        upstream_model: &str,
        force_usage: bool,
        limit_field: Option<&str>,
        leave_out: &[&str],
    ) -> bytes::Bytes {
        let leaves_out = leave_out.iter().any(|k| self.body.contains_key(*k));
        let wants_usage = self.stream && force_usage && self.endpoint != Endpoint::Embeddings;
        let openai = matches!(
            self.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
        );
        let other_limit = match limit_field {
            Some("max_tokens") => "max_completion_tokens",
            _ => "max_tokens",
        };
        let rename = limit_field.is_some()
            && self.endpoint.upstream_suffix() == "/chat/completions"
            && self.body.contains_key(other_limit);
        if let (true, false, false, Some(raw)) = (openai, rename, leaves_out, self.native.as_ref())
        {
            let out = if wants_usage && !self.client_wants_usage {
                let mut opts = match self.body.get("stream_options") {
                    Some(Value::Object(o)) => o.clone(),
                    _ => Map::new(),
                };
                opts.insert("include_usage".into(), Value::Bool(true));
                crate::messages::splice_model(raw, upstream_model)
                    .and_then(|o| {
                        crate::messages::set_top_level(&o, "stream_options", &Value::Object(opts))
                    })
                    .map(bytes::Bytes::from)
            } else {
                // The client's own buffer when the name needs no change.
                crate::messages::splice_model_bytes(raw, upstream_model)
            };
            if let Some(out) = out {
                return out;
            }
        }
        let mut body = self.body.clone();
        for k in leave_out {
            body.remove(*k);
        }
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if let (true, Some(field)) = (rename, limit_field) {
            if let Some(limit) = body.remove(other_limit) {
                let smaller = match (body.get(field).and_then(Value::as_u64), limit.as_u64()) {
                    (Some(own), Some(other)) if other < own => Some(limit),
                    (Some(_), _) => None,
                    (None, _) => Some(limit),
                };
                if let Some(limit) = smaller {
                    body.insert(field.to_string(), limit);
                }
            }
        }
        if self.stream && force_usage && self.endpoint != Endpoint::Embeddings {
            // (A client's `"stream_options": null` is replaced: kept, it
            // would leave the stream without its usage.)
            match body.get_mut("stream_options") {
                Some(Value::Object(o)) => {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
                _ => {
                    let mut o = Map::new();
                    o.insert("include_usage".into(), Value::Bool(true));
                    body.insert("stream_options".into(), Value::Object(o));
                }
            }
        }
        serde_json::to_vec(&body).unwrap_or_default().into()
    }
}

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

fn expect(param: &str, v: &Value, ok: bool, want: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_param(
            param,
            format!(
                "Invalid type for '{param}': expected {want}, but got {}.",
                type_name(v)
            ),
        ))
    }
}

fn check_number(
    body: &Map<String, Value>,
    param: &str,
    min: f64,
    max: f64,
) -> Result<(), ApiError> {
    match body.get(param) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => {
            let n = v.as_f64();
            expect(param, v, n.is_some(), "a number")?;
            let n = n.unwrap_or_default();
            if n < min || n > max {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    format!("'{param}' must be between {min} and {max}, got {n}."),
                )
                .with_param(param));
            }
            Ok(())
        }
    }
}

fn check_int(body: &Map<String, Value>, param: &str, min: i64) -> Result<(), ApiError> {
    match body.get(param) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => {
            expect(param, v, v.is_i64() || v.is_u64(), "an integer")?;
            if v.as_i64().is_some_and(|n| n < min) {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    format!("'{param}' must be at least {min}."),
                )
                .with_param(param));
            }
            Ok(())
        }
    }
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// The prompts of a request: one, or each of a legacy completions batch
/// (`prompt` as a list of texts or of token lists; one list of tokens is
/// one prompt).
fn prompts(body: &Map<String, Value>) -> u64 {
    match body.get("prompt") {
        Some(Value::Array(a)) if a.iter().any(|p| p.is_string() || p.is_array()) => {
            a.len().max(1) as u64
        }
        _ => 1,
    }
}

/// The choices an answer holds: `n` for each prompt.
pub fn choices_returned(body: &Map<String, Value>) -> u64 {
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    n.saturating_mul(prompts(body))
}

/// The answers the provider writes, each billed: `n` for each prompt, or
/// `best_of` when larger (legacy completions write `best_of` and return
/// the best `n`).
pub fn answers_written(body: &Map<String, Value>) -> u64 {
    let best_of = body
        .get("best_of")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    n.max(best_of).saturating_mul(prompts(body))
}

/// A request body as a JSON object, for every API the gateway serves: an
/// empty body, one that is not JSON and one that is not an object each get
/// a 400 `invalid_json` saying which (the caller's API shapes the error).
pub fn read_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body is empty; send a JSON object.",
        ));
    }
    match serde_json::from_slice::<UniqueKeys>(bytes) {
        Ok(UniqueKeys(m)) => Ok(m),
        Err(e) if e.is_data() => match serde_json::from_slice::<Value>(bytes) {
            // The top level is no object.
            Ok(other) if !other.is_object() => Err(ApiError::invalid_request(
                "invalid_json",
                format!(
                    "The request body must be a JSON object, not {}.",
                    type_name(&other)
                ),
            )),
            // A key given twice.
            _ => Err(ApiError::invalid_request(
                "invalid_json",
                format!("{e}. Send each field once."),
            )),
        },
        Err(e) => Err(ApiError::invalid_request(
            "invalid_json",
            format!("We could not parse the JSON body of your request ({e}). Send valid JSON with Content-Type: application/json."),
        )),
    }
}

/// A JSON object whose top-level keys are all different. A key given twice
/// would be read one way here (the last one wins) and may be read another
/// way where the body is edited in place (the model, a lowered
/// `max_tokens`) or by the provider: a request the gateway capped could
/// reach the provider uncapped. Such a body is refused.
struct UniqueKeys(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut m = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    let v: Value = a.next_value()?;
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "The request body gives the field `{k}` more than once"
                        )));
                    }
                    m.insert(k, v);
                }
                Ok(UniqueKeys(m))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Parse and validate a request body for `endpoint`.
pub fn parse_request(endpoint: Endpoint, bytes: &[u8]) -> Result<ParsedRequest, ApiError> {
    if endpoint.is_anthropic() {
        return crate::messages::parse(endpoint, bytes::Bytes::copy_from_slice(bytes));
    }
    if matches!(
        endpoint,
        Endpoint::Responses | Endpoint::ResponsesInputTokens
    ) {
        let body = bytes::Bytes::copy_from_slice(bytes);
        let map = crate::responses::read(&body)?;
        return crate::responses::parse(endpoint, map, body, None, "resp_fuzz".into());
    }
    let body = read_object(bytes)?;

    let model = match body.get("model") {
        None | Some(Value::Null) => {
            return Err(ApiError::missing_param(
                "model",
                "the model or route alias to use",
            ))
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(
                ApiError::invalid_request("invalid_value", "'model' must not be empty.")
                    .with_param("model"),
            )
        }
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(ApiError::invalid_param(
                "model",
                format!(
                    "Invalid type for 'model': expected a string, but got {}.",
                    type_name(v)
                ),
            ))
        }
    };

    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::invalid_param(
                "stream",
                format!(
                    "Invalid type for 'stream': expected a boolean, but got {}.",
                    type_name(v)
                ),
            ))
        }
    };
    let mut client_wants_usage = false;
    match body.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    "'stream_options' is only allowed when 'stream' is true.",
                )
                .with_param("stream_options"));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => client_wants_usage = *b,
                Some(v) => expect("stream_options.include_usage", v, false, "a boolean")?,
            }
        }
        Some(v) => expect("stream_options", v, false, "an object")?,
    }

    check_number(&body, "temperature", 0.0, 2.0)?;
    check_number(&body, "top_p", 0.0, 1.0)?;
    check_number(&body, "presence_penalty", -2.0, 2.0)?;
    check_number(&body, "frequency_penalty", -2.0, 2.0)?;
    check_int(&body, "max_tokens", 1)?;
    check_int(&body, "max_completion_tokens", 1)?;
    check_int(&body, "n", 1)?;
    // A string; its value is the provider's to judge (OpenAI's efforts,
    // Groq's `default`, values yet to come): the gateway reads only the
    // ones it maps to a thinking budget.
    if let Some(v) = body.get("reasoning_effort") {
        expect(
            "reasoning_effort",
            v,
            v.is_null() || v.is_string(),
            "a string",
        )?;
    }
    if let Some(v) = body.get("stop") {
        expect(
            "stop",
            v,
            v.is_null() || v.is_string() || v.is_array(),
            "a string or an array of strings",
        )?;
    }

    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = match body.get("messages") {
                None | Some(Value::Null) => {
                    return Err(ApiError::missing_param(
                        "messages",
                        "the conversation so far",
                    ))
                }
                Some(Value::Array(a)) => a,
                Some(v) => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!(
                            "Invalid type for 'messages': expected an array, but got {}.",
                            type_name(v)
                        ),
                    ))
                }
            };
            if messages.is_empty() {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    "'messages' must contain at least one message.",
                )
                .with_param("messages"));
            }
            for (i, m) in messages.iter().enumerate() {
                // Named only when something is wrong: a valid message costs no allocation.
                let param = || format!("messages[{i}]");
                let Value::Object(m) = m else {
                    let param = param();
                    return Err(ApiError::invalid_param(
                        &param,
                        format!(
                            "Invalid type for '{param}': expected an object, but got {}.",
                            type_name(m)
                        ),
                    ));
                };
                match m.get("role") {
                    Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
                    Some(Value::String(r)) => {
                        let param = param();
                        return Err(ApiError::invalid_request(
                            "invalid_value",
                            format!(
                                "Invalid value for '{param}.role': {r:?}. Supported: {}.",
                                ROLES.join(", ")
                            ),
                        )
                        .with_param(format!("{param}.role")));
                    }
                    None => {
                        return Err(ApiError::missing_param(
                            &format!("{}.role", param()),
                            "system, user, assistant or tool",
                        ))
                    }
                    Some(v) => expect(&format!("{}.role", param()), v, false, "a string")?,
                }
                if let Some(c) = m.get("content") {
                    if !(c.is_string() || c.is_array() || c.is_null()) {
                        expect(
                            &format!("{}.content", param()),
                            c,
                            false,
                            "a string or an array of content parts",
                        )?;
                    }
                }
            }
            if let Some(v) = body.get("tools") {
                expect("tools", v, v.is_array() || v.is_null(), "an array")?;
            }
        }
        Endpoint::Completions => match body.get("prompt") {
            None | Some(Value::Null) => {
                return Err(ApiError::missing_param("prompt", "the text to complete"))
            }
            Some(v) => expect(
                "prompt",
                v,
                v.is_string() || v.is_array(),
                "a string or an array",
            )?,
        },
        Endpoint::Embeddings => {
            match body.get("input") {
                None | Some(Value::Null) => {
                    return Err(ApiError::missing_param("input", "the text to embed"))
                }
                Some(v) => expect(
                    "input",
                    v,
                    v.is_string() || v.is_array(),
                    "a string or an array",
                )?,
            }
            if stream {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    "Embeddings cannot be streamed.",
                )
                .with_param("stream"));
            }
        }
        Endpoint::Messages
        | Endpoint::MessagesCountTokens
        | Endpoint::Responses
        | Endpoint::ResponsesInputTokens => {}
    }

    Ok(ParsedRequest {
        endpoint,
        body,
        model,
        stream,
        client_wants_usage,
        native: None,
        anthropic_only: Default::default(),
        responses: None,
    })
}

/// Which tool call of a streamed choice a `tool_calls` delta continues, as
/// a slot number: 0 for the first call seen, 1 for the next, and so on.
/// OpenAI numbers the calls (`index`); some compatible servers (Gemini's)
/// leave the index out and send each call whole with its own `id`: a new id
/// is a new call, and a delta with neither continues the last one. Others
/// (Ollama) give every call of a turn the same `index` with its own `id`:
/// an id other than the one that index holds is a new call too, and a later
/// delta with that index and no id continues the newest.
#[derive(Debug, Default, Clone)]
pub struct ToolCallIndex {
    /// The id of each call seen, by its slot.
    ids: Vec<Option<String>>,
    /// The slot each upstream `index` stands for now, by that index.
    slots: Vec<Option<usize>>,
}

impl ToolCallIndex {
    pub fn of(&mut self, call: &Value) -> usize {
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|i| !i.is_empty());
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .filter(|n| *n < 4096)
            .map(|n| n as usize);
        if let Some(n) = index {
            if self.slots.len() <= n {
                self.slots.resize(n + 1, None);
            }
            if let Some(slot) = self.slots[n] {
                let held = self.ids[slot].as_deref();
                // An id other than the one the index holds: another call.
                let another = matches!((id, held), (Some(id), Some(held)) if id != held);
                if !another {
                    if held.is_none() {
                        self.ids[slot] = id.map(str::to_string);
                    }
                    return slot;
                }
                // Another call under this index: one seen before (its id
                // again), or a new one.
                let seen = id.and_then(|id| self.ids.iter().position(|k| k.as_deref() == Some(id)));
                if let Some(seen) = seen {
                    self.slots[n] = Some(seen);
                    return seen;
                }
            }
            self.ids.push(id.map(str::to_string));
            let slot = self.ids.len() - 1;
            self.slots[n] = Some(slot);
            return slot;
        }
        match id {
            Some(id) => match self.ids.iter().position(|k| k.as_deref() == Some(id)) {
                Some(n) => n,
                None => {
                    self.ids.push(Some(id.to_string()));
                    self.ids.len() - 1
                }
            },
            None => self.ids.len().saturating_sub(1),
        }
    }
}

/// The text a streamed `delta.content` (or a message's `content`) carries:
/// the string itself, or the text parts of a list of content chunks (as
/// Mistral's reasoning models send, thinking chunks beside the text ones)
/// joined as they come. Thinking chunks are not text. None when it is
/// neither a string nor a list.
pub fn content_text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// The text of a chat message's `content` (string, or the text parts of an array).
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(endpoint: Endpoint, body: &str) -> ApiError {
        parse_request(endpoint, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn valid_chat() {
        let r = parse_request(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"extra":{"kept":1}}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        assert!(!r.client_wants_usage);
        let up: Value = serde_json::from_slice(&r.upstream_body("up-m", true, None)).unwrap();
        assert_eq!(up["model"], "up-m");
        assert_eq!(up["stream_options"]["include_usage"], true);
        assert_eq!(up["extra"]["kept"], 1);
        // `"stream_options": null` with a limit renamed (the body rebuilt):
        // the usage is still asked for.
        let r = parse_request(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":null,"max_tokens":5}"#,
        )
        .unwrap();
        let up: Value =
            serde_json::from_slice(&r.upstream_body("up-m", true, Some("max_completion_tokens")))
                .unwrap();
        assert_eq!(up["stream_options"]["include_usage"], true, "{up}");
        assert_eq!(up["max_completion_tokens"], 5, "{up}");
    }

    #[test]
    fn the_clients_own_body_is_edited_in_place() {
        let raw = br#"{ "model" : "m", "messages":[{"role":"user","content":"hi \u00e9"}], "stream":true, "stream_options":{"x":1} }"#;
        let mut r = parse_request(Endpoint::ChatCompletions, raw).unwrap();
        let parsed_path: Value =
            serde_json::from_slice(&r.upstream_body("up-m", true, None)).unwrap();
        r.native = Some(bytes::Bytes::from_static(raw));
        let out = r.upstream_body("up-m", true, None);
        // The same request as the re-serialising path makes ...
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), parsed_path);
        // ... with the client's bytes (spacing, escapes) kept.
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            r#"{ "model" : "up-m", "messages":[{"role":"user","content":"hi \u00e9"}], "stream":true, "stream_options":{"include_usage":true,"x":1} }"#
        );
        // Not streamed: only the model changes.
        let raw = br#"{"messages":[{"role":"user","content":"x"}],"model":"m"}"#;
        let mut r = parse_request(Endpoint::ChatCompletions, raw).unwrap();
        r.native = Some(bytes::Bytes::from_static(raw));
        assert_eq!(
            r.upstream_body("m2", true, None),
            br#"{"messages":[{"role":"user","content":"x"}],"model":"m2"}"#.to_vec()
        );
    }

    #[test]
    fn the_token_limit_goes_in_the_field_the_provider_takes() {
        let limit = |endpoint, raw: &'static [u8], field| {
            let mut r = parse_request(endpoint, raw).unwrap();
            r.native = Some(bytes::Bytes::from_static(raw));
            let v: Value =
                serde_json::from_slice(&r.upstream_body("up", false, Some(field))).unwrap();
            (v["max_tokens"].clone(), v["max_completion_tokens"].clone())
        };
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":7}"#;
        let renamed = limit(Endpoint::ChatCompletions, chat, "max_completion_tokens");
        assert_eq!(renamed, (Value::Null, json!(7)));
        assert_eq!(
            limit(Endpoint::ChatCompletions, chat, "max_tokens"),
            (json!(7), Value::Null)
        );
        let new = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":9}"#;
        assert_eq!(
            limit(Endpoint::ChatCompletions, new, "max_tokens"),
            (json!(9), Value::Null)
        );
        // Both given: the smaller goes, under the provider's name.
        let both = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":7,"max_completion_tokens":9}"#;
        let kept = limit(Endpoint::ChatCompletions, both, "max_completion_tokens");
        assert_eq!(kept, (Value::Null, json!(7)));
        assert_eq!(
            limit(Endpoint::ChatCompletions, both, "max_tokens"),
            (json!(7), Value::Null)
        );
        // The legacy completions endpoint knows only max_tokens.
        let legacy = br#"{"model":"m","prompt":"x","max_tokens":7}"#;
        let same = limit(Endpoint::Completions, legacy, "max_completion_tokens");
        assert_eq!(same, (json!(7), Value::Null));
        // A body with nothing to rename is still the client's own bytes.
        let raw = br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        let mut r = parse_request(Endpoint::ChatCompletions, raw).unwrap();
        r.native = Some(bytes::Bytes::from_static(raw));
        assert_eq!(
            r.upstream_body("m", false, Some("max_completion_tokens")),
            raw.to_vec()
        );
        // A provider with no name of its own: the client's names go as given.
        let mut r = parse_request(Endpoint::ChatCompletions, new).unwrap();
        r.native = Some(bytes::Bytes::from_static(new));
        assert_eq!(r.upstream_body("m", false, None), new.to_vec());
        // A parameter the model does not take is left out (only when there).
        let raw = br#"{"model":"a","reasoning_effort":"high","messages":[{"role":"user","content":"x"}]}"#;
        let mut r = parse_request(Endpoint::ChatCompletions, raw).unwrap();
        r.native = Some(bytes::Bytes::from_static(raw));
        let up: Value = serde_json::from_slice(&r.upstream_body_without(
            "m",
            false,
            None,
            &["reasoning_effort"],
        ))
        .unwrap();
        assert!(up.get("reasoning_effort").is_none(), "{up}");
        assert_eq!(
            (up["model"].as_str(), up["messages"][0]["content"].as_str()),
            (Some("m"), Some("x"))
        );
        let up: Value = serde_json::from_slice(&r.upstream_body("m", false, None)).unwrap();
        assert_eq!(up["reasoning_effort"], "high");
    }

    #[test]
    fn a_batch_of_prompts_and_best_of_count_every_answer() {
        let b = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(answers_written(&b(json!({"messages": []}))), 1);
        assert_eq!(answers_written(&b(json!({"n": 3}))), 3);
        assert_eq!(
            answers_written(&b(json!({"prompt": ["a", "b", "c"], "n": 2}))),
            6
        );
        assert_eq!(
            choices_returned(&b(json!({"prompt": ["a", "b", "c"], "n": 2}))),
            6
        );
        assert_eq!(
            answers_written(&b(json!({"prompt": "a", "best_of": 20, "n": 2}))),
            20
        );
        assert_eq!(
            choices_returned(&b(json!({"prompt": "a", "best_of": 20, "n": 2}))),
            2
        );
        // One prompt given as tokens; a batch of token lists.
        assert_eq!(answers_written(&b(json!({"prompt": [1, 2, 3]}))), 1);
        assert_eq!(answers_written(&b(json!({"prompt": [[1], [2]]}))), 2);
    }

    #[test]
    fn errors_name_the_parameter() {
        let e = err(Endpoint::ChatCompletions, "{not json");
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        let e = err(Endpoint::ChatCompletions, "[1,2]");
        assert_eq!(e.code, "invalid_json");
        assert!(
            e.message.contains("must be a JSON object, not an array"),
            "{e}"
        );
        // A field given twice is refused (the gateway lowers the first
        // `max_tokens` in place; the provider would read the last).
        for api in [
            Endpoint::ChatCompletions,
            Endpoint::Messages,
            Endpoint::Responses,
        ] {
            let e = err(
                api,
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"input":"hi","max_tokens":100000}"#,
            );
            assert_eq!((e.status, e.code), (400, "invalid_json"));
            assert!(e.message.contains("`max_tokens` more than once"), "{e}");
        }
        // Nested objects keep JSON's usual reading.
        assert!(parse_request(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","role":"user","content":"hi"}]}"#
        )
        .is_ok());
        let e = err(Endpoint::ChatCompletions, r#"{"messages":[]}"#);
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = err(Endpoint::ChatCompletions, r#"{"model":5,"messages":[]}"#);
        assert!(
            e.message.contains("expected a string, but got a number"),
            "{e}"
        );
        let e = err(Endpoint::ChatCompletions, r#"{"model":"m"}"#);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        );
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user"}],"temperature":"hot"}"#,
        );
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user"}],"reasoning_effort":3}"#,
        );
        assert_eq!(e.param.as_deref(), Some("reasoning_effort"));
        // Any string: the provider judges the value (Groq takes `default`).
        let ok = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"reasoning_effort":"default"}"#;
        assert!(parse_request(Endpoint::ChatCompletions, ok).is_ok());
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user"}],"temperature":3}"#,
        );
        assert_eq!(e.code, "invalid_value");
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
        );
        assert_eq!(e.param.as_deref(), Some("stream"));
        let e = err(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":1.5}"#,
        );
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = err(Endpoint::Embeddings, r#"{"model":"m"}"#);
        assert_eq!(e.param.as_deref(), Some("input"));
        let e = err(Endpoint::Completions, r#"{"model":"m","prompt":{}}"#);
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = err(Endpoint::ChatCompletions, "  ");
        assert_eq!(e.code, "invalid_json");
    }

    /// Ollama streams parallel calls all with index 0, each with its own
    /// id: each is a call of its own; a delta with no id continues the
    /// newest, and OpenAI's numbering keeps its meaning.
    #[test]
    fn tool_calls_sharing_an_index_with_their_own_ids_stay_apart() {
        let mut t = ToolCallIndex::default();
        assert_eq!(t.of(&json!({"index": 0, "id": "a"})), 0);
        assert_eq!(t.of(&json!({"index": 0, "id": "b"})), 1);
        assert_eq!(t.of(&json!({"index": 0})), 1);
        assert_eq!(t.of(&json!({"index": 0, "id": "b"})), 1);
        assert_eq!(t.of(&json!({"index": 0, "id": ""})), 1);
        // An earlier call's id again: that call.
        assert_eq!(t.of(&json!({"index": 0, "id": "a"})), 0);
        assert_eq!(t.of(&json!({"index": 0})), 0);
        // OpenAI: the id comes once, in the call's first delta.
        let mut t = ToolCallIndex::default();
        assert_eq!(t.of(&json!({"index": 0, "id": "a"})), 0);
        assert_eq!(t.of(&json!({"index": 1, "id": "b"})), 1);
        assert_eq!(t.of(&json!({"index": 0})), 0);
        assert_eq!(t.of(&json!({"index": 1})), 1);
        // An index with no id at first, its id later: the same call.
        let mut t = ToolCallIndex::default();
        assert_eq!(t.of(&json!({"index": 3})), 0);
        assert_eq!(t.of(&json!({"index": 3, "id": "x"})), 0);
        assert_eq!(t.of(&json!({"index": 5, "id": "y"})), 1);
        // No index: each new id is a new call.
        let mut t = ToolCallIndex::default();
        assert_eq!(t.of(&json!({"id": "c1"})), 0);
        assert_eq!(t.of(&json!({"id": "c2"})), 1);
        assert_eq!(t.of(&json!({})), 1);
        assert_eq!(t.of(&json!({"id": "c1"})), 0);
    }

    #[test]
    fn content_text_of_reads_strings_and_text_chunks() {
        assert_eq!(content_text_of(&json!("hi")).as_deref(), Some("hi"));
        let mistral = json!([
            {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
            {"type": "text", "text": "Hello"},
            {"type": "text", "text": " world"}
        ]);
        assert_eq!(content_text_of(&mistral).as_deref(), Some("Hello world"));
        assert_eq!(content_text_of(&Value::Null), None);
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/embeddings/"),
            Some(Endpoint::Embeddings)
        );
        assert_eq!(Endpoint::from_path("/v2/x"), None);
    }
}
