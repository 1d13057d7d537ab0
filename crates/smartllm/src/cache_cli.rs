//! `smartllm cache`: stats, purge and rebuild through the running gateway's
//! admin API, and `cache eval` (thresholds over labelled pairs) offline.

use crate::admin_client::admin_call;
use crate::CacheCmd;
use anyhow::Context;
use smartllm_embed::{cosine, Embedder};

/// Runs one `smartllm cache` subcommand.
pub fn cache_cmd(action: CacheCmd) -> anyhow::Result<()> {
    match action {
        CacheCmd::Stats { target } => {
            println!("{}", admin_call(&target, "GET", "/admin/cache/stats")?)
        }
        CacheCmd::Rebuild { target } => {
            println!("{}", admin_call(&target, "POST", "/admin/cache/rebuild")?)
        }
        CacheCmd::Purge {
            target,
            all,
            route,
            namespace,
        } => {
            let query = match (all, route, namespace) {
                (true, _, _) => "all=true".to_string(),
                (_, Some(r), _) => format!("route={r}"),
                (_, _, Some(n)) => format!("namespace={n}"),
                _ => anyhow::bail!("say what to purge: --all, --route NAME or --namespace HEX"),
            };
            println!(
                "{}",
                admin_call(&target, "POST", &format!("/admin/cache/purge?{query}"))?
            );
        }
        CacheCmd::Eval { pairs, config } => {
            let cfg = smartllm_config::load_dir(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = std::fs::read_to_string(&pairs)
                .with_context(|| format!("reading {}", pairs.display()))?;
            let pairs = smartllm_cache::guard::parse_pairs(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", pairs.display()))?;
            let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
            let mut cosines = Vec::with_capacity(pairs.len());
            for (a, b, _) in &pairs {
                let v = embedder.embed_blocking(vec![a.clone(), b.clone()])?;
                cosines.push(cosine(&v[0], &v[1]));
            }
            let rows = smartllm_cache::guard::evaluate(
                &pairs,
                &cosines,
                &smartllm_cache::guard::default_thresholds(),
            );
            let default = cfg.cache.defaults.similarity_threshold;
            println!("{} pairs ({} duplicates); cache decision = cosine >= threshold and the precision guard passes", pairs.len(), pairs.iter().filter(|p| p.2).count());
            println!("threshold  precision  recall  hit_rate  tp  fp");
            for r in rows {
                let mark = if (r.threshold - default).abs() < 1e-6 {
                    "  <- configured"
                } else {
                    ""
                };
                println!(
                    "{:>9.2}  {:>9.3}  {:>6.3}  {:>8.3}  {:>2}  {:>2}{mark}",
                    r.threshold,
                    r.precision,
                    r.recall,
                    r.hit_rate,
                    r.true_positives,
                    r.false_positives
                );
            }
        }
    }
    Ok(())
}
