//! SmartLLM Router configuration: a directory of YAML files, parsed strictly
//! (unknown keys are errors), validated as a whole (every error is reported, with
//! file, key path and line) and resolved into [`Config`], which the rest of the
//! gateway consumes. Loading is pure: secrets (provider keys) are read when the
//! proxy prepares a runtime snapshot from a `Config`.
//!
//! - [`raw`]: the files as written (serde, `deny_unknown_fields`);
//! - `load`: reading and parsing the files, locating issues;
//! - `resolve`: validation and defaults, one module per section;
//! - `types` and [`routing`]: the resolved configuration;
//! - [`tls`]: the API listener's certificate, key and client CAs;
//! - [`watch`]: file watching for hot reload.

pub mod catalog;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod load;
mod locate;
pub mod raw;
mod resolve;
pub mod routing;
#[cfg(test)]
mod test_support;
pub mod tls;
mod types;
pub mod units;
pub mod watch;

pub use error::{ConfigError, ConfigIssue, UnitError, UrlError};
pub use load::{
    layout_warnings, load_dir, load_for_reload, load_texts, parse_profiles_file, read_texts,
    ReloadLoad, CACHE_FILE, FILES, KEYS_FILE, MAIN_FILE, MODELS_FILE, PROFILES_FILE,
    PROVIDERS_FILE, ROUTES_FILE,
};
pub use locate::locate;
pub use resolve::{
    default_benchmark_tasks, default_verifier_threshold, ENV_ASSETS_DIR, ENV_DATA_DIR,
};
pub use routing::*;
pub use types::*;

/// Set to `true` (or `1`, `yes`), keys are required unless `keys.yaml` says
/// `require_key: false`, and when it is missing: the packages' systemd unit and the
/// Kubernetes manifest set it, so a deleted `keys.yaml` never opens an
/// installed gateway at a restart.
pub const ENV_REQUIRE_KEY: &str = "SMARTLLM_REQUIRE_KEY";

/// [`ENV_REQUIRE_KEY`] is set to a true value.
pub fn require_key_by_env() -> bool {
    std::env::var(ENV_REQUIRE_KEY)
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

use load::Issues;
