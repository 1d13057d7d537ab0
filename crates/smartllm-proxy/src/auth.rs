//! Virtual keys: the client's key is hashed (sha256) and looked up; the key
//! itself is never stored, logged or forwarded. A known key gives the request
//! its tenant, app and allowed models; a missing or unknown one is refused with
//! 401 when `keys.yaml` requires keys.

use crate::ctx::Ctx;
use crate::runtime::Runtime;
use pingora_proxy::Session;
use sha2::{Digest, Sha256};
use smartllm_protocol::ApiError;

/// The client's key: `Authorization: Bearer KEY`, `x-api-key: KEY`
/// (Anthropic's SDKs and Claude Code), or `api-key: KEY` (Azure style).
fn presented_key(session: &Session) -> Option<String> {
    let h = &session.req_header().headers;
    if let Some(v) = h.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        if !token.is_empty() {
            return Some(token.to_string());
        }
    }
    h.get("x-api-key")
        .or_else(|| h.get("api-key"))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Identify the caller; errors are 401s ready to send.
pub fn authenticate(session: &Session, ctx: &mut Ctx, rt: &Runtime) -> Result<(), ApiError> {
    let required = rt.config.keys.require_key;
    let Some(key) = presented_key(session) else {
        if required {
            return Err(ApiError::new(
                401,
                "invalid_request_error",
                "missing_api_key",
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY' (keys are configured in keys.yaml).",
            ));
        }
        ctx.tenant = "anonymous".into();
        return Ok(());
    };
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    ctx.key_sha256 = Some(hex::encode(&digest[..6]));
    // A hash-map lookup on the digest: the secret itself is never compared.
    match rt.keys.get(&digest) {
        Some(vk) => {
            ctx.tenant = vk.tenant.clone();
            ctx.app = vk.app.clone();
            ctx.key_name = vk.name.clone();
            ctx.key = Some(vk.clone());
            Ok(())
        }
        None if required => Err(ApiError::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided. Check the key you send; the gateway's keys are listed (hashed) in keys.yaml.",
        )),
        None => {
            // Open gateway: unknown keys are anonymous callers, still kept apart.
            ctx.tenant = format!("key:{}", hex::encode(&digest[..16]));
            Ok(())
        }
    }
}

/// May this key use this model (or route alias)?
pub fn authorize_model(ctx: &Ctx, requested: &str, resolved: &str) -> Result<(), ApiError> {
    let Some(vk) = ctx.key.as_ref() else {
        return Ok(());
    };
    if vk.models.is_empty() || vk.models.iter().any(|m| m == requested || m == resolved) {
        return Ok(());
    }
    Err(ApiError::new(
        403,
        "permission_error",
        "model_not_allowed",
        format!(
            "Key '{}' may not use model '{requested}'. Allowed: {}.",
            vk.name,
            vk.models.join(", ")
        ),
    )
    .with_param("model"))
}
