//! The Responses API conversations the gateway keeps for providers that do
//! not keep state themselves (translated to Chat Completions or Anthropic
//! Messages): `previous_response_id` continues them, `GET` and `DELETE
//! /v1/responses/{id}` read and remove them. Scoped by tenant (another
//! tenant's id is not found), kept for [`TTL`], each at most [`MAX_BYTES`].
//! RocksDB work runs on the blocking pool, never on the proxy's threads.

use smartllm_protocol::responses::StoredResponse;
use smartllm_store::{Store, CF_RESPONSES};
use std::sync::Arc;

/// How long a stored response lives (OpenAI keeps them 30 days).
pub const TTL_SECS: u64 = 30 * 24 * 3600;
/// A conversation larger than this is not stored (its follow-ups get a 404).
pub const MAX_BYTES: usize = 8 << 20;

fn key(tenant: &str, id: &str) -> Vec<u8> {
    // Length-prefixed: no tenant name can reach into another's keys.
    let mut k = Vec::with_capacity(tenant.len() + id.len() + 4);
    k.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The stored response `id` of `tenant`, if it is there and not expired.
pub async fn load(store: Option<&Arc<Store>>, tenant: &str, id: &str) -> Option<StoredResponse> {
    let store = store?.clone();
    let k = key(tenant, id);
    tokio::task::spawn_blocking(move || {
        let bytes = store.get(CF_RESPONSES, &k).ok()??;
        let (expiry, rest) = bytes.split_at_checked(8)?;
        let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
        if expiry <= smartllm_protocol::time::now_secs() {
            let _ = store.delete(CF_RESPONSES, &k);
            return None;
        }
        StoredResponse::from_bytes(rest)
    })
    .await
    .ok()
    .flatten()
}

/// Keep `stored` for `tenant` (off the request path; failures are logged).
pub fn save(
    store: Option<&Arc<Store>>,
    tasks: &tokio_util::task::TaskTracker,
    tenant: &str,
    stored: StoredResponse,
) {
    let Some(store) = store.cloned() else {
        return;
    };
    let k = key(tenant, stored.id());
    tasks.spawn_blocking(move || {
        let body = stored.to_bytes();
        if body.len() > MAX_BYTES {
            tracing::info!(
                id = stored.id(),
                bytes = body.len(),
                "response conversation too large to keep; previous_response_id will not find it"
            );
            return;
        }
        let mut v = (smartllm_protocol::time::now_secs() + TTL_SECS)
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(&body);
        if let Err(e) = store.put(CF_RESPONSES, &k, &v) {
            tracing::warn!(error = %e, "storing a response failed");
        }
    });
}

/// Remove the stored response `id` of `tenant`; whether it was there.
pub async fn delete(store: Option<&Arc<Store>>, tenant: &str, id: &str) -> bool {
    if load(store, tenant, id).await.is_none() {
        return false;
    }
    let Some(store) = store.cloned() else {
        return false;
    };
    let k = key(tenant, id);
    tokio::task::spawn_blocking(move || store.delete(CF_RESPONSES, &k).is_ok())
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_keep_tenants_apart() {
        assert_ne!(super::key("a", "b\0c"), super::key("a\0b", "c"));
        assert_eq!(super::key("t", "resp_1"), b"\0\0\0\x01tresp_1".to_vec());
    }
}
