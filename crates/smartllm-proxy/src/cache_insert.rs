//! A cache write waiting for its answer: set on a miss, completed by the
//! exchange once the whole answer is known, stored off the request path.

use crate::metrics;
use serde_json::Value;
use smartllm_cache::{CacheKey, SemanticCache};
use smartllm_config::CachePolicy;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Is this answer (a `chat.completion` document) one to serve again? Every
/// choice must have ended on its own (`stop`) or with tool calls, and carry
/// content or tool calls: an answer a content filter stopped, a refusal, an
/// empty answer, or (when a cost cap lowered the limit) one cut at the token
/// limit, is not stored. One cut at the client's own limit is (the limit is
/// part of the key); one cut at the model's own limit never reaches here.
///
/// What is stored is what every replay (JSON, stream, Messages, Responses)
/// reads: content given as a list of parts (Mistral's reasoning models) is
/// stored as its text (reasoning parts left out; any other part and it is not
/// stored), and a choice that named no end gets `stop` (or `tool_calls`).
fn storable(completion: String, cost_capped: bool) -> Option<String> {
    let mut v = serde_json::from_str::<Value>(&completion).ok()?;
    let choices = v["choices"].as_array_mut().filter(|c| !c.is_empty())?;
    let mut changed = false;
    for c in choices.iter_mut() {
        if !c.is_object() || !c["message"].is_object() {
            return None;
        }
        let ended = match c["finish_reason"].as_str() {
            // OpenAI's words, and what other compatible servers say for an
            // answer that ended on its own (TGI, Together, pass-through
            // proxies of Anthropic).
            Some(
                "stop" | "tool_calls" | "function_call" | "eos" | "eos_token" | "stop_sequence"
                | "end_turn",
            ) => true,
            Some("length") => !cost_capped,
            // Providers that say nothing: judged by the content alone.
            None => c["finish_reason"].is_null(),
            Some(_) => false,
        };
        let m = &mut c["message"];
        let refused = m["refusal"].as_str().is_some_and(|r| !r.is_empty());
        if let Value::Array(parts) = &m["content"] {
            let mut text = String::new();
            for p in parts {
                match p["type"].as_str() {
                    Some("text") => text.push_str(p["text"].as_str().unwrap_or("")),
                    Some("thinking" | "reasoning") => {}
                    _ => return None,
                }
            }
            m["content"] = Value::String(text);
            changed = true;
        }
        let calls = m["tool_calls"].as_array().is_some_and(|t| !t.is_empty())
            || m["function_call"].is_object();
        let said = m["content"].as_str().is_some_and(|t| !t.is_empty()) || calls;
        if !(ended && !refused && said) {
            return None;
        }
        if c["finish_reason"].is_null() {
            c["finish_reason"] = Value::from(if calls { "tool_calls" } else { "stop" });
            changed = true;
        }
    }
    Some(if changed { v.to_string() } else { completion })
}

/// What a miss needs to store the answer later.
pub struct PendingInsert {
    /// When the answer was asked for (milliseconds): the entry dates from then.
    pub asked_at: u64,
    pub cache: Arc<SemanticCache>,
    pub key: CacheKey,
    pub embedding: Option<Vec<f32>>,
    pub policy: CachePolicy,
    pub route: String,
    pub model: String,
    /// A per-request cost cap lowered max tokens: an answer it cut short
    /// (finish_reason "length") is not stored.
    pub cost_capped: bool,
    /// Keyed under a model the client named (not a routed alias): only that
    /// model's answer is stored; a substitute (budget degrade, cost cap,
    /// fallback) drops the write.
    pub fixed_model: bool,
    /// Stores in progress gateway-wide, and the bound on them.
    pub pending: Arc<std::sync::atomic::AtomicUsize>,
    pub max_pending: usize,
    /// Where the store runs (a drain waits for it before the data dir closes).
    pub tasks: TaskTracker,
    /// The fleet, when it shares the cache: the stored entry goes to it.
    pub fleet: Option<Arc<crate::fleet_sync::FleetSync>>,
    /// `cache.exclude.answers`: the exclusions read the answer too.
    pub answer_exclusions: Option<Arc<smartllm_cache::Exclusions>>,
}

/// The words of an answer as the exclusions read them: every choice's
/// content and tool-call arguments.
fn answer_text(completion: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(completion) else {
        return String::new();
    };
    let mut text = String::new();
    for c in v["choices"].as_array().into_iter().flatten() {
        let m = &c["message"];
        if let Some(t) = m["content"].as_str() {
            text.push_str(t);
            text.push('\n');
        }
        let calls = m["tool_calls"].as_array().into_iter().flatten();
        for f in calls.map(|c| &c["function"]).chain([&m["function_call"]]) {
            if let Some(a) = f["arguments"].as_str() {
                text.push_str(a);
                text.push('\n');
            }
        }
    }
    text
}

