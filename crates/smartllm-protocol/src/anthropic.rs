//! Anthropic Messages API <-> OpenAI Chat Completions, both ways, streaming included,
//! so OpenAI clients use Claude models unchanged.

use crate::error::ApiError;
use crate::sse::{data_event, SseEvent, SseParser, SseTooLarge, StreamError, DONE_EVENT};
use crate::usage::Usage;
use serde_json::{json, Map, Value};

/// The answer's limit Anthropic needs when a Chat Completions request sets
/// none and the model's own most is not known (`profile.max_output_tokens`).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn text_of(content: &Value) -> String {
    crate::openai::content_text(content)
}

/// OpenAI content (string or parts) -> Anthropic content blocks. A part
/// Anthropic has no block for (audio, a file by id, a file other than a PDF)
/// is an error naming it: the request goes to a deployment that can read it,
/// never to Claude without it.
fn content_blocks(content: &Value) -> Result<Vec<Value>, ApiError> {
    let parts = match content {
        // (Blank text is Anthropic's 400: "text content blocks must contain
        // non-whitespace text".)
        Value::String(s) if s.trim().is_empty() => return Ok(Vec::new()),
        Value::String(s) => return Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts,
        _ => return Ok(Vec::new()),
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        // An empty (or blank) text block is Anthropic's 400: left out.
        if kind == "text"
            && p.get("text")
                .and_then(Value::as_str)
                .is_some_and(|t| t.trim().is_empty())
        {
            continue;
        }
        let block = match kind {
            "text" => Some(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(Value::String(String::new()))})),
            // An earlier answer's refusal, in the history: its words.
            "refusal" => Some(json!({"type": "text", "text": p.get("refusal").cloned().unwrap_or(Value::String(String::new()))})),
            "image_url" => p
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
                .and_then(|url| match url.strip_prefix("data:") {
                    Some(rest) => {
                        let (media, data) = rest.split_once(";base64,")?;
                        Some(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}))
                    }
                    None => Some(json!({"type": "image", "source": {"type": "url", "url": url}})),
                }),
            // A PDF inline (`file_data`, as the Responses API's `input_file`
            // becomes): a document block.
            "file" => p
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
                .and_then(|d| d.strip_prefix("data:application/pdf;base64,"))
                .map(|data| {
                    let mut doc = json!({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}});
                    if let Some(name) = p.get("file").and_then(|f| f.get("filename")).and_then(Value::as_str) {
                        doc["title"] = json!(name);
                    }
                    doc
                }),
            _ => None,
        };
        match block {
            Some(b) => out.push(b),
            None => {
                return Err(untranslatable(
                    &format!("a `{kind}` content part"),
                    "content",
                ))
            }
        }
    }
    Ok(out)
}

/// A request field or part Anthropic models cannot take: a 400 that names
/// it (another deployment or model in the chain may still take the request).
fn untranslatable(what: &str, param: &str) -> ApiError {
    ApiError::invalid_request(
        "unsupported_for_provider",
        format!("Anthropic models cannot take {what}; send the request to an OpenAI-compatible model, or leave it out."),
    )
    .with_param(param)
}

/// A tool call id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): other
/// characters (`functions.get_weather:0`, as some servers write them) become
/// `_` and a short digest of the id as sent follows (`call.1` and `call:1`
/// stay two ids), the same way in the call and in its result, so the two
/// still match.
fn tool_id(id: Option<&Value>) -> Value {
    let id = id.and_then(Value::as_str).unwrap_or("");
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Value::String(id.to_string());
    }
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    use sha2::Digest;
    let digest = hex::encode(&sha2::Sha256::digest(id.as_bytes())[..4]);
    Value::String(format!("{clean}_{digest}"))
}

fn push_message(out: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    // Anthropic wants alternating roles: merge consecutive turns of one role.
    if let Some(last) = out.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some(role) {
            if let Some(Value::Array(c)) = last.get_mut("content") {
                c.extend(blocks);
                return;
            }
        }
    }
    out.push(json!({"role": role, "content": blocks}));
}

/// Translate an OpenAI chat request body into an Anthropic Messages request.
/// `structured_outputs`: the model takes Anthropic's `output_config.format`
/// (Claude Sonnet 4.5, Opus 4.1 and later; listed in its capabilities).
/// What the model takes beyond plain Messages (its listed capabilities).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Takes {
    /// Anthropic's structured outputs (`output_config.format`).
    pub structured_outputs: bool,
    /// Extended thinking: `reasoning_effort` becomes a thinking budget.
    pub thinking: bool,
    /// The model's own output limit, to which the gateway lowers a larger
    /// `max_tokens` upstream: a thinking budget is sized within it.
    pub max_output_tokens: Option<u64>,
}

/// The thinking budget for an OpenAI `reasoning_effort` (`none` and
/// `minimal` ask for none).
fn thinking_budget(effort: &str) -> Option<u64> {
    match effort {
        "low" => Some(2048),
        "medium" => Some(8192),
        "high" => Some(16384),
        "xhigh" => Some(32768),
        _ => None,
    }
}

/// Anthropic's smallest thinking budget.
const MIN_THINKING_BUDGET: u64 = 1024;

