//! The cache phase of a request: decide whether the request may use the cache
//! (policy, headers, temperature, privacy exclusions), look it up, answer hits
//! directly (JSON, or replayed as SSE), and remember misses so the complete
//! answer is stored off the request path.

use super::parse::Parsed;
use crate::cache_insert::PendingInsert;
use crate::ctx::Ctx;
use crate::runtime::Runtime;
use crate::{metrics, respond, Shared};
use bytes::Bytes;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_cache::{api_chat_key, CacheKey, Lookup};
use smartllm_protocol::assemble::replay_as_sse;
use smartllm_protocol::responses::{response_from_chat, ChatToResponsesStream};
use smartllm_protocol::{messages, Endpoint};

/// The client's cache directives: `no-store` (neither served from nor
/// stored), `no-cache` (a fresh answer wanted: a chat UI's regenerate), and
/// whether any directive asks for a fresh answer (`no-cache`, and as HTTP
/// caches read them, `max-age=0` and HTTP/1.0's `Pragma: no-cache`).
struct Directives {
    no_store: bool,
    no_cache: bool,
    fresh: bool,
}

fn cache_control(session: &Session) -> Directives {
    let mut d = Directives {
        no_store: false,
        no_cache: false,
        fresh: false,
    };
    let headers = &session.req_header().headers;
    for v in headers.get_all("cache-control") {
        let v = v.to_str().unwrap_or("").to_ascii_lowercase();
        for x in v.split(',').map(str::trim) {
            d.no_store |= x == "no-store";
            d.no_cache |= x == "no-cache";
            d.fresh |= x
                .strip_prefix("max-age")
                .and_then(|r| r.trim_start().strip_prefix('='))
                .is_some_and(|n| n.trim().trim_matches('"') == "0");
        }
    }
    for v in headers.get_all("pragma") {
        d.fresh |= v
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|x| x.trim().eq_ignore_ascii_case("no-cache"));
    }
    d.fresh |= d.no_cache;
    d
}

