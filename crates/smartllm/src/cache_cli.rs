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
            tenant,
        } => {
            let query = match (all, route, namespace, tenant) {
                (true, ..) => "all=true".to_string(),
                (_, Some(r), ..) => format!("route={}", query_value(&r)),
                (_, _, Some(n), _) => format!("namespace={}", query_value(&n)),
                (.., Some(t)) => format!("tenant={}", query_value(&t)),
                _ => anyhow::bail!(
                    "say what to purge: --all, --route NAME, --namespace HEX or --tenant NAME"
                ),
            };
            println!(
                "{}",
                admin_call(&target, "POST", &format!("/admin/cache/purge?{query}"))?
            );
        }
        CacheCmd::Eval {
            pairs,
            config,
            verifier_threshold,
            features_out,
            json,
        } => eval(Eval {
            path: &pairs,
            config: &config,
            verifier: verifier_threshold,
            features_out: features_out.as_deref(),
            json,
        })?,
        CacheCmd::Calibrate {
            pairs,
            config,
            max_trap_rate,
            route,
            verifier,
            write,
            json,
        } => crate::cache_calibrate::calibrate(crate::cache_calibrate::Calibrate {
            pairs: &pairs,
            config: &config,
            max_trap_rate,
            route: route.as_deref(),
            with_verifier: verifier,
            write,
            json,
        })?,
    }
    Ok(())
}

/// `v` percent-encoded for a query string: letters, digits and `-_.~` as
/// they are, every other byte as `%XX` (a route named `c++` must not reach
/// the gateway as `c  `, nor `a&all=true` as a second parameter).
pub(crate) fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Eval<'a> {
    path: &'a Path,
    config: &'a Path,
    verifier: Option<f32>,
    features_out: Option<&'a Path>,
    json: bool,
}

