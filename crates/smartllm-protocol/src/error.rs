//! OpenAI-shaped errors: `{"error":{"message","type","param","code"}}` with the
//! HTTP status a client expects. `code` doubles as the low-cardinality metric label.

use serde_json::json;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds, for 429/503 answers.
    pub retry_after: Option<u64>,
    /// The methods a 405's path takes (its `Allow` header).
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            allow: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", code, message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_request("invalid_type", message).with_param(param)
    }

    pub fn missing_param(param: &str, what: &str) -> Self {
        Self::invalid_request(
            "missing_required_parameter",
            format!("Missing required parameter: '{param}' ({what})."),
        )
        .with_param(param)
    }

    pub fn model_not_found(model: &str, known: &[String]) -> Self {
        let mut msg = format!("The model '{model}' does not exist on this gateway.");
        if !known.is_empty() {
            msg.push_str(&format!(
                " Available models and aliases: {}. See GET /v1/models.",
                known.join(", ")
            ));
        }
        Self::new(404, "invalid_request_error", "model_not_found", msg).with_param("model")
    }

    pub fn not_found_path(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown request URL: {method} {path}: not an endpoint this gateway serves. Supported: POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/responses/input_tokens, /v1/messages, /v1/messages/count_tokens and /v1/feedback; GET and DELETE /v1/responses/{{id}}; GET /v1/models, /v1/models/{{id}} and /v1/smartllm/usage."),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &'static str) -> Self {
        let mut e = Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use {allowed}."),
        );
        e.allow = Some(allowed);
        e
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!(
                "Request body exceeds the gateway limit of {limit} bytes (server.max_body_size)."
            ),
        )
    }

    pub fn header_too_large(size: usize, limit: u64) -> Self {
        Self::new(
            431,
            "invalid_request_error",
            "request_header_too_large",
            format!("The request line and headers are {size} bytes; the limit is {limit} (server.max_header_size)."),
        )
    }

    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            415,
            "invalid_request_error",
            "unsupported_media_type",
            format!("Content-Type {got:?} is not supported; send application/json."),
        )
    }

    /// 415 for a `Content-Encoding` the gateway does not decode.
    pub fn unsupported_encoding(got: &str) -> Self {
        Self::new(
            415,
            "invalid_request_error",
            "unsupported_content_encoding",
            format!("Content-Encoding {got:?} is not supported; send the body uncompressed, or gzip- or deflate-encoded."),
        )
    }

    pub fn bad_gateway(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(502, "upstream_error", code, message)
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "upstream_error", "upstream_timeout", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(503, "server_error", code, message)
    }

    /// 503 `server_shutting_down`: this instance is stopping; the request
    /// may be sent again at once (another instance takes it).
    pub fn shutting_down(message: impl Into<String>) -> Self {
        let mut e = Self::unavailable("server_shutting_down", message);
        e.retry_after = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", "internal_error", message)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }

    /// The error as one SSE event, for streams that fail after bytes reached the client.
    pub fn sse_event(&self) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&self.body());
        out.extend_from_slice(b"\n\n");
        out
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let e = ApiError::missing_param("model", "the model to use");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "missing_required_parameter");
        assert!(v["error"]["message"].as_str().unwrap().contains("'model'"));
        assert_eq!(e.status, 400);
    }
}