pub fn request_to_anthropic(
    body: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    takes: Takes,
    default_max_tokens: u64,
) -> Result<Value, ApiError> {
    let structured_outputs = takes.structured_outputs;
    let mut system = Vec::new();
    let mut messages = Vec::new();
    let empty = Vec::new();
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    // The last turn that is no system message: a blank question there is
    // refused, elsewhere left out.
    let last_turn = msgs.iter().rposition(|m| {
        !matches!(
            m.get("role").and_then(Value::as_str),
            Some("system" | "developer")
        )
    });
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let t = text_of(content);
                if !t.is_empty() {
                    system.push(t);
                }
            }
            "user" => {
                let blocks = content_blocks(content)?;
                // A last question of blank text only: Anthropic's 400, named
                // here (left out, the turn before it would read as the
                // answer to go on with). One earlier in the history is left
                // out (OpenAI takes it).
                if blocks.is_empty() && last_turn == Some(i) {
                    return Err(ApiError::invalid_request(
                        "invalid_value",
                        "Anthropic models take no user message without content: every text part of the last one is empty.",
                    )
                    .with_param("messages"));
                }
                push_message(&mut messages, "user", blocks)
            }
            "assistant" => {
                let mut blocks = content_blocks(content)?;
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                    for c in calls {
                        let f = c.get("function").cloned().unwrap_or(Value::Null);
                        let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
                        blocks.push(json!({
                            "type": "tool_use",
                            "id": tool_id(c.get("id")),
                            "name": f.get("name").cloned().unwrap_or(Value::String(String::new())),
                            "input": input,
                        }));
                    }
                }
                push_message(&mut messages, "assistant", blocks);
            }
            "tool" => {
                let id = tool_id(m.get("tool_call_id"));
                // A tool that printed nothing: a result without content
                // (blank text is Anthropic's 400).
                let text = text_of(content);
                let result = if text.trim().is_empty() {
                    json!({"type": "tool_result", "tool_use_id": id})
                } else {
                    json!({"type": "tool_result", "tool_use_id": id, "content": text})
                };
                push_message(&mut messages, "user", vec![result]);
            }
            _ => {}
        }
    }
    // An answer the client began (a last assistant message): Anthropic
    // continues it, and refuses one ending in white space.
    if let Some(last) = messages
        .last_mut()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    {
        if let Some(Value::Array(blocks)) = last.get_mut("content") {
            if let Some(text) = blocks
                .last_mut()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .and_then(|b| b.get_mut("text"))
            {
                let trimmed = text.as_str().unwrap_or("").trim_end().to_string();
                *text = Value::String(trimmed);
            }
            if blocks
                .last()
                .is_some_and(|b| b.get("text").and_then(Value::as_str) == Some(""))
            {
                blocks.pop();
            }
            if blocks.is_empty() {
                messages.pop();
            }
        }
    }
    if messages.is_empty() {
        return Err(ApiError::invalid_request(
            "invalid_value",
            "Anthropic models need at least one user or assistant message besides the system prompt.",
        )
        .with_param("messages"));
    }
    // An answer the client began, as Claude will read it.
    let prefilled = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("assistant");
    // Legacy function calling has no translation here (its answers would
    // need `function_call`, not `tool_calls`): sent on, the functions would
    // be dropped without a word.
    let legacy_functions = body
        .get("functions")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
        || body
            .get("function_call")
            .is_some_and(|c| !c.is_null() && c.as_str() != Some("none"))
        || msgs.iter().any(|m| {
            m.get("role").and_then(Value::as_str) == Some("function")
                || m.get("function_call").is_some_and(|v| !v.is_null())
        });
    if legacy_functions {
        return Err(untranslatable(
            "legacy `functions` / `function_call` (use `tools` and `tool_choice`, which are translated)",
            "functions",
        ));
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(untranslatable("`n` above 1 (one answer per request)", "n"));
    }
    if body.contains_key("web_search_options") {
        // Claude searches through its own server tool, whose answer blocks
        // Chat Completions has no place for: sent on, the search would be
        // dropped without a word.
        return Err(untranslatable(
            "`web_search_options` (Claude searches through its web_search tool: use the Messages API)",
            "web_search_options",
        ));
    }
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(default_max_tokens);
    // What would change what the answer must hold, and that Claude cannot
    // give, is refused rather than left out: the client would read `None`
    // where it asked for log-probabilities or audio.
    let asked = |k: &str| {
        body.get(k)
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
    };
    if asked("logprobs")
        || body
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            > 0
    {
        return Err(untranslatable(
            "`logprobs` (Claude returns no token log-probabilities)",
            "logprobs",
        ));
    }
    let audio_out = body
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "audio"));
    if audio_out || asked("audio") {
        return Err(untranslatable(
            "audio output (`modalities`, `audio`)",
            "modalities",
        ));
    }
    if body
        .get("logit_bias")
        .and_then(Value::as_object)
        .is_some_and(|b| !b.is_empty())
    {
        return Err(untranslatable(
            "`logit_bias` (its keys are token ids of OpenAI's tokenizers)",
            "logit_bias",
        ));
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64) {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = body.get("top_p").and_then(Value::as_f64) {
        out.insert("top_p".into(), json!(p));
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    // `allowed_tools`: the tools the answer may call, of those listed.
    let allowed = body
        .get("tool_choice")
        .filter(|c| c.get("type").and_then(Value::as_str) == Some("allowed_tools"))
        .and_then(|c| c.get("allowed_tools"));
    let allowed_names: Option<Vec<&str>> = allowed
        .and_then(|a| a.get("tools"))
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
                    t.get(kind)
                        .and_then(|f| f.get("name"))
                        .or_else(|| t.get("name"))
                        .and_then(Value::as_str)
                })
                .collect()
        });
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let mut out_tools = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
            let name = t
                .get(kind)
                .and_then(|d| d.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            // (A tool `allowed_tools` leaves out is not sent at all.)
            if allowed_names.as_ref().is_some_and(|a| !a.contains(&name)) {
                continue;
            }
            if kind != "function" {
                // A `custom` tool (free-form input) has no Anthropic form:
                // dropped, the model could never call it.
                return Err(untranslatable(
                    &format!("tools[{i}] of type `{kind}` (Anthropic takes function tools)"),
                    &format!("tools[{i}].type"),
                ));
            }
            let Some(f) = t.get("function").filter(|f| f.get("name").is_some()) else {
                return Err(ApiError::missing_param(
                    &format!("tools[{i}].function.name"),
                    "a function tool's name",
                ));
            };
            let mut tool = Map::new();
            tool.insert("name".into(), f["name"].clone());
            // (A tool without a description goes without one.)
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                tool.insert("description".into(), d.clone());
            }
            tool.insert(
                "input_schema".into(),
                f.get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"})),
            );
            // Strict tools (`chat.completions.parse`'s, for one): their
            // arguments follow the schema. A model with Anthropic's
            // structured outputs is held to it too; to one without, the
            // schema goes as a plain tool's (the README says so).
            if structured_outputs && f.get("strict") == Some(&Value::Bool(true)) {
                tool.insert("strict".into(), Value::Bool(true));
            }
            out_tools.push(Value::Object(tool));
        }
        if !out_tools.is_empty() {
            out.insert("tools".into(), Value::Array(out_tools));
        }
    }
    if let Some(a) = allowed {
        if !out.contains_key("tools") {
            return Err(ApiError::invalid_request(
                "invalid_value",
                "tool_choice.allowed_tools names none of the tools in `tools`.",
            )
            .with_param("tool_choice.allowed_tools.tools"));
        }
        let mode = a.get("mode").and_then(Value::as_str).unwrap_or("auto");
        let kind = if mode == "required" { "any" } else { "auto" };
        out.insert("tool_choice".into(), json!({"type": kind}));
    }
    match body.get("tool_choice").filter(|_| allowed.is_none()) {
        Some(Value::String(s)) if s == "auto" => {
            out.insert("tool_choice".into(), json!({"type": "auto"}));
        }
        Some(Value::String(s)) if s == "required" => {
            out.insert("tool_choice".into(), json!({"type": "any"}));
        }
        Some(Value::String(s)) if s == "none" => {
            out.insert("tool_choice".into(), json!({"type": "none"}));
        }
        // Anything else is OpenAI's 400, not a choice left out (the model
        // would run on `auto` while the client asked for something else).
        Some(Value::String(s)) => {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!(
                    "Invalid value: '{s}'. Supported values are: 'none', 'auto', and 'required'."
                ),
            )
            .with_param("tool_choice"));
        }
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let Some(name) = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .filter(|n| n.as_str().is_some_and(|n| !n.is_empty()))
                else {
                    return Err(ApiError::missing_param(
                        "tool_choice.function.name",
                        "the name of the function to call",
                    ));
                };
                out.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
            }
            // A valid OpenAI choice, of a tool Anthropic has no form for.
            Some("custom") => {
                return Err(untranslatable(
                    "tool_choice of type `custom` (Anthropic takes function tools)",
                    "tool_choice.type",
                ));
            }
            Some(kind) => {
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    format!("Invalid value: '{kind}'. Supported values are: 'function', 'custom' and 'allowed_tools'."),
                )
                .with_param("tool_choice.type"));
            }
            None => {
                return Err(ApiError::missing_param(
                    "tool_choice.type",
                    "the kind of tool choice",
                ));
            }
        },
        Some(Value::Null) | None => {}
        Some(_) => {
            return Err(ApiError::invalid_request(
                "invalid_type",
                "Invalid type for 'tool_choice': expected one of a string or an object.",
            )
            .with_param("tool_choice"));
        }
    }
    // `parallel_tool_calls: false`: at most one tool call per answer.
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) && out.contains_key("tools") {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({"type": "auto"}));
        if choice.get("type").and_then(Value::as_str) != Some("none") {
            choice["disable_parallel_tool_use"] = json!(true);
        }
    }
    // Structured outputs: Anthropic's `output_config.format` holds the
    // schema (the answer is the JSON text, as OpenAI's is). JSON mode
    // (`json_object`) has no Anthropic field; its prompt asks for JSON.
    if let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) {
        match rf.get("type").and_then(Value::as_str) {
            Some("json_schema") if !structured_outputs => {
                return Err(untranslatable(
                    "response_format `json_schema` on a model not listed with the `structured_outputs` capability (list it in `profile.capabilities` for Claude models that take Anthropic's structured outputs)",
                    "response_format",
                ))
            }
            Some("json_schema") => {
                let Some(schema) = rf.get("json_schema").and_then(|j| j.get("schema")) else {
                    return Err(ApiError::invalid_request(
                        "invalid_value",
                        "response_format.json_schema.schema is required.",
                    )
                    .with_param("response_format"));
                };
                out.insert(
                    "output_config".into(),
                    json!({"format": {"type": "json_schema", "schema": schema}}),
                );
            }
            Some("text") | Some("json_object") | None => {}
            Some(other) => {
                return Err(untranslatable(
                    &format!("response_format `{other}`"),
                    "response_format",
                ))
            }
        }
    }
    // The end user's id: `safety_identifier` (OpenAI's newer name) or `user`,
    // as its sha256: Anthropic wants an opaque id and refuses one that looks
    // like an email address (OpenAI clients often send one), or a long one.
    if let Some(user) = ["safety_identifier", "user"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .filter(|u| !u.is_empty())
    {
        use sha2::Digest;
        let id = hex::encode(sha2::Sha256::digest(user.as_bytes()));
        out.insert("metadata".into(), json!({"user_id": id}));
    }
    // `reasoning_effort` to a Claude model with extended thinking: a budget
    // by the effort, at most half of `max_tokens` (which, as OpenAI's
    // `max_completion_tokens`, counts the thinking too) and at least
    // Anthropic's minimum, else none. Thinking takes no sampling settings
    // and no forced tool (Anthropic's 400s), so those go when it is on; a
    // forced tool keeps the request as it was, without thinking. So does a
    // request in the middle of a tool loop (its last assistant turn called
    // tools): with thinking on, Claude wants that turn to open with the
    // signed thinking block it wrote, which Chat Completions has no place
    // for, so the client could not send it back (Anthropic's 400 "Expected
    // `thinking` or `redacted_thinking`, but found `tool_use`").
    let mid_tool_loop = msgs
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    let forced_tool = out
        .get("tool_choice")
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t == "any" || t == "tool");
    // (Thinking cannot continue an answer the client began: Anthropic's
    // 400.)
    let room = takes
        .max_output_tokens
        .map_or(max_tokens, |most| max_tokens.min(most));
    // The gateway reads the effort here: a value OpenAI does not know (a
    // typo) is OpenAI's 400, not thinking left out unseen.
    let effort = body.get("reasoning_effort").and_then(Value::as_str);
    if let Some(e) = effort.filter(|e| {
        takes.thinking && !["none", "minimal", "low", "medium", "high", "xhigh"].contains(e)
    }) {
        return Err(ApiError::invalid_request(
            "invalid_value",
            format!("Invalid value for 'reasoning_effort': '{e}'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high' and 'xhigh'."),
        )
        .with_param("reasoning_effort"));
    }
    let budget = effort
        .and_then(thinking_budget)
        .map(|b| b.min(room / 2))
        .filter(|b| {
            takes.thinking
                && *b >= MIN_THINKING_BUDGET
                && !forced_tool
                && !mid_tool_loop
                && !prefilled
        });
    if let Some(budget) = budget {
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
        out.remove("temperature");
        out.remove("top_p");
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// A `stop_reason` that says the answer was cut at a token limit (the
/// request's, or the model's context window).
pub fn cut_at_limit(stop_reason: &str) -> bool {
    matches!(stop_reason, "max_tokens" | "model_context_window_exceeded")
}

fn finish_reason(stop: Option<&str>) -> Value {
    match stop {
        Some("end_turn") | Some("stop_sequence") | Some("pause_turn") => json!("stop"),
        Some("max_tokens") | Some("model_context_window_exceeded") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(_) => json!("stop"),
        None => Value::Null,
    }
}

/// Anthropic's `usage` object in the canonical [`Usage`].
pub fn usage_of(u: &Value) -> Usage {
    let get = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = get("cache_read_input_tokens");
    // `cache_creation` splits the writes by lifetime (5 minutes, 1 hour);
    // without it they are all 5-minute writes.
    let split = u.get("cache_creation").filter(|c| c.is_object());
    let part = |k: &str| {
        split
            .and_then(|c| c.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let (w5, w1) = (
        part("ephemeral_5m_input_tokens"),
        part("ephemeral_1h_input_tokens"),
    );
    // Saturating: absurd counts must not wrap round to a small bill.
    let written = get("cache_creation_input_tokens").max(w5.saturating_add(w1));
    Usage {
        prompt_tokens: get("input_tokens")
            .saturating_add(cached)
            .saturating_add(written),
        completion_tokens: get("output_tokens"),
        // The thinking within the output (`output_tokens_details`).
        reasoning_tokens: u
            .get("output_tokens_details")
            .and_then(|d| d.get("thinking_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cached_tokens: cached,
        cache_write_tokens: written,
        cache_write_1h_tokens: w1.min(written),
        tier: crate::usage::ServiceTier::of(u, "service_tier"),
        web_searches: u
            .get("server_tool_use")
            .and_then(|s| s.get("web_search_requests"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        ..Usage::default()
    }
}

fn openai_usage(u: &Usage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total(),
        // (Claude's cache writes: counted in `prompt_tokens`, named as
        // OpenAI-compatible gateways do, and carried to Responses usage.)
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_write_tokens},
    });
    // Claude's thinking, when it says how much: OpenAI's reasoning tokens
    // (inside `completion_tokens` in both APIs).
    if u.reasoning_tokens > 0 {
        v["completion_tokens_details"] = json!({"reasoning_tokens": u.reasoning_tokens});
    }
    v
}

/// Translate a complete Anthropic message into an OpenAI `chat.completion`.
pub fn response_to_openai(v: &Value, model: &str) -> (Value, Usage) {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    if let Some(blocks) = v.get("content").and_then(Value::as_array) {
        for b in blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("tool_use") => tool_calls.push(json!({
                    "id": b.get("id"),
                    "type": "function",
                    "function": {
                        "name": b.get("name"),
                        "arguments": serde_json::to_string(b.get("input").unwrap_or(&json!({}))).unwrap_or_default(),
                    }
                })),
                _ => {}
            }
        }
    }
    let usage = v.get("usage").map(usage_of).unwrap_or_default();
    let mut message = json!({"role": "assistant", "content": text});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
        if text.is_empty() {
            message["content"] = Value::Null;
        }
    }
    let id = v.get("id").and_then(Value::as_str).unwrap_or("msg");
    let out = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": crate::time::now_secs(),
        "model": v.get("model").and_then(Value::as_str).unwrap_or(model),
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(v.get("stop_reason").and_then(Value::as_str)),
            "logprobs": null,
        }],
        "usage": openai_usage(&usage),
    });
    (out, usage)
}

