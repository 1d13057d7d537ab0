//! `keys.yaml`: virtual keys (by sha256) with their tenant, app, models and
//! limits; limits per app; and budgets with what to do when one is spent.

use crate::raw::{RawKeysFile, RawLimits};
use crate::{
    Budget, BudgetScope, Config, Issues, KeysConfig, Limits, OnExceed, Url, VirtualKey, KEYS_FILE,
};
use std::collections::{BTreeMap, BTreeSet};

pub(super) fn resolve_keys(raw: RawKeysFile, config: &Config, v: &mut Issues<'_>) -> KeysConfig {
    let mut names = BTreeSet::new();
    let mut hashes = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        if !names.insert(k.name.clone()) {
            v.push(
                KEYS_FILE,
                format!("{at}.name"),
                format!("key name {:?} is used twice", k.name),
            );
        }
        let digest = hex::decode(k.sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        let Some(sha256) = digest else {
            v.push(
                KEYS_FILE,
                format!("{at}.sha256"),
                "must be 64 hex characters: the sha256 of the key (smartllm keys hash < key-file)",
            );
            continue;
        };
        if !hashes.insert(sha256) {
            v.push(
                KEYS_FILE,
                format!("{at}.sha256"),
                "the same key is listed twice",
            );
        }
        let previous_sha256 = k.previous_sha256.as_deref().and_then(|p| {
            let digest = hex::decode(p.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            match digest {
                None => v.push(
                    KEYS_FILE,
                    format!("{at}.previous_sha256"),
                    "must be 64 hex characters: the sha256 of the key being replaced",
                ),
                Some(d) if !hashes.insert(d) => v.push(
                    KEYS_FILE,
                    format!("{at}.previous_sha256"),
                    "the same key is listed twice",
                ),
                Some(_) => {}
            }
            digest
        });
        if k.tenant.trim().is_empty() || k.tenant.contains('\0') {
            v.push(
                KEYS_FILE,
                format!("{at}.tenant"),
                "must be a non-empty name",
            );
        }
        // The names an open gateway gives callers without a listed key: a
        // listed tenant of that name would share their limits, budget,
        // cache and stored responses.
        if k.tenant == "anonymous" || k.tenant.starts_with("key:") {
            v.push(
                KEYS_FILE,
                format!("{at}.tenant"),
                "'anonymous' and names starting 'key:' are the gateway's own for callers without a listed key",
            );
        }
        // Apps are named `tenant/app`: a `/` in either part would let two
        // tenants' apps share one name (and its limits and budget).
        if k.tenant.contains('/') {
            v.push(KEYS_FILE, format!("{at}.tenant"), "must not contain '/'");
        }
        if k.app
            .as_deref()
            .is_some_and(|a| a.contains('/') || a.trim().is_empty())
        {
            v.push(
                KEYS_FILE,
                format!("{at}.app"),
                "must be a non-empty name without '/'",
            );
        }
        for (j, m) in k.models.iter().enumerate() {
            if config.model(m).is_none() && !config.routes.contains_key(m) {
                v.push(
                    KEYS_FILE,
                    format!("{at}.models[{j}]"),
                    format!("{m:?} is neither a model nor a route alias"),
                );
            }
        }
        let limits = resolve_limits(&format!("{at}.limits"), &k.limits, v);
        keys.push(VirtualKey {
            name: k.name,
            sha256,
            previous_sha256,
            tenant: k.tenant,
            app: k.app.unwrap_or_else(|| "default".into()),
            models: k.models,
            limits,
        });
    }
    // `require_key: true` with no key listed is how the gateway is installed:
    // every request is refused (401) until an operator makes keys
    // (`smartllm keys create`), which a running gateway reloads. `serve` and
    // `check` say so; it is not an error.
    // `SMARTLLM_REQUIRE_KEY=true` (the packages' systemd unit and the
    // Kubernetes manifest set it) requires keys unless the file says
    // `require_key: false`, even when it is gone: a keys.yaml deleted by
    // mistake refuses every request at a restart too, as it does at a
    // reload (without it, a directory without keys.yaml starts open).
    let require_key = raw
        .require_key
        .unwrap_or(crate::require_key_by_env() || !keys.is_empty());
    let mut apps = BTreeMap::new();
    for (name, a) in &raw.apps {
        if !name.contains('/') {
            v.push(
                KEYS_FILE,
                format!("apps.{name}"),
                "apps are named tenant/app",
            );
        }
        apps.insert(
            name.clone(),
            resolve_limits(&format!("apps.{name}.limits"), &a.limits, v),
        );
    }
    let mut budgets = Vec::new();
    let mut seen: Vec<(BudgetScope, String, bool, usize)> = Vec::new();
    for (i, b) in raw.budgets.into_iter().enumerate() {
        let at = format!("budgets[{i}]");
        let scope = match b.scope.as_str() {
            "tenant" => BudgetScope::Tenant,
            "app" => BudgetScope::App,
            "key" => BudgetScope::Key,
            other => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.scope"),
                    format!("unknown scope {other:?}: use tenant, app or key"),
                );
                continue;
            }
        };
        if scope == BudgetScope::App && !b.name.contains('/') {
            v.push(
                KEYS_FILE,
                format!("{at}.name"),
                "app budgets are named tenant/app",
            );
        }
        if b.daily_usd.is_none() && b.monthly_usd.is_none() && b.max_request_usd.is_none() {
            v.push(
                KEYS_FILE,
                &at,
                "set daily_usd, monthly_usd, max_request_usd or several",
            );
        }
        for (field, value) in [
            ("daily_usd", b.daily_usd),
            ("monthly_usd", b.monthly_usd),
            ("max_request_usd", b.max_request_usd),
        ] {
            if value.is_some_and(|x| !x.is_finite() || x <= 0.0) {
                v.push(
                    KEYS_FILE,
                    format!("{at}.{field}"),
                    "must be a positive amount of USD",
                );
            }
        }
        let alert_at = b.alert_at.unwrap_or_else(|| vec![50.0, 80.0, 100.0]);
        if alert_at.iter().any(|p| !(1.0..=1000.0).contains(p)) {
            v.push(
                KEYS_FILE,
                format!("{at}.alert_at"),
                "percentages must be between 1 and 1000",
            );
        }
        let on_exceed = match (b.on_exceed.as_deref().unwrap_or("reject"), b.degrade_to) {
            ("reject", None) => OnExceed::Reject,
            ("reject", Some(_)) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.degrade_to"),
                    "only applies with on_exceed: degrade",
                );
                OnExceed::Reject
            }
            ("degrade", Some(t)) => {
                if config.model(&t).is_none() && !config.routes.contains_key(&t) {
                    v.push(
                        KEYS_FILE,
                        format!("{at}.degrade_to"),
                        format!("{t:?} is neither a model nor a route alias"),
                    );
                }
                OnExceed::Degrade(t)
            }
            ("degrade", None) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.degrade_to"),
                    "on_exceed: degrade needs degrade_to (a cheaper model or route)",
                );
                OnExceed::Reject
            }
            (other, _) => {
                v.push(
                    KEYS_FILE,
                    format!("{at}.on_exceed"),
                    format!("unknown action {other:?}: use reject or degrade"),
                );
                OnExceed::Reject
            }
        };
        // One budget per scope, name and action: two that do the same
        // share one metric series and one alert record, so one would hide
        // the other's state. (A degrade budget under a larger reject one,
        // "degrade at $5, refuse at $20", is two actions: kept.)
        let degrades = matches!(on_exceed, OnExceed::Degrade(_));
        if let Some((_, _, _, j)) = seen
            .iter()
            .find(|(s, n, d, _)| *s == scope && *n == b.name && *d == degrades)
        {
            v.push(
                KEYS_FILE,
                format!("{at}.name"),
                format!(
                    "a second {} budget for {:?} that also {} (the first is budgets[{j}]): put both amounts in one budget",
                    scope.as_str(),
                    b.name,
                    if degrades { "degrades" } else { "refuses" },
                ),
            );
        }
        seen.push((scope, b.name.clone(), degrades, i));
        let webhook = b.webhook.and_then(|w| match Url::parse_webhook(&w) {
            Ok(u) => Some(u),
            Err(e) => {
                v.push(KEYS_FILE, format!("{at}.webhook"), e.to_string());
                None
            }
        });
        budgets.push(Budget {
            scope,
            name: b.name,
            daily_usd: b.daily_usd,
            monthly_usd: b.monthly_usd,
            max_request_usd: b.max_request_usd,
            alert_at,
            on_exceed,
            webhook,
        });
    }
    KeysConfig {
        require_key,
        require_key_explicit: raw.require_key.is_some(),
        keys,
        apps,
        budgets,
    }
}