/// Look the request up; answer a hit (true). On a miss, leave the pending
/// cache write in the context for the exchange to complete.
pub async fn phase(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    request: &Parsed<'_>,
) -> pingora_error::Result<bool> {
    let req = &request.req;
    // A routed alias is cached under its own name (the model is chosen only on a miss).
    let model = request
        .routed
        .map_or(request.model.name.as_str(), |r| r.name.as_str());
    let route = request.route.map(|r| r.name.as_str());
    let cfg = &rt.config.cache;
    let Some(cache) = shared.cache.clone() else {
        return Ok(false);
    };
    if !req.endpoint.is_chat() || !cfg.enabled {
        return Ok(false);
    }
    let policy = cfg.policy(route, model).clone();
    if !policy.enabled {
        return Ok(false);
    }
    let Directives {
        no_store,
        no_cache,
        fresh,
    } = cache_control(session);
    let temperature = req
        .body
        .get("temperature")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let bypass = |ctx: &mut Ctx, why: &'static str| {
        ctx.cache_status = Some("bypass");
        metrics::cache_bypass(why);
    };
    if no_store {
        bypass(ctx, "no_store");
        return Ok(false);
    }
    if temperature > policy.max_temperature {
        bypass(ctx, "temperature");
        return Ok(false);
    }
    // Answers with parts the cache does not keep (token log-probabilities,
    // audio, web search results) are neither served from it nor stored.
    if keeps_no_replay(&req.body) {
        bypass(ctx, "shape");
        return Ok(false);
    }
    if let Some(rule) = rt
        .cache_exclusions
        .matches(&smartllm_protocol::prompt::messages_text(&req.body))
    {
        tracing::debug!(request_id = %ctx.request_id, rule, "cache bypassed by an exclusion rule");
        bypass(ctx, "excluded");
        return Ok(false);
    }
    // What the canonical body leaves out decides the answer: a document, a
    // server tool or extended thinking that only an Anthropic provider sees,
    // a Responses feature only a provider that speaks Responses takes, or a
    // previous response the gateway does not hold (its history).
    let only = &req.anthropic_only;
    if only.untranslatable.is_some() || only.thinking || only.lossy {
        bypass(ctx, "shape");
        return Ok(false);
    }
    // (Or, through Responses, log-probabilities or encrypted reasoning,
    // which only its own body asks for: the canonical chat body never
    // carries them, so `keeps_no_replay` cannot see them.)
    if req.responses.as_deref().is_some_and(|r| {
        (r.previous_response_id.is_some() && r.previous.is_none())
            || r.untranslatable.is_some()
            || responses_keeps_no_replay(&r.original)
    }) {
        bypass(ctx, "shape");
        return Ok(false);
    }
    // Anthropic's `top_k` has no Chat Completions field: it joins the key
    // through the API's name.
    // So do the fields and beta features that only the raw Messages body
    // (and its `anthropic-beta` header) carries to Anthropic providers.
    let mut api: std::borrow::Cow<'_, str> = match only.top_k {
        Some(k) => format!("{}+top_k={k}", req.endpoint.as_str()).into(),
        None => req.endpoint.as_str().into(),
    };
    if req.endpoint == Endpoint::Messages {
        if let Some(extra) = &only.extra {
            api = format!("{api}+{extra}").into();
        }
        // As a set: order, spacing and repeats do not matter.
        let mut betas: Vec<&str> = session
            .req_header()
            .headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        betas.sort_unstable();
        betas.dedup();
        if !betas.is_empty() {
            api = format!("{api}+anthropic-beta={}", betas.join(",")).into();
        }
    }
    // Whether each of the routed alias's rules that reads the request
    // beside the prompt (its headers, its app) holds, read as the router
    // reads them, joins the key: an answer a rule sent to one model is
    // never replayed to a request a rule sends elsewhere (`x-tier: premium`
    // pinned to a stronger model, another app's pin), and requests the
    // rules treat alike share their answers.
    if let Some(r) = request.routed.filter(|r| {
        r.rules
            .iter()
            .any(|rule| !rule.when.headers.is_empty() || !rule.when.apps.is_empty())
    }) {
        let headers = crate::routing::rule_headers(session);
        let held: String = r
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                // The rule itself too (a reload that rewrites rule 0 must
                // not give its answers a new meaning).
                smartllm_router::decide::request_conditions(rule, &headers, &ctx.tenant, &ctx.app)
                    .map(|m| {
                        let digest =
                            <sha2::Sha256 as sha2::Digest>::digest(format!("{rule:?}").as_bytes());
                        format!(
                            "{i}{}{}",
                            hex::encode(&digest[..4]),
                            if m { '+' } else { '-' }
                        )
                    })
            })
            .collect::<Vec<_>>()
            .join(",");
        api = format!("{api}+rules:{held}").into();
    }
    // Narrower than the tenant when `cache.isolation` says so: only the
    // same app's (or key's) requests share an answer.
    match rt.config.cache.isolation {
        smartllm_config::CacheIsolation::Tenant => {}
        smartllm_config::CacheIsolation::App => api = format!("{api}+app:{}", ctx.app).into(),
        smartllm_config::CacheIsolation::Key => api = format!("{api}+key:{}", ctx.key_name).into(),
    }
    let Some(key) = api_chat_key(&api, &ctx.tenant, model, &req.body) else {
        bypass(ctx, "shape");
        return Ok(false);
    };
    ctx.cache_namespace = Some(key.namespace_hex());
    let route_name = route.unwrap_or(model).to_string();
    let mut folded = [0u8; 8];
    folded.copy_from_slice(&key.exact[..8]);
    ctx.question = Some(u64::from_le_bytes(folded));
    // The answer dates from now: a purge issued while it is written covers it.
    let asked_at = smartllm_cache::now_ms();
    let pending = |key: CacheKey, embedding: Option<Vec<f32>>| PendingInsert {
        asked_at,
        cache: cache.clone(),
        key,
        embedding,
        policy: policy.clone(),
        route: route_name.clone(),
        model: model.to_string(),
        cost_capped: false,
        fixed_model: request.routed.is_none(),
        pending: shared.pending_inserts.clone(),
        max_pending: cfg.max_pending_inserts,
        tasks: shared.tasks.clone(),
        fleet: shared.fleet_sync.clone(),
        answer_exclusions: cfg.exclude_answers.then(|| rt.cache_exclusions.clone()),
    };
    if fresh {
        // Fresh answer requested: skip the lookup, refresh the entry. Only
        // `no-cache` reads as a regenerate (a vote against the answer
        // before): `max-age=0` or a `Pragma` may be a client's habit.
        ctx.regenerate = no_cache;
        ctx.cache_status = Some("bypass");
        ctx.cache_insert = Some(pending(key, None));
        return Ok(false);
    }
    let span = crate::otel::Phase::start(&ctx.trace, "cache lookup");
    let mut times = smartllm_cache::LookupTimes::default();
    let found = cache
        .lookup_timed(&key, &policy, cfg.top_k, &mut times)
        .await;
    if let Some((start, end)) = times.embed {
        span.step("embed", start, end);
    }
    if let Some((start, end)) = times.search {
        span.step("search", start, end);
    }
    span.set(opentelemetry::KeyValue::new(
        "smartllm.cache",
        match &found {
            Ok(Lookup::Hit { kind, .. }) => kind.header(),
            Ok(Lookup::Miss { .. }) => "miss",
            Err(_) => "error",
        },
    ));
    span.end();
    match found {
        Ok(Lookup::Hit {
            entry,
            kind,
            similarity,
            verifier,
        }) => {
            ctx.cache_status = Some(kind.header());
            ctx.cache_similarity = Some(similarity);
            ctx.cache_verifier = verifier;
            // A routed alias names no model until the router runs: the hit
            // is the answer of the model that served it (for the ledger's
            // row and saved cost, the traffic mix and `x-smartllm-model`).
            if request.routed.is_some() && rt.config.model(&entry.model).is_some() {
                ctx.set_model(&entry.model);
            }
            let mut completion: Value =
                serde_json::from_str(&entry.response).unwrap_or(Value::Null);
            ctx.saved_usage = smartllm_protocol::Usage::from_openai(&completion);
            if !completion.is_object() {
                // Unreadable payload: fall through to the upstream.
                ctx.cache_status = Some("miss");
                ctx.cache_similarity = None;
                ctx.cache_verifier = None;
                ctx.cache_insert = Some(pending(key, None));
                return Ok(false);
            }
            fresh_ids(&mut completion);
            let anthropic = req.endpoint == Endpoint::Messages;
            let responses = req.responses.as_deref();
            if req.stream {
                let mut body = replay_as_sse(&completion, req.client_wants_usage);
                if anthropic {
                    let mut m = messages::ChatToMessagesStream::new(&req.model, 0);
                    body = m.feed(&body).unwrap_or_default();
                } else if let Some(r) = responses {
                    let mut s =
                        ChatToResponsesStream::new(&r.id, r.created_at, &req.model, &r.original);
                    let mut out = s.feed(&body).unwrap_or_default();
                    out.extend(s.finish());
                    if let Some(resp) = s.response() {
                        super::responses::keep(shared, ctx, req, &resp);
                    }
                    body = out;
                }
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
            } else if anthropic {
                let m = messages::response_from_chat(&completion, &req.model);
                respond::json(
                    session,
                    ctx,
                    200,
                    serde_json::to_vec(&m).unwrap_or_default(),
                    &[],
                )
                .await?;
            } else if let Some(r) = responses {
                let resp = response_from_chat(&completion, &r.id, r.created_at, &r.original);
                super::responses::keep(shared, ctx, req, &resp);
                let body = serde_json::to_vec(&resp).unwrap_or_default();
                respond::json(session, ctx, 200, body, &[]).await?;
            } else {
                let body = serde_json::to_vec(&completion).unwrap_or_default();
                respond::json(session, ctx, 200, body, &[]).await?;
            }
            Ok(true)
        }
        Ok(Lookup::Miss {
            embedding,
            task_vector,
            best_similarity,
            rejected,
        }) => {
            ctx.task_vector = task_vector;
            ctx.cache_status = Some("miss");
            ctx.cache_similarity = best_similarity;
            ctx.cache_near = rejected.is_none()
                && best_similarity.is_some_and(|b| {
                    b >= policy.similarity_threshold - smartllm_router::suggest::NEAR_MISS_MARGIN
                });
            ctx.cache_refused = rejected;
            if let Some(why) = rejected {
                tracing::debug!(request_id = %ctx.request_id, why, best = best_similarity, "semantic candidate rejected (by the precision guard or the verifier, as why says)");
            }
            ctx.cache_insert = Some(pending(key, embedding));
            Ok(false)
        }
        Err(smartllm_cache::CacheError::Embed(smartllm_embed::EmbedError::Overloaded(why))) => {
            // Overload: skip the cache for this request, serve it upstream.
            tracing::debug!(request_id = %ctx.request_id, why, "embedder overloaded; cache skipped");
            metrics::shed("embedder");
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

/// A hit is a new answer, with ids of its own: `chatcmpl-` and 32 random
/// hex digits (the Messages and Responses shapes derive theirs from it),
/// fresh tool-call ids and this moment's `created`. Apps that log,
/// deduplicate or key state by id never see one twice.
fn fresh_ids(completion: &mut Value) {
    let id = crate::ctx::random_id();
    completion["id"] = Value::String(format!("chatcmpl-{id}"));
    completion["created"] = Value::from(smartllm_protocol::time::now_secs());
    let Some(choices) = completion["choices"].as_array_mut() else {
        return;
    };
    for (i, choice) in choices.iter_mut().enumerate() {
        let Some(calls) = choice
            .get_mut("message")
            .and_then(|m| m.get_mut("tool_calls"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for (j, call) in calls.iter_mut().enumerate() {
            if call.get("id").is_some() {
                call["id"] = Value::String(format!("call_{}_{i}_{j}", &id[..24]));
            }
        }
    }
}

/// A chat request whose answer has parts a cache entry does not keep:
/// token log-probabilities, audio, web search annotations.
fn keeps_no_replay(body: &serde_json::Map<String, Value>) -> bool {
    let set = |f: &str| {
        body.get(f)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    };
    set("logprobs")
        || set("top_logprobs")
        || set("audio")
        || set("web_search_options")
        || body
            .get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x != "text"))
}

/// A Responses body asking for parts of the answer a cached replay would
/// not have: token log-probabilities (`top_logprobs`, or `include`
/// naming `*.logprobs`) or encrypted reasoning to pass back later.
fn responses_keeps_no_replay(body: &serde_json::Map<String, Value>) -> bool {
    body.get("top_logprobs")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
        || body
            .get("include")
            .and_then(Value::as_array)
            .is_some_and(|inc| {
                inc.iter()
                    .filter_map(Value::as_str)
                    .any(|i| i.ends_with("logprobs") || i == "reasoning.encrypted_content")
            })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn answers_with_parts_an_entry_does_not_keep_bypass_the_cache() {
        let no = |v: serde_json::Value| super::keeps_no_replay(v.as_object().unwrap());
        assert!(!no(json!({"messages": []})));
        assert!(!no(
            json!({"logprobs": false, "modalities": ["text"], "audio": null})
        ));
        assert!(no(json!({"logprobs": true})));
        assert!(no(json!({"top_logprobs": 3})));
        assert!(no(json!({"modalities": ["text", "audio"]})));
        assert!(no(json!({"audio": {"voice": "alloy", "format": "wav"}})));
        assert!(no(json!({"web_search_options": {}})));
        // Through Responses, which its canonical chat body does not show.
        let no = |v: serde_json::Value| super::responses_keeps_no_replay(v.as_object().unwrap());
        assert!(!no(json!({"input": "hi", "top_logprobs": 0})));
        assert!(!no(json!({"include": ["web_search_call.action.sources"]})));
        assert!(no(json!({"top_logprobs": 5})));
        assert!(no(json!({"include": ["message.output_text.logprobs"]})));
        assert!(no(json!({"include": ["reasoning.encrypted_content"]})));
    }

    #[test]
    fn a_hit_gets_ids_of_its_own() {
        let stored = json!({"id": "chatcmpl-first", "object": "chat.completion", "created": 1,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_first", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                               {"id": "call_second", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}]});
        let (mut a, mut b) = (stored.clone(), stored.clone());
        super::fresh_ids(&mut a);
        super::fresh_ids(&mut b);
        assert!(a["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_ne!(a["id"], stored["id"]);
        assert_ne!(a["id"], b["id"]);
        assert!(a["created"].as_u64().unwrap() > 1_700_000_000);
        let calls = |v: &serde_json::Value| {
            v["choices"][0]["message"]["tool_calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let (ca, cb) = (calls(&a), calls(&b));
        assert!(ca.iter().all(|c| c.starts_with("call_")), "{ca:?}");
        assert_ne!(ca[0], ca[1]);
        assert!(ca
            .iter()
            .all(|c| !cb.contains(c) && !calls(&stored).contains(c)));
        // Everything else as stored.
        assert_eq!(
            a["choices"][0]["message"]["tool_calls"][1]["function"],
            stored["choices"][0]["message"]["tool_calls"][1]["function"]
        );
    }
}
