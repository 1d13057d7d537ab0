//! The text of a request's prompt, for the places that read it: privacy
//! exclusions of the cache, and token estimates when an upstream reports
//! no usage. (The router's feature extractor reads the turns separately:
//! the last user turn, images, the number of turns.)

use crate::openai::content_text;
use serde_json::{Map, Value};

/// Every message's text, one part a line: its content (text parts), its
/// `name`, and the arguments of the tool calls it makes (what an assistant
/// turn passed to a tool is prompt too, for the privacy exclusions).
pub fn messages_text(body: &Map<String, Value>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(c) = m.get("content") {
            parts.push(content_text(c));
        }
        if let Some(n) = m.get("name").and_then(Value::as_str) {
            parts.push(n.to_string());
        }
        let calls = m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for f in calls
            .filter_map(|c| c.get("function"))
            .chain(m.get("function_call"))
        {
            if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                parts.push(a.to_string());
            }
        }
    }
    parts.join("\n")
}

/// Everything a request sends as prompt: its messages, its `prompt`
/// (completions) or its `input` (embeddings).
pub fn request_text(body: &Map<String, Value>) -> String {
    let mut out = String::new();
    for field in ["messages", "prompt", "input"] {
        match body.get(field) {
            Some(Value::Array(items)) => {
                for it in items {
                    match it {
                        Value::String(s) => out.push_str(s),
                        Value::Object(m) => {
                            out.push_str(&content_text(m.get("content").unwrap_or(&Value::Null)))
                        }
                        _ => {}
                    }
                    out.push('\n');
                }
            }
            Some(Value::String(s)) => out.push_str(s),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn messages_and_other_prompt_fields() {
        let chat = body(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        ]}));
        assert_eq!(messages_text(&chat), "Be brief.\nHi");
        assert_eq!(request_text(&chat), "Be brief.\nHi\n");
        // Names and tool-call arguments are prompt too.
        let tools = body(json!({"messages": [
            {"role": "user", "name": "alice", "content": "Look her up"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"email\":\"alice@example.com\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "active"}
        ]}));
        assert_eq!(
            messages_text(&tools),
            "Look her up\nalice\n\n{\"email\":\"alice@example.com\"}\nactive"
        );
        let completion = body(json!({"prompt": "Once upon"}));
        assert_eq!(messages_text(&completion), "");
        assert_eq!(request_text(&completion), "Once upon");
        let embeddings = body(json!({"input": ["a", "b"]}));
        assert_eq!(request_text(&embeddings), "a\nb\n");
    }
}
