//! The small sections of `smartllm.yaml`: `data_dir` (which
//! `SMARTLLM_DATA_DIR` overrides), `logging:`, `demo:`, `reload:`, `store:`
//! `ledger:` and `metrics:`.

use super::{dur, relative_to, ENV_DATA_DIR};
use crate::raw::{RawDemo, RawLedger, RawLogging, RawMetrics, RawReload, RawStore};
use crate::{
    DemoConfig, Issues, LabelNames, LedgerConfig, LoggingConfig, MetricsConfig, ReloadConfig,
    StoreConfig, UnpricedPolicy, Url, MAIN_FILE,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn resolve_data_dir(dir: &Path, data_dir: Option<String>) -> PathBuf {
    let data_dir = std::env::var(ENV_DATA_DIR)
        .ok()
        .filter(|s| !s.is_empty())
        .or(data_dir)
        .unwrap_or_else(|| "/var/lib/smartllm".to_string());
    relative_to(dir, &data_dir)
}

pub(super) fn resolve_logging(logging: RawLogging, v: &mut Issues<'_>) -> LoggingConfig {
    let level = logging.level.unwrap_or_else(|| "info".into());
    if !["trace", "debug", "info", "warn", "error"].contains(&level.as_str()) {
        v.push(
            MAIN_FILE,
            "logging.level",
            format!("unknown level {level:?}: use trace, debug, info, warn or error"),
        );
    }
    LoggingConfig {
        level,
        access_log: logging.access_log.unwrap_or(true),
    }
}

pub(super) fn resolve_demo(demo: RawDemo, v: &mut Issues<'_>) -> DemoConfig {
    let auto = match demo.mode.as_deref().unwrap_or("auto") {
        "auto" => true,
        "off" => false,
        other => {
            v.push(
                MAIN_FILE,
                "demo.mode",
                format!("unknown mode {other:?}: use auto or off"),
            );
            false
        }
    };
    let demo_upstream = demo
        .upstream
        .unwrap_or_else(|| "http://127.0.0.1:8000/v1".into());
    DemoConfig {
        auto,
        upstream: Url::parse(&demo_upstream).unwrap_or_else(|err| {
            v.push(MAIN_FILE, "demo.upstream", err.to_string());
            Url::parse("http://127.0.0.1:8000/v1").expect("default url")
        }),
    }
}

pub(super) fn resolve_reload(reload: RawReload) -> ReloadConfig {
    let resolved = ReloadConfig {
        watch: reload.watch.unwrap_or(true),
        debounce: dur(reload.debounce, 0)
            .max(Duration::from_millis(50))
            .min(Duration::from_secs(60)),
    };
    match reload.debounce {
        Some(_) => resolved,
        None => ReloadConfig {
            debounce: Duration::from_millis(200),
            ..resolved
        },
    }
}

pub(super) fn resolve_store(store: RawStore, v: &mut Issues<'_>) -> StoreConfig {
    let memory_budget = store.memory_budget.map(|b| b.0).unwrap_or(128 << 20);
    if memory_budget < 8 << 20 {
        v.push(MAIN_FILE, "store.memory_budget", "must be at least 8MiB");
    }
    let responses_ttl = store
        .responses_ttl
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(30 * 86_400));
    if responses_ttl < Duration::from_secs(60) {
        v.push(MAIN_FILE, "store.responses_ttl", "must be at least 1m");
    }
    StoreConfig {
        memory_budget: memory_budget.max(8 << 20),
        responses: store.responses.unwrap_or(true),
        responses_ttl: responses_ttl.max(Duration::from_secs(60)),
    }
}

pub(super) fn resolve_ledger(ledger: RawLedger, v: &mut Issues<'_>) -> LedgerConfig {
    let unpriced = match ledger.unpriced.as_deref() {
        None | Some("allow") => UnpricedPolicy::Allow,
        Some("reject") => UnpricedPolicy::Reject,
        Some(_) => {
            v.push(MAIN_FILE, "ledger.unpriced", "must be allow or reject");
            UnpricedPolicy::Allow
        }
    };
    LedgerConfig {
        unpriced,
        flush_interval: ledger
            .flush_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(60)),
    }
}

pub(super) fn resolve_metrics(metrics: RawMetrics, v: &mut Issues<'_>) -> MetricsConfig {
    let default = MetricsConfig::default();
    let max_label_values = match metrics.max_label_values {
        Some(0) => {
            v.push(MAIN_FILE, "metrics.max_label_values", "must be at least 1");
            default.max_label_values
        }
        Some(n) => n,
        None => default.max_label_values,
    };
    let label_names = match metrics.label_names.as_deref() {
        None | Some("plain") => LabelNames::Plain,
        Some("hashed") => LabelNames::Hashed,
        Some(other) => {
            v.push(
                MAIN_FILE,
                "metrics.label_names",
                format!("unknown value {other:?}: use plain or hashed"),
            );
            LabelNames::Plain
        }
    };
    MetricsConfig {
        max_label_values,
        label_names,
    }
}
