//! Validation and resolution of the parsed files into a [`Config`], one
//! section at a time, in the order [`resolve`] calls them: that order is the
//! order in which issues are reported. Defaults are filled in here; every
//! problem is pushed to [`Issues`] and resolution goes on, so one load reports
//! them all.

pub(crate) mod cache;
pub use cache::default_verifier_threshold;
mod embedder;
mod fleet;
mod general;
mod keys;
mod models;
mod profiles;
mod providers;
mod routes;
mod server;
mod tracing;

use crate::raw::{
    RawCacheFile, RawKeysFile, RawMain, RawMeasuredProfiles, RawModels, RawProviders, RawRoutes,
};
use crate::units::ConfigDuration;
use crate::{ApiKeySource, Config, Issues, KeysConfig, ProviderConfig};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variables that override paths of `smartllm.yaml` (handy for
/// development and packaging; documented in the README).
pub const ENV_DATA_DIR: &str = "SMARTLLM_DATA_DIR";
pub const ENV_ASSETS_DIR: &str = "SMARTLLM_ASSETS_DIR";

pub use profiles::default_benchmark_tasks;

/// The files of a config directory, parsed (a missing file is its default).
pub(crate) struct RawFiles {
    pub main: RawMain,
    pub providers: RawProviders,
    pub models: RawModels,
    pub routes: RawRoutes,
    pub cache: RawCacheFile,
    pub keys: RawKeysFile,
    pub measured: RawMeasuredProfiles,
}

/// Resolve every section; `digest` identifies the files' contents and is
/// extended with the files the routes and `server.tls` refer to.
pub(crate) fn resolve(dir: &Path, digest: String, raw: RawFiles, v: &mut Issues<'_>) -> Config {
    let RawFiles {
        main,
        providers,
        models,
        routes,
        cache,
        keys,
        measured,
    } = raw;
    let server = server::resolve_server(dir, main.server, v);
    let data_dir = general::resolve_data_dir(dir, main.data_dir);
    let embedder = embedder::resolve_embedder(dir, main.embedder, v);
    let logging = general::resolve_logging(main.logging, v);
    let demo = general::resolve_demo(main.demo, v);
    let reload = general::resolve_reload(main.reload);
    let providers = providers::resolve_providers(dir, providers, &server, v);
    let (mut models, prices) = models::resolve_models(models, &providers, v);
    profiles::apply_measured(&mut models, measured, v);
    let model_names: BTreeSet<String> = models.iter().map(|m| m.name.clone()).collect();
    let resolved_routes = routes::resolve_routes(dir, &routes.routes, &model_names, v);
    let classifier = routes::resolve_classifier(dir, &routes.classifier, v);
    let store = general::resolve_store(main.store, v);
    let admin_token = server::resolve_admin_token(dir, main.admin, server.admin_listen, v);
    let ledger = general::resolve_ledger(main.ledger, v);
    let fleet = fleet::resolve_fleet(dir, main.fleet, v);
    let metrics = general::resolve_metrics(main.metrics, v);
    let tracing = tracing::resolve_tracing(main.tracing, v);
    let digest = routes::digest_referenced_files(&digest, &classifier, &resolved_routes, v);
    let digest = server::check_tls(&digest, &server, v);
    let digest = digest_secret_files(dir, &digest, &providers, &admin_token);
    let mut config = Config {
        dir: dir.to_path_buf(),
        digest,
        server,
        data_dir,
        store,
        embedder,
        logging,
        demo,
        reload,
        providers,
        models,
        routes: resolved_routes,
        classifier,
        keys: KeysConfig::default(),
        admin_token,
        ledger,
        fleet,
        metrics,
        tracing,
        prices,
        cache: cache::unresolved(),
    };
    // These two refer to models and routes: they are checked against `config`.
    config.cache = cache::resolve_cache(dir, cache.cache, &config, v);
    config.keys = keys::resolve_keys(keys, &config, v);
    config
}

/// `digest` extended with the contents of the key and CA files the
/// providers and the admin API read (`api_key_file`, `tls_ca_file`,
/// `admin.token_file`): rotating a key in its file is a change a reload
/// applies, not an unchanged config. A file that cannot be read counts by its
/// error (the provider answers 503 until it can be; that is not a config
/// error). Only a hash of each file is kept.
fn digest_secret_files(
    dir: &Path,
    digest: &str,
    providers: &BTreeMap<String, ProviderConfig>,
    admin_token: &ApiKeySource,
) -> String {
    let files = secret_files(providers, admin_token);
    if files.is_empty() {
        return digest.to_string();
    }
    let mut hasher = Sha256::new();
    hasher.update(digest.as_bytes());
    for path in files {
        // Named within the config directory where it lies there: the
        // digest must not depend on how the directory was named
        // (`check --config conf` and the gateway on its absolute path).
        let name = path.strip_prefix(dir).unwrap_or(&path);
        hasher.update(name.to_string_lossy().as_bytes());
        hasher.update([0]);
        match std::fs::read(&path) {
            Ok(bytes) => hasher.update(Sha256::digest(&bytes)),
            Err(e) => hasher.update(format!("unreadable: {:?}", e.kind()).as_bytes()),
        }
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..8])
}

