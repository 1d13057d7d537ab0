//! The text of a request's prompt, for the places that read it: privacy
//! exclusions of the cache, and token estimates when an upstream reports
//! no usage. (The router's feature extractor reads the turns separately:
//! the last user turn, images, the number of turns.)

use crate::openai::content_text;
use serde_json::{Map, Value};

/// Every message's content (text parts), one message a line.
pub fn messages_text(body: &Map<String, Value>) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content"))
                .map(content_text)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
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
        let completion = body(json!({"prompt": "Once upon"}));
        assert_eq!(messages_text(&completion), "");
        assert_eq!(request_text(&completion), "Once upon");
        let embeddings = body(json!({"input": ["a", "b"]}));
        assert_eq!(request_text(&embeddings), "a\nb\n");
    }
}
