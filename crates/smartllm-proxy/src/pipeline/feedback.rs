//! `POST /v1/feedback`: a score for an earlier answer of the same tenant
//! (`{"request_id", "score": 0-1}` or `{"request_id", "thumbs": "up"|"down"}`),
//! which moves the router's expected quality of the model that answered, on
//! that request's task (`smartllm_router::feedback`).

use super::Failure;
use crate::ctx::Ctx;
use crate::{respond, Shared};
use pingora_proxy::Session;
use serde_json::{json, Value};
use smartllm_protocol::ApiError;

/// The request id and the score (0-1) a feedback body gives.
fn parse(body: &[u8]) -> Result<(String, f64), ApiError> {
    let o = smartllm_protocol::openai::read_object(body)?;
    let id = match o.get("request_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "request_id",
                "'request_id' must be the x-request-id of an earlier answer.",
            ))
        }
        None => {
            return Err(ApiError::missing_param(
                "request_id",
                "the x-request-id of the answer",
            ))
        }
    };
    let score = match (o.get("score"), o.get("thumbs")) {
        (Some(s), None) => match s.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => x,
            _ => {
                return Err(ApiError::invalid_param(
                    "score",
                    "'score' must be a number from 0 (bad) to 1 (good).",
                ))
            }
        },
        (None, Some(t)) => match t.as_str() {
            Some("up") => 1.0,
            Some("down") => 0.0,
            _ => {
                return Err(ApiError::invalid_param(
                    "thumbs",
                    "'thumbs' must be \"up\" or \"down\".",
                ))
            }
        },
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_request(
                "invalid_value",
                "Give either 'score' or 'thumbs', not both.",
            ))
        }
        (None, None) => {
            return Err(ApiError::missing_param(
                "score",
                "0-1, or 'thumbs': up/down",
            ))
        }
    };
    Ok((id, score))
}

pub async fn answer(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    body: &[u8],
) -> Result<(), Failure> {
    let (id, score) = parse(body)?;
    // Scoring takes the book's lock (a map lookup): off the proxy's threads.
    let (book, tenant, key) = (shared.feedback.clone(), ctx.tenant.clone(), id.clone());
    let scored = tokio::task::spawn_blocking(move || book.score(&key, &tenant, score))
        .await
        .map_err(|e| ApiError::internal(format!("scoring the request failed: {e}")))?;
    let served = scored.map_err(|e| {
        ApiError::new(
            404,
            "invalid_request_error",
            "request_not_found",
            e.to_string(),
        )
        .with_param("request_id")
    })?;
    let prior = shared
        .runtime
        .load()
        .config
        .model(&served.model)
        .map(|m| m.profile.quality(served.task));
    let now = prior.map(|p| {
        shared
            .feedback
            .quality(&ctx.tenant, &served.model, served.task, p)
    });
    crate::metrics::feedback(&served.model, served.task.as_str());
    let out = json!({
        "request_id": id,
        "model": served.model,
        "task": served.task.as_str(),
        "score": score,
        "quality": {"profile": prior, "now": now},
    });
    respond::json(session, ctx, 200, out.to_string().into_bytes(), &[]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn bodies_give_a_request_and_a_score_or_a_clear_error() {
        assert_eq!(
            parse(br#"{"request_id":"r1","score":0.25}"#).unwrap(),
            ("r1".into(), 0.25)
        );
        assert_eq!(
            parse(br#"{"request_id":"r1","thumbs":"down"}"#).unwrap().1,
            0.0
        );
        assert_eq!(
            parse(br#"{"request_id":"r1","thumbs":"up"}"#).unwrap().1,
            1.0
        );
        for (body, param) in [
            (&br#"{"score":1}"#[..], Some("request_id")),
            (br#"{"request_id":"r1","score":7}"#, Some("score")),
            (br#"{"request_id":"r1","thumbs":"meh"}"#, Some("thumbs")),
            (br#"{"request_id":"r1"}"#, Some("score")),
            (br#"{"request_id":"r1","score":1,"thumbs":"up"}"#, None),
            (br#"[1]"#, None),
            (br#"nope"#, None),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(
                e.param.as_deref(),
                param,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
