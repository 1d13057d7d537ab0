//! End-to-end tests: the real `smartllm serve` against `mock-llm`, on loopback.
//! One binary; one module per concern. The harness (`smartllm_e2e`, `tests/lib.rs`)
//! builds the binaries it starts when they are missing.

mod anthropic;
mod billing;
mod bounded;
mod cache;
mod cli;
mod clients;
mod common;
mod config;
mod dashboard;
mod fleet;
mod front_door;
mod keys_and_costs;
mod lifecycle;
mod limits;
mod overload;
mod profiles;
mod proxy;
mod responses;
mod routing;
mod secrets;
mod stream_failures;
mod tls;
mod tracing;
