//! `smartllm cache`: stats, purge and rebuild through the running gateway's
//! admin API, and `cache eval` (thresholds over labelled pairs) offline.

use crate::admin_client::admin_call;
use crate::CacheCmd;
use anyhow::Context;
use smartllm_cache::guard::{self, EvalRow, LabelledPair};
use smartllm_embed::{cosine, Embedder};
use std::path::Path;

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
        CacheCmd::Eval {
            pairs,
            config,
            json,
        } => eval(&pairs, &config, json)?,
        CacheCmd::Calibrate {
            pairs,
            config,
            max_trap_rate,
            route,
            write,
            json,
        } => crate::cache_calibrate::calibrate(crate::cache_calibrate::Calibrate {
            pairs: &pairs,
            config: &config,
            max_trap_rate,
            route: route.as_deref(),
            write,
            json,
        })?,
    }
    Ok(())
}

/// `smartllm cache eval`: embed every pair with the configured model and sweep
/// the thresholds.
fn eval(path: &Path, config: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = smartllm_config::load_dir(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pairs =
        guard::parse_pairs(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(!pairs.is_empty(), "{}: no pairs", path.display());
    let cosines = pair_cosines(&cfg, &pairs)?;
    let rows = guard::evaluate(&pairs, &cosines, &guard::default_thresholds());
    let configured = cfg.cache.defaults.similarity_threshold;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report_json(path, &pairs, &rows, configured))?
        );
    } else {
        print!("{}", report_text(path, &pairs, &rows, configured));
    }
    Ok(())
}

/// The cosine of each pair's two texts (as the cache embeds them) with the
/// configured embedding model.
pub(crate) fn pair_cosines(
    cfg: &smartllm_config::Config,
    pairs: &[LabelledPair],
) -> anyhow::Result<Vec<f32>> {
    let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
    let mut cosines = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(16) {
        let texts = chunk
            .iter()
            .flat_map(|p| {
                [
                    smartllm_cache::embedding_text(&p.a),
                    smartllm_cache::embedding_text(&p.b),
                ]
            })
            .collect();
        let v = embedder.embed_blocking(texts)?;
        cosines.extend(v.chunks(2).map(|ab| cosine(&ab[0], &ab[1])));
    }
    Ok(cosines)
}

/// f32 thresholds as the two-decimal numbers they stand for (0.95, not 0.9499999).
pub(crate) fn round2(t: f32) -> f64 {
    (f64::from(t) * 100.0).round() / 100.0
}

fn is_configured(r: &EvalRow, configured: f32) -> bool {
    (r.threshold - configured).abs() < 1e-6
}

