//! Usage when the upstream reports none (estimated, and marked so) and its
//! recording in the context and metrics.

use crate::ctx::Ctx;
use crate::metrics;
use serde_json::Value;
use smartllm_protocol::{Endpoint, ParsedRequest, Usage};

pub(super) fn completion_text(v: &Value) -> String {
    v.get("choices")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let m = &c["message"];
                    let mut t = m
                        .get("content")
                        .and_then(Value::as_str)
                        .or_else(|| c.get("text").and_then(Value::as_str))
                        .unwrap_or("")
                        .to_string();
                    if let Some(calls) = m.get("tool_calls") {
                        t.push_str(&calls.to_string());
                    }
                    // Reasoning the provider shows (DeepSeek-R1 and vLLM's
                    // reasoning parsers) is generated, and billed, too.
                    for field in ["reasoning_content", "reasoning"] {
                        if let Some(r) = m.get(field).and_then(Value::as_str) {
                            t.push('\n');
                            t.push_str(r);
                        }
                    }
                    t
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// When an upstream reports no usage: count tokens ourselves (marked
/// estimated), on the blocking pool (a prompt of megabytes takes the
/// tokenizer a good part of a second; the proxy's threads never wait on it).
pub(super) async fn estimate_usage(req: &ParsedRequest, completion: String) -> Usage {
    let prompt = smartllm_protocol::prompt::request_text(&req.body);
    let embeddings = req.endpoint == Endpoint::Embeddings;
    // Should the count fail, about 4 bytes a token, never nothing.
    let rough = (
        by_bytes(&prompt),
        if embeddings { 0 } else { by_bytes(&completion) },
    );
    let (prompt_tokens, completion_tokens) = tokio::task::spawn_blocking(move || {
        (
            smartllm_ledger::estimate_tokens(&prompt),
            if embeddings {
                0
            } else {
                smartllm_ledger::estimate_tokens(&completion)
            },
        )
    })
    .await
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "counting tokens failed; estimated from bytes");
        rough
    });
    Usage {
        prompt_tokens,
        completion_tokens,
        ..Usage::default()
    }
}

/// [`smartllm_ledger::estimate_tokens`] on the blocking pool.
pub(super) async fn estimate_tokens(text: String) -> u64 {
    let rough = by_bytes(&text);
    tokio::task::spawn_blocking(move || smartllm_ledger::estimate_tokens(&text))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "counting tokens failed; estimated from bytes");
            rough
        })
}

/// About 4 bytes a token.
fn by_bytes(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

pub(super) fn record_usage(ctx: &mut Ctx, usage: Option<Usage>) {
    if let Some(mut u) = usage {
        // A search-model request's one web search, billed per call at the
        // model's `web_search` price (its usage reports none).
        if ctx.web_search && u.web_searches == 0 {
            u.web_searches = 1;
        }
        metrics::tokens(
            ctx.model().unwrap_or("-"),
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
        );
        ctx.usage = Some(u);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// What an answer without usage is billed from: its text, its calls and
    /// the reasoning it showed.
    #[test]
    fn the_completion_text_holds_the_reasoning_too() {
        let v = json!({"choices": [{"message": {"content": "42", "reasoning_content": "six times seven",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}}]});
        let t = super::completion_text(&v);
        assert!(t.starts_with("42"), "{t}");
        assert!(t.contains("\"name\":\"f\""), "{t}");
        assert!(t.ends_with("six times seven"), "{t}");
    }
}