/// Translate an Anthropic error body into an OpenAI-shaped one.
pub fn error_to_openai(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "Anthropic returned HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            )
        });
    let kind = err
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("upstream_error");
    let kind = match kind {
        "invalid_request_error"
        | "authentication_error"
        | "permission_error"
        | "not_found_error"
        | "rate_limit_error" => kind,
        "overloaded_error" | "api_error" => "server_error",
        _ => "upstream_error",
    };
    serde_json::to_vec(
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
    .unwrap_or_default()
}

/// Streaming translation: Anthropic events in, OpenAI `chat.completion.chunk` SSE out.
#[derive(Debug)]
pub struct AnthropicStream {
    parser: SseParser,
    /// A `data:` event that is no JSON came: the stream is broken.
    pub malformed: bool,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    usage: Usage,
    saw_usage: bool,
    /// `message_delta` came: the usage is the final one (before it, only
    /// `message_start`'s prompt figures and a placeholder output count).
    usage_final: bool,
    /// Bytes of text, thinking and tool arguments generated so far: the
    /// estimate of the output when the stream ends before its usage.
    generated_bytes: u64,
    /// Anthropic content-block index -> OpenAI tool_calls index, and whether
    /// any argument text came for it.
    tool_index: Vec<(u64, usize, bool)>,
    /// The stream is over for the client: `message_stop` or an error was
    /// translated, and `[DONE]` sent.
    pub done: bool,
    /// The error the provider reported mid-stream (`event: error`): the
    /// stream failed. The client got it as an OpenAI error event.
    pub error: Option<StreamError>,
    /// The answer stopped at the token limit (`stop_reason: max_tokens`).
    pub truncated: bool,
    /// It stopped at the model's context window
    /// (`model_context_window_exceeded`), whatever limit was asked for.
    pub window_cut: bool,
    /// OpenAI chunks are built: off when the caller only reads the stream
    /// (its usage, its end) and relays the provider's own bytes.
    emit: bool,
}

