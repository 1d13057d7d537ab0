//! `cache.yaml`: the cache switch, default and per-route (or per-model)
//! policies, index sizes, encryption keys (current and old), and what is
//! never cached.

use super::relative_to;
use crate::raw::{RawCache, RawCachePolicy};
use crate::{CacheConfig, CachePolicy, Config, Detector, Issues, CACHE_FILE};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const DEFAULT_POLICY: CachePolicy = CachePolicy {
    enabled: true,
    semantic: true,
    similarity_threshold: DEFAULT_THRESHOLD,
    ttl: Duration::from_secs(24 * 3600),
    version: 1,
    max_temperature: 1.0,
    verifier: Some(DEFAULT_VERIFIER_THRESHOLD),
};

/// The default pair, the verifier's pass score when none is named and the
/// cosine a candidate needs to reach it: what `smartllm cache calibrate
/// --verifier` picks on the yardstick's tuning split for at most 1% of
/// traps served (bench/README.md, issue #16).
pub const DEFAULT_VERIFIER_THRESHOLD: f32 = 0.70;
/// The same for all-MiniLM-L6-v2 (`model.onnx`, `model.int8.onnx`), whose
/// verifier has trees of its own: the default pass score when the embedder
/// runs one of those files.
pub const L6_VERIFIER_THRESHOLD: f32 = 0.85;

/// The verifier's pass score when none is named: the one calibrated for
/// the embedding model's own verifier.
pub fn default_verifier_threshold(model: &Path) -> f32 {
    match model.file_name().and_then(|n| n.to_str()) {
        Some("model.onnx" | "model.int8.onnx") => L6_VERIFIER_THRESHOLD,
        _ => DEFAULT_VERIFIER_THRESHOLD,
    }
}
pub const DEFAULT_THRESHOLD: f32 = 0.70;
/// Without the verifier, the cosine and the guard alone decide: a policy
/// that turns the verifier off and names no threshold of its own gets at
/// least this one (the product's default cosine before the verifier).
pub const UNVERIFIED_THRESHOLD: f32 = 0.95;

/// `model_pass`: the verifier's pass score when neither the policy nor
/// its base names one ([`default_verifier_threshold`] of the embedder).
fn resolve_policy(
    at: &str,
    raw: &RawCachePolicy,
    base: &CachePolicy,
    model_pass: f32,
    v: &mut Issues<'_>,
) -> CachePolicy {
    let verifier_off = raw.verifier == Some(false);
    let threshold = match raw.similarity_threshold {
        Some(t) => t,
        // The inherited threshold was chosen with the verifier behind it.
        None if verifier_off && base.verifier.is_some() => {
            base.similarity_threshold.max(UNVERIFIED_THRESHOLD)
        }
        None => base.similarity_threshold,
    };
    if !(0.5..=1.0).contains(&threshold) {
        v.push(
            CACHE_FILE,
            format!("{at}similarity_threshold"),
            "must be between 0.5 and 1.0 (cosine similarity)",
        );
    }
    let max_temperature = raw.max_temperature.unwrap_or(base.max_temperature);
    if !(0.0..=2.0).contains(&max_temperature) {
        v.push(
            CACHE_FILE,
            format!("{at}max_temperature"),
            "must be between 0 and 2",
        );
    }
    let verifier_threshold = raw
        .verifier_threshold
        .or(base.verifier)
        .unwrap_or(model_pass);
    if !(0.0..=1.0).contains(&verifier_threshold) {
        v.push(
            CACHE_FILE,
            format!("{at}verifier_threshold"),
            "must be between 0 and 1 (the verifier's score)",
        );
    }
    let verifier = match raw.verifier {
        Some(true) => Some(verifier_threshold.clamp(0.0, 1.0)),
        Some(false) => None,
        None => base
            .verifier
            .map(|t| raw.verifier_threshold.unwrap_or(t).clamp(0.0, 1.0)),
    };
    let ttl = raw.ttl.map(|d| d.0).unwrap_or(base.ttl);
    if ttl < Duration::from_secs(1) {
        v.push(CACHE_FILE, format!("{at}ttl"), "must be at least 1s");
    }
    CachePolicy {
        enabled: raw.enabled.unwrap_or(base.enabled),
        semantic: raw.semantic.unwrap_or(base.semantic),
        similarity_threshold: threshold.clamp(0.5, 1.0),
        ttl: ttl.max(Duration::from_secs(1)),
        version: raw.version.unwrap_or(base.version),
        max_temperature: max_temperature.clamp(0.0, 2.0),
        verifier,
    }
}

