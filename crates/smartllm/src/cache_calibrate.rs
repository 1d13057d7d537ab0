//! `smartllm cache calibrate`: the loosest similarity threshold that keeps
//! the share of traps served at or under a target on labelled pairs, for the
//! default or one route (with `--verifier`, together with the verifier's pass
//! score), optionally written into `cache.yaml` (which a running gateway
//! reloads).

use crate::cache_cli::{pair_scores, round2};
use anyhow::Context;
use smartllm_cache::guard::{self, EvalRow};
use std::path::Path;

/// The thresholds tried, loosest first: 0.70 to 0.99.
fn grid() -> Vec<f32> {
    (70..=99).map(|t| t as f32 / 100.0).collect()
}

/// The loosest row whose trap rate, and that of every stricter row, is at
/// most `max_trap_rate` (a looser threshold that happens to dip under the
/// target between two that do not is not taken). `rows` run loosest first.
pub fn choose(rows: &[EvalRow], max_trap_rate: f64) -> Option<&EvalRow> {
    let first_ok = rows
        .iter()
        .rposition(|r| r.trap_rate > max_trap_rate)
        .map_or(0, |i| i + 1);
    rows.get(first_ok)
}

/// The verifier pass scores tried with `--verifier`: 0.05 to 0.95.
fn pass_grid() -> Vec<f32> {
    (1..=19).map(|p| p as f32 * 0.05).collect()
}

/// With `--verifier`: for each pass score, [`choose`]'s threshold; of
/// those, the one serving the most duplicates (ties: the stricter pass
/// score). `by_pass`: (pass score, rows loosest first).
pub fn choose_with_pass(
    by_pass: &[(f32, Vec<EvalRow>)],
    max_trap_rate: f64,
) -> Option<(f32, &EvalRow)> {
    let mut best: Option<(f32, &EvalRow)> = None;
    for (pass, rows) in by_pass {
        if let Some(r) = choose(rows, max_trap_rate) {
            if best.is_none_or(|(bp, b)| {
                r.recall > b.recall + 1e-12 || ((r.recall - b.recall).abs() <= 1e-12 && *pass > bp)
            }) {
                best = Some((*pass, r));
            }
        }
    }
    best
}

pub struct Calibrate<'a> {
    pub pairs: &'a Path,
    pub config: &'a Path,
    pub max_trap_rate: f64,
    pub route: Option<&'a str>,
    pub with_verifier: bool,
    pub write: bool,
    pub json: bool,
}

