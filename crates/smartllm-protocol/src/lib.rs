//! OpenAI wire protocol for SmartLLM Router: request validation, OpenAI-shaped
//! errors, the SSE codec, usage extraction and provider adapters (Anthropic).

pub mod anthropic;
pub mod assemble;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod openai;
pub mod sse;
pub mod usage;

pub use error::ApiError;
pub use openai::{parse_request, Endpoint, ParsedRequest};
pub use usage::Usage;
