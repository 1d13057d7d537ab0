//! The cache phase of a request: decide whether the request may use the cache
//! (policy, headers, temperature, privacy exclusions), look it up, answer hits
//! directly (JSON, or replayed as SSE), and remember misses so the complete
//! answer is stored off the request path.

use crate::ctx::Ctx;
use crate::runtime::Runtime;
use crate::{respond, Shared};
use bytes::Bytes;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_cache::{chat_key, CacheKey, Lookup, SemanticCache};
use smartllm_config::CachePolicy;
use smartllm_protocol::assemble::replay_as_sse;
use smartllm_protocol::openai::content_text;
use smartllm_protocol::{Endpoint, ParsedRequest};
use std::sync::Arc;

/// Any choice ended by the token limit.
fn cut_short(completion: &str) -> bool {
    serde_json::from_str::<Value>(completion).is_ok_and(|v| {
        v["choices"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"] == "length"))
    })
}

/// What a miss needs to store the answer later.
pub struct PendingInsert {
    pub cache: Arc<SemanticCache>,
    pub key: CacheKey,
    pub embedding: Option<Vec<f32>>,
    pub policy: CachePolicy,
    pub route: String,
    pub model: String,
    /// A per-request cost cap lowered max tokens: an answer it cut short
    /// (finish_reason "length") is not stored.
    pub cost_capped: bool,
    /// Stores in progress gateway-wide, and the bound on them.
    pub pending: Arc<std::sync::atomic::AtomicUsize>,
    pub max_pending: usize,
}

impl PendingInsert {
    /// Store `completion` (a `chat.completion` JSON document) in the background.
    pub fn spawn(self, completion: String) {
        use std::sync::atomic::Ordering;
        if self.cost_capped && cut_short(&completion) {
            return;
        }
        // Under overload, drop the store rather than pile up tasks and memory.
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!(crate::metrics::SHED, "reason" => "cache_insert").increment(1);
            return;
        }
        tokio::spawn(async move {
            let pending = self.pending.clone();
            if let Err(e) = self
                .cache
                .insert(
                    self.key,
                    self.embedding,
                    completion,
                    &self.policy,
                    &self.route,
                    &self.model,
                )
                .await
            {
                if let smartllm_cache::CacheError::Embed(smartllm_embed::EmbedError::Overloaded(
                    _,
                )) = e
                {
                    metrics::counter!(crate::metrics::SHED, "reason" => "cache_insert")
                        .increment(1);
                } else {
                    tracing::warn!(error = %e, "storing a cache entry failed");
                }
            }
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn cache_control(session: &Session) -> (bool, bool) {
    let mut no_store = false;
    let mut no_cache = false;
    for v in session.req_header().headers.get_all("cache-control") {
        let v = v.to_str().unwrap_or("").to_ascii_lowercase();
        for d in v.split(',').map(str::trim) {
            no_store |= d == "no-store";
            no_cache |= d == "no-cache";
        }
    }
    (no_store, no_cache)
}

fn prompt_text(req: &ParsedRequest) -> String {
    req.body
        .get("messages")
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

/// Returns true when the request was answered from the cache.
pub async fn phase(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    req: &ParsedRequest,
    model: &str,
    route: Option<&str>,
) -> pingora_error::Result<bool> {
    let cfg = &rt.config.cache;
    let Some(cache) = shared.cache.clone() else {
        return Ok(false);
    };
    if req.endpoint != Endpoint::ChatCompletions || !cfg.enabled {
        return Ok(false);
    }
    let policy = cfg.policy(route, model).clone();
    if !policy.enabled {
        return Ok(false);
    }
    let (no_store, no_cache) = cache_control(session);
    let temperature = req
        .body
        .get("temperature")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let bypass = |ctx: &mut Ctx, why: &'static str| {
        ctx.cache_status = Some("bypass");
        metrics::counter!(smartllm_cache::metric_names::LOOKUPS, "result" => format!("bypass_{why}")).increment(1);
    };
    if no_store {
        bypass(ctx, "no_store");
        return Ok(false);
    }
    if temperature > policy.max_temperature {
        bypass(ctx, "temperature");
        return Ok(false);
    }
    if let Some(rule) = rt.cache_exclusions.matches(&prompt_text(req)) {
        tracing::debug!(request_id = %ctx.request_id, rule, "cache bypassed by an exclusion rule");
        bypass(ctx, "excluded");
        return Ok(false);
    }
    let Some(key) = chat_key(&ctx.tenant, model, &req.body) else {
        bypass(ctx, "shape");
        return Ok(false);
    };
    let route_name = route.unwrap_or(model).to_string();
    let pending = |key: CacheKey, embedding: Option<Vec<f32>>| PendingInsert {
        cache: cache.clone(),
        key,
        embedding,
        policy: policy.clone(),
        route: route_name.clone(),
        model: model.to_string(),
        cost_capped: false,
        pending: shared.pending_inserts.clone(),
        max_pending: cfg.max_pending_inserts,
    };
    if no_cache {
        // Fresh answer requested: skip the lookup, refresh the entry.
        ctx.cache_status = Some("bypass");
        ctx.cache_insert = Some(pending(key, None));
        return Ok(false);
    }
    match cache.lookup(&key, &policy, cfg.top_k).await {
        Ok(Lookup::Hit {
            entry,
            kind,
            similarity,
        }) => {
            ctx.cache_status = Some(kind.header());
            ctx.cache_similarity = Some(similarity);
            let completion: Value = serde_json::from_str(&entry.response).unwrap_or(Value::Null);
            ctx.saved_usage = smartllm_protocol::Usage::from_openai(&completion);
            if completion.is_null() {
                // Unreadable payload: fall through to the upstream.
                ctx.cache_status = Some("miss");
                ctx.cache_similarity = None;
                ctx.cache_insert = Some(pending(key, None));
                return Ok(false);
            }
            if req.stream {
                let body = replay_as_sse(&completion, req.client_wants_usage);
                // The whole replay is known: a sized body keeps the connection reusable.
                let mut h = respond::header(
                    200,
                    ctx,
                    "text/event-stream; charset=utf-8",
                    Some(body.len()),
                )?;
                h.insert_header("cache-control", "no-cache")?;
                ctx.status = 200;
                session.write_response_header(Box::new(h), false).await?;
                session
                    .write_response_body(Some(Bytes::from(body)), true)
                    .await?;
            } else {
                respond::json(session, ctx, 200, entry.response.clone().into_bytes(), &[]).await?;
            }
            Ok(true)
        }
        Ok(Lookup::Miss {
            embedding,
            best_similarity,
            rejected,
        }) => {
            ctx.cache_status = Some("miss");
            ctx.cache_similarity = best_similarity;
            ctx.cache_near = rejected.is_none()
                && best_similarity.is_some_and(|b| {
                    b >= policy.similarity_threshold - smartllm_router::suggest::NEAR_MISS_MARGIN
                });
            if let Some(why) = rejected {
                tracing::debug!(request_id = %ctx.request_id, why, best = ?best_similarity, "semantic candidate rejected by the precision guard");
            }
            ctx.cache_insert = Some(pending(key, embedding));
            Ok(false)
        }
        Err(smartllm_cache::CacheError::Embed(smartllm_embed::EmbedError::Overloaded(why))) => {
            // Overload: skip the cache for this request, serve it upstream.
            tracing::debug!(request_id = %ctx.request_id, why, "embedder overloaded; cache skipped");
            metrics::counter!(crate::metrics::SHED, "reason" => "embedder").increment(1);
            bypass(ctx, "overloaded");
            Ok(false)
        }
        Err(e) => {
            // The cache never fails a request: serve it from the upstream.
            tracing::warn!(request_id = %ctx.request_id, error = %e, "cache lookup failed; bypassing the cache");
            bypass(ctx, "error");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_cut_by_the_token_limit_are_recognised() {
        let cut = r#"{"choices":[{"index":0,"finish_reason":"length","message":{"content":"a"}}]}"#;
        let whole = r#"{"choices":[{"index":0,"finish_reason":"stop","message":{"content":"a"}}]}"#;
        assert!(super::cut_short(cut));
        assert!(!super::cut_short(whole));
        assert!(!super::cut_short("not json"));
    }
}