fn report_json(
    path: &Path,
    pairs: &[LabelledPair],
    rows: &[EvalRow],
    configured: f32,
) -> serde_json::Value {
    let duplicates = pairs.iter().filter(|p| p.duplicate).count();
    let row = |r: &EvalRow| {
        let categories: serde_json::Map<String, serde_json::Value> = r
            .categories
            .iter()
            .map(|c| {
                (
                    c.category.clone(),
                    serde_json::json!({
                        "duplicate": c.duplicate,
                        "served": c.served,
                        "total": c.total,
                        "rate": c.rate(),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "threshold": round2(r.threshold),
            "configured": is_configured(r, configured),
            "precision": r.precision,
            "recall": r.recall,
            "trap_rate": r.trap_rate,
            "hit_rate": r.hit_rate,
            "duplicates_served": r.true_positives,
            "traps_served": r.false_positives,
            "guard_blocked": r.guard_blocked,
            "categories": categories,
        })
    };
    serde_json::json!({
        "pairs_file": path.display().to_string(),
        "pairs": pairs.len(),
        "duplicates": duplicates,
        "traps": pairs.len() - duplicates,
        "configured_threshold": round2(configured),
        "decision": "cosine >= threshold and the precision guard passes",
        "rows": rows.iter().map(row).collect::<Vec<_>>(),
    })
}

fn report_text(path: &Path, pairs: &[LabelledPair], rows: &[EvalRow], configured: f32) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let duplicates = pairs.iter().filter(|p| p.duplicate).count();
    let _ = writeln!(
        out,
        "{}: {} pairs ({} duplicates, {} traps); served = cosine >= threshold and the precision guard passes",
        path.display(),
        pairs.len(),
        duplicates,
        pairs.len() - duplicates
    );
    let mark = |r: &EvalRow| {
        if is_configured(r, configured) {
            "  <- configured"
        } else {
            ""
        }
    };
    let _ = writeln!(
        out,
        "threshold  dup_served  trap_rate  precision  hit_rate  dups  traps  guard_blocked"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>9.2}  {:>10.3}  {:>9.3}  {:>9.3}  {:>8.3}  {:>4}  {:>5}  {:>13}{}",
            r.threshold,
            r.recall,
            r.trap_rate,
            r.precision,
            r.hit_rate,
            r.true_positives,
            r.false_positives,
            r.guard_blocked,
            mark(r)
        );
    }
    let Some(first) = rows.first() else {
        return out;
    };
    // Per category: the share of each category's pairs that is served.
    let _ = writeln!(
        out,
        "\nserved per category (duplicates: higher is better; traps: lower is better)"
    );
    let width = |c: &guard::CategoryRate| c.category.len().max(6) + 1;
    let mut header = String::from("threshold ");
    let mut kinds = String::from("          ");
    for c in &first.categories {
        let _ = write!(header, " {:>w$}", c.category, w = width(c));
        let kind = if c.duplicate { "dup" } else { "trap" };
        let _ = write!(
            kinds,
            " {:>w$}",
            format!("{kind}/{}", c.total),
            w = width(c)
        );
    }
    let _ = writeln!(out, "{header}\n{kinds}");
    for r in rows {
        let _ = write!(out, "{:>9.2} ", r.threshold);
        for c in &r.categories {
            let _ = write!(out, " {:>w$.3}", c.rate(), w = width(c));
        }
        let _ = writeln!(out, "{}", mark(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> (Vec<LabelledPair>, Vec<EvalRow>) {
        let pairs = guard::parse_pairs(
            "a cat\tthe cat\t1\tparaphrase\tsrc\n\
             it is hot today\tthe weather outside is cold\t0\tantonym\tsynthetic:src\n",
        )
        .unwrap();
        let rows = guard::evaluate(&pairs, &[0.96, 0.9], &[0.85, 0.95]);
        (pairs, rows)
    }

    #[test]
    fn text_report_marks_the_configured_threshold_and_lists_categories() {
        let (pairs, rows) = rows();
        let text = report_text(Path::new("p.tsv"), &pairs, &rows, 0.95);
        assert!(text.contains("2 pairs (1 duplicates, 1 traps)"), "{text}");
        let configured: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("<- configured"))
            .collect();
        assert_eq!(configured.len(), 2, "{text}");
        assert!(configured
            .iter()
            .all(|l| l.trim_start().starts_with("0.95")));
        assert!(text.contains("paraphrase") && text.contains("antonym") && text.contains("trap/1"));
    }

    #[test]
    fn json_report_has_rates_per_category() {
        let (pairs, rows) = rows();
        let v = report_json(Path::new("p.tsv"), &pairs, &rows, 0.95);
        assert_eq!(v["pairs"], 2);
        assert_eq!(v["traps"], 1);
        assert_eq!(v["configured_threshold"], 0.95);
        let loose = &v["rows"][0];
        assert_eq!(loose["configured"], false);
        assert_eq!(loose["trap_rate"], 1.0);
        assert_eq!(loose["categories"]["antonym"]["served"], 1);
        let strict = &v["rows"][1];
        assert_eq!(strict["configured"], true);
        assert_eq!(strict["recall"], 1.0);
        assert_eq!(strict["trap_rate"], 0.0);
        assert_eq!(strict["categories"]["paraphrase"]["rate"], 1.0);
    }
}