/// `smartllm cache eval`: embed every pair with the configured model and sweep
/// the thresholds (with the verifier when it is on or asked for).
fn eval(args: Eval<'_>) -> anyhow::Result<()> {
    let path = args.path;
    let cfg = smartllm_config::load_dir(args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pairs =
        guard::parse_pairs(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(!pairs.is_empty(), "{}: no pairs", path.display());
    let pass = args.verifier.or(cfg.cache.defaults.verifier);
    if let Some(p) = pass {
        anyhow::ensure!(
            (0.0..=1.0).contains(&p),
            "--verifier-threshold must be between 0 and 1"
        );
    }
    let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
    let cosines = cosines_with(&embedder, &pairs)?;
    let unread = beyond_window(&embedder, &pairs);
    let features = if pass.is_some() || args.features_out.is_some() {
        Some(pair_features(&embedder, &pairs, &cosines)?)
    } else {
        None
    };
    if let (Some(out), Some(f)) = (args.features_out, &features) {
        write_features(out, &pairs, f, &cosines)?;
    }
    let verifier = smartllm_cache::Verifier::for_model(&embedder.info().model);
    // As a lookup judges: the same wording needs no verdict.
    let scores: Option<Vec<f32>> = features
        .as_ref()
        .map(|f| f.iter().map(|v| judge(verifier, v)).collect());
    let judged = match (&scores, pass) {
        (Some(s), Some(p)) => Some((s.as_slice(), p)),
        _ => None,
    };
    let configured = cfg.cache.defaults.similarity_threshold;
    let rows = guard::evaluate_gated(
        &pairs,
        &cosines,
        judged,
        &thresholds_with(configured),
        &unread,
    );
    // The verifier's pass score swept at the configured cosine threshold.
    let sweep: Vec<(f32, EvalRow)> = match &scores {
        Some(s) if pass.is_some() => (1..20)
            .map(|i| i as f32 / 20.0)
            .filter_map(|p| {
                guard::evaluate_gated(&pairs, &cosines, Some((s, p)), &[configured], &unread)
                    .pop()
                    .map(|r| (p, r))
            })
            .collect(),
        _ => Vec::new(),
    };
    let report = Report {
        path,
        pairs: &pairs,
        rows: &rows,
        configured,
        verifier: pass,
        sweep: &sweep,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        print!("{}", report_text(&report));
    }
    Ok(())
}

/// The thresholds `cache eval` reports: 0.80-0.99, and the configured one
/// where it lies outside them (the default 0.70), in order.
fn thresholds_with(configured: f32) -> Vec<f32> {
    let mut grid = guard::default_thresholds();
    if !grid.iter().any(|t| (t - configured).abs() < 1e-6) {
        grid.push(configured);
        grid.sort_by(f32::total_cmp);
    }
    grid
}

struct Report<'a> {
    path: &'a Path,
    pairs: &'a [LabelledPair],
    rows: &'a [EvalRow],
    configured: f32,
    verifier: Option<f32>,
    sweep: &'a [(f32, EvalRow)],
}

/// What the verifier is shown of one pair, as a lookup shows it.
pub(crate) struct PairView {
    /// The verifier's features: of the whole texts, or, for two prompts
    /// that share a frame, of the parts they differ in (the first feature
    /// is then the parts' cosine).
    features: [f32; smartllm_cache::verify::N],
    /// The two prompts share a frame: `features` are the parts'.
    framed: bool,
    /// Worded the same (the whole texts, or the differing parts of framed
    /// ones): a lookup needs no verdict.
    same_wording: bool,
}

/// The verifier's view of every pair (the texts' token states from
/// `embedder`, as the cache computes them at lookup; for two prompts that
/// share a frame, one more model run of the parts they differ in), so that
/// `cache eval`, `cache calibrate` and a verifier trained on
/// `--features-out` see what a lookup judges.
fn pair_features(
    embedder: &Embedder,
    pairs: &[LabelledPair],
    cosines: &[f32],
) -> anyhow::Result<Vec<PairView>> {
    let mut out = Vec::with_capacity(pairs.len());
    for (chunk, cos) in pairs.chunks(16).zip(cosines.chunks(16)) {
        let texts = pair_texts(chunk);
        let states = embedder.token_states_blocking(texts)?;
        for ((ab, &c), pair) in states.chunks(2).zip(cos).zip(chunk) {
            let whole = || smartllm_cache::verify::features(c, &ab[0], &ab[1], smartllm_embed::DIM);
            if smartllm_cache::same_wording(&pair.a, &pair.b) {
                out.push(PairView {
                    features: whole(),
                    framed: false,
                    same_wording: true,
                });
                continue;
            }
            let (qa, qb) = (
                smartllm_cache::embedding_text(&pair.a),
                smartllm_cache::embedding_text(&pair.b),
            );
            let view = match guard::differing_parts(&qa, &qb) {
                Some((a, b)) if smartllm_cache::same_wording(a, b) => PairView {
                    features: whole(),
                    framed: true,
                    same_wording: true,
                },
                Some(_) => {
                    let parts =
                        smartllm_cache::differing_parts_features(embedder, &pair.a, &pair.b)
                            .context("the pair shares a frame")?
                            .context("embedding the parts the pair differs in")?;
                    PairView {
                        features: parts,
                        framed: true,
                        same_wording: false,
                    }
                }
                None => PairView {
                    features: whole(),
                    framed: false,
                    same_wording: false,
                },
            };
            out.push(view);
        }
    }
    Ok(out)
}

/// One row a pair: the verifier's features (the parts' for framed pairs),
/// then guard_pass, label, category, source, group, the whole texts'
/// cosine (the lookup's first stage) and whether the pair is framed (`1`)
/// or worded the same (`s`: a lookup needs no verdict).
fn write_features(
    out: &Path,
    pairs: &[LabelledPair],
    views: &[PairView],
    cosines: &[f32],
) -> anyhow::Result<()> {
    use std::fmt::Write;
    let mut text = format!(
        "{}\tguard_pass\tlabel\tcategory\tsource\tgroup\twhole_cosine\tframed\n",
        smartllm_cache::verify::FEATURES.join("\t")
    );
    for ((p, v), c) in pairs.iter().zip(views).zip(cosines) {
        for x in &v.features {
            let _ = write!(text, "{x}\t");
        }
        // Pairs that share a first text are one group for cross-validation.
        let group = smartllm_cache::exact_text(&p.a).to_lowercase();
        let guard_pass = smartllm_cache::near_miss(&p.a, &p.b).is_none();
        let framed = match (v.same_wording, v.framed) {
            (true, _) => "s",
            (false, true) => "1",
            (false, false) => "0",
        };
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}\t{}\t{c}\t{framed}",
            u8::from(guard_pass),
            u8::from(p.duplicate),
            p.category,
            p.source,
            group.replace('\t', " ")
        );
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}