impl AnthropicStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        AnthropicStream {
            parser: SseParser::default(),
            malformed: false,
            id: "chatcmpl-anthropic".into(),
            model: model.to_string(),
            created: crate::time::now_secs(),
            include_usage,
            usage: Usage::default(),
            saw_usage: false,
            usage_final: false,
            generated_bytes: 0,
            tool_index: Vec::new(),
            done: false,
            error: None,
            truncated: false,
            window_cut: false,
            emit: true,
        }
    }

    /// Read the stream without translating it: usage, end, errors and
    /// estimates as before, and `feed` returns nothing (no chunk is built
    /// for a client that gets the provider's own events).
    pub fn reading_only(mut self) -> Self {
        self.emit = false;
        self
    }

    pub fn usage(&self) -> Option<Usage> {
        self.saw_usage.then_some(self.usage)
    }

    /// The usage is the provider's final figure (`message_delta` came), not
    /// `message_start`'s placeholder output count.
    pub fn usage_final(&self) -> bool {
        self.usage_final
    }

    /// Output tokens generated so far, estimated from the text, thinking and
    /// tool arguments streamed (about 4 bytes a token).
    pub fn generated_tokens_estimate(&self) -> u64 {
        self.generated_bytes.div_ceil(4)
    }

    /// Add a chunk to `out`, built only when chunks are emitted.
    fn push(&self, out: &mut Vec<u8>, build: impl FnOnce(&Self) -> Vec<u8>) {
        if self.emit {
            out.extend(build(self));
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Vec<u8> {
        let v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        data_event(&v.to_string())
    }

    /// Feed upstream bytes; returns OpenAI SSE bytes to send now.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, SseTooLarge> {
        let events = self.parser.feed(chunk)?;
        let mut out = Vec::new();
        for ev in events {
            self.on_event(&ev, &mut out);
        }
        if !self.emit {
            // The error event and `[DONE]` (once a stream) were all that
            // could still be written.
            out.clear();
        }
        Ok(out)
    }

    fn on_event(&mut self, ev: &SseEvent, out: &mut Vec<u8>) {
        if self.error.is_some() {
            // The client already got the error and [DONE].
            return;
        }

        let parsed = serde_json::from_str::<Value>(&ev.data);
        if parsed.is_err()
            && !ev.data.trim().is_empty()
            && !ev.is_done()
            && !self.done
            && ev.event.as_deref() != Some("error")
        {
            // Not passed on; the stream is broken (the gateway ends it). (An
            // `error` event is one whether or not its body parses.)
            self.malformed = true;
            return;
        }
        let kind = ev
            .event
            .clone()
            .or_else(|| {
                let v = parsed.as_ref().ok()?;
                v.get("type").and_then(Value::as_str).map(str::to_string)
            })
            .unwrap_or_default();
        if kind == "error" {
            // Whether or not its body parses.
            let body = error_to_openai(500, ev.data.as_bytes());
            out.extend(data_event(&String::from_utf8_lossy(&body)));
            out.extend_from_slice(DONE_EVENT);
            self.error = Some(StreamError::from_event(ev).unwrap_or_else(|| StreamError {
                kind: None,
                code: None,
                message: String::from_utf8_lossy(&body).into_owned(),
            }));
            self.done = true;
            return;
        }
        let Ok(v) = parsed else {
            return;
        };
        match kind.as_str() {
            "message_start" => {
                let m = &v["message"];
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = format!("chatcmpl-{id}");
                }
                if let Some(model) = m.get("model").and_then(Value::as_str) {
                    self.model = model.to_string();
                }
                if let Some(u) = m.get("usage") {
                    self.usage = usage_of(u);
                    self.saw_usage = true;
                }
                // Content null, as OpenAI's own first chunk of an answer
                // that may be tool calls only: the SDK's accumulated
                // message then has `content: None` there, as the answer
                // sent whole does (text deltas fill it in).
                self.push(out, |s| {
                    s.chunk(json!({"role": "assistant", "content": null}), Value::Null)
                });
            }
            "content_block_start" => {
                let block = &v["content_block"];
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let n = self.tool_index.len();
                    self.tool_index.push((idx, n, false));
                    self.push(out, |s| s.chunk(
                        json!({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""}}]}),
                        Value::Null,
                    ));
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = d.get("text").and_then(Value::as_str).unwrap_or("");
                        self.generated_bytes += text.len() as u64;
                        self.push(out, |s| s.chunk(json!({"content": text}), Value::Null));
                    }
                    Some("input_json_delta") => {
                        let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let part = d.get("partial_json").and_then(Value::as_str).unwrap_or("");
                        self.generated_bytes += part.len() as u64;
                        let tool = self.tool_index.iter_mut().find(|(i, _, _)| *i == idx);
                        if let Some((_, n, got)) = tool.filter(|_| !part.is_empty()) {
                            *got = true;
                            let n = *n;
                            self.push(out, |s| s.chunk(json!({"tool_calls": [{"index": n, "function": {"arguments": part}}]}), Value::Null));
                        }
                    }
                    Some("thinking_delta") => {
                        let text = d.get("thinking").and_then(Value::as_str).unwrap_or("");
                        self.generated_bytes += text.len() as u64;
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                // A tool called with no arguments streams none ("" at most):
                // an OpenAI client gets "{}", as the provider's own JSON says.
                let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let tool = self.tool_index.iter_mut().find(|(i, _, _)| *i == idx);
                if let Some((_, n, got)) = tool.filter(|(_, _, got)| !*got) {
                    *got = true;
                    let n = *n;
                    self.push(out, |s| {
                        s.chunk(
                            json!({"tool_calls": [{"index": n, "function": {"arguments": "{}"}}]}),
                            Value::Null,
                        )
                    });
                }
            }
            "message_delta" => {
                if let Some(u) = v.get("usage") {
                    // message_delta carries cumulative output tokens (and sometimes input).
                    let d = usage_of(u);
                    self.usage.completion_tokens = d.completion_tokens;
                    if d.tier != crate::usage::ServiceTier::Standard {
                        self.usage.tier = d.tier;
                    }
                    // Cumulative, like the output tokens.
                    self.usage.web_searches = self.usage.web_searches.max(d.web_searches);
                    self.usage.reasoning_tokens =
                        self.usage.reasoning_tokens.max(d.reasoning_tokens);
                    if d.prompt_tokens > 0 {
                        // Without its `cache_creation` object the delta does
                        // not say how the writes split: message_start's split stays.
                        let split = u.get("cache_creation").is_some_and(Value::is_object);
                        let w1 = if split {
                            d.cache_write_1h_tokens
                        } else {
                            self.usage.cache_write_1h_tokens
                        };
                        self.usage.prompt_tokens = d.prompt_tokens;
                        self.usage.cached_tokens = d.cached_tokens;
                        self.usage.cache_write_tokens = d.cache_write_tokens;
                        self.usage.cache_write_1h_tokens = w1.min(d.cache_write_tokens);
                    }
                    self.saw_usage = true;
                    self.usage_final = true;
                }
                let stop = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str);
                self.truncated |= stop.is_some_and(cut_at_limit);
                self.window_cut |= stop == Some("model_context_window_exceeded");
                self.push(out, |s| {
                    s.chunk(json!({}), finish_reason(stop.or(Some("end_turn"))))
                });
            }
            "message_stop" => {
                if self.include_usage {
                    let u = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": openai_usage(&self.usage),
                    });
                    out.extend(data_event(&u.to_string()));
                }
                out.extend_from_slice(DONE_EVENT);
                self.done = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_web_searches_and_the_tier_are_read() {
        let u = usage_of(
            &json!({"input_tokens": 10, "output_tokens": 7, "service_tier": "priority",
            "server_tool_use": {"web_search_requests": 2}}),
        );
        assert_eq!(u.web_searches, 2);
        assert_eq!(u.tier, crate::usage::ServiceTier::Priority);
        assert_eq!(usage_of(&json!({"input_tokens": 1})).web_searches, 0);
    }

    #[test]
    fn cache_writes_split_into_5_minute_and_1_hour() {
        let u = usage_of(&json!({"input_tokens": 10, "output_tokens": 7,
            "cache_read_input_tokens": 5, "cache_creation_input_tokens": 6,
            "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 2}}));
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 21,
                completion_tokens: 7,
                cached_tokens: 5,
                cache_write_tokens: 6,
                cache_write_1h_tokens: 2,
                ..Usage::default()
            }
        );
        // An OpenAI client's usage names them (and Responses usage after it).
        let chat = openai_usage(&u);
        assert_eq!(
            chat["prompt_tokens_details"],
            json!({"cached_tokens": 5, "cache_write_tokens": 6})
        );
        assert_eq!(
            crate::responses::responses_usage(&chat)["input_tokens_details"]["cache_write_tokens"],
            6
        );
        // Without the split every write is a 5-minute one.
        let u = usage_of(&json!({"input_tokens": 1, "cache_creation_input_tokens": 3}));
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (4, 3, 0)
        );
    }

    fn translated(extra: Value) -> Result<Value, ApiError> {
        let mut body: Map<String, Value> = serde_json::from_value(json!({
            "model": "claude",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        }))
        .unwrap();
        if let Value::Object(e) = extra {
            body.extend(e);
        }
        request_to_anthropic(
            &body,
            "claude-x",
            false,
            Takes {
                structured_outputs: true,
                ..Takes::default()
            },
            DEFAULT_MAX_TOKENS,
        )
    }

    /// `reasoning_effort` becomes a thinking budget for a Claude model
    /// listed with `thinking`, within half of `max_tokens`, without the
    /// sampling settings thinking refuses; never for other models, for
    /// `minimal`, for a forced tool or when no budget fits.
    #[test]
    fn reasoning_effort_reaches_claude_as_a_thinking_budget() {
        let thinking = Takes {
            thinking: true,
            ..Takes::default()
        };
        let ask = |extra: Value, takes: Takes, default: u64| {
            let mut body: Map<String, Value> = serde_json::from_value(json!({
                "model": "c", "temperature": 0.3, "top_p": 0.9,
                "messages": [{"role": "user", "content": "Prove it"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            }))
            .unwrap();
            if let Value::Object(e) = extra {
                body.extend(e);
            }
            request_to_anthropic(&body, "claude-x", false, takes, default).unwrap()
        };
        for (effort, budget) in [
            ("low", 2048),
            ("medium", 8192),
            ("high", 16384),
            ("xhigh", 32768),
        ] {
            let out = ask(json!({"reasoning_effort": effort}), thinking, 100_000);
            assert_eq!(
                out["thinking"],
                json!({"type": "enabled", "budget_tokens": budget}),
                "{effort}"
            );
            assert!(
                out.get("temperature").is_none() && out.get("top_p").is_none(),
                "{out}"
            );
        }
        // A new question after a finished tool loop thinks again.
        let out = ask(
            json!({"reasoning_effort": "low", "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "assistant", "content": "It rains."},
                {"role": "user", "content": "And tomorrow?"}]}),
            thinking,
            64000,
        );
        assert_eq!(out["thinking"]["budget_tokens"], 2048);
        // Half of the answer's room at most: OpenAI's limit counts the
        // reasoning too.
        let out = ask(
            json!({"reasoning_effort": "high", "max_completion_tokens": 6000}),
            thinking,
            64000,
        );
        assert_eq!(out["thinking"]["budget_tokens"], 3000);
        assert_eq!(out["max_tokens"], 6000);
        let out = ask(json!({"reasoning_effort": "high"}), thinking, 4096);
        assert_eq!(out["thinking"]["budget_tokens"], 2048);
        // A value it does not know is a 400 where it would be read.
        let mut body: Map<String, Value> = serde_json::from_value(json!({
            "model": "c", "reasoning_effort": "hgih",
            "messages": [{"role": "user", "content": "Prove it"}]}))
        .unwrap();
        let e = request_to_anthropic(&body, "claude-x", false, thinking, 64000).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("reasoning_effort"));
        body.insert("reasoning_effort".into(), json!("high"));
        assert!(request_to_anthropic(&body, "claude-x", false, thinking, 64000).is_ok());
        // Within the model's own limit, which the gateway lowers a larger
        // `max_tokens` to upstream.
        let capped = Takes {
            max_output_tokens: Some(32_000),
            ..thinking
        };
        let out = ask(
            json!({"reasoning_effort": "xhigh", "max_completion_tokens": 100_000}),
            capped,
            64000,
        );
        assert_eq!(out["thinking"]["budget_tokens"], 16_000);
        for (extra, takes) in [
            (json!({"reasoning_effort": "high"}), Takes::default()),
            (json!({"reasoning_effort": "minimal"}), thinking),
            (json!({"reasoning_effort": "none"}), thinking),
            (
                json!({"reasoning_effort": "high", "max_tokens": 1500}),
                thinking,
            ),
            (
                json!({"reasoning_effort": "high", "tool_choice": "required"}),
                thinking,
            ),
            (
                json!({"reasoning_effort": "high", "tool_choice": {"type": "function", "function": {"name": "f"}}}),
                thinking,
            ),
            (json!({}), thinking),
            // A tool loop's next request: the last assistant turn called a
            // tool (its thinking block could not come back).
            (
                json!({"reasoning_effort": "high", "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]}),
                thinking,
            ),
            // An answer the client began.
            (
                json!({"reasoning_effort": "high", "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "The colour is"}]}),
                thinking,
            ),
        ] {
            let out = ask(extra.clone(), takes, 64000);
            assert!(out.get("thinking").is_none(), "{extra}: {out}");
            assert_eq!(out["temperature"], 0.3, "{extra}");
        }
    }

    /// Structured outputs, one tool call at a time, PDFs: carried, not
    /// dropped; what Claude cannot take is a 400 naming it.
    #[test]
    fn what_chat_asks_for_reaches_claude_or_is_refused_by_name() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
        let out = translated(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": true, "schema": schema}}})).unwrap();
        assert_eq!(
            out["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
        let out = translated(json!({"response_format": {"type": "json_object"}})).unwrap();
        assert!(out.get("output_config").is_none());
        // A model not listed as taking structured outputs: refused by name.
        let body: Map<String, Value> = serde_json::from_value(json!({"model": "c",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}))
        .unwrap();
        let e = request_to_anthropic(
            &body,
            "claude-3-5-haiku",
            false,
            Takes::default(),
            DEFAULT_MAX_TOKENS,
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("unsupported_for_provider", Some("response_format"))
        );

        let out = translated(json!({"parallel_tool_calls": false})).unwrap();
        assert_eq!(
            out["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        let out =
            translated(json!({"parallel_tool_calls": false, "tool_choice": "required"})).unwrap();
        assert_eq!(
            out["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        let out = translated(json!({"parallel_tool_calls": false, "tool_choice": "none"})).unwrap();
        assert_eq!(out["tool_choice"], json!({"type": "none"}));
        // Asked for off, or empty: nothing to refuse.
        translated(
            json!({"logprobs": false, "logit_bias": {}, "modalities": ["text"], "audio": null}),
        )
        .unwrap();
        // No limit asked: the model's own most (the caller's default).
        let plain: Map<String, Value> =
            serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]}))
                .unwrap();
        let out = request_to_anthropic(&plain, "c", false, Takes::default(), 8192).unwrap();
        assert_eq!(out["max_tokens"], 8192);

        let out = translated(json!({"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBER"}},
            {"type": "text", "text": "Summarise"}]}]}))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"][0],
            json!({"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}})
        );

        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (json!({"web_search_options": {}}), "web_search_options"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "logprobs"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (
                json!({"audio": {"voice": "alloy", "format": "wav"}}),
                "modalities",
            ),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]}]}),
                "content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}),
                "content",
            ),
            // Legacy function calling, in the request or its history.
            (
                json!({"functions": [{"name": "f", "parameters": {"type": "object"}}]}),
                "functions",
            ),
            (
                json!({"messages": [{"role": "user", "content": "w?"},
                    {"role": "assistant", "content": null, "function_call": {"name": "f", "arguments": "{}"}},
                    {"role": "function", "name": "f", "content": "rain"}]}),
                "functions",
            ),
            // A free-form tool has no Anthropic form.
            (
                json!({"tools": [{"type": "custom", "custom": {"name": "code_exec"}}]}),
                "tools[0].type",
            ),
        ] {
            let e = translated(extra.clone()).unwrap_err();
            assert_eq!(
                (e.status, e.code, e.param.as_deref()),
                (400, "unsupported_for_provider", Some(param)),
                "{extra}"
            );
        }
    }

    /// The end user's id reaches Claude as an opaque digest (Anthropic
    /// refuses one that looks like an email address).
    #[test]
    fn the_end_user_id_goes_to_claude_as_a_digest() {
        let out = translated(json!({"user": "ann@example.com"})).unwrap();
        let id = out["metadata"]["user_id"].as_str().unwrap();
        assert_eq!(id.len(), 64);
        assert!(!id.contains('@'));
        let newer =
            translated(json!({"user": "x", "safety_identifier": "ann@example.com"})).unwrap();
        assert_eq!(newer["metadata"]["user_id"], id, "safety_identifier first");
        assert!(translated(json!({})).unwrap().get("metadata").is_none());
    }

    /// What Anthropic refuses in a history another API wrote: empty text
    /// blocks, tool ids outside its alphabet, a prefill ending in white
    /// space; `allowed_tools` narrows the tools.
    #[test]
    fn histories_reach_claude_in_a_form_it_takes() {
        let out = translated(json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "rain"},
            {"role": "assistant", "content": "Sure, "}]}))
        .unwrap();
        let m = out["messages"].as_array().unwrap();
        assert_eq!(
            m[0]["content"],
            json!([{"type": "text", "text": "Weather?"}])
        );
        let id = m[1]["content"][0]["id"].as_str().unwrap();
        assert!(id.starts_with("functions_get_weather_0_"), "{id}");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_eq!(m[2]["content"][0]["tool_use_id"], id);
        // Ids that differ only in what is replaced stay apart; one Anthropic
        // takes goes as it is.
        assert_ne!(
            tool_id(Some(&json!("call.1"))),
            tool_id(Some(&json!("call:1")))
        );
        assert_ne!(tool_id(Some(&json!("call.1"))), json!("call_1"));
        assert_eq!(tool_id(Some(&json!("toolu_01A-b"))), json!("toolu_01A-b"));
        // A last question of blank text only is refused, not left out; an
        // earlier one is left out.
        let e = translated(json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "  "}]}]}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let out = translated(json!({"messages": [{"role": "user", "content": ""},
            {"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"],
            json!([{"type": "text", "text": "hi"}])
        );
        // Blank text Claude wrote before a tool call, and a tool that
        // printed nothing, come back as Anthropic takes them.
        let out = translated(json!({"messages": [{"role": "user", "content": "ls"},
            {"role": "assistant", "content": "\n\n", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "sh", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": ""}]}))
        .unwrap();
        let t = out["messages"].as_array().unwrap();
        assert_eq!(t[1]["content"].as_array().unwrap().len(), 1, "{out}");
        assert_eq!(t[1]["content"][0]["type"], "tool_use");
        assert_eq!(
            t[2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "toolu_1"})
        );
        assert_eq!(m[3]["content"], json!([{"type": "text", "text": "Sure,"}]));
        // A prefill of white space alone is no prefill.
        let out = translated(json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}))
        .unwrap();
        assert_eq!(out["messages"].as_array().unwrap().len(), 1);

        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]);
        let out = translated(json!({"tools": tools, "tool_choice": {"type": "allowed_tools",
            "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}}))
        .unwrap();
        assert_eq!(out["tools"].as_array().unwrap().len(), 1);
        assert_eq!(out["tools"][0]["name"], "get_time");
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        // A custom tool the allowed ones leave out is not sent (nor refused);
        // allowed tools none of which is listed are a 400.
        let mixed = json!([
            {"type": "custom", "custom": {"name": "code_exec"}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]);
        let out = translated(json!({"tools": mixed, "tool_choice": {"type": "allowed_tools",
            "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}}))
        .unwrap();
        assert_eq!(out["tools"].as_array().unwrap().len(), 1);
        assert_eq!(out["tool_choice"], json!({"type": "auto"}));
        let e = translated(json!({"tools": tools, "tool_choice": {"type": "allowed_tools",
            "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]}}}))
        .unwrap_err();
        assert_eq!(e.status, 400);
        // An empty legacy list is nothing to refuse.
        translated(json!({"functions": [], "function_call": "none"})).unwrap();
    }

    #[test]
    fn request_translation() {
        let body: Map<String, Value> = serde_json::from_value(json!({
            "model": "claude",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "42"}
            ],
            "max_tokens": 50, "temperature": 1.7, "stop": "END",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "required"
        }))
        .unwrap();
        let out = request_to_anthropic(
            &body,
            "claude-x",
            true,
            Takes::default(),
            DEFAULT_MAX_TOKENS,
        )
        .unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "be brief");
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["stream"], true);
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["content"].as_array().unwrap().len(), 2);
        assert_eq!(msgs[1]["content"][0]["input"]["a"], 1);
        assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
    }

    #[test]
    fn response_translation() {
        let v = json!({"id": "msg_1", "model": "claude-x", "stop_reason": "max_tokens",
            "content": [{"type": "text", "text": "Hello"}],
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4}});
        let (out, usage) = response_to_openai(&v, "c");
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert_eq!(out["usage"]["prompt_tokens"], 14);
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 14,
                completion_tokens: 5,
                cached_tokens: 4,
                ..Usage::default()
            }
        );
    }

    fn sse(events: &[Value]) -> String {
        events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn stream_usage_is_final_only_at_message_delta_and_keeps_the_1h_split() {
        let start = json!({"type": "message_start", "message": {"id": "m1", "model": "c",
            "usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 50,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 50}}}});
        let delta = |t: &str| json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}});
        let mut s = AnthropicStream::new("c", false);
        s.feed(sse(&[start, delta("Hello there, "), delta("general Kenobi.")]).as_bytes())
            .unwrap();
        // Cut here (a client that left, a broken stream): the output so far
        // is estimated from the text, not message_start's placeholder 1.
        assert!(!s.usage_final());
        assert_eq!(s.usage().unwrap().completion_tokens, 1);
        assert_eq!(s.generated_tokens_estimate(), 7);
        // message_delta's totals carry no `cache_creation` split.
        s.feed(
            sse(&[
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 10, "output_tokens": 9, "cache_creation_input_tokens": 50}}),
            ])
            .as_bytes(),
        )
        .unwrap();
        assert!(s.usage_final());
        let u = s.usage().unwrap();
        assert_eq!(
            (
                u.completion_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (9, 50, 50)
        );
    }

    #[test]
    fn a_tool_choice_openai_refuses_is_refused_not_left_out() {
        // Left out, the model would run on `auto` while the client asked
        // for something else.
        for (choice, param) in [
            (json!("always"), "tool_choice"),
            (json!({"type": "function"}), "tool_choice.function.name"),
            (
                json!({"type": "function", "function": {}}),
                "tool_choice.function.name",
            ),
            (json!({"type": "tool", "name": "f"}), "tool_choice.type"),
            (
                json!({"type": "custom", "custom": {"name": "f"}}),
                "tool_choice.type",
            ),
            (json!({"function": {"name": "f"}}), "tool_choice.type"),
            (json!(3), "tool_choice"),
        ] {
            let e = translated(json!({ "tool_choice": choice })).unwrap_err();
            assert_eq!(e.status, 400, "{choice}");
            assert_eq!(e.param.as_deref(), Some(param), "{choice}: {e:?}");
        }
        for ok in [json!(null), json!("auto"), json!("none"), json!("required")] {
            assert!(translated(json!({ "tool_choice": ok })).is_ok(), "{ok}");
        }
        let out =
            translated(json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}))
                .unwrap();
        assert_eq!(out["tool_choice"], json!({"type": "tool", "name": "f"}));
    }

    #[test]
    fn strict_tools_stay_strict_for_models_with_structured_outputs() {
        let tools = json!([{"type": "function", "function": {"name": "f", "strict": true,
            "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}]);
        let out = translated(json!({ "tools": tools })).unwrap();
        assert_eq!(out["tools"][0]["strict"], true);
        // No description given, none sent (not "").
        assert!(out["tools"][0].get("description").is_none(), "{out}");
        let body: Map<String, Value> = serde_json::from_value(json!({
            "model": "claude", "messages": [{"role": "user", "content": "hi"}], "tools": tools}))
        .unwrap();
        let plain = request_to_anthropic(&body, "claude-x", false, Takes::default(), 1024).unwrap();
        assert!(plain["tools"][0].get("strict").is_none(), "{plain}");
    }

    #[test]
    fn claudes_thinking_tokens_are_openais_reasoning_tokens() {
        let u = usage_of(&json!({"input_tokens": 10, "output_tokens": 9,
            "output_tokens_details": {"thinking_tokens": 4}}));
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (9, 4));
        assert_eq!(
            openai_usage(&u)["completion_tokens_details"]["reasoning_tokens"],
            4
        );
        assert!(openai_usage(&usage_of(&json!({"output_tokens": 2})))
            .get("completion_tokens_details")
            .is_none());
        // And streamed: message_delta's cumulative figure.
        let mut s = AnthropicStream::new("c", false);
        s.feed(sse(&[
            json!({"type": "message_start", "message": {"id": "m1", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 9, "output_tokens_details": {"thinking_tokens": 5}}}),
        ])
        .as_bytes())
        .unwrap();
        assert_eq!(s.usage().unwrap().reasoning_tokens, 5);
    }

    #[test]
    fn a_tool_called_without_arguments_streams_empty_json() {
        let mut s = AnthropicStream::new("c", false);
        let out = s
            .feed(sse(&[
                json!({"type": "message_start", "message": {"id": "m1", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t1", "name": "now", "input": {}}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t2", "name": "f", "input": {}}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
                json!({"type": "content_block_stop", "index": 1}),
            ]).as_bytes())
            .unwrap();
        let mut args = ["".to_string(), "".to_string()];
        let mut first = true;
        for d in String::from_utf8(out).unwrap().split("\n\n") {
            let Some(v) = d
                .strip_prefix("data: ")
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
            else {
                continue;
            };
            if first {
                // A tool-only answer's content is null, as OpenAI streams it
                // (and as the answer sent whole has it), not "".
                let delta = &v["choices"][0]["delta"];
                assert_eq!(delta["role"], "assistant");
                assert!(delta.get("content").is_some_and(Value::is_null), "{v}");
                first = false;
            }
            for call in v["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = call["index"].as_u64().unwrap() as usize;
                args[i] += call["function"]["arguments"].as_str().unwrap_or("");
            }
        }
        assert_eq!(args, ["{}", "{\"a\":1}"]);
    }

    #[test]
    fn stream_translation() {
        let input = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n\
event: ping\ndata: {\"type\":\"ping\"}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut s = AnthropicStream::new("claude", true);
        let mut out = Vec::new();
        for c in input.as_bytes().chunks(7) {
            out.extend(s.feed(c).unwrap());
        }
        assert!(!s.truncated, "it ended its turn");
        let mut cut = AnthropicStream::new("claude", true);
        cut.feed(input.replace("end_turn", "max_tokens").as_bytes())
            .unwrap();
        assert!(cut.truncated);
        let text = String::from_utf8(out).unwrap();
        let datas: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let content: String = datas
            .iter()
            .filter_map(|d| {
                d["choices"]
                    .get(0)?
                    .get("delta")?
                    .get("content")?
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(content, "Hello");
        assert_eq!(
            datas
                .iter()
                .filter_map(|d| d["choices"].get(0)?.get("finish_reason")?.as_str())
                .collect::<Vec<_>>(),
            ["stop"]
        );
        assert_eq!(datas.last().unwrap()["usage"]["completion_tokens"], 3);
        assert_eq!(datas.last().unwrap()["usage"]["prompt_tokens"], 9);
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(s.done);
        assert_eq!(s.usage().unwrap().total(), 12);
    }

    #[test]
    fn a_stream_read_only_builds_no_chunks_and_reads_the_same() {
        let input = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"f\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":5}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut full = AnthropicStream::new("claude", false);
        let mut read = AnthropicStream::new("claude", false).reading_only();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for c in input.as_bytes().chunks(11) {
            a.extend(full.feed(c).unwrap());
            b.extend(read.feed(c).unwrap());
        }
        assert!(!a.is_empty());
        assert!(b.is_empty(), "{}", String::from_utf8_lossy(&b));
        assert_eq!(read.usage(), full.usage());
        assert_eq!(read.usage().unwrap().total(), 14);
        assert!(read.done && read.usage_final() && read.truncated);
        assert_eq!(
            read.generated_tokens_estimate(),
            full.generated_tokens_estimate()
        );
        // An error event: recorded, nothing written.
        let mut read = AnthropicStream::new("claude", false).reading_only();
        let out = read
            .feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n")
            .unwrap();
        assert!(out.is_empty());
        assert!(read.error.is_some() && read.done);
    }

    #[test]
    fn error_event_mid_stream_fails_the_stream() {
        let input = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n";
        for size in [1, 5, input.len()] {
            let mut s = AnthropicStream::new("claude", false);
            let mut out = Vec::new();
            for c in input.as_bytes().chunks(size) {
                out.extend(s.feed(c).unwrap());
            }
            let text = String::from_utf8(out).unwrap();
            let e = s.error.as_ref().expect("the error is recorded");
            assert_eq!(e.kind.as_deref(), Some("overloaded_error"));
            assert_eq!(e.message, "Overloaded");
            assert!(s.done);
            // The client gets it as an OpenAI error event, then [DONE], and nothing after.
            let datas: Vec<&str> = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .collect();
            assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
            let err: Value = serde_json::from_str(datas[datas.len() - 2]).unwrap();
            assert_eq!(err["error"]["message"], "Overloaded");
            assert_eq!(err["error"]["type"], "server_error");
            assert!(!text.contains("\"lo\""), "{text}");
        }
        // An `error` event whose body does not parse is still an error.
        let mut s = AnthropicStream::new("claude", false);
        let out = s.feed(b"event: error\ndata: gone\n\n").unwrap();
        assert!(s.error.is_some() && s.done);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("data: [DONE]\n\n"));
        // A whole stream has none.
        let mut s = AnthropicStream::new("claude", false);
        s.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
            .unwrap();
        assert!(s.done && s.error.is_none());
        // Any other event whose body does not parse breaks the stream, and
        // is not passed on.
        let mut s = AnthropicStream::new("claude", false);
        let out = s
            .feed(b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\", garbage\n\n")
            .unwrap();
        assert!(s.malformed && s.error.is_none() && out.is_empty());
        // A `[DONE]` some servers add breaks nothing.
        let mut s = AnthropicStream::new("claude", false);
        s.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\ndata: [DONE]\n\n")
            .unwrap();
        assert!(s.done && !s.malformed);
    }
}
