//! `GET /v1/models`: the configured models and routes, as OpenAI lists them.

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
    let mut data: Vec<serde_json::Value> = cfg
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}))
        .collect();
    data.extend(
        cfg.routes
            .values()
            .map(|r| json!({"id": r.name, "object": "model", "created": 0, "owned_by": "smartllm-route", "route_to": r.model})),
    );
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
                let err = ApiError::model_not_found(&id, &rt.known_models);
                respond::error(session, ctx, &err).await
            }
        },
    }
}
