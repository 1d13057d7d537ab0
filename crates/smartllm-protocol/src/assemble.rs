//! Between the two shapes of a chat answer: a stream of `chat.completion.chunk`
//! events assembled into one `chat.completion` (so a streamed answer can be
//! cached), and a `chat.completion` replayed as a stream (a cache hit for a
//! client that asked for `stream: true`).

use crate::sse::{data_event, SseParser, DONE_EVENT};
use serde_json::{json, Map, Value};

#[derive(Debug, Default, Clone)]
struct Choice {
    role: Option<String>,
    content: String,
    saw_content: bool,
    finish_reason: Value,
    /// tool call index -> (id, name, arguments)
    tool_calls: Vec<(Value, String, String)>,
    tool_index: crate::openai::ToolCallIndex,
}

/// Collects OpenAI chat chunks (as SSE bytes) into a `chat.completion`.
#[derive(Debug, Default)]
pub struct ChunkAssembler {
    parser: SseParser,
    id: Option<Value>,
    model: Option<Value>,
    created: Option<Value>,
    fingerprint: Option<Value>,
    choices: Vec<Choice>,
    usage: Option<Value>,
    done: bool,
    broken: bool,
}

impl ChunkAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let Ok(events) = self.parser.feed(bytes) else {
            self.broken = true;
            return;
        };
        for ev in events {
            if ev.is_done() {
                self.done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                self.broken = true;
                continue;
            };
            if v.get("error").is_some() {
                self.broken = true;
                continue;
            }
            self.on_chunk(&v);
        }
    }

    fn on_chunk(&mut self, v: &Value) {
        self.id = self.id.take().or_else(|| v.get("id").cloned());
        self.model = self.model.take().or_else(|| v.get("model").cloned());
        self.created = self.created.take().or_else(|| v.get("created").cloned());
        self.fingerprint = self
            .fingerprint
            .take()
            .or_else(|| v.get("system_fingerprint").cloned());
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if idx > 128 {
                self.broken = true;
                return;
            }
            if self.choices.len() <= idx {
                self.choices.resize(idx + 1, Choice::default());
            }
            let ch = &mut self.choices[idx];
            let d = &c["delta"];
            if let Some(r) = d.get("role").and_then(Value::as_str) {
                ch.role = Some(r.to_string());
            }
            if let Some(t) = d.get("content").and_then(crate::openai::content_text_of) {
                ch.content.push_str(&t);
                ch.saw_content = true;
            }
            if let Some(calls) = d.get("tool_calls").and_then(Value::as_array) {
                for call in calls {
                    let ti = ch.tool_index.of(call);
                    if ti > 128 {
                        self.broken = true;
                        return;
                    }
                    if ch.tool_calls.len() <= ti {
                        ch.tool_calls
                            .resize(ti + 1, (Value::Null, String::new(), String::new()));
                    }
                    let t = &mut ch.tool_calls[ti];
                    if let Some(id) = call
                        .get("id")
                        .filter(|i| !i.is_null() && i.as_str() != Some(""))
                    {
                        t.0 = id.clone();
                    }
                    if let Some(n) = call["function"].get("name").and_then(Value::as_str) {
                        t.1.push_str(n);
                    }
                    if let Some(a) = call["function"].get("arguments").and_then(Value::as_str) {
                        t.2.push_str(a);
                    }
                }
            }
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                ch.finish_reason = f.clone();
            }
        }
    }

    /// The assembled `chat.completion`, if the stream completed cleanly.
    pub fn finish(self) -> Option<Value> {
        if !self.done || self.broken || self.choices.is_empty() {
            return None;
        }
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message = Map::new();
                message.insert("role".into(), json!(c.role.clone().unwrap_or_else(|| "assistant".into())));
                message.insert(
                    "content".into(),
                    if c.saw_content || c.tool_calls.is_empty() { json!(c.content) } else { Value::Null },
                );
                if !c.tool_calls.is_empty() {
                    message.insert(
                        "tool_calls".into(),
                        Value::Array(
                            c.tool_calls
                                .iter()
                                .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                                .collect(),
                        ),
                    );
                }
                json!({"index": i, "message": Value::Object(message), "finish_reason": c.finish_reason, "logprobs": null})
            })
            .collect();
        let mut out = json!({
            "id": self.id.unwrap_or(json!("chatcmpl-smartllm")),
            "object": "chat.completion",
            "created": self.created.unwrap_or(json!(0)),
            "model": self.model.unwrap_or(json!("")),
            "choices": choices,
        });
        if let Some(f) = self.fingerprint {
            out["system_fingerprint"] = f;
        }
        if let Some(u) = self.usage {
            out["usage"] = u;
        }
        Some(out)
    }
}

