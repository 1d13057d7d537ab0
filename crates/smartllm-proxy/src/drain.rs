//! Reading an upstream response body to its end, bounded in size and in how
//! long the peer may stall: the one drain loop, used by the buffered relay,
//! provider errors and webhook answers; and a request's declared body length.

use pingora_core::protocols::http::client::HttpSession;
use pingora_http::RequestHeader;
use std::time::{Duration, Instant};

/// The body length a request declares (`Content-Length`), when it is a number:
/// checked against a limit before reading a byte of the body.
pub fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Why a body could not be read whole.
pub enum BodyError {
    TooLarge,
    Timeout,
    Broken(String),
}

/// Read the rest of `up`'s response body: at most `limit` bytes, each read
/// within `idle`; the time spent waiting is added to `waited`.
pub async fn response_body(
    up: &mut HttpSession,
    idle: Duration,
    limit: usize,
    waited: &mut Duration,
) -> Result<Vec<u8>, BodyError> {
    let mut buf = Vec::new();
    loop {
        let t = Instant::now();
        let r = pingora_timeout::timeout(idle, up.read_response_body()).await;
        *waited += t.elapsed();
        match r {
            Ok(Ok(Some(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Ok(buf),
            Ok(Err(e)) => return Err(BodyError::Broken(e.etype().as_str().to_string())),
            Err(_) => return Err(BodyError::Timeout),
        }
    }
}