/// The key and CA files of the providers and the admin API, sorted.
fn secret_files(
    providers: &BTreeMap<String, ProviderConfig>,
    admin_token: &ApiKeySource,
) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = providers
        .values()
        .flat_map(|p| {
            let key = match &p.api_key {
                ApiKeySource::File(f) => Some(f.clone()),
                _ => None,
            };
            key.into_iter().chain(p.tls_ca_file.clone())
        })
        .chain(match admin_token {
            ApiKeySource::File(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

impl Config {
    /// Files outside the config files whose contents the running config
    /// reads: TLS certificates, keys and client CAs, provider key and CA
    /// files, the admin token file, the classifier examples and the learned
    /// routers. The watcher watches them too (wherever they are).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let s = &self.server;
        let mut files: Vec<PathBuf> = s
            .tls
            .iter()
            .chain(s.admin_tls.iter())
            .flat_map(|t| {
                [
                    Some(&t.cert_file),
                    Some(&t.key_file),
                    t.client_ca_file.as_ref(),
                ]
            })
            .flatten()
            .cloned()
            .chain(secret_files(&self.providers, &self.admin_token))
            .chain(self.classifier.examples.iter().cloned())
            .chain(self.routes.values().filter_map(|r| match &r.strategy {
                crate::Strategy::Learned(p) => Some(p.clone()),
                _ => None,
            }))
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

/// A duration setting, or `default_secs`.
fn dur(d: Option<ConfigDuration>, default_secs: u64) -> Duration {
    d.map(|d| d.0).unwrap_or(Duration::from_secs(default_secs))
}

fn relative_to(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;
    use std::time::Duration;

    /// One mistake, one error: a provider refused for its own field is not
    /// also "unknown" to the models on it, and a price derived from a
    /// wrong one (cache prices from `input`) is not a second error.
    #[test]
    fn one_mistake_gives_one_error() {
        let providers = "providers:\n  openai:\n    kind: openai\n    base_url: not a url\n";
        let models = "models:\n  - name: a\n    pricing: { input: -0.15, output: 0.6 }\n    deployments:\n      - provider: openai\n  - name: b\n    deployments:\n      - provider: openai\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, providers),
            (MODELS_FILE, models),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("providers.openai.base_url"), "{text}");
        assert!(text.contains("models[0].pricing.input"), "{text}");
        assert!(!text.contains("unknown provider"), "{text}");
        assert!(!text.contains("cache_write"), "{text}");
        assert_eq!(err.issues.len(), 2, "{text}");
    }

    /// No silent $0: a `pricing` block that leaves out `input` or `output`
    /// (not taken from the catalog) is refused at its line; `output: 0`,
    /// an embedding model's missing output and a per-call price are not.
    #[test]
    fn a_price_left_out_of_pricing_is_an_error_not_free() {
        let models = "models:\n  - name: a\n    pricing: { input: 1.5 }\n    deployments:\n      - provider: mock\n  - name: b\n    pricing: {}\n    deployments:\n      - provider: mock\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("models.yaml:3: models[0].pricing: gives no `output` price"),
            "{text}"
        );
        assert!(
            text.contains("models.yaml:7: models[1].pricing: gives no `input` price"),
            "{text}"
        );
        assert!(
            text.contains("models[1].pricing: gives no `output` price"),
            "{text}"
        );
        assert_eq!(err.issues.len(), 3, "{text}");
        let models = "models:\n  - name: a\n    pricing: { input: 1.5, output: 0 }\n    deployments:\n      - provider: mock\n  - name: e\n    mode: embedding\n    pricing: { input: 0.02 }\n    deployments:\n      - provider: mock\n  - name: p\n    pricing: { per_request: 0.01 }\n    deployments:\n      - provider: mock\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
        ]);
        load_dir(dir.path()).unwrap();
    }

    /// A day that allows more than its month is said (the daily limit
    /// would never bind); the other way round is the usual setting.
    #[test]
    fn a_daily_limit_above_the_monthly_one_is_warned_about() {
        let keys = "keys: []\nbudgets:\n  - { scope: tenant, name: a, daily_usd: 1.0, monthly_usd: 0.5 }\n  - { scope: tenant, name: b, daily_usd: 1.0, monthly_usd: 20 }\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (KEYS_FILE, keys),
        ]);
        let w = load_dir(dir.path()).unwrap().budget_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("tenant:a") && w[0].contains("never binds"),
            "{w:?}"
        );
    }

    #[test]
    fn validation_reports_every_error_with_lines() {
        let models = "models:\n  - name: a\n    deployments:\n      - provider: nope\n  - name: a\n    deployments: []\n";
        let routes = "routes:\n  auto:\n    model: missing\n";
        let dir = write_dir(&[
            (MAIN_FILE, "server:\n  listen: nonsense\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
            (ROUTES_FILE, routes),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("smartllm.yaml:2: server.listen"), "{text}");
        assert!(
            text.contains(
                "models.yaml:4: models[0].deployments[0].provider: unknown provider \"nope\""
            ),
            "{text}"
        );
        assert!(
            text.contains("models.yaml:5: models[1].name: model \"a\" is defined twice"),
            "{text}"
        );
        assert!(
            text.contains("models.yaml:6: models[1].deployments"),
            "{text}"
        );
        assert!(
            text.contains("routes.yaml:3: routes.auto.model: unknown model \"missing\""),
            "{text}"
        );
        assert_eq!(err.issues.len(), 5, "{text}");
    }

    #[test]
    fn overload_bounds_are_validated() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  max_in_flight: 0\nembedder:\n  queue_depth: 0\n  max_queue_wait: 0s\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:2: server.max_in_flight"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:4: embedder.queue_depth"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:5: embedder.max_queue_wait"),
            "{text}"
        );
        let c = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert_eq!(c.server.max_in_flight, 4096);
        assert_eq!(c.embedder.queue_depth, 256);
        assert_eq!(c.embedder.max_queue_wait, Duration::from_millis(250));
        assert_eq!(c.cache.max_pending_inserts, 1024);
    }

    #[test]
    fn metrics_section_is_validated_and_label_names_need_a_restart() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "data_dir: /tmp/x\nmetrics:\n  max_label_values: 0\n  label_names: secret\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:3: metrics.max_label_values"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:4: metrics.label_names"),
            "{text}"
        );
        let dir = write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\nmetrics: { bogus: 1 }\n")]);
        assert!(load_dir(dir.path()).is_err());
        let old = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert_eq!(old.metrics, MetricsConfig::default());
        let new = load_dir(
            write_dir(&[(
                MAIN_FILE,
                "data_dir: /tmp/x\nmetrics:\n  max_label_values: 50\n  label_names: hashed\n",
            )])
            .path(),
        )
        .unwrap();
        assert_eq!(new.metrics.max_label_values, 50);
        assert_eq!(new.metrics.label_names, LabelNames::Hashed);
        assert_eq!(
            old.restart_only_changes(&new),
            ["metrics.label_names: plain -> hashed"]
        );
        let applied = old.with_restart_only_from(new);
        assert_eq!(applied.metrics.max_label_values, 50, "reloads live");
        assert_eq!(applied.metrics.label_names, LabelNames::Plain);
    }

    #[test]
    fn fleet_sharing_is_validated_and_needs_a_restart() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "data_dir: /tmp/x\nfleet:\n  share_cache: true\n  cache_stream_len: 5\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:3: fleet.share_cache"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:4: fleet.cache_stream_len"),
            "{text}"
        );
        // A URL the Redis client cannot use is refused at its line.
        let bad = write_dir(&[(
            MAIN_FILE,
            "data_dir: /tmp/x\nfleet:\n  redis: redis://redis:70000/0\n",
        )]);
        let text = load_dir(bad.path()).unwrap_err().to_string();
        assert!(text.contains("smartllm.yaml:3: fleet.redis"), "{text}");
        let old = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert!(!old.fleet.share_cache && !old.fleet.share_costs);
        let new = load_dir(
            write_dir(&[(
                MAIN_FILE,
                "data_dir: /tmp/x\nfleet:\n  redis: redis://127.0.0.1:1/0\n  share_cache: true\n",
            )])
            .path(),
        )
        .unwrap();
        assert!(
            new.fleet.share_cache && new.fleet.share_costs,
            "costs are shared by default"
        );
        assert_eq!(
            old.restart_only_changes(&new),
            [
                "fleet.share_cache: false -> true",
                "fleet.share_costs: false -> true"
            ]
        );
        let applied = old.with_restart_only_from(new);
        assert!(applied.fleet.redis.is_some(), "limits move at once");
        assert!(!applied.fleet.share_cache);
    }

    #[test]
    fn the_token_limit_field_defaults_by_provider_and_is_validated() {
        let load = |providers: &str| {
            load_dir(
                write_dir(&[
                    (MAIN_FILE, "data_dir: /tmp/x\n"),
                    ("providers.yaml", providers),
                ])
                .path(),
            )
        };
        let c = load("providers:\n  o:\n    kind: openai\n    base_url: https://api.openai.com/v1\n  eu:\n    kind: openai\n    base_url: https://eu.api.openai.com/v1\n  v:\n    kind: openai\n    base_url: http://10.0.0.5:8000/v1\n  w:\n    kind: openai\n    base_url: http://10.0.0.5:8000/v1\n    max_tokens_field: max_tokens\n").unwrap();
        let field = |p: &str| c.providers[p].max_tokens_field;
        assert_eq!(field("o"), Some(TokenLimitField::MaxCompletionTokens));
        assert_eq!(field("eu"), Some(TokenLimitField::MaxCompletionTokens));
        assert_eq!(field("v"), None);
        assert_eq!(field("w"), Some(TokenLimitField::MaxTokens));
        let text = load("providers:\n  v:\n    kind: openai\n    base_url: http://10.0.0.5:8000/v1\n    max_tokens_field: max_output_tokens\n").unwrap_err().to_string();
        assert!(
            text.contains("providers.yaml:5: providers.v.max_tokens_field: unknown field"),
            "{text}"
        );
    }

    #[test]
    fn cost_rules_are_validated_with_their_line() {
        let models = "models:\n  - name: a\n    deployments: [ { provider: p } ]\n  - name: b\n    deployments: [ { provider: p } ]\n";
        let providers = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n";
        let routes = |extra: &str| format!("routes:\n  r:\n    candidates: [a, b]\n{extra}");
        let load = |extra: &str| {
            load_dir(
                write_dir(&[
                    (MAIN_FILE, "data_dir: /tmp/x\n"),
                    ("providers.yaml", providers),
                    ("models.yaml", models),
                    ("routes.yaml", &routes(extra)),
                ])
                .path(),
            )
        };
        let c = load("").unwrap();
        assert_eq!(c.routes["r"].cost_rule, CostRule::Log);
        let c = load("    cost_rule: cheapest_within\n    quality_tolerance: 0.05\n").unwrap();
        assert_eq!(c.routes["r"].cost_rule, CostRule::CheapestWithin(0.05));
        assert_eq!(
            load("    cost_rule: linear\n").unwrap().routes["r"].cost_rule,
            CostRule::Linear
        );
        let text = load("    cost_rule: cheapest\n").unwrap_err().to_string();
        assert!(
            text.contains("routes.yaml:4: routes.r.cost_rule: unknown rule"),
            "{text}"
        );
        let text = load("    quality_tolerance: 0.05\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("routes.yaml:4: routes.r.quality_tolerance: applies only to cost_rule: cheapest_within"),
            "{text}"
        );
        let text = load("    cost_rule: cheapest_within\n    quality_tolerance: 0.9\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("routes.yaml:5: routes.r.quality_tolerance"),
            "{text}"
        );
        let c = load(
            "    explore: 0.1
    explore_floor: 0.7
",
        )
        .unwrap();
        assert_eq!(
            (c.routes["r"].explore, c.routes["r"].explore_floor),
            (0.1, 0.7)
        );
        assert_eq!(load("").unwrap().routes["r"].explore, 0.0);
        let text = load(
            "    explore: 0.9
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("routes.yaml:4: routes.r.explore: must be between 0 and 0.5"),
            "{text}"
        );
    }

    /// The classifier examples and a learned router are watched wherever
    /// they are: a new file in another directory hot-reloads too.
    #[test]
    fn routing_files_are_watched() {
        let elsewhere = tempfile::tempdir().unwrap();
        let examples = elsewhere.path().join("tasks.tsv");
        let learned = elsewhere.path().join("router.json");
        std::fs::write(&examples, "chat\thi\n").unwrap();
        std::fs::write(&learned, "{}").unwrap();
        let models = "models:\n  - name: a\n    deployments: [ { provider: p } ]\n  - name: b\n    deployments: [ { provider: p } ]\n";
        let providers = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n";
        let routes = format!(
            "routes:\n  r:\n    candidates: [a, b]\n    strategy: learned\n    learned: {}\nclassifier:\n  examples: {}\n",
            learned.display(),
            examples.display()
        );
        let dir = write_dir(&[
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            ("providers.yaml", providers),
            ("models.yaml", models),
            ("routes.yaml", &routes),
        ]);
        let c = load_dir(dir.path()).unwrap();
        let watched = c.watched_files();
        for f in [&examples, &learned] {
            assert!(watched.contains(f), "{f:?} not in {watched:?}");
        }
    }
}
