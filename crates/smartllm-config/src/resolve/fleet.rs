//! `fleet:` of `smartllm.yaml`: the Redis shared by several gateways for
//! limits and budgets (and, when asked, the cache and the cost view), and
//! what to do when it cannot be reached.

use crate::raw::RawFleet;
use crate::{FleetConfig, FleetOnError, Issues, MAIN_FILE};
use std::path::Path;
use std::time::Duration;

pub(super) fn resolve_fleet(dir: &Path, raw: RawFleet, v: &mut Issues<'_>) -> FleetConfig {
    let redis = raw.redis.filter(|r| !r.trim().is_empty());
    if let Some(url) = &redis {
        use redis::IntoConnectionInfo;
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://"))
        {
            v.push(
                MAIN_FILE,
                "fleet.redis",
                "must be a redis://, rediss:// (TLS) or redis+unix:// URL",
            );
        } else if let Err(e) = url.as_str().into_connection_info() {
            // Parsed as the client will: a port out of range would fail
            // every request's fleet call instead, and limits turn local.
            v.push(
                MAIN_FILE,
                "fleet.redis",
                format!("is not a usable Redis URL: {e}"),
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
    let share_cache = raw.share_cache.unwrap_or(false);
    if share_cache && redis.is_none() {
        v.push(
            MAIN_FILE,
            "fleet.share_cache",
            "needs fleet.redis (the stream the gateways share)",
        );
    }
    let cache_stream_len = raw.cache_stream_len.unwrap_or(100_000);
    if !(100..=100_000_000).contains(&cache_stream_len) {
        v.push(
            MAIN_FILE,
            "fleet.cache_stream_len",
            "must be between 100 and 100000000 entries",
        );
    }
    let tls_ca_file = raw.tls_ca_file.map(|p| super::relative_to(dir, &p));
    if let Some(ca) = &tls_ca_file {
        if !redis.as_deref().is_some_and(|r| r.starts_with("rediss://")) {
            v.push(
                MAIN_FILE,
                "fleet.tls_ca_file",
                "needs a rediss:// fleet.redis (TLS)",
            );
        } else if let Err(e) = std::fs::read(ca) {
            v.push(
                MAIN_FILE,
                "fleet.tls_ca_file",
                format!("{}: {e}", ca.display()),
            );
        }
    }
    FleetConfig {
        share_costs: raw.share_costs.unwrap_or(redis.is_some()),
        redis,
        tls_ca_file,
        key_prefix,
        timeout,
        on_error,
        share_cache,
        cache_stream_len,
    }
}