impl PendingInsert {
    /// Store `completion` (a `chat.completion` JSON document) in the
    /// background, if it is [`storable`].
    pub fn spawn(self, completion: String) {
        use std::sync::atomic::Ordering;
        // Under overload, drop the store rather than pile up tasks and memory.
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            metrics::shed("cache_insert");
            return;
        }
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let pending = self.pending.clone();
            let Some(completion) = storable(completion, self.cost_capped) else {
                metrics::cache_not_stored();
                pending.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            if let Some(rule) = self
                .answer_exclusions
                .as_ref()
                .and_then(|ex| ex.matches(&answer_text(&completion)))
            {
                tracing::debug!(rule, "answer not cached: an exclusion rule matches it (cache.exclude.answers)");
                metrics::cache_not_stored();
                pending.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            match self
                .cache
                .insert_asked_at(
                    self.key,
                    self.embedding,
                    completion,
                    &self.policy,
                    &self.route,
                    &self.model,
                    self.asked_at,
                )
                .await
            {
                Ok(stored) => {
                    if let Some(fleet) = &self.fleet {
                        fleet.publish(crate::fleet_sync::CacheEvent::Insert(Box::new(stored)));
                    }
                }
                // A purge came while the answer was written: as if stored
                // and purged.
                Err(smartllm_cache::CacheError::Purged) => metrics::cache_not_stored(),
                Err(e) => {
                    if let smartllm_cache::CacheError::Embed(
                        smartllm_embed::EmbedError::Overloaded(_),
                    ) = e
                    {
                        metrics::shed("cache_insert");
                    } else {
                        if matches!(e, smartllm_cache::CacheError::Store(_)) {
                            ::metrics::counter!(smartllm_ledger::METRIC_STORE_WRITE_ERRORS, "what" => "cache").increment(1);
                        }
                        tracing::warn!(error = %e, "storing a cache entry failed");
                    }
                }
            }
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_whole_answers_are_stored() {
        let storable = |c: &str, capped: bool| super::storable(c.to_string(), capped).is_some();
        let answer = |finish: &str, message: &str| {
            format!(r#"{{"choices":[{{"index":0,"finish_reason":{finish},"message":{message}}}]}}"#)
        };
        let text = r#"{"role":"assistant","content":"Paris."}"#;
        assert!(storable(&answer("\"stop\"", text), false));
        assert!(
            storable(&answer("null", text), false),
            "a provider that says nothing"
        );
        // Cut at the client's own limit: keyed by it, stored; not when a
        // cost cap lowered the limit.
        assert!(storable(&answer("\"length\"", text), false));
        assert!(!storable(&answer("\"length\"", text), true));
        // Stopped by a content filter, refused, or empty: never served again.
        assert!(!storable(&answer("\"content_filter\"", text), false));
        let refusal = r#"{"role":"assistant","content":null,"refusal":"I can't help with that."}"#;
        assert!(!storable(&answer("\"stop\"", refusal), false));
        assert!(!storable(
            &answer("\"stop\"", r#"{"role":"assistant","content":""}"#),
            false
        ));
        // Tool calls are an answer.
        let call = r#"{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}"#;
        assert!(storable(&answer("\"tool_calls\"", call), false));
        // No choice, another choice filtered, or not JSON.
        assert!(!storable(r#"{"choices":[]}"#, false));
        let two = format!(
            r#"{{"choices":[{{"index":0,"finish_reason":"stop","message":{text}}},{{"index":1,"finish_reason":"content_filter","message":{text}}}]}}"#
        );
        assert!(!storable(&two, false));
        assert!(!storable("not json", false));
    }

    /// What is stored is what every replay reads: text content, a named end.
    #[test]
    fn parts_are_stored_as_text_and_a_silent_end_as_stop() {
        let stored = |c: &str| -> serde_json::Value {
            serde_json::from_str(&super::storable(c.to_string(), false).unwrap()).unwrap()
        };
        let v = stored(
            r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"hmm"}]},{"type":"text","text":"Par"},{"type":"text","text":"is."}]}}]}"#,
        );
        assert_eq!(v["choices"][0]["message"]["content"], "Paris.");
        let v = stored(
            r#"{"choices":[{"index":0,"finish_reason":null,"message":{"role":"assistant","content":"Paris."}}]}"#,
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let v = stored(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}}]}"#,
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        // An unchanged answer is stored byte for byte.
        let plain = r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Paris."}}], "x": 1}"#;
        assert_eq!(
            super::storable(plain.to_string(), false).as_deref(),
            Some(plain)
        );
        // An image part, or only reasoning: not stored.
        assert!(super::storable(r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":[{"type":"image_url","image_url":{"url":"x"}}]}}]}"#.to_string(), false).is_none());
        assert!(super::storable(r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":[{"type":"thinking","thinking":"x"}]}}]}"#.to_string(), false).is_none());
    }
}
