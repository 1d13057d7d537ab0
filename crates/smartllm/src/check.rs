//! `smartllm check`: validate a config directory and note provider keys that
//! are not available on this machine.

use std::path::Path;
use std::process::ExitCode;

/// Secrets the gateway reads from files every user of the host may read.
pub fn key_file_warnings(c: &smartllm_config::Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let files = c
        .cache
        .encryption_key_file
        .iter()
        .map(|p| ("cache.encryption_key_file", p))
        .chain(
            c.cache
                .encryption_old_key_files
                .iter()
                .map(|p| ("cache.encryption_old_key_files", p)),
        );
    files
        .filter_map(|(setting, p)| {
            let mode = std::fs::metadata(p).ok()?.permissions().mode();
            // Group permissions are the packaging's (root:smartllm 640).
            (mode & 0o007 != 0).then(|| {
                format!(
                    "{setting} {} can be read by every user of this host (mode {:o}): chmod 600 it (or 640 with the gateway's group)",
                    p.display(),
                    mode & 0o777
                )
            })
        })
        .collect()
}

/// `smartllm check --config DIR`: exit 0 when the config loads, 1 (errors on
/// stderr) when not. `local`: the config is for this host, so files `serve`
/// needs that are missing here fail it too.
pub fn check(dir: &Path, local: bool) -> ExitCode {
    match smartllm_config::load_dir(dir) {
        Ok(c) => {
            // Loading the config only read the classifier examples and the
            // learned routers; parse them as the gateway does when it
            // builds its router, so what `serve` would refuse fails here.
            if let Err(e) = smartllm_router::RouterAssets::build(&c, None, None) {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
            // `serve` loads the embedder before it listens: a file it cannot
            // find would stop it (a restart loop under systemd). For this
            // host (`--local`) that fails the check; a config checked for
            // another host (a container image) gets a warning.
            let e = &c.embedder;
            for (what, p) in [
                ("ONNX Runtime", &e.onnxruntime),
                ("model", &e.model),
                ("tokenizer", &e.tokenizer),
            ] {
                if p.is_file() {
                    continue;
                }
                let msg = format!("embedder: the {what} {} does not exist, so `smartllm serve` would not start here (run packaging/fetch-assets.sh, or set embedder.assets_dir / SMARTLLM_ASSETS_DIR)", p.display());
                if local {
                    eprintln!("{msg}");
                    return ExitCode::from(1);
                }
                println!("warning: {msg}");
            }
            // `serve` refuses a cache key file it cannot read or use.
            if let Some(path) = &c.cache.encryption_key_file {
                if let Err(e) =
                    smartllm_cache::Codec::from_key_files(path, &c.cache.encryption_old_key_files)
                {
                    let msg = format!("{e}, so `smartllm serve` would not start here");
                    if local {
                        eprintln!("{msg}");
                        return ExitCode::from(1);
                    }
                    println!("warning: {msg}");
                }
            }
            for w in key_file_warnings(&c) {
                println!("warning: {w}");
            }
            // `serve` refuses an admin token it cannot read (fail closed).
            if let Some(msg) = smartllm_proxy::runtime::admin_token_problem(&c) {
                let msg = format!("{msg}, so `smartllm serve` would not start here");
                if local {
                    eprintln!("{msg}");
                    return ExitCode::from(1);
                }
                println!("warning: {msg}");
            }
            println!(
                "{}: config OK ({} providers, {} models, {} routes; digest {})",
                dir.display(),
                c.providers.len(),
                c.models.len(),
                c.routes.len(),
                c.digest
            );
            for (what, tls) in [("TLS", &c.server.tls), ("admin TLS", &c.server.admin_tls)] {
                let Some(tls) = tls else { continue };
                // Loading the config checked the files; say what will be served.
                if let Ok(m) = smartllm_config::tls::load(tls) {
                    println!(
                        "{what}: {} with the matching key {} (certificate sha256 {}){}",
                        tls.cert_file.display(),
                        tls.key_file.display(),
                        m.fingerprint,
                        match &tls.client_ca_file {
                            Some(ca) => format!("; client certificates from {}", ca.display()),
                            None => String::new(),
                        }
                    );
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    if let Some(w) = m
                        .validity
                        .and_then(|v| smartllm_config::tls::validity_warning(v, now))
                    {
                        println!("warning: {what}: {}: {w}", tls.cert_file.display());
                    }
                    for w in &m.warnings {
                        println!("warning: {what}: {w}");
                    }
                }
            }
            if !c.keys.require_key
                && !c.keys.require_key_explicit
                && dir.join(smartllm_config::KEYS_FILE).exists()
            {
                println!("warning: keys.yaml lists no key and does not say `require_key`, so the gateway is open to anyone who can reach it: write `require_key: true` (refuse requests until keys are added) or `require_key: false` (open on purpose)");
            }
            for w in smartllm_config::layout_warnings(dir, c.keys.require_key) {
                println!("warning: {w}");
            }
            for w in c.keys.unmatched() {
                println!("warning: {w}");
            }
            if c.keys.require_key && c.keys.keys.is_empty() {
                println!("note: keys.yaml lists no key, so every request is refused (401): make one with `smartllm keys create NAME --config {}`", dir.display());
            }
            for p in c.providers.values() {
                match &p.api_key {
                    smartllm_config::ApiKeySource::Env(var)
                        if std::env::var(var)
                            .map(|v| v.trim().is_empty())
                            .unwrap_or(true) =>
                    {
                        println!(
                            "note: provider {} reads its key from {var}, which is not set here",
                            p.name
                        )
                    }
                    smartllm_config::ApiKeySource::File(f) if !f.is_file() => {
                        println!(
                            "note: provider {} reads its key from {}, which does not exist",
                            p.name,
                            f.display()
                        )
                    }
                    _ => {}
                }
            }
            unpriced_warnings(&c);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// No silent $0: every model without `pricing` and without a catalog entry
/// for its upstream names is named; catalog-priced models are counted.
fn unpriced_warnings(c: &smartllm_config::Config) {
    for w in c
        .unpriced_warnings()
        .into_iter()
        .chain(c.capability_warnings())
        .chain(c.budget_warnings())
    {
        println!("warning: {w}");
    }
    let from_catalog = c
        .models
        .iter()
        .filter(|m| {
            matches!(
                c.price(&m.name).map(|p| &p.source),
                Some(smartllm_config::PriceSource::Catalog(_))
            )
        })
        .count();
    if from_catalog > 0 {
        let cat = smartllm_config::catalog::catalog();
        println!(
            "note: {from_catalog} models take their prices from the built-in catalog ({}, {}); `smartllm prices --config DIR` lists them",
            cat.version, cat.date
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartllm_router::learned::{LearnedRouter, Linear, EMBEDDING_DIM, FORMAT};

    /// A learned router or classifier examples the gateway would refuse
    /// fail the check, not only files that cannot be read.
    #[test]
    fn check_parses_the_routing_files() {
        let dir = std::env::temp_dir().join(format!("smartllm-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("smartllm.yaml", "server: {}\n");
        write(
            "providers.yaml",
            "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n",
        );
        write(
            "models.yaml",
            "models:\n  - name: a\n    deployments: [ { provider: p } ]\n  - name: b\n    deployments: [ { provider: p } ]\n",
        );
        write(
            "routes.yaml",
            "routes:\n  r:\n    candidates: [a, b]\n    strategy: learned\n    learned: learned.json\nclassifier:\n  examples: tasks.tsv\n",
        );
        let examples: String = smartllm_router::Task::ALL
            .iter()
            .map(|t| format!("{t}\tsome prompt\n"))
            .collect();
        write("tasks.tsv", examples.as_str());
        let learned = |dim: usize| {
            LearnedRouter {
                format: FORMAT.into(),
                embedder: "test".into(),
                dim,
                lambda: 1.0,
                models: [(
                    "a".to_string(),
                    Linear {
                        weights: vec![0.0; dim],
                        bias: 0.5,
                        samples: 8,
                        train_rmse: 0.1,
                    },
                )]
                .into(),
            }
            .to_json()
        };
        // ExitCode has no PartialEq on every toolchain: compare its Debug.
        let code = |c: ExitCode| format!("{c:?}");
        write("learned.json", learned(EMBEDDING_DIM).as_str());
        assert_eq!(code(check(&dir, false)), code(ExitCode::SUCCESS));
        write("learned.json", learned(3).as_str());
        assert_eq!(code(check(&dir, false)), code(ExitCode::from(1)));
        write("learned.json", learned(EMBEDDING_DIM).as_str());
        write("tasks.tsv", "code\tonly one task\n");
        assert_eq!(code(check(&dir, false)), code(ExitCode::from(1)));
        write("tasks.tsv", examples.as_str());
        // A cache key file every user may read is named; one of the
        // gateway's group is not.
        use std::os::unix::fs::PermissionsExt;
        write("cache.key", &"5e".repeat(32));
        write(
            "cache.yaml",
            "cache:\n  enabled: true\n  encryption_key_file: cache.key\n",
        );
        let mode = |m: u32| {
            std::fs::set_permissions(dir.join("cache.key"), std::fs::Permissions::from_mode(m))
                .unwrap()
        };
        let warnings = || key_file_warnings(&smartllm_config::load_dir(&dir).unwrap());
        mode(0o644);
        let w = warnings();
        assert!(w.len() == 1 && w[0].contains("(mode 644)"), "{w:?}");
        mode(0o640);
        assert!(warnings().is_empty());
        assert_eq!(code(check(&dir, false)), code(ExitCode::SUCCESS));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