fn resolve_limits(at: &str, raw: &RawLimits, v: &mut Issues<'_>) -> Limits {
    for (field, value) in [
        ("requests_per_minute", raw.requests_per_minute),
        ("tokens_per_minute", raw.tokens_per_minute),
    ] {
        if value == Some(0) {
            v.push(
                KEYS_FILE,
                format!("{at}.{field}"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    Limits {
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;

    #[test]
    fn keys_and_pricing() {
        let models = "models:\n  - name: small\n    pricing: { input: 0.15, output: 0.6 }\n    deployments:\n      - provider: mock\n";
        let keys = "keys:\n  - name: demo\n    sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n    tenant: acme\n    models: [small]\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
            (KEYS_FILE, keys),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert!(c.keys.require_key);
        assert_eq!(c.keys.keys[0].app, "default");
        assert_eq!(c.models[0].pricing.cached_input_per_1m, 0.15);
        let bad = "keys:\n  - name: a\n    sha256: xyz\n    tenant: t\n  - name: a\n    sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n    tenant: t\n    models: [ghost]\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, bad),
        ]);
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("keys.yaml:3: keys[0].sha256"), "{err}");
        assert!(
            err.contains("keys[1].name: key name \"a\" is used twice"),
            "{err}"
        );
        assert!(err.contains("keys[1].models[0]"), "{err}");
    }

    /// Two budgets of one scope and name are an error at the second.
    #[test]
    fn a_budget_given_twice_is_an_error() {
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (
                KEYS_FILE,
                "budgets:\n  - { scope: tenant, name: demo, daily_usd: 5 }\n  - { scope: app, name: demo/web, daily_usd: 5 }\n  - { scope: tenant, name: demo, daily_usd: 1 }\n  - { scope: tenant, name: demo, daily_usd: 2, on_exceed: degrade, degrade_to: small }\n",
            ),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.issues.len(), 1, "{err}");
        assert_eq!(err.issues[0].path, "budgets[2].name");
        assert_eq!(err.issues[0].line, Some(4), "{err}");
        assert!(
            err.issues[0].message.contains("the first is budgets[0]"),
            "{err}"
        );
    }

    /// A degrade budget whose target a key in its scope may not use is a
    /// warning naming the key (its requests are refused there, not
    /// degraded); a key that lists the target, or lists nothing, is fine.
    #[test]
    fn a_degrade_target_a_key_may_not_use_is_named() {
        let models = format!("{MODELS}  - name: tiny\n    deployments:\n      - provider: mock\n        model: mock-tiny\n");
        let keys = "keys:\n  - { name: a, sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881, tenant: acme, models: [small] }\n  - { name: b, sha256: 3d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881, tenant: acme, models: [small, tiny] }\n  - { name: c, sha256: 4d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881, tenant: acme }\nbudgets:\n  - { scope: tenant, name: acme, daily_usd: 1, on_exceed: degrade, degrade_to: tiny }\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, &models),
            (KEYS_FILE, keys),
        ]);
        let w = load_dir(dir.path()).unwrap().keys.unmatched();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("keys.yaml budgets[0].degrade_to: key \"a\" may not use \"tiny\""),
            "{w:?}"
        );
    }

    /// A budget or app limit naming no listed key's tenant, app or key is a
    /// warning (it would apply to nobody); a '/' in a tenant or app name is
    /// an error (`acme` + `web/v2` and `acme/web` + `v2` would be one app).
    #[test]
    fn limits_for_nobody_are_named_and_slashes_refused() {
        let key = |tenant: &str, app: &str| {
            format!("keys:\n  - name: batch-job\n    sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n    tenant: {tenant}\n    app: {app}\n")
        };
        let limits = "apps:\n  acme/web: { limits: { requests_per_minute: 5 } }\n  acme/wbe: { limits: { requests_per_minute: 5 } }\nbudgets:\n  - { scope: tenant, name: acme, daily_usd: 1 }\n  - { scope: tenant, name: Acme, daily_usd: 1 }\n  - { scope: app, name: acme/web, daily_usd: 1 }\n  - { scope: key, name: batch-jb, daily_usd: 1 }\n  - { scope: key, name: batch-job, daily_usd: 1 }\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, &format!("{}{limits}", key("acme", "web"))),
        ]);
        let w = load_dir(dir.path()).unwrap().keys.unmatched();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].starts_with("keys.yaml budgets[1].name: \"Acme\" is no tenant"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("keys.yaml budgets[3].name: \"batch-jb\" is no key name"),
            "{w:?}"
        );
        assert!(w[2].starts_with("keys.yaml apps.acme/wbe:"), "{w:?}");
        // No key listed yet (a fresh install's budgets): nothing to say.
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, &format!("require_key: true\nkeys: []\n{limits}")),
        ]);
        assert!(load_dir(dir.path()).unwrap().keys.unmatched().is_empty());
        for (tenant, app, field) in [
            ("acme/eu", "web", "keys[0].tenant"),
            ("acme", "web/v2", "keys[0].app"),
        ] {
            let dir = write_dir(&[
                (MAIN_FILE, ""),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, MODELS),
                (KEYS_FILE, &key(tenant, app)),
            ]);
            let err = load_dir(dir.path()).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("'/'"), "{err}");
        }
        // The names keyless callers get are not a listed tenant's.
        for tenant in ["anonymous", "key:0123"] {
            let dir = write_dir(&[
                (MAIN_FILE, ""),
                (PROVIDERS_FILE, PROVIDERS),
                (MODELS_FILE, MODELS),
                (KEYS_FILE, &key(tenant, "web")),
            ]);
            let err = load_dir(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("keys[0].tenant") && err.contains("'anonymous'"),
                "{err}"
            );
        }
    }

    /// How the gateway is installed: a key is required and none is listed
    /// yet. It loads (every request gets 401 until `smartllm keys create`).
    #[test]
    fn a_required_key_with_none_listed_loads() {
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, "require_key: true\nkeys: []\n"),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert!(c.keys.require_key && c.keys.keys.is_empty());
        // Without `require_key`, an empty list leaves the gateway open.
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (KEYS_FILE, "keys: []\n"),
        ]);
        assert!(!load_dir(dir.path()).unwrap().keys.require_key);
    }
}