/// Replay a `chat.completion` as an OpenAI SSE stream: a role chunk, the
/// content, the finish chunk, the usage chunk when asked for, then `[DONE]`.
pub fn replay_as_sse(completion: &Value, include_usage: bool) -> Vec<u8> {
    let base = |choices: Value| {
        let mut c = json!({
            "id": completion.get("id").cloned().unwrap_or(json!("chatcmpl-smartllm")),
            "object": "chat.completion.chunk",
            "created": completion.get("created").cloned().unwrap_or(json!(0)),
            "model": completion.get("model").cloned().unwrap_or(json!("")),
            "choices": choices,
        });
        if let Some(f) = completion.get("system_fingerprint") {
            c["system_fingerprint"] = f.clone();
        }
        c
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    let choices = completion
        .get("choices")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, c) in choices.iter().enumerate() {
        let msg = &c["message"];
        let role = msg.get("role").cloned().unwrap_or(json!("assistant"));
        out.extend(data_event(&base(json!([{"index": i, "delta": {"role": role, "content": ""}, "finish_reason": null, "logprobs": null}])).to_string()));
        if let Some(text) = msg
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            out.extend(data_event(&base(json!([{"index": i, "delta": {"content": text}, "finish_reason": null, "logprobs": null}])).to_string()));
        }
        if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
            let deltas: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(ti, t)| json!({"index": ti, "id": t.get("id"), "type": "function", "function": t.get("function")}))
                .collect();
            out.extend(data_event(&base(json!([{"index": i, "delta": {"tool_calls": deltas}, "finish_reason": null, "logprobs": null}])).to_string()));
        }
        let finish = c.get("finish_reason").cloned().unwrap_or(json!("stop"));
        out.extend(data_event(
            &base(json!([{"index": i, "delta": {}, "finish_reason": finish, "logprobs": null}]))
                .to_string(),
        ));
    }
    if include_usage {
        if let Some(u) = completion.get("usage") {
            let mut chunk = base(json!([]));
            chunk["usage"] = u.clone();
            out.extend(data_event(&chunk.to_string()));
        }
    }
    out.extend_from_slice(DONE_EVENT);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_and_replay_round_trip() {
        let completion = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let sse = replay_as_sse(&completion, true);
        let mut a = ChunkAssembler::new();
        for part in sse.chunks(7) {
            a.feed(part);
        }
        let back = a.finish().expect("complete");
        assert_eq!(back, completion);
        // Without [DONE] nothing is assembled (a broken stream is never cached).
        let mut a = ChunkAssembler::new();
        a.feed(&sse[..sse.len() - DONE_EVENT.len()]);
        assert!(a.finish().is_none());
    }

    #[test]
    fn tool_calls_are_assembled() {
        let s = "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"t1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":\"}}]}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n";
        let mut a = ChunkAssembler::new();
        a.feed(s.as_bytes());
        let v = a.finish().unwrap();
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(call["id"], "t1");
        assert!(v["choices"][0]["message"]["content"].is_null());
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    /// Ollama streams parallel calls all with index 0, each with its own
    /// id: the stored answer has two calls, not one with both names.
    #[test]
    fn tool_calls_sharing_an_index_are_assembled_apart() {
        let s = concat!(
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"file_write\",\"arguments\":\"{\\\"p\\\":1}\"}}]}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"file_write\",\"arguments\":\"{\\\"p\\\":2}\"}}]}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut a = ChunkAssembler::new();
        a.feed(s.as_bytes());
        let v = a.finish().unwrap();
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2, "{v}");
        assert_eq!(calls[0]["id"], "call_a");
        assert_eq!(calls[0]["function"]["name"], "file_write");
        assert_eq!(calls[0]["function"]["arguments"], "{\"p\":1}");
        assert_eq!(calls[1]["id"], "call_b");
        assert_eq!(calls[1]["function"]["name"], "file_write");
        assert_eq!(calls[1]["function"]["arguments"], "{\"p\":2}");
    }

    /// Mistral's reasoning models send `content` as a list of chunks: the
    /// text ones are the answer, the thinking ones are not.
    #[test]
    fn content_chunks_are_assembled_as_text() {
        let s = concat!(
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":[{\"type\":\"thinking\",\"thinking\":[{\"type\":\"text\",\"text\":\"hmm\"}]}]}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":[{\"type\":\"text\",\"text\":\"Hello\"}]}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut a = ChunkAssembler::new();
        a.feed(s.as_bytes());
        let v = a.finish().unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    }
}