/// Each pair's cosine and, when `verifier` is on, the verifier's score
/// (one model load for both).
pub(crate) fn pair_scores(
    cfg: &smartllm_config::Config,
    pairs: &[LabelledPair],
    verifier: bool,
) -> anyhow::Result<PairScores> {
    let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
    let cosines = cosines_with(&embedder, pairs)?;
    let beyond_window = beyond_window(&embedder, pairs);
    let scores = if verifier {
        let v = smartllm_cache::Verifier::for_model(&embedder.info().model);
        Some(
            pair_features(&embedder, pairs, &cosines)?
                .iter()
                .map(|f| judge(v, f))
                .collect(),
        )
    } else {
        None
    };
    Ok(PairScores {
        cosines,
        scores,
        beyond_window,
    })
}

/// The verifier's score of a pair as a lookup judges it: the same wording
/// needs no verdict; two prompts that share a frame are judged on the parts
/// they differ in, and score 0 when those are further apart than any pair
/// the verifier was trained on; others on the whole texts.
fn judge(verifier: &smartllm_cache::Verifier, view: &PairView) -> f32 {
    if view.same_wording {
        1.0
    } else if view.framed && view.features[0] < smartllm_cache::VERIFIER_MIN_COSINE {
        0.0
    } else {
        verifier.score(&view.features)
    }
}

/// What a lookup would see of each labelled pair ([`pair_scores`]).
pub(crate) struct PairScores {
    pub cosines: Vec<f32>,
    /// The verifier's score of each pair, when asked for.
    pub scores: Option<Vec<f32>>,
    /// Whether the pair's texts differ past the model's window.
    pub beyond_window: Vec<bool>,
}

/// Whether each pair's texts differ past the embedding model's window
/// (`embedder.max_seq_len` tokens): a lookup never serves such a pair
/// (`beyond_window`), so neither does an evaluation.
fn beyond_window(embedder: &Embedder, pairs: &[LabelledPair]) -> Vec<bool> {
    pairs
        .iter()
        .map(|p| smartllm_cache::unread_tails_differ(embedder, &p.a, &p.b))
        .collect()
}

/// Both texts of each pair, as the cache embeds them, in order.
fn pair_texts(pairs: &[LabelledPair]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|p| {
            [
                smartllm_cache::embedding_text(&p.a),
                smartllm_cache::embedding_text(&p.b),
            ]
        })
        .collect()
}

fn cosines_with(embedder: &Embedder, pairs: &[LabelledPair]) -> anyhow::Result<Vec<f32>> {
    let mut cosines = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(16) {
        let texts = pair_texts(chunk);
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

fn decision(verifier: Option<f32>) -> String {
    match verifier {
        Some(p) => format!(
            "cosine >= threshold, the precision guard passes and the verifier scores >= {}",
            round2(p)
        ),
        None => "cosine >= threshold and the precision guard passes".into(),
    }
}

fn report_json(report: &Report<'_>) -> serde_json::Value {
    let Report {
        path,
        pairs,
        rows,
        configured,
        verifier,
        sweep,
    } = *report;
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
            "verifier_blocked": r.verifier_blocked,
            "categories": categories,
        })
    };
    let sweep: Vec<serde_json::Value> = sweep
        .iter()
        .map(|(p, r)| {
            let mut v = row(r);
            v["verifier_threshold"] = serde_json::json!(round2(*p));
            v
        })
        .collect();
    serde_json::json!({
        "pairs_file": path.display().to_string(),
        "pairs": pairs.len(),
        "duplicates": duplicates,
        "traps": pairs.len() - duplicates,
        "configured_threshold": round2(configured),
        "verifier_threshold": verifier.map(round2),
        "decision": decision(verifier),
        "rows": rows.iter().map(row).collect::<Vec<_>>(),
        "verifier_sweep": sweep,
    })
}

