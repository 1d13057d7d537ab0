//! The OpenAI Responses API around the common pipeline: parsing a request
//! with the conversation its `previous_response_id` continues (when the
//! gateway keeps it), `POST /v1/responses/input_tokens`, and `GET` / `DELETE
//! /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` of the
//! responses the gateway keeps. A create request
//! then runs the same phases as a chat completion; answers are translated in
//! the exchange and stored by [`keep`].

use super::Failure;
use crate::ctx::Ctx;
use crate::responses_store::Link;
use crate::{respond, Shared};
use bytes::BytesMut;
use pingora_proxy::Session;
use serde_json::Value;
use smartllm_protocol::responses::{self as proto, StoredResponse};
use smartllm_protocol::{ApiError, Endpoint, ParsedRequest};

/// A new response id: `resp_` and 32 hex digits from the operating
/// system's secure random source. An id is all a follow-up names to read a
/// conversation back (within its tenant), so it must not be guessable from
/// ids seen before, as a fast generator's are.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No system source (never on Linux): still unique.
        bytes = (u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..))).to_be_bytes();
    }
    format!("resp_{}", hex::encode(bytes))
}

pub async fn parse(
    shared: &Shared,
    ctx: &mut Ctx,
    endpoint: Endpoint,
    body: BytesMut,
) -> Result<ParsedRequest, ApiError> {
    let raw = body.freeze();
    let map = proto::read(&raw)?;
    let previous = match proto::previous_response_id(&map) {
        Some(id) => match &shared.responses {
            Some(r) => r.load_chain(&ctx.tenant, id).await,
            None => None,
        },
        None => None,
    };
    let previous = previous.map(|(stored, chain)| {
        ctx.previous_chain = Some(chain);
        stored
    });
    // The stored conversation goes upstream too: the budget's estimate and
    // the cost cap count it (a follow-up of a few bytes can carry megabytes).
    if let Some(p) = &previous {
        ctx.prompt_bytes += p.history_bytes();
        ctx.prompt_tokens += (p.history_bytes() as u64).div_ceil(4);
    }
    let owner = match (
        &previous,
        proto::previous_response_id(&map),
        &shared.responses,
    ) {
        (None, Some(id), Some(r)) => match r.owner_of(&ctx.tenant, id).await {
            Some(provider) => Some(provider),
            None => fleet_owner(shared, ctx, id).await,
        },
        _ => None,
    };
    // Item references and conversations name state a provider keeps for
    // every tenant under the gateway's one key: whose they are cannot be
    // told, so none is passed on.
    if let Some(param) = foreign_state(&map) {
        return Err(ApiError::invalid_request(
            "unsupported_parameter",
            "Item references and conversations name what a provider keeps under this gateway's one key for every tenant; the gateway cannot tell whose they are and does not pass them on. Send the items themselves, or continue with previous_response_id.",
        )
        .with_param(param));
    }
    let mut req = proto::parse(endpoint, map, raw, previous, new_id())?;
    if let Some(r) = req.responses.as_mut() {
        r.native_owned = owner.is_some();
        r.native_provider = owner.flatten();
    }
    Ok(req)
}

/// A provider speaking Responses answered `id` for this request's tenant:
/// remember whose it is, so that only they can continue it, and which
/// provider keeps it (in the fleet's Redis too, when there is one: a
/// follow-up may reach another gateway).
pub fn own(shared: &Shared, ctx: &Ctx, req: &ParsedRequest, id: &str) {
    let stored = req.responses.as_deref().is_some_and(|r| r.store);
    if let (true, Some(store)) = (stored, &shared.responses) {
        let provider = ctx.provider.clone().unwrap_or_default();
        store.own(&shared.tasks, &ctx.tenant, id, &provider, asked_ms(ctx));
        if let Some(fleet) = ctx
            .rt
            .as_ref()
            .and_then(|rt| shared.quotas.fleet(&rt.config.fleet))
        {
            let key = owner_key(&ctx.tenant, id);
            let ttl = store.ttl().as_secs();
            shared.tasks.spawn(async move {
                if let Err(e) = fleet
                    .mark_with("response-owner", &key, &format!("p:{provider}"), ttl)
                    .await
                {
                    tracing::warn!(error = %e, "recording a response's owner in the fleet failed; follow-ups reaching other gateways get 404");
                }
            });
        }
    }
}

/// The fleet's key of `tenant`'s response `id` (a hash: ids and tenant
/// names stay out of Redis key listings).
fn owner_key(tenant: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((tenant.len() as u64).to_be_bytes());
    h.update(tenant.as_bytes());
    h.update(id.as_bytes());
    hex::encode(h.finalize())
}

