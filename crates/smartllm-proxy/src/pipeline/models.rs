//! `GET /v1/models`: the configured models and routes, as OpenAI lists them,
//! or as Anthropic does when the request carries `anthropic-version` (Claude
//! Code lists models with `?limit=1000`; `limit`, `after_id` and `before_id`
//! page the list).

use crate::ctx::Ctx;
use crate::respond;
use crate::runtime::Runtime;
use pingora_proxy::Session;
use serde_json::json;
use smartllm_protocol::ApiError;

/// Answer `GET /v1/models` (every model and route) or `/v1/models/{id}`.
pub async fn answer(
    session: &mut Session,
    ctx: &mut Ctx,
    rt: &Runtime,
    id: Option<String>,
) -> pingora_error::Result<()> {
    let cfg = &rt.config;
    // A key that lists its models sees those (and the aliases that lead to
    // them), as it may use them; an open gateway or an unlisted key, all.
    let allowed =
        |id: &str, resolved: &str| crate::auth::authorize_model(ctx, id, resolved).is_ok();
    // Anthropic's list holds only models that answer Messages: Claude Code
    // and other pickers would offer an embedding model for chat.
    let listed_kind = |m: &smartllm_config::ModelConfig| {
        !ctx.anthropic || m.serves(smartllm_config::ModelMode::Chat)
    };
    let mut data: Vec<serde_json::Value> = cfg
        .models
        .iter()
        .filter(|m| allowed(&m.name, &m.name) && listed_kind(m))
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}))
        .collect();
    data.extend(
        cfg.routes
            .values()
            .filter(|r| allowed(&r.name, if r.is_routed() { &r.name } else { &r.model }))
            .map(|r| json!({"id": r.name, "object": "model", "created": 0, "owned_by": "smartllm-route", "route_to": r.model})),
    );
    // A name an alias's `match` pattern takes is that alias, under the
    // name asked for (Claude Code looks up the model it is set to).
    if let Some(id) = id.as_deref() {
        let listed = data.iter().any(|m| m["id"] == id);
        let alias = (!listed && cfg.model(id).is_none())
            .then(|| cfg.route_matching(id))
            .flatten();
        if let Some(entry) = alias.and_then(|r| data.iter().find(|m| m["id"] == r.name.as_str())) {
            let mut entry = entry.clone();
            entry["id"] = json!(id);
            data.push(entry);
        }
    }
    let known: Vec<String> = match ctx.key.as_ref() {
        Some(k) if !k.models.is_empty() => data
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect(),
        _ => rt.known_models.clone(),
    };
    if ctx.anthropic {
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        return anthropic(session, ctx, &known, data, id, &query).await;
    }
    match id {
        None => {
            let body =
                serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
            respond::json(session, ctx, 200, body, &[]).await
        }
        Some(id) => match data.into_iter().find(|m| m["id"] == id.as_str()) {
            Some(m) => {
                respond::json(
                    session,
                    ctx,
                    200,
                    serde_json::to_vec(&m).unwrap_or_default(),
                    &[],
                )
                .await
            }
            None => {
                let err = ApiError::model_not_found(&id, &known);
                respond::error(session, ctx, &err).await
            }
        },
    }
}

/// The list (or one model) in Anthropic's shape.
async fn anthropic(
    session: &mut Session,
    ctx: &mut Ctx,
    known: &[String],
    data: Vec<serde_json::Value>,
    id: Option<String>,
    query: &str,
) -> pingora_error::Result<()> {
    let model = |m: &serde_json::Value| json!({"type": "model", "id": m["id"], "display_name": m["id"], "created_at": "1970-01-01T00:00:00Z"});
    if let Some(id) = id {
        return match data.iter().find(|m| m["id"] == id.as_str()) {
            Some(m) => {
                let body = serde_json::to_vec(&model(m)).unwrap_or_default();
                respond::json(session, ctx, 200, body, &[]).await
            }
            None => {
                let err = ApiError::model_not_found(&id, known);
                respond::error(session, ctx, &err).await
            }
        };
    }
    let param = |k: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    };
    let limit = match param("limit").map(|v| v.parse::<usize>()) {
        None => 20,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            let err = ApiError::invalid_request(
                "invalid_value",
                "limit: Input should be an integer between 1 and 1000",
            )
            .with_param("limit");
            return respond::error(session, ctx, &err).await;
        }
    };
    let ids: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    let pos = |k: &str| param(k).and_then(|v| ids.iter().position(|i| *i == v));
    let (start, end, has_more) = page(ids.len(), limit, pos("after_id"), pos("before_id"));
    let page: Vec<serde_json::Value> = data[start..end].iter().map(model).collect();
    let body = json!({
        "data": page,
        "has_more": has_more,
        "first_id": ids.get(start).filter(|_| start < end),
        "last_id": end.checked_sub(1).and_then(|i| ids.get(i)).filter(|_| start < end),
    });
    respond::json(
        session,
        ctx,
        200,
        serde_json::to_vec(&body).unwrap_or_default(),
        &[],
    )
    .await
}

/// The page `start..end` of a list of `len` ids, `limit` long, after or
/// before the id at a position, and whether more lie beyond it in the
/// direction paged (Anthropic's `has_more`: earlier ids for `before_id`).
fn page(
    len: usize,
    limit: usize,
    after: Option<usize>,
    before: Option<usize>,
) -> (usize, usize, bool) {
    match (after, before) {
        (Some(a), _) => {
            let end = (a + 1 + limit).min(len);
            (a + 1, end, end < len)
        }
        (None, Some(b)) => {
            let start = b.saturating_sub(limit);
            (start, b, start > 0)
        }
        (None, None) => {
            let end = limit.min(len);
            (0, end, end < len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::page;

    #[test]
    fn pages_say_whether_more_lie_in_their_direction() {
        assert_eq!(page(5, 2, None, None), (0, 2, true));
        assert_eq!(page(5, 2, Some(1), None), (2, 4, true));
        assert_eq!(page(5, 2, Some(2), None), (3, 5, false));
        // Before the 4th id: the 2nd and 3rd, and the 1st is earlier still.
        assert_eq!(page(5, 2, None, Some(3)), (1, 3, true));
        assert_eq!(page(5, 2, None, Some(2)), (0, 2, false));
        assert_eq!(page(5, 10, None, None), (0, 5, false));
    }
}
