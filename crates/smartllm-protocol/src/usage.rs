//! Token usage as reported by upstreams, and the stream filter that records it.

use crate::sse::{SseEvent, SseParser, SseTooLarge, StreamError};
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache (part of
    /// `prompt_tokens`): OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`.
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache (part of
    /// `prompt_tokens`): Anthropic `cache_creation_input_tokens`.
    pub cache_write_tokens: u64,
    /// Cache writes kept for an hour (part of `cache_write_tokens`; the rest
    /// are 5-minute writes): Anthropic `cache_creation.ephemeral_1h_input_tokens`.
    pub cache_write_1h_tokens: u64,
    /// Completion tokens spent reasoning (part of `completion_tokens`):
    /// OpenAI `completion_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: u64,
    /// Prompt tokens of audio (part of `prompt_tokens`): OpenAI
    /// `prompt_tokens_details.audio_tokens`.
    pub audio_prompt_tokens: u64,
    /// Completion tokens of audio (part of `completion_tokens`): OpenAI
    /// `completion_tokens_details.audio_tokens`.
    pub audio_completion_tokens: u64,
    /// The processing tier the provider served the request on (its
    /// `service_tier`), which scales its price.
    pub tier: ServiceTier,
    /// Web searches the provider ran for the answer, billed per search:
    /// Anthropic's `usage.server_tool_use.web_search_requests`, the
    /// `web_search_call` items of a Responses answer.
    pub web_searches: u64,
}

/// A provider's processing tier, as its answer reports it: OpenAI's
/// `service_tier` (`flex` at half price, `priority` at a premium; `default`,
/// `auto` and `scale` at the list price), Anthropic's `usage.service_tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceTier {
    #[default]
    Standard,
    Flex,
    Priority,
}

impl ServiceTier {
    pub fn parse(s: &str) -> ServiceTier {
        match s {
            "flex" => ServiceTier::Flex,
            "priority" => ServiceTier::Priority,
            _ => ServiceTier::Standard,
        }
    }

    /// The tier an answer names in `field` (standard when it names none).
    pub fn of(v: &Value, field: &str) -> ServiceTier {
        v.get(field)
            .and_then(Value::as_str)
            .map_or(ServiceTier::Standard, ServiceTier::parse)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Standard => "standard",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
        }
    }
}

impl Usage {
    /// Read OpenAI's `usage` object (`prompt_tokens`, `completion_tokens`,
    /// and their details: cached, reasoning and audio tokens).
    pub fn from_openai(v: &Value) -> Option<Usage> {
        let u = v.get("usage")?;
        if u.is_null() {
            return None;
        }
        let detail = |details: &str, kind: &str| {
            u.get(details)
                .and_then(|d| d.get(kind))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let mut usage = Usage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
            completion_tokens: u
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            cached_tokens: detail("prompt_tokens_details", "cached_tokens"),
            cache_write_tokens: detail("prompt_tokens_details", "cache_write_tokens"),
            cache_write_1h_tokens: 0,
            reasoning_tokens: detail("completion_tokens_details", "reasoning_tokens"),
            audio_prompt_tokens: detail("prompt_tokens_details", "audio_tokens"),
            audio_completion_tokens: detail("completion_tokens_details", "audio_tokens"),
            tier: ServiceTier::of(v, "service_tier"),
            web_searches: 0,
        };
        usage.fold_total(u.get("total_tokens").and_then(Value::as_u64).unwrap_or(0));
        Some(usage)
    }