pub(super) fn resolve_cache(
    dir: &Path,
    raw: RawCache,
    config: &Config,
    v: &mut Issues<'_>,
) -> CacheConfig {
    let top = RawCachePolicy {
        enabled: Some(true),
        semantic: raw.semantic,
        similarity_threshold: raw.similarity_threshold,
        ttl: raw.ttl,
        version: raw.version,
        max_temperature: raw.max_temperature,
        verifier: raw.verifier,
        verifier_threshold: raw.verifier_threshold,
    };
    let model_pass = default_verifier_threshold(&config.embedder.model);
    let base = CachePolicy {
        verifier: Some(model_pass),
        ..DEFAULT_POLICY
    };
    let defaults = resolve_policy("cache.", &top, &base, model_pass, v);
    let mut routes = BTreeMap::new();
    for (name, p) in &raw.routes {
        if !config.routes.contains_key(name) && config.model(name).is_none() {
            v.push(
                CACHE_FILE,
                format!("cache.routes.{name}"),
                format!("{name:?} is neither a route alias nor a model"),
            );
        }
        routes.insert(
            name.clone(),
            resolve_policy(
                &format!("cache.routes.{name}."),
                p,
                &defaults,
                model_pass,
                v,
            ),
        );
    }
    for (i, pat) in raw.exclude.patterns.iter().enumerate() {
        if let Err(e) = regex::Regex::new(pat) {
            v.push(
                CACHE_FILE,
                format!("cache.exclude.patterns[{i}]"),
                format!("invalid regular expression: {e}"),
            );
        }
    }
    let mut detectors = Vec::new();
    for (i, d) in raw.exclude.detectors.iter().enumerate() {
        match d.as_str() {
            "email" => detectors.push(Detector::Email),
            "phone" => detectors.push(Detector::Phone),
            "card" => detectors.push(Detector::Card),
            "api_key" => detectors.push(Detector::ApiKey),
            "ssn" => detectors.push(Detector::Ssn),
            "iban" => detectors.push(Detector::Iban),
            other => v.push(
                CACHE_FILE,
                format!("cache.exclude.detectors[{i}]"),
                format!("unknown detector {other:?}: use email, phone, card, api_key, ssn or iban"),
            ),
        }
    }
    let isolation = match raw.isolation.as_deref() {
        None | Some("tenant") => crate::CacheIsolation::Tenant,
        Some("app") => crate::CacheIsolation::App,
        Some("key") => crate::CacheIsolation::Key,
        Some(other) => {
            v.push(
                CACHE_FILE,
                "cache.isolation".to_string(),
                format!("unknown isolation {other:?}: use tenant (the default), app or key"),
            );
            crate::CacheIsolation::Tenant
        }
    };
    // Written out of range, these are errors (the key and its line), not
    // values quietly raised to their least.
    for (key, value, least) in [
        ("cache.ivf_threshold", raw.ivf_threshold, 1_000),
        ("cache.pq_threshold", raw.pq_threshold, 10_000),
        ("cache.l1_entries", raw.l1_entries, 1),
        ("cache.max_pending_inserts", raw.max_pending_inserts, 1),
    ] {
        if value.is_some_and(|n| n < least) {
            v.push(CACHE_FILE, key, format!("must be at least {least}"));
        }
    }
    let top_k = raw.top_k.unwrap_or(8);
    if !(1..=256).contains(&top_k) {
        v.push(CACHE_FILE, "cache.top_k", "must be between 1 and 256");
    }
    let encryption_key_file = raw.encryption_key_file.map(|f| relative_to(dir, &f));
    let mut encryption_old_key_files: Vec<std::path::PathBuf> = Vec::new();
    if !raw.encryption_old_key_files.is_empty() && encryption_key_file.is_none() {
        v.push(
            CACHE_FILE,
            "cache.encryption_old_key_files",
            "needs cache.encryption_key_file: old keys only open entries sealed before a rotation, the current key seals new ones",
        );
    }
    for (i, f) in raw.encryption_old_key_files.iter().enumerate() {
        let at = format!("cache.encryption_old_key_files[{i}]");
        if f.trim().is_empty() {
            v.push(CACHE_FILE, at, "must name a key file");
            continue;
        }
        let path = relative_to(dir, f);
        if encryption_key_file.as_ref() == Some(&path) {
            v.push(
                CACHE_FILE,
                at,
                "is cache.encryption_key_file itself: list only keys of earlier rotations",
            );
        } else if encryption_old_key_files.contains(&path) {
            v.push(CACHE_FILE, at, "is listed twice");
        } else {
            encryption_old_key_files.push(path);
        }
    }
    CacheConfig {
        enabled: raw.enabled.unwrap_or(false),
        defaults,
        routes,
        l1_entries: raw.l1_entries.unwrap_or(10_000).max(1),
        top_k: top_k.clamp(1, 256),
        max_pending_inserts: raw.max_pending_inserts.unwrap_or(1024).max(1),
        ivf_threshold: raw.ivf_threshold.unwrap_or(IVF_THRESHOLD).max(1_000),
        pq_threshold: raw.pq_threshold.unwrap_or(PQ_THRESHOLD).max(10_000),
        encryption_key_file,
        encryption_old_key_files,
        exclude_patterns: raw.exclude.patterns,
        detectors,
        exclude_answers: raw.exclude.answers.unwrap_or(false),
        isolation,
    }
}