/// Did another gateway of the fleet give `ctx`'s tenant the response `id`,
/// and from which provider (none when the marker does not say)?
async fn fleet_owner(shared: &Shared, ctx: &Ctx, id: &str) -> Option<Option<String>> {
    let fleet = ctx
        .rt
        .as_ref()
        .and_then(|rt| shared.quotas.fleet(&rt.config.fleet))?;
    let value = fleet
        .mark_of("response-owner", &owner_key(&ctx.tenant, id))
        .await
        .ok()
        .flatten()?;
    Some(
        value
            .strip_prefix("p:")
            .filter(|p| !p.is_empty())
            .map(str::to_string),
    )
}

/// The parameter of a reference to state a provider keeps (`conversation`,
/// an `item_reference` input item), if the request has one.
fn foreign_state(map: &serde_json::Map<String, Value>) -> Option<String> {
    if map.get("conversation").is_some_and(|c| !c.is_null()) {
        return Some("conversation".into());
    }
    map.get("input")?
        .as_array()?
        .iter()
        .position(|i| i["type"] == "item_reference")
        .map(|i| format!("input[{i}]"))
}

/// `POST /v1/responses/input_tokens`: the gateway's estimate of the input.
pub async fn input_tokens(
    session: &mut Session,
    ctx: &mut Ctx,
    request: &super::parse::Parsed<'_>,
) -> Result<(), Failure> {
    let n = super::prompt_tokens(&request.req.body).await;
    let out = serde_json::to_vec(&proto::input_tokens_object(n)).unwrap_or_default();
    respond::json(
        session,
        ctx,
        200,
        out,
        &[("x-smartllm-estimated".to_string(), "true".to_string())],
    )
    .await?;
    Ok(())
}

/// `GET` or `DELETE /v1/responses/{id}` of the caller's tenant.
pub async fn stored(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    id: &str,
    delete: bool,
) -> Result<(), Failure> {
    let body = match &shared.responses {
        None => None,
        Some(r) if delete => r
            .delete(&shared.tasks, &ctx.tenant, id)
            .await
            .then(|| proto::deleted_object(id)),
        Some(r) => r.response(&ctx.tenant, id).await,
    };
    let Some(body) = body else {
        return Err(Failure::Api(proto::response_not_found(id, None)));
    };
    respond::json(
        session,
        ctx,
        200,
        serde_json::to_vec(&body).unwrap_or_default(),
        &[],
    )
    .await?;
    Ok(())
}

/// `GET /v1/responses/{id}/input_items` of the caller's tenant: a page of
/// the conversation a response the gateway keeps answered.
pub async fn input_items(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    id: &str,
    query: Option<&str>,
) -> Result<(), Failure> {
    let q = proto::ItemsQuery::parse(query)?;
    let stored = match &shared.responses {
        Some(r) => r.load(&ctx.tenant, id).await,
        None => None,
    };
    let Some(stored) = stored else {
        return Err(Failure::Api(proto::response_not_found(id, None)));
    };
    // A kept conversation may hold megabytes: its items are made (each
    // message hashed for its id) and written out off the proxy's threads.
    let body = tokio::task::spawn_blocking(move || {
        proto::input_item_list(&stored, &q).map(|b| serde_json::to_vec(&b).unwrap_or_default())
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing input items: {e}")))??;
    respond::json(session, ctx, 200, body, &[]).await?;
    Ok(())
}

/// When the request started, in milliseconds: a tenant purge since then
/// drops what it would keep.
fn asked_ms(ctx: &Ctx) -> u64 {
    smartllm_cache::now_ms().saturating_sub(ctx.start.elapsed().as_millis() as u64)
}

/// Keep an answered response (`store` not false) for `GET` and
/// `previous_response_id`, off the request path.
pub fn keep(shared: &Shared, ctx: &Ctx, req: &ParsedRequest, response: &Value) {
    let Some(r) = req.responses.as_deref().filter(|r| r.store) else {
        return;
    };
    if response["status"] == "failed" {
        return;
    }
    match StoredResponse::new(r.previous.as_ref(), &r.original, response.clone()) {
        Ok(stored) => {
            // Kept as what it adds to the conversation it continues.
            let link = r
                .previous
                .as_ref()
                .zip(ctx.previous_chain)
                .map(|(p, chain)| Link {
                    parent: p.id().to_string(),
                    prefix: p.messages.len(),
                    chain,
                });
            if let Some(r) = &shared.responses {
                r.save_linked(&shared.tasks, &ctx.tenant, stored, link, asked_ms(ctx));
            }
        }
        Err(e) => tracing::debug!(request_id = %ctx.request_id, error = %e, "response not kept"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn response_ids_are_resp_and_32_hex_digits_and_differ() {
        let (a, b) = (super::new_id(), super::new_id());
        for id in [&a, &b] {
            let hex = id.strip_prefix("resp_").unwrap();
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(a, b);
    }
}