    /// Some OpenAI-compatible providers (xAI's Grok) count reasoning tokens
    /// outside `completion_tokens` and only in `total_tokens`; OpenAI counts
    /// them inside (its total is prompt + completion). A total above prompt +
    /// completion raises the completion by what is missing, at most the
    /// reasoning tokens reported: they are billed as output either way.
    pub fn fold_total(&mut self, total_tokens: u64) {
        // Saturating, here and in `total`: an upstream's absurd counts must
        // not wrap round to a small bill (or panic a debug build).
        let counted = self.prompt_tokens.saturating_add(self.completion_tokens);
        if self.reasoning_tokens > 0 && total_tokens > counted {
            self.completion_tokens = self
                .completion_tokens
                .saturating_add((total_tokens - counted).min(self.reasoning_tokens));
        }
    }

    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Passes an OpenAI-compatible SSE stream through, event by event: records the
/// usage chunk, and drops it when the gateway (not the client) asked for it;
/// records the first error event (`data: {"error": ...}`), which passes on to
/// the client as it is.
#[derive(Debug)]
pub struct OpenAiStreamFilter {
    parser: SseParser,
    forward_usage_chunk: bool,
    pub usage: Option<Usage>,
    pub saw_done: bool,
    pub events: u64,
    /// Chunks whose delta carries generated text (content, a refusal, a
    /// tool call's arguments, reasoning), and the bytes of that text as
    /// written in the JSON, the answer's and the reasoning's: what a
    /// stream without a usage chunk is billed from (see
    /// [`OpenAiStreamFilter::generated_tokens_estimate`]).
    pub deltas: u64,
    text_bytes: u64,
    reasoning_bytes: u64,
    /// The first error the provider reported mid-stream: the stream failed.
    pub error: Option<StreamError>,
    /// A choice ended at the token limit (`finish_reason: "length"`).
    pub truncated: bool,
    /// Choices that named their finish reason: with all of them (`n`), the
    /// answer reached its end even if `[DONE]` does not follow (a stream
    /// that just stops before does not).
    pub finished: u64,
    /// The indexes of those choices (each counted once).
    finished_choices: Vec<u64>,
    /// The tier the chunks name (each carries it): for a usage the gateway
    /// has to estimate.
    pub tier: ServiceTier,
    /// The answer has begun: a chunk carried content, a tool call,
    /// reasoning, a refusal or a finish reason (a role-only first chunk is
    /// no start). Until then nothing generated would be lost by asking
    /// another deployment.
    pub started: bool,
    /// A `data:` event that is no JSON came (and was not passed on): the
    /// stream is broken, and ends with the gateway's error.
    pub malformed: bool,
}

/// Whether an event's data is something other than JSON (checked without
/// building it; an event of no data, a comment or a keep-alive, is fine).
pub fn malformed_event(data: &str) -> bool {
    !data.trim().is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(data).is_err()
}

/// Whether a chat completion (or chunk) has a choice that ended at the
/// token limit (`finish_reason: "length"`).
pub fn cut_at_length(v: &Value) -> bool {
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"] == "length"))
}

/// Whether an event's JSON gives a `finish_reason` other than `null` or
/// `""` (without parsing it: every chunk carries the field, nearly all with
/// null; some servers send an empty one on every chunk, which ends nothing).
fn names_finish_reason(data: &str) -> bool {
    const FIELD: &str = "\"finish_reason\"";
    data.match_indices(FIELD).any(|(i, _)| {
        let rest = data[i + FIELD.len()..].trim_start();
        rest.strip_prefix(':').is_some_and(|r| {
            let r = r.trim_start();
            r.starts_with('"') && !r.starts_with("\"\"")
        })
    })
}

/// Whether a chunk carries a `usage` object (not `"usage": null`, which
/// OpenAI puts in every chunk of a stream that asked for usage): only such
/// a chunk is parsed for it.
fn names_usage(data: &str) -> bool {
    const FIELD: &str = "\"usage\"";
    data.match_indices(FIELD).any(|(i, _)| {
        let rest = data[i + FIELD.len()..].trim_start();
        rest.strip_prefix(':')
            .is_some_and(|r| r.trim_start().starts_with('{'))
    })
}

/// Whether a chunk carries something of the answer: content, text (legacy
/// completions), a tool or function call, reasoning or a refusal.
fn begun(v: &Value) -> bool {
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return false;
    };
    let some = |x: &Value| match x {
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
        _ => false,
    };
    choices.iter().any(|c| {
        let d = &c["delta"];
        some(&c["text"])
            || [
                "content",
                "tool_calls",
                "function_call",
                "reasoning_content",
                "reasoning",
                "refusal",
            ]
            .iter()
            .any(|k| some(&d[*k]))
    })
}

/// The delta fields that hold the answer's generated text.
const TEXT_FIELDS: [&[u8]; 3] = [b"\"content\"", b"\"refusal\"", b"\"arguments\""];
/// The delta fields that hold generated reasoning (DeepSeek, vLLM,
/// OpenRouter; some servers send both, with the same text).
const REASONING_FIELDS: [&[u8]; 2] = [b"\"reasoning_content\"", b"\"reasoning\""];

