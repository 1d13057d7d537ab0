//! `smartllm route explain`, `smartllm train-router` and `smartllm eval`.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use smartllm_config::{Config, Strategy};
use smartllm_embed::Embedder;
use smartllm_router::decide::{expected_cost, profile_quality, StaticState};
use smartllm_router::eval::{self, EvalRow};
use smartllm_router::learned::{LearnedRouter, Sample};
use smartllm_router::{RequestInfo, RouterAssets};
use std::collections::BTreeMap;
use std::path::Path;

fn load(config: &Path) -> anyhow::Result<(Config, Embedder, RouterAssets)> {
    let cfg = smartllm_config::load_dir(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
    let embed = |t: Vec<String>| {
        embedder
            .embed_blocking(t)
            .map_err(smartllm_router::assets::EmbedFnError::from)
    };
    let assets =
        RouterAssets::build(&cfg, Some(&embed), None).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((cfg, embedder, assets))
}

fn chat(prompt: &str) -> Map<String, Value> {
    let v = json!({"messages": [{"role": "user", "content": prompt}]});
    v.as_object().cloned().unwrap_or_default()
}

/// `smartllm route explain --config DIR [--route auto] PROMPT`
pub fn explain(config: &Path, route: &str, prompt: &str, as_json: bool) -> anyhow::Result<()> {
    let (cfg, embedder, assets) = load(config)?;
    let Some(r) = cfg.routes.get(route) else {
        bail!(
            "{route:?} is not a route alias (routes.yaml defines: {})",
            cfg.routes.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    if !r.is_routed() {
        println!("{route} is a fixed alias for {} (reason=alias)", r.model);
        return Ok(());
    }
    let emb = embedder.embed_blocking(vec![prompt.to_string()])?.pop();
    let body = chat(prompt);
    let f = smartllm_router::extract(&body, emb.as_deref(), assets.classifier.as_deref());
    let info = RequestInfo::default();
    let d = smartllm_router::decide(
        &cfg,
        r,
        &f,
        assets.learned_for(&r.strategy),
        emb.as_deref(),
        &info,
        &StaticState,
    );
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"decision": d, "features": f}))?
        );
        return Ok(());
    }
    println!(
        "route {}: {} (reason={}, strategy={})",
        d.route, d.model, d.reason, d.strategy
    );
    println!(
        "features: task={} ({:.0}% by {}), complexity={:.2}, prompt_tokens={}, expected_output={}, language={}, code={}, math={}, tools={}, images={}",
        f.task, f.task_confidence * 100.0, f.task_source, f.complexity, f.prompt_tokens, f.expected_output_tokens,
        f.language, f.has_code, f.has_math, f.has_tools, f.has_images
    );
    println!(
        "weights: quality={:.2} cost={:.2} latency={:.2}",
        d.weights.0, d.weights.1, d.weights.2
    );
    println!(
        "{:<22} {:>8} {:>12} {:>12} {:>9}  excluded",
        "candidate", "quality", "cost_usd", "latency_ms", "utility"
    );
    for c in &d.candidates {
        println!(
            "{:<22} {:>8.3} {:>12.6} {:>12.0} {:>9.4}  {}",
            c.model,
            c.quality,
            c.expected_cost_usd,
            c.expected_latency_ms,
            c.utility,
            c.excluded.as_deref().unwrap_or("")
        );
    }
    if !d.fallbacks.is_empty() {
        println!("fallbacks: {}", d.fallbacks.join(" -> "));
    }
    Ok(())
}

struct Labelled {
    prompt: String,
    scores: BTreeMap<String, f64>,
    costs: BTreeMap<String, f64>,
}

/// JSONL lines `{"prompt", "model", "score"[, "cost"]}` (or `{"prompt", "scores": {model: score}}`), grouped by prompt.
fn read_data(path: &Path) -> anyhow::Result<Vec<Labelled>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<Labelled> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let prompt = v["prompt"]
            .as_str()
            .with_context(|| format!("{}:{}: needs \"prompt\"", path.display(), i + 1))?
            .to_string();
        let at = *index.entry(prompt.clone()).or_insert_with(|| {
            out.push(Labelled {
                prompt: prompt.clone(),
                scores: BTreeMap::new(),
                costs: BTreeMap::new(),
            });
            out.len() - 1
        });
        let mut add = |model: &str, score: f64, cost: Option<f64>| -> anyhow::Result<()> {
            if !(0.0..=1.0).contains(&score) {
                bail!(
                    "{}:{}: score {score} is not between 0 and 1",
                    path.display(),
                    i + 1
                );
            }
            out[at].scores.insert(model.to_string(), score);
            if let Some(c) = cost {
                out[at].costs.insert(model.to_string(), c);
            }
            Ok(())
        };
        if let Some(scores) = v["scores"].as_object() {
            for (m, s) in scores {
                add(m, s.as_f64().unwrap_or(-1.0), None)?;
            }
        } else {
            let model = v["model"].as_str().with_context(|| {
                format!(
                    "{}:{}: needs \"model\" and \"score\"",
                    path.display(),
                    i + 1
                )
            })?;
            let score = v["score"].as_f64().with_context(|| {
                format!("{}:{}: needs a numeric \"score\"", path.display(), i + 1)
            })?;
            add(model, score, v["cost"].as_f64())?;
        }
    }
    if out.is_empty() {
        bail!("{}: no labelled prompts", path.display());
    }
    Ok(out)
}

fn embed_all(embedder: &Embedder, prompts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(64) {
        out.extend(embedder.embed_blocking(chunk.to_vec())?);
    }
    Ok(out)
}