pub fn calibrate(c: Calibrate<'_>) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..1.0).contains(&c.max_trap_rate),
        "--max-trap-rate is a share between 0 and 1 (0.01 is 1%), not {}",
        c.max_trap_rate
    );
    let cfg = smartllm_config::load_dir(c.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(r) = c.route {
        anyhow::ensure!(
            cfg.routes.contains_key(r) || cfg.models.iter().any(|m| m.name == r),
            "{}: no route or model named {r:?}",
            c.config.display()
        );
    }
    let text = std::fs::read_to_string(c.pairs)
        .with_context(|| format!("reading {}", c.pairs.display()))?;
    let pairs =
        guard::parse_pairs(&text).map_err(|e| anyhow::anyhow!("{}: {e}", c.pairs.display()))?;
    anyhow::ensure!(
        pairs.iter().any(|p| !p.duplicate) && pairs.iter().any(|p| p.duplicate),
        "{}: calibration needs both duplicates (label 1) and traps (label 0)",
        c.pairs.display()
    );
    // The route's verifier takes part, as it does in the gateway.
    let policy = cfg.cache.policy(c.route, c.route.unwrap_or(""));
    anyhow::ensure!(
        !c.with_verifier || policy.verifier.is_some(),
        "--verifier: the verifier is off for {} (cache.verifier: false)",
        c.route.unwrap_or("the default")
    );
    let crate::cache_cli::PairScores {
        cosines,
        scores,
        beyond_window,
    } = pair_scores(&cfg, &pairs, policy.verifier.is_some())?;
    let current = policy.similarity_threshold;
    let current_pass = policy.verifier;
    let mut verifier = policy.verifier;
    let rows;
    let by_pass: Vec<(f32, Vec<EvalRow>)>;
    let chosen = if c.with_verifier {
        let scores = scores.as_deref().context("no verifier scores")?;
        by_pass = pass_grid()
            .into_iter()
            .map(|p| {
                (
                    p,
                    guard::evaluate_gated(
                        &pairs,
                        &cosines,
                        Some((scores, p)),
                        &grid(),
                        &beyond_window,
                    ),
                )
            })
            .collect();
        choose_with_pass(&by_pass, c.max_trap_rate).map(|(p, r)| {
            verifier = Some(p);
            r
        })
    } else {
        let judged = scores.as_deref().zip(policy.verifier);
        rows = guard::evaluate_gated(&pairs, &cosines, judged, &grid(), &beyond_window);
        choose(&rows, c.max_trap_rate)
    };
    let chosen = chosen.ok_or_else(|| {
        anyhow::anyhow!(
            "no threshold up to 0.99 keeps the traps served at or under {:.1}% on {}: serve exact matches only there (`semantic: false`)",
            c.max_trap_rate * 100.0,
            c.pairs.display()
        )
    })?;
    let scope = c
        .route
        .map_or("cache.similarity_threshold".to_string(), |r| {
            format!("cache.routes.{r}.similarity_threshold")
        });
    let mut written = None;
    if c.write {
        let file = c.config.join("cache.yaml");
        let mut keys = vec![("similarity_threshold", round2(chosen.threshold))];
        if c.with_verifier {
            keys.extend(verifier.map(|p| ("verifier_threshold", round2(p))));
        }
        written = Some(write_threshold(c.config, &file, c.route, &keys)?);
    }
    if c.json {
        let v = serde_json::json!({
            "pairs_file": c.pairs.display().to_string(),
            "pairs": pairs.len(),
            "max_trap_rate": c.max_trap_rate,
            "key": scope,
            "current_threshold": round2(current),
            "threshold": round2(chosen.threshold),
            "duplicates_served": chosen.recall,
            "trap_rate": chosen.trap_rate,
            "precision": chosen.precision,
            "verifier_threshold": verifier.map(round2),
            "current_verifier_threshold": current_pass.map(round2),
            "written": written.as_ref().map(|p: &std::path::PathBuf| p.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} pairs; traps served at most {:.1}%; {}",
            c.pairs.display(),
            pairs.len(),
            c.max_trap_rate * 100.0,
            match (c.with_verifier, current_pass) {
                (true, _) => "the verifier's pass score chosen with it".to_string(),
                (false, Some(v)) => format!("with the verifier at {:.2}", v),
                (false, None) => "without the verifier".to_string(),
            }
        );
        let pass = match (c.with_verifier, verifier, current_pass) {
            (true, Some(p), Some(now)) => format!(", verifier_threshold {p:.2} (now {now:.2})"),
            _ => String::new(),
        };
        println!(
            "{scope}: {:.2} (now {:.2}){pass}: {:.1}% of duplicates served, {:.1}% of traps, precision {:.3}",
            chosen.threshold,
            current,
            chosen.recall * 100.0,
            chosen.trap_rate * 100.0,
            chosen.precision
        );
        match &written {
            Some(p) => println!("written to {} (a running gateway reloads it)", p.display()),
            None => println!("--write sets it in cache.yaml"),
        }
    }
    Ok(())
}

/// Set the threshold in `file` (the config dir's cache.yaml), keeping every
/// other line and comment; the edited config must load (and resolve to the
/// value) before it replaces the file, atomically.
fn write_threshold(
    dir: &Path,
    file: &Path,
    route: Option<&str>,
    keys: &[(&str, f64)],
) -> anyhow::Result<std::path::PathBuf> {
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut new = old;
    for (key, value) in keys {
        new = set_key(&new, route, key, *value)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    }
    // Check the whole directory with the new file before touching the real
    // one (in memory: no copy of the config, key files included, elsewhere).
    let mut texts = std::collections::BTreeMap::new();
    for f in smartllm_config::FILES {
        match std::fs::read_to_string(dir.join(f)) {
            Ok(t) => {
                texts.insert(f, t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.join(f).display())),
        }
    }
    texts.insert(smartllm_config::CACHE_FILE, new.clone());
    let cfg = smartllm_config::load_texts(dir, texts)
        .map_err(|e| anyhow::anyhow!("the edited cache.yaml does not load: {e}"))?;
    let policy = cfg.cache.policy(route, route.unwrap_or(""));
    for (key, value) in keys {
        let got = match *key {
            "verifier_threshold" => policy.verifier.unwrap_or(f32::NAN),
            _ => policy.similarity_threshold,
        };
        anyhow::ensure!(
            (f64::from(got) - value).abs() < 1e-6,
            "the edited cache.yaml resolves {key} to {got}, not {value}"
        );
    }
    crate::config_write::replace(file, &new)?;
    Ok(file.to_path_buf())
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// The key of a block-style `key:` line (with or without a value).
fn key_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let (k, _) = t.split_once(':')?;
    (!k.is_empty() && !k.contains(' ') && !k.starts_with('-')).then_some(k)
}

/// Lines [start, end) of the block under the line at `at` (deeper indented).
fn block_end(lines: &[String], at: usize) -> usize {
    let base = indent_of(&lines[at]);
    (at + 1..lines.len())
        .find(|&i| is_content(&lines[i]) && indent_of(&lines[i]) <= base)
        .unwrap_or(lines.len())
}

/// The value of `key: value   # comment` replaced by `value`, the spacing
/// and comment after it kept.
fn replace_value(line: &str, value: &str) -> String {
    let (head, rest) = line.split_once(':').expect("a key line");
    let old = rest.trim_start();
    let tail = old.find(char::is_whitespace).map_or("", |i| &old[i..]);
    format!("{head}: {value}{tail}")
}

/// Find `key:` directly under the block at `parent` (None: top level).
fn find_child(lines: &[String], parent: Option<usize>, key: &str) -> Option<usize> {
    let (from, to) = match parent {
        Some(p) => (p + 1, block_end(lines, p)),
        None => (0, lines.len()),
    };
    let depth = (from..to)
        .find(|&i| is_content(&lines[i]))
        .map(|i| indent_of(&lines[i]))?;
    (from..to).find(|&i| {
        is_content(&lines[i]) && indent_of(&lines[i]) == depth && key_of(&lines[i]) == Some(key)
    })
}

/// Indentation for a new child of `parent`: that of its first child, else
/// two more than the parent's.
fn child_indent(lines: &[String], parent: usize) -> usize {
    (parent + 1..block_end(lines, parent))
        .find(|&i| is_content(&lines[i]))
        .map_or(indent_of(&lines[parent]) + 2, |i| indent_of(&lines[i]))
}

/// Set `key` in a flow mapping line `name: { a: 1, b: x }`.
fn set_in_flow(line: &str, key: &str, value: &str) -> Result<String, String> {
    let (head, rest) = line.split_once(':').expect("a key line");
    let rest = rest.trim_start();
    let close = rest
        .rfind('}')
        .ok_or_else(|| format!("cannot edit {line:?}: a flow mapping without '}}'"))?;
    let inner = &rest[1..close];
    let after = &rest[close + 1..];
    if inner.contains(['{', '[', '"', '\'']) {
        return Err(format!(
            "cannot edit {line:?} safely (nested or quoted values): set {key} by hand"
        ));
    }
    let mut items: Vec<String> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let mut found = false;
    for it in items.iter_mut() {
        if it.split_once(':').map(|(k, _)| k.trim()) == Some(key) {
            *it = format!("{key}: {value}");
            found = true;
        }
    }
    if !found {
        items.push(format!("{key}: {value}"));
    }
    Ok(format!("{head}: {{ {} }}{after}", items.join(", ")))
}

/// `text` (a cache.yaml) with the default or `route`'s similarity threshold
/// set to `value`: an existing key is replaced in place (its comment kept),
/// a missing one (or missing `routes:` / route / `cache:`) is added.
#[cfg(test)]
pub fn set_threshold(text: &str, route: Option<&str>, value: f64) -> Result<String, String> {
    set_key(text, route, "similarity_threshold", value)
}

/// `text` (a cache.yaml) with `key` (`similarity_threshold` or
/// `verifier_threshold`) of the default or of `route` set to `value`, as
/// [`set_threshold`] does.
pub fn set_key(text: &str, route: Option<&str>, key: &str, value: f64) -> Result<String, String> {
    let value = format!("{value:.2}");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let cache = match find_child(&lines, None, "cache") {
        Some(i) => i,
        None => {
            if lines.iter().any(|l| is_content(l)) {
                return Err("no top-level `cache:` key".into());
            }
            lines.push("cache:".into());
            lines.len() - 1
        }
    };
    let ind = |n: usize| " ".repeat(n);
    let target_parent = match route {
        None => cache,
        Some(r) => {
            let routes = match find_child(&lines, Some(cache), "routes") {
                Some(i) => i,
                None => {
                    let at = block_end(&lines, cache);
                    let pad = child_indent(&lines, cache);
                    lines.insert(at, format!("{}routes:", ind(pad)));
                    at
                }
            };
            match find_child(&lines, Some(routes), r) {
                Some(i) => {
                    let after_colon = lines[i].split_once(':').map_or("", |(_, v)| v).trim();
                    if after_colon.starts_with('{') {
                        lines[i] = set_in_flow(&lines[i], key, &value)?;
                        return Ok(lines.join("\n") + "\n");
                    }
                    if is_content(after_colon) {
                        return Err(format!("routes.{r} has an inline value; set {key} by hand"));
                    }
                    i
                }
                None => {
                    let at = block_end(&lines, routes);
                    let pad = child_indent(&lines, routes);
                    lines.insert(at, format!("{}{r}: {{ {key}: {value} }}", ind(pad)));
                    return Ok(lines.join("\n") + "\n");
                }
            }
        }
    };
    match find_child(&lines, Some(target_parent), key) {
        Some(i) => lines[i] = replace_value(&lines[i], &value),
        None => {
            let pad = child_indent(&lines, target_parent);
            lines.insert(target_parent + 1, format!("{}{key}: {value}", ind(pad)));
        }
    }
    Ok(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = "# Semantic cache\ncache:\n  enabled: true                   # global switch\n  similarity_threshold: 0.95      # cosine; per-route overrides below\n  exclude:\n    patterns: []\n  routes:                         # per route alias or model\n    auto: { enabled: true }\n    smart: { similarity_threshold: 0.97 }\n    deep:\n      version: 2\n";

    #[test]
    fn the_default_is_replaced_in_place_keeping_comments() {
        let out = set_threshold(SHIPPED, None, 0.9).unwrap();
        assert!(
            out.contains("  similarity_threshold: 0.90      # cosine; per-route overrides below\n"),
            "{out}"
        );
        assert_eq!(out.lines().count(), SHIPPED.lines().count());
        assert!(
            out.contains("smart: { similarity_threshold: 0.97 }"),
            "{out}"
        );
    }

    #[test]
    fn routes_in_flow_and_block_style_and_new_ones() {
        let out = set_threshold(SHIPPED, Some("auto"), 0.88).unwrap();
        assert!(
            out.contains("    auto: { enabled: true, similarity_threshold: 0.88 }\n"),
            "{out}"
        );
        let out = set_threshold(SHIPPED, Some("smart"), 0.93).unwrap();
        assert!(
            out.contains("    smart: { similarity_threshold: 0.93 }\n"),
            "{out}"
        );
        let out = set_threshold(SHIPPED, Some("deep"), 0.91).unwrap();
        assert!(
            out.contains("    deep:\n      similarity_threshold: 0.91\n      version: 2\n"),
            "{out}"
        );
        let out = set_threshold(SHIPPED, Some("fresh"), 0.9).unwrap();
        assert!(
            out.ends_with("      version: 2\n    fresh: { similarity_threshold: 0.90 }\n"),
            "{out}"
        );
        // The default is untouched by a route's calibration.
        assert!(out.contains("  similarity_threshold: 0.95 "), "{out}");
    }

    #[test]
    fn missing_blocks_are_added() {
        let out = set_threshold("cache:\n  enabled: true\n", Some("auto"), 0.9).unwrap();
        assert_eq!(
            out,
            "cache:\n  enabled: true\n  routes:\n    auto: { similarity_threshold: 0.90 }\n"
        );
        let out = set_threshold("cache:\n  enabled: true\n", None, 0.9).unwrap();
        assert_eq!(
            out,
            "cache:\n  similarity_threshold: 0.90\n  enabled: true\n"
        );
        assert_eq!(
            set_threshold("", None, 0.9).unwrap(),
            "cache:\n  similarity_threshold: 0.90\n"
        );
        assert!(set_threshold("other: 1\n", None, 0.9).is_err());
        assert!(set_threshold("cache:\n  routes:\n    a: { x: \"{\" }\n", Some("a"), 0.9).is_err());
    }

    fn row(threshold: f32, trap_rate: f64) -> EvalRow {
        EvalRow {
            threshold,
            precision: 1.0,
            recall: 0.5,
            trap_rate,
            hit_rate: 0.5,
            true_positives: 1,
            false_positives: 0,
            guard_blocked: 0,
            verifier_blocked: 0,
            categories: Vec::new(),
        }
    }

    #[test]
    fn the_verifier_threshold_is_set_beside_the_similarity_threshold() {
        let out = set_key(SHIPPED, None, "verifier_threshold", 0.8).unwrap();
        assert!(
            out.contains("cache:\n  verifier_threshold: 0.80\n  enabled: true"),
            "{out}"
        );
        let out = set_key(SHIPPED, Some("smart"), "verifier_threshold", 0.75).unwrap();
        assert!(
            out.contains("    smart: { similarity_threshold: 0.97, verifier_threshold: 0.75 }\n"),
            "{out}"
        );
        let out = set_key(SHIPPED, Some("deep"), "verifier_threshold", 0.7).unwrap();
        assert!(
            out.contains("    deep:\n      verifier_threshold: 0.70\n      version: 2\n"),
            "{out}"
        );
    }

    fn scored(threshold: f32, trap_rate: f64, recall: f64) -> EvalRow {
        EvalRow {
            recall,
            ..row(threshold, trap_rate)
        }
    }

    #[test]
    fn with_the_verifier_the_pair_serving_most_within_the_target() {
        let by_pass = vec![
            // A lax verifier: only a strict threshold keeps traps under 1%.
            (0.3, vec![scored(0.7, 0.05, 0.7), scored(0.9, 0.01, 0.3)]),
            // A strict verifier: the loose threshold holds, and serves more.
            (0.8, vec![scored(0.7, 0.008, 0.5), scored(0.9, 0.0, 0.2)]),
            // Stricter still: no more served.
            (0.9, vec![scored(0.7, 0.0, 0.45), scored(0.9, 0.0, 0.1)]),
        ];
        let (pass, r) = choose_with_pass(&by_pass, 0.01).unwrap();
        assert_eq!((pass, r.threshold), (0.8, 0.7));
        let (pass, r) = choose_with_pass(&by_pass, 0.05).unwrap();
        assert_eq!((pass, r.threshold), (0.3, 0.7));
        // Equal duplicates served: the stricter pass score.
        let tie = vec![
            (0.5, vec![scored(0.7, 0.0, 0.4)]),
            (0.6, vec![scored(0.7, 0.0, 0.4)]),
        ];
        assert_eq!(choose_with_pass(&tie, 0.01).unwrap().0, 0.6);
        assert!(choose_with_pass(&[(0.5, vec![scored(0.9, 0.2, 0.1)])], 0.01).is_none());
    }

    #[test]
    fn the_loosest_threshold_under_the_target_from_there_on() {
        let rows = [
            row(0.7, 0.05),
            row(0.8, 0.005),
            row(0.85, 0.02),
            row(0.9, 0.01),
            row(0.95, 0.0),
        ];
        // 0.80 dips under 1% but 0.85 does not: 0.90 is the loosest that holds.
        assert_eq!(choose(&rows, 0.01).unwrap().threshold, 0.9);
        assert_eq!(choose(&rows, 0.05).unwrap().threshold, 0.7);
        assert!(choose(&[row(0.7, 0.2), row(0.99, 0.02)], 0.01).is_none());
    }
}