/// The bytes of the JSON string values of `field` (a quoted key) in `data`,
/// as written (an escape counts its bytes), found without parsing: every
/// `"field": "..."` occurrence; a value that is not a string counts 0.
fn string_bytes(data: &[u8], field: &[u8]) -> usize {
    let mut total = 0;
    for at in memchr::memmem::find_iter(data, field) {
        let mut i = at + field.len();
        while data.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if data.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        while data.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if data.get(i) != Some(&b'"') {
            continue;
        }
        let start = i + 1;
        let mut j = start;
        while j < data.len() {
            match data[j] {
                b'\\' => j += 2,
                b'"' => break,
                _ => j += 1,
            }
        }
        total += j.min(data.len()) - start;
    }
    total
}

impl OpenAiStreamFilter {
    pub fn new(client_wants_usage: bool) -> Self {
        OpenAiStreamFilter {
            parser: SseParser::default(),
            forward_usage_chunk: client_wants_usage,
            usage: None,
            saw_done: false,
            events: 0,
            deltas: 0,
            text_bytes: 0,
            reasoning_bytes: 0,
            error: None,
            truncated: false,
            finished: 0,
            finished_choices: Vec::new(),
            tier: ServiceTier::Standard,
            started: false,
            malformed: false,
        }
    }

    /// Feed an upstream chunk; returns the bytes to send to the client now.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, SseTooLarge> {
        let events = self.parser.feed(chunk)?;
        let mut out = Vec::with_capacity(chunk.len());
        for ev in events {
            if self.keep(&ev) {
                out.extend_from_slice(&ev.raw);
            }
        }
        Ok(out)
    }

    fn keep(&mut self, ev: &SseEvent) -> bool {
        self.events += 1;
        if ev.is_done() {
            self.saw_done = true;
            return true;
        }
        if let Some(e) = StreamError::from_event(ev) {
            self.error.get_or_insert(e);
            return true;
        }
        // Nothing after [DONE] is the answer's (nor passed on).
        if self.saw_done {
            return false;
        }
        if self.malformed || malformed_event(&ev.data) {
            self.malformed = true;
            return false;
        }
        if let Some(at) = ev.data.find("\"delta\"") {
            // From the delta on (a provider may repeat the whole message
            // before it).
            let d = &ev.data.as_bytes()[at..];
            let text: usize = TEXT_FIELDS.iter().map(|f| string_bytes(d, f)).sum();
            // Servers that send both reasoning fields send the same text
            // in each: counted once. Mistral's thinking comes as `text`
            // parts of an array `content`.
            let reasoning = REASONING_FIELDS
                .iter()
                .map(|f| string_bytes(d, f))
                .max()
                .unwrap_or(0)
                + string_bytes(d, b"\"text\"");
            if text + reasoning > 0 {
                self.deltas += 1;
                self.text_bytes += text as u64;
                self.reasoning_bytes += reasoning as u64;
            }
        }
        // Only a choice's last chunk names it: parsed then.
        if names_finish_reason(&ev.data) {
            if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                for c in v
                    .get("choices")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let index = c["index"].as_u64().unwrap_or(0);
                    let named = c["finish_reason"].as_str().is_some_and(|f| !f.is_empty());
                    if named && !self.finished_choices.contains(&index) {
                        self.finished_choices.push(index);
                    }
                }
                self.finished = self.finished_choices.len() as u64;
                self.started |= self.finished > 0;
            }
        }
        // Parsed only until the answer begins: its first chunk or two.
        if !self.started {
            if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                self.started = begun(&v);
                if self.tier == ServiceTier::Standard {
                    self.tier = ServiceTier::of(&v, "service_tier");
                }
            }
        }
        // Only the last chunk of a choice names its finish reason.
        if !self.truncated && ev.data.contains("\"length\"") {
            self.truncated =
                serde_json::from_str::<Value>(&ev.data).is_ok_and(|v| cut_at_length(&v));
        }
        if !names_usage(&ev.data) {
            return true;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return true;
        };
        if let Some(u) = Usage::from_openai(&v) {
            self.usage = Some(u);
            let usage_only = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty());
            if usage_only && !self.forward_usage_chunk {
                return false;
            }
        }
        true
    }

    /// Output tokens generated so far, without parsing a chunk: the
    /// generated text's bytes at 4 a token, and at least a token for each
    /// chunk that carried some (OpenAI and most compatible servers stream
    /// one token a chunk; Gemini and vLLM's `stream_interval` several).
    pub fn generated_tokens_estimate(&self) -> u64 {
        self.deltas
            .max((self.text_bytes + self.reasoning_bytes).div_ceil(4))
    }

    /// The reasoning's share of [`Self::generated_tokens_estimate`]: what
    /// the answer's assembled text (content and tool calls) leaves out.
    pub fn reasoning_tokens_estimate(&self) -> u64 {
        self.reasoning_bytes.div_ceil(4)
    }

    /// Whatever partial event is left when the upstream ends.
    pub fn pending(&self) -> &[u8] {
        self.parser.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event that is no JSON is not passed on and marks the stream
    /// broken (so is everything after it); keep-alive comments and events
    /// without data are fine.
    #[test]
    fn an_event_that_is_no_json_breaks_the_stream() {
        let mut f = OpenAiStreamFilter::new(false);
        let ok = f
            .feed(b": keep-alive\n\nevent: ping\ndata: \n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n")
            .unwrap();
        assert!(!f.malformed);
        assert!(String::from_utf8(ok).unwrap().contains("Hi"));
        let out = f
            .feed(b"data: {\"choices\": [garbage\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n")
            .unwrap();
        assert!(f.malformed);
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        assert!(malformed_event("{\"a\": 1"));
        assert!(!malformed_event(" {\"a\": [1, 2]} "));
    }

    /// The answer begins with its first content, tool call or reasoning
    /// (not with the role-only first chunk); it ends with a finish reason,
    /// however the JSON is spaced, even without `[DONE]`.
    #[test]
    fn a_stream_knows_when_its_answer_began_and_ended() {
        let mut f = OpenAiStreamFilter::new(false);
        f.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n")
            .unwrap();
        assert!(!f.started && f.finished == 0);
        f.feed(b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hi\"}, \"finish_reason\": null}]}\n\n")
            .unwrap();
        assert!(f.started && f.finished == 0);
        f.feed(b"data: {\"choices\": [{\"index\": 0, \"delta\": {}, \"finish_reason\": \"stop\"}]}\n\n")
            .unwrap();
        assert!(f.finished == 1 && !f.saw_done);
        // n = 2: each choice's end counts, once.
        let end_of_second =
            b"data: {\"choices\":[{\"index\":1,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n";
        f.feed(end_of_second).unwrap();
        assert_eq!(f.finished, 2);
        f.feed(end_of_second).unwrap();
        assert_eq!(f.finished, 2);
        // The tier the first chunks name, for an estimated usage.
        let mut flex = OpenAiStreamFilter::new(false);
        flex.feed(b"data: {\"service_tier\":\"flex\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n")
            .unwrap();
        assert_eq!(flex.tier, ServiceTier::Flex);

        let mut tool = OpenAiStreamFilter::new(false);
        tool.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n")
            .unwrap();
        assert!(tool.started && tool.finished == 0);
        let mut thinking = OpenAiStreamFilter::new(false);
        thinking
            .feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Let me\"}}]}\n\n")
            .unwrap();
        assert!(thinking.started);
        // An error first: nothing began.
        let mut err = OpenAiStreamFilter::new(false);
        err.feed(b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n")
            .unwrap();
        assert!(!err.started && err.error.is_some());
        // An empty finish reason on every chunk ends nothing and begins
        // nothing: the role chunk is still not the answer.
        let mut empty = OpenAiStreamFilter::new(false);
        empty
            .feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":\"\"}]}\n\n")
            .unwrap();
        assert!(!empty.started && empty.finished == 0);
        empty
            .feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"\"}]}\n\n")
            .unwrap();
        assert!(empty.started && empty.finished == 0);
        assert!(names_finish_reason(r#"{"finish_reason": "stop"}"#));
        assert!(!names_finish_reason(r#"{"finish_reason": ""}"#));
        assert!(!names_finish_reason(r#"{"finish_reason":null}"#));
        // Only a usage object is parsed for: OpenAI's `"usage": null` in
        // every chunk, or the word in the answer's text, is not.
        assert!(names_usage(
            r#"{"choices":[],"usage": {"prompt_tokens":1}}"#
        ));
        assert!(!names_usage(
            r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#
        ));
        assert!(!names_usage(
            r#"{"choices":[{"delta":{"content":"the \"usage\": {"}}]}"#
        ));
    }

    /// Reasoning a provider counts outside `completion_tokens` (xAI: only
    /// in `total_tokens`) is billed as output; OpenAI's own totals (prompt
    /// + completion, reasoning inside) are left as they are.
    #[test]
    fn reasoning_outside_the_completion_is_counted() {
        let xai = serde_json::json!({"usage": {"prompt_tokens": 10120, "completion_tokens": 1499,
            "total_tokens": 14428, "prompt_tokens_details": {"cached_tokens": 128},
            "completion_tokens_details": {"reasoning_tokens": 2809}}});
        let u = Usage::from_openai(&xai).unwrap();
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (4308, 2809));
        assert_eq!(u.total(), 14428);
        let openai = serde_json::json!({"usage": {"prompt_tokens": 10, "completion_tokens": 500,
            "total_tokens": 510, "completion_tokens_details": {"reasoning_tokens": 400}}});
        assert_eq!(Usage::from_openai(&openai).unwrap().completion_tokens, 500);
        // A total off for other reasons adds no more than the reasoning.
        let odd = serde_json::json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
            "total_tokens": 1000, "completion_tokens_details": {"reasoning_tokens": 3}}});
        assert_eq!(Usage::from_openai(&odd).unwrap().completion_tokens, 8);
    }

    /// Counts near u64::MAX stop there instead of wrapping to a small
    /// bill: OpenAI's usage, its total, and Anthropic's sums of input,
    /// cache reads and cache writes.
    #[test]
    fn huge_token_counts_saturate() {
        let big = serde_json::json!({"usage": {"prompt_tokens": u64::MAX, "completion_tokens": 5,
            "total_tokens": u64::MAX, "completion_tokens_details": {"reasoning_tokens": 3}}});
        let u = Usage::from_openai(&big).unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (u64::MAX, 5));
        assert_eq!(u.total(), u64::MAX);
        let anthropic = serde_json::json!({"input_tokens": u64::MAX, "output_tokens": u64::MAX,
            "cache_read_input_tokens": 10, "cache_creation_input_tokens": 5,
            "cache_creation": {"ephemeral_5m_input_tokens": u64::MAX, "ephemeral_1h_input_tokens": u64::MAX}});
        let u = crate::anthropic::usage_of(&anthropic);
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (u64::MAX, u64::MAX, u64::MAX)
        );
        assert_eq!(u.total(), u64::MAX);
    }

    /// A stream's generated tokens are counted a chunk a token, not from
    /// its bytes (some 150 of a chunk's are envelope).
    #[test]
    fn deltas_count_the_chunks_that_carry_the_answer() {
        let mut f = OpenAiStreamFilter::new(false);
        let chunk = |t: &str| {
            format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n")
        };
        // The role-only first chunk and the last (a finish reason, an
        // empty delta) carry nothing generated.
        f.feed(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"finish_reason\":null}]}\n\n").unwrap();
        for t in ["The", " answer", " is"] {
            f.feed(chunk(t).as_bytes()).unwrap();
        }
        f.feed(b": keep-alive\n\n").unwrap();
        f.feed(b"data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n").unwrap();
        assert_eq!(f.deltas, 3);
        // 13 bytes of text: 4 at 4 bytes a token (a token a chunk says 3).
        assert_eq!(f.generated_tokens_estimate(), 4);
        assert!(f.usage.is_none());
        // One word a chunk, of varying lengths (the mock's stream, a
        // provider without usage): about a token a word, not the chunks'
        // size differences at 4 bytes a token (which read 55 for 14).
        let mut w = OpenAiStreamFilter::new(false);
        let words = "The quick brown fox jumps over the lazy dog while extraordinarily long words interleave";
        for word in words.split(' ') {
            w.feed(chunk(&format!(" {word}")).as_bytes()).unwrap();
        }
        w.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")
            .unwrap();
        let n = words.split(' ').count() as u64;
        let est = w.generated_tokens_estimate();
        // (101 bytes: 26 at 4 bytes a token; tiktoken says 17.)
        assert!((n..=2 * n).contains(&est), "{est} for {n} words");
        assert_eq!(w.reasoning_tokens_estimate(), 0);
        // Chunks of many tokens each: their bytes count.
        let mut g = OpenAiStreamFilter::new(false);
        g.feed(chunk("A").as_bytes()).unwrap();
        for _ in 0..4 {
            g.feed(chunk(&"word ".repeat(40)).as_bytes()).unwrap();
        }
        let est = g.generated_tokens_estimate();
        assert!((190..=210).contains(&est), "{est}");
        // Both reasoning fields with the same text: once. Mistral's
        // thinking parts count as reasoning.
        let mut both = OpenAiStreamFilter::new(false);
        both.feed(b"data: {\"choices\":[{\"delta\":{\"reasoning\":\"abcdefgh\",\"reasoning_content\":\"abcdefgh\"}}]}\n\n").unwrap();
        both.feed(b"data: {\"choices\":[{\"delta\":{\"content\":[{\"type\":\"thinking\",\"thinking\":[{\"type\":\"text\",\"text\":\"abcd\"}]}]}}]}\n\n").unwrap();
        assert_eq!((both.deltas, both.reasoning_tokens_estimate()), (2, 3));
        // Reasoning and tool-call arguments count; spacing and escapes
        // are read as written.
        let mut r = OpenAiStreamFilter::new(false);
        r.feed(b"data: {\"choices\": [{\"delta\": {\"reasoning_content\": \"abcdefgh\"}}]}\n\n")
            .unwrap();
        r.feed(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n").unwrap();
        assert_eq!(r.deltas, 2);
        assert_eq!(r.reasoning_tokens_estimate(), 2);
        assert_eq!(r.generated_tokens_estimate(), 2 + 3);
    }

    #[test]
    fn string_values_are_measured_without_parsing() {
        assert_eq!(string_bytes(br#"{"content":"abc"}"#, b"\"content\""), 3);
        assert_eq!(string_bytes(br#"{"content" :  "a\"b"}"#, b"\"content\""), 4);
        assert_eq!(string_bytes(br#"{"content":null}"#, b"\"content\""), 0);
        assert_eq!(
            string_bytes(br#"{"x":"content","content":"ab"}"#, b"\"content\""),
            2
        );
        assert_eq!(string_bytes(br#"{"content":"ab"#, b"\"content\""), 2);
        assert_eq!(
            string_bytes(br#"{"reasoning_content":"ab"}"#, b"\"reasoning\""),
            0
        );
    }

    /// A choice that ended at the token limit marks the stream truncated;
    /// the word "length" in the answer, or another finish reason, does not.
    #[test]
    fn a_stream_cut_at_the_token_limit_is_marked() {
        let feed = |finish: &str, content: &str| {
            let mut f = OpenAiStreamFilter::new(false);
            let chunks = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n\
                 data: {{\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"{finish}\"}}]}}\n\ndata: [DONE]\n\n"
            );
            f.feed(chunks.as_bytes()).unwrap();
            f.truncated
        };
        assert!(feed("length", "a"));
        assert!(!feed("stop", "the \\\"length\\\" of it"));
        assert!(!feed("stop", "a"));
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn usage_chunk_dropped_unless_asked() {
        let mut f = OpenAiStreamFilter::new(false);
        let out = f.feed(STREAM.as_bytes()).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("prompt_tokens"), "{out}");
        assert!(out.contains("\"hi\"") && out.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                cached_tokens: 3,
                ..Usage::default()
            })
        );
        assert!(f.saw_done);

        let mut f = OpenAiStreamFilter::new(true);
        let out = f.feed(STREAM.as_bytes()).unwrap();
        assert_eq!(out, STREAM.as_bytes());
        assert_eq!(f.usage.unwrap().total(), 9);
        assert_eq!(f.error, None);
    }

    #[test]
    fn error_event_mid_stream_is_recorded_and_passed_on() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n\
data: [DONE]\n\n";
        // Whatever the chunking, and although [DONE] follows.
        for size in [1, 7, stream.len()] {
            let mut f = OpenAiStreamFilter::new(false);
            let mut out = Vec::new();
            for c in stream.as_bytes().chunks(size) {
                out.extend(f.feed(c).unwrap());
            }
            assert_eq!(out, stream.as_bytes(), "forwarded untouched");
            let e = f.error.as_ref().expect("the error is recorded");
            assert_eq!(e.message, "The server had an error");
            assert_eq!(e.kind.as_deref(), Some("server_error"));
            assert!(f.saw_done);
        }
        // A stream without one has none.
        let mut f = OpenAiStreamFilter::new(false);
        f.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"no \\\"error\\\" here\"},\"finish_reason\":null}],\"error\":null}\n\ndata: [DONE]\n\n")
            .unwrap();
        assert_eq!(f.error, None);
    }
}