fn report_text(report: &Report<'_>) -> String {
    use std::fmt::Write;
    let Report {
        path,
        pairs,
        rows,
        configured,
        verifier,
        sweep,
    } = *report;
    let mut out = String::new();
    let duplicates = pairs.iter().filter(|p| p.duplicate).count();
    let _ = writeln!(
        out,
        "{}: {} pairs ({} duplicates, {} traps); served = {}",
        path.display(),
        pairs.len(),
        duplicates,
        pairs.len() - duplicates,
        decision(verifier)
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
        "threshold  dup_served  trap_rate  precision  hit_rate  dups  traps  guard_blocked  verifier_blocked"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>9.2}  {:>10.3}  {:>9.3}  {:>9.3}  {:>8.3}  {:>4}  {:>5}  {:>13}  {:>16}{}",
            r.threshold,
            r.recall,
            r.trap_rate,
            r.precision,
            r.hit_rate,
            r.true_positives,
            r.false_positives,
            r.guard_blocked,
            r.verifier_blocked,
            mark(r)
        );
    }
    if !sweep.is_empty() {
        let _ = writeln!(
            out,
            "\nverifier pass score at the configured threshold ({:.2})\nverifier  dup_served  trap_rate  precision",
            configured
        );
        for (p, r) in sweep {
            let here = verifier.is_some_and(|v| (v - p).abs() < 1e-6);
            let _ = writeln!(
                out,
                "{:>8.2}  {:>10.3}  {:>9.3}  {:>9.3}{}",
                p,
                r.recall,
                r.trap_rate,
                r.precision,
                if here { "  <- configured" } else { "" }
            );
        }
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

    #[test]
    fn purge_values_are_percent_encoded() {
        assert_eq!(query_value("auto-1.2_x~"), "auto-1.2_x~");
        assert_eq!(query_value("c++"), "c%2B%2B");
        assert_eq!(query_value("a b&all=true#%"), "a%20b%26all%3Dtrue%23%25");
        assert_eq!(query_value("é/"), "%C3%A9%2F");
        // The gateway decodes them back to the name as given.
        for route in ["c++", "a b&all=true", "é/x%41", "plain"] {
            let query = format!("route={}", query_value(route));
            assert_eq!(
                smartllm_protocol::admin_query::purge(&query).unwrap(),
                smartllm_protocol::admin_query::PurgeTarget::Route(route.to_string()),
                "{query}"
            );
        }
    }

    fn rows() -> (Vec<LabelledPair>, Vec<EvalRow>) {
        let pairs = guard::parse_pairs(
            "a cat\tthe cat\t1\tparaphrase\tsrc\n\
             it is hot today\tthe weather outside is cold\t0\tantonym\tsynthetic:src\n",
        )
        .unwrap();
        let rows = guard::evaluate(&pairs, &[0.96, 0.9], &[0.85, 0.95]);
        (pairs, rows)
    }

    fn report<'a>(
        pairs: &'a [LabelledPair],
        rows: &'a [EvalRow],
        verifier: Option<f32>,
        sweep: &'a [(f32, EvalRow)],
    ) -> Report<'a> {
        Report {
            path: Path::new("p.tsv"),
            pairs,
            rows,
            configured: 0.95,
            verifier,
            sweep,
        }
    }

    /// With a verifier, the pair it scores under the pass score is not
    /// served, counts as verifier_blocked, and the sweep is reported.
    #[test]
    fn reports_show_the_verifier_decision_and_its_sweep() {
        let (pairs, _) = rows();
        let scores = [0.2, 0.9];
        let rows = guard::evaluate_verified(&pairs, &[0.96, 0.96], Some((&scores, 0.5)), &[0.95]);
        assert_eq!((rows[0].true_positives, rows[0].verifier_blocked), (0, 1));
        let sweep: Vec<(f32, EvalRow)> = [0.1f32, 0.5]
            .iter()
            .map(|&p| {
                let r =
                    guard::evaluate_verified(&pairs, &[0.96, 0.96], Some((&scores, p)), &[0.95]);
                (p, r[0].clone())
            })
            .collect();
        let text = report_text(&report(&pairs, &rows, Some(0.5), &sweep));
        assert!(text.contains("the verifier scores >= 0.5"), "{text}");
        assert!(
            text.contains("verifier pass score at the configured threshold"),
            "{text}"
        );
        let v = report_json(&report(&pairs, &rows, Some(0.5), &sweep));
        assert_eq!(v["verifier_threshold"], 0.5);
        assert_eq!(v["rows"][0]["verifier_blocked"], 1);
        assert_eq!(v["verifier_sweep"][0]["verifier_threshold"], 0.1);
        assert_eq!(v["verifier_sweep"][0]["recall"], 1.0);
        assert_eq!(v["verifier_sweep"][1]["recall"], 0.0);
    }

    #[test]
    fn the_configured_threshold_is_always_reported() {
        let t = thresholds_with(0.70);
        assert_eq!(t.len(), 21);
        assert!((t[0] - 0.70).abs() < 1e-6 && (t[1] - 0.80).abs() < 1e-6);
        assert_eq!(thresholds_with(0.95).len(), 20);
    }

    #[test]
    fn text_report_marks_the_configured_threshold_and_lists_categories() {
        let (pairs, rows) = rows();
        let text = report_text(&report(&pairs, &rows, None, &[]));
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
        let v = report_json(&report(&pairs, &rows, None, &[]));
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
