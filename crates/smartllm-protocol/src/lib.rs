//! OpenAI wire protocol for SmartLLM Router: request validation, OpenAI-shaped
//! errors, the SSE codec, usage extraction, provider adapters (Anthropic),
//! prompt text and the clock every crate records time by.

pub mod admin_query;
pub mod answer;
pub mod anthropic;
pub mod assemble;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod messages;
pub mod openai;
pub mod prompt;
pub mod responses;
pub mod sse;
pub mod time;
pub mod usage;

pub use error::ApiError;
pub use openai::{parse_request, Endpoint, ParsedRequest};
pub use usage::Usage;