/// Vectors at which the flat index becomes IVF-SQ8 by default. A flat
/// search reads every vector of the index (about 0.2 ms per lookup at 5,000
/// on one core, 0.9 ms at 20,000): past a few thousand it costs a semantic
/// hit more than its embedding, while IVF reads an eighth of the lists.
pub const IVF_THRESHOLD: usize = 2_000;

/// Vectors from which an IVF build encodes them with product quantisation
/// (48 bytes a 384-dimension vector) instead of 8-bit scalars (384 bytes):
/// at 1M vectors 56 MiB against 377 MiB and half the search time, every
/// candidate then scored again on its stored vector (bench/README, "Vector
/// index at scale"). At least 10,000 (PQ's codebooks need that many
/// vectors to train on).
pub const PQ_THRESHOLD: usize = 1_000_000;

/// What `Config` holds until `cache.yaml` is resolved (after the routes it
/// names).
pub(super) fn unresolved() -> CacheConfig {
    CacheConfig {
        enabled: false,
        defaults: DEFAULT_POLICY,
        routes: BTreeMap::new(),
        l1_entries: 10_000,
        top_k: 8,
        max_pending_inserts: 1024,
        ivf_threshold: IVF_THRESHOLD,
        pq_threshold: PQ_THRESHOLD,
        encryption_key_file: None,
        encryption_old_key_files: Vec::new(),
        exclude_patterns: Vec::new(),
        detectors: Vec::new(),
        exclude_answers: false,
        isolation: crate::CacheIsolation::Tenant,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;
    use std::time::Duration;

    #[test]
    fn cache_policies_resolve_per_route() {
        let cache = "cache:\n  enabled: true\n  ttl: 1h\n  exclude:\n    patterns: ['secret']\n    detectors: [email]\n  routes:\n    auto:\n      similarity_threshold: 0.97\n      version: 3\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (ROUTES_FILE, "routes:\n  auto:\n    model: small\n"),
            (CACHE_FILE, cache),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert!(c.cache.enabled);
        let p = c.cache.policy(Some("auto"), "small");
        assert_eq!(
            (p.similarity_threshold, p.version, p.ttl),
            (0.97, 3, Duration::from_secs(3600))
        );
        let d = c.cache.policy(None, "small");
        assert_eq!((d.similarity_threshold, d.version), (0.70, 1));
        assert_eq!(c.cache.detectors, vec![Detector::Email]);
        assert_eq!(c.cache.pq_threshold, super::PQ_THRESHOLD);
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (CACHE_FILE, "cache:\n  pq_threshold: 50000\n"),
        ]);
        assert_eq!(load_dir(dir.path()).unwrap().cache.pq_threshold, 50_000);
        // PQ's codebooks need thousands of vectors: less than 10,000 is an
        // error (sizes_below_their_least_are_errors).

        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (CACHE_FILE, "cache:\n  isolation: app\n"),
        ]);
        assert_eq!(
            load_dir(dir.path()).unwrap().cache.isolation,
            crate::CacheIsolation::App
        );
        let bad = "cache:\n  similarity_threshold: 2\n  exclude:\n    patterns: ['(']\n    detectors: [dna]\n  routes:\n    ghost: {}\n  isolation: team\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (CACHE_FILE, bad),
        ]);
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("cache.yaml:2: cache.similarity_threshold"),
            "{err}"
        );
        assert!(
            err.contains("cache.exclude.patterns[0]: invalid regular expression"),
            "{err}"
        );
        assert!(
            err.contains("cache.exclude.detectors[0]: unknown detector"),
            "{err}"
        );
        assert!(err.contains("cache.routes.ghost"), "{err}");
        assert!(
            err.contains("cache.yaml:8: cache.isolation: unknown isolation \"team\""),
            "{err}"
        );
    }

    /// The verifier is on by default at the calibrated pass score; a route
    /// may turn it off or ask for another score, and a score outside 0..1 is
    /// refused with its key path and line.
    #[test]
    fn the_verifier_is_on_by_default_and_set_per_route() {
        let load = |cache: &str| {
            let dir = write_dir(&[
                (MAIN_FILE, ""),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, MODELS),
                (
                    ROUTES_FILE,
                    "routes:\n  auto:\n    model: small\n  fast:\n    model: small\n",
                ),
                (CACHE_FILE, cache),
            ]);
            load_dir(dir.path()).map_err(|e| e.to_string())
        };
        let c = load("cache:\n  enabled: true\n").unwrap();
        assert_eq!(
            c.cache.policy(None, "small").verifier,
            Some(super::DEFAULT_VERIFIER_THRESHOLD)
        );
        // The default pass score is the embedding model's verifier's.
        let dir = std::path::Path::new("/usr/share/smartllm");
        for (file, want) in [
            ("paraphrase-l3.int8.onnx", super::DEFAULT_VERIFIER_THRESHOLD),
            ("model.int8.onnx", super::L6_VERIFIER_THRESHOLD),
            ("model.onnx", super::L6_VERIFIER_THRESHOLD),
        ] {
            assert_eq!(super::default_verifier_threshold(&dir.join(file)), want);
        }
        let c = load("cache:\n  verifier_threshold: 0.8\n  routes:\n    auto: { verifier: false }\n    fast: { verifier_threshold: 0.3 }\n").unwrap();
        assert_eq!(c.cache.policy(None, "small").verifier, Some(0.8));
        assert_eq!(c.cache.policy(Some("auto"), "small").verifier, None);
        assert_eq!(c.cache.policy(Some("fast"), "small").verifier, Some(0.3));
        // The default cosine (0.70) was chosen with the verifier behind it:
        // a route without the verifier keeps 0.95 unless it names its own.
        let threshold =
            |c: &Config, route: Option<&str>| c.cache.policy(route, "small").similarity_threshold;
        assert_eq!(threshold(&c, None), super::DEFAULT_THRESHOLD);
        assert_eq!(threshold(&c, Some("auto")), super::UNVERIFIED_THRESHOLD);
        assert_eq!(threshold(&c, Some("fast")), super::DEFAULT_THRESHOLD);
        let c = load("cache:\n  similarity_threshold: 0.98\n  routes:\n    auto: { verifier: false }\n    fast: { verifier: false, similarity_threshold: 0.9 }\n").unwrap();
        assert_eq!(threshold(&c, Some("auto")), 0.98);
        assert_eq!(threshold(&c, Some("fast")), 0.9);
        let c =
            load("cache:\n  verifier: false\n  routes:\n    auto: { verifier: true }\n").unwrap();
        assert_eq!(threshold(&c, None), super::UNVERIFIED_THRESHOLD);
        assert_eq!(threshold(&c, Some("auto")), super::UNVERIFIED_THRESHOLD);
        assert_eq!(c.cache.policy(None, "small").verifier, None);
        assert_eq!(
            c.cache.policy(Some("auto"), "small").verifier,
            Some(super::DEFAULT_VERIFIER_THRESHOLD)
        );
        let err =
            load("cache:\n  enabled: true\n  routes:\n    auto:\n      verifier_threshold: 1.5\n")
                .unwrap_err();
        assert!(
            err.contains("cache.yaml:5: cache.routes.auto.verifier_threshold"),
            "{err}"
        );
    }

    /// Index and queue sizes below their least are errors naming the key
    /// and its line, not values quietly raised.
    #[test]
    fn sizes_below_their_least_are_errors() {
        for (line, key) in [
            (
                "ivf_threshold: 10",
                "cache.ivf_threshold: must be at least 1000",
            ),
            (
                "pq_threshold: 5",
                "cache.pq_threshold: must be at least 10000",
            ),
            ("l1_entries: 0", "cache.l1_entries: must be at least 1"),
            (
                "max_pending_inserts: 0",
                "cache.max_pending_inserts: must be at least 1",
            ),
        ] {
            let dir = write_dir(&[
                (MAIN_FILE, ""),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, MODELS),
                (CACHE_FILE, &format!("cache:\n  enabled: true\n  {line}\n")),
            ]);
            let err = load_dir(dir.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("cache.yaml:3: {key}")), "{err}");
        }
    }

    #[test]
    fn old_encryption_keys_resolve_and_are_validated() {
        let files = |cache: &str| {
            write_dir(&[
                (MAIN_FILE, ""),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, MODELS),
                (CACHE_FILE, cache),
            ])
        };
        let ok = "cache:\n  enabled: true\n  encryption_key_file: new.key\n  encryption_old_key_files:\n    - old.key\n    - /etc/older.key\n";
        let dir = files(ok);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(
            c.cache.encryption_key_file.as_deref(),
            Some(dir.path().join("new.key").as_path())
        );
        assert_eq!(
            c.cache.encryption_old_key_files,
            vec![
                dir.path().join("old.key"),
                std::path::PathBuf::from("/etc/older.key")
            ]
        );
        let none = load_dir(files("cache:\n  enabled: true\n").path()).unwrap();
        assert!(none.cache.encryption_old_key_files.is_empty());

        // Old keys without a current one.
        let err = load_dir(
            files("cache:\n  enabled: true\n  encryption_old_key_files: [old.key]\n").path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "cache.yaml:3: cache.encryption_old_key_files: needs cache.encryption_key_file"
            ),
            "{err}"
        );
        // The current key listed as old, a key twice, an empty name: each by
        // its position and line.
        let bad = "cache:\n  encryption_key_file: k\n  encryption_old_key_files:\n    - a\n    - k\n    - a\n    - ''\n";
        let err = load_dir(files(bad).path()).unwrap_err().to_string();
        assert!(
            err.contains("cache.yaml:5: cache.encryption_old_key_files[1]: is cache.encryption_key_file itself"),
            "{err}"
        );
        assert!(
            err.contains("cache.yaml:6: cache.encryption_old_key_files[2]: is listed twice"),
            "{err}"
        );
        assert!(
            err.contains("cache.yaml:7: cache.encryption_old_key_files[3]: must name a key file"),
            "{err}"
        );
        // A misspelt key is refused, with its line.
        let err = load_dir(
            files("cache:\n  encryption_key_file: k\n  encryption_old_key_file: a\n").path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cache.yaml:3") && err.contains("encryption_old_key_file"),
            "{err}"
        );
    }
}
