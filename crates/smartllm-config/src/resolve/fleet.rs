//! `fleet:` of `smartllm.yaml`: the Redis shared by several gateways for
//! limits and budgets, and what to do when it cannot be reached.

use crate::raw::RawFleet;
use crate::{FleetConfig, FleetOnError, Issues, MAIN_FILE};
use std::time::Duration;

pub(super) fn resolve_fleet(raw: RawFleet, v: &mut Issues<'_>) -> FleetConfig {
    let redis = raw.redis.filter(|r| !r.trim().is_empty());
    if let Some(url) = &redis {
        if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
            v.push(
                MAIN_FILE,
                "fleet.redis",
                "must be a redis:// or redis+unix:// URL",
            );
        }
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "smartllm".into());
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c == '{' || c == '}')
    {
        v.push(
            MAIN_FILE,
            "fleet.key_prefix",
            "must be a non-empty word without spaces or braces",
        );
    }
    let on_error = match raw.on_error.as_deref().unwrap_or("local") {
        "local" => FleetOnError::Local,
        "reject" => FleetOnError::Reject,
        other => {
            v.push(
                MAIN_FILE,
                "fleet.on_error",
                format!("unknown action {other:?}: use local or reject"),
            );
            FleetOnError::Local
        }
    };
    let timeout = raw
        .timeout
        .map(|d| d.0)
        .unwrap_or(Duration::from_millis(250));
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        v.push(
            MAIN_FILE,
            "fleet.timeout",
            "must be between 1ms and 10s (it is paid by a request when Redis is slow)",
        );
    }
    FleetConfig {
        redis,
        key_prefix,
        timeout,
        on_error,
    }
}