/// `smartllm train-router --data FILE.jsonl --out FILE`
pub fn train(config: &Path, data: &Path, out: &Path, lambda: f64) -> anyhow::Result<()> {
    let cfg = smartllm_config::load_dir(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let embedder = Embedder::load(&cfg.embedder).context("loading the embedding model")?;
    let rows = read_data(data)?;
    let prompts: Vec<String> = rows.iter().map(|r| r.prompt.clone()).collect();
    let embs = embed_all(&embedder, &prompts)?;
    let mut samples = Vec::new();
    for (r, e) in rows.iter().zip(&embs) {
        for (m, s) in &r.scores {
            samples.push(Sample {
                embedding: e,
                model: m,
                score: *s,
            });
        }
    }
    let name = cfg
        .embedder
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let router = LearnedRouter::train(&samples, lambda, &format!("all-MiniLM-L6-v2 ({name})"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(out, router.to_json()).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "trained on {} prompts ({} labels); wrote {}",
        rows.len(),
        samples.len(),
        out.display()
    );
    for (m, l) in &router.models {
        println!(
            "  {m:<22} samples={:<6} train_rmse={:.4}",
            l.samples, l.train_rmse
        );
    }
    Ok(())
}

/// `smartllm eval --data FILE.jsonl [--router FILE]`: cost/quality curves.
pub fn evaluate(
    config: &Path,
    data: &Path,
    router: Option<&Path>,
    as_json: bool,
) -> anyhow::Result<()> {
    let (cfg, embedder, assets) = load(config)?;
    let learned = match router {
        Some(p) => Some(
            LearnedRouter::from_json(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        None => cfg
            .routes
            .values()
            .find_map(|r| assets.learned_for(&r.strategy).cloned())
            .or_else(|| {
                cfg.routes.values().find_map(|r| match &r.strategy {
                    Strategy::Learned(p) => LearnedRouter::from_json(&std::fs::read(p).ok()?).ok(),
                    _ => None,
                })
            }),
    };
    let rows = read_data(data)?;
    // Models labelled on every prompt, known to the config (for prices).
    let models: Vec<String> = rows[0]
        .scores
        .keys()
        .filter(|m| rows.iter().all(|r| r.scores.contains_key(*m)))
        .cloned()
        .collect();
    let configured: Vec<&smartllm_config::ModelConfig> = models
        .iter()
        .map(|m| {
            cfg.model(m)
                .with_context(|| format!("model {m} of the data is not in models.yaml"))
        })
        .collect::<anyhow::Result<_>>()?;
    if models.len() < 2 {
        bail!("the data must label at least two models on every prompt");
    }
    let prompts: Vec<String> = rows.iter().map(|r| r.prompt.clone()).collect();
    let embs = embed_all(&embedder, &prompts)?;
    let mut eval_rows = Vec::new();
    let mut rule_pred = Vec::new();
    let mut learned_pred = Vec::new();
    for (r, e) in rows.iter().zip(&embs) {
        let f = smartllm_router::extract(&chat(&r.prompt), Some(e), assets.classifier.as_deref());
        eval_rows.push(EvalRow {
            scores: models.iter().map(|m| r.scores[m]).collect(),
            costs: models
                .iter()
                .zip(&configured)
                .map(|(m, mc)| {
                    r.costs
                        .get(m)
                        .copied()
                        .unwrap_or_else(|| expected_cost(mc, &f))
                })
                .collect(),
        });
        rule_pred.push(
            configured
                .iter()
                .map(|mc| profile_quality(mc, f.task, f.complexity))
                .collect::<Vec<_>>(),
        );
        if let Some(l) = &learned {
            learned_pred.push(
                configured
                    .iter()
                    .map(|mc| {
                        l.predict(&mc.name, e)
                            .unwrap_or_else(|| profile_quality(mc, f.task, f.complexity))
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
    let (best, cheapest) = eval::best_and_cheapest(&eval_rows, models.len());
    let mut curves = vec![
        eval::predicted_curve("rules", &eval_rows, &rule_pred, best),
        eval::random_curve(&eval_rows, best, cheapest),
    ];
    if learned.is_some() {
        curves.insert(
            0,
            eval::predicted_curve("learned", &eval_rows, &learned_pred, best),
        );
    }
    let oracle = eval::oracle_point(&eval_rows, best);
    let shares = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
    let table: Vec<Value> = shares
        .iter()
        .map(|c| {
            let mut row = json!({"cost_share": c});
            for cv in &curves {
                row[cv.name.as_str()] = json!(eval::quality_at(cv, *c));
            }
            row
        })
        .collect();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "prompts": rows.len(), "models": models, "best": models[best], "cheapest": models[cheapest],
                "oracle": oracle, "quality_at_cost_share": table, "curves": curves,
            }))?
        );
        return Ok(());
    }
    println!(
        "{} prompts, models: {}; best model: {}, cheapest: {}",
        rows.len(),
        models.join(", "),
        models[best],
        models[cheapest]
    );
    println!(
        "oracle (cheapest model reaching the top score per prompt): {:.1}% of the best model's quality at {:.1}% of its cost",
        oracle.quality_share * 100.0,
        oracle.cost_share * 100.0
    );
    println!("share of the best model's quality kept, at a share of its cost:");
    print!("{:>10}", "cost");
    for cv in &curves {
        print!(" {:>9}", cv.name);
    }
    println!();
    for (c, row) in shares.iter().zip(&table) {
        print!("{:>9.0}%", c * 100.0);
        for cv in &curves {
            print!(
                " {:>8.1}%",
                row[cv.name.as_str()].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        println!();
    }
    Ok(())
}
