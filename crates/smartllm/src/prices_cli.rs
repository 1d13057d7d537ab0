//! `smartllm prices`: the built-in price catalog, searched; or, with
//! `--config`, what each configured model is billed at and where that price
//! comes from.

use crate::printers;
use smartllm_config::catalog::{catalog, CatalogEntry};
use smartllm_config::PriceSource;
use std::path::Path;

fn usd(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v}"))
}

fn count(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

const HEADER: [&str; 13] = [
    "model",
    "provider",
    "mode",
    "context",
    "input",
    "output",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "reasoning",
    "long_context",
    "batch_input",
    "batch_output",
];

fn cells(e: &CatalogEntry) -> Vec<String> {
    vec![
        e.model.clone(),
        e.provider.clone(),
        e.mode.clone(),
        count(e.context_window),
        usd(e.input),
        usd(e.output),
        usd(e.cache_read),
        usd(e.cache_write_5m),
        usd(e.cache_write_1h),
        usd(e.reasoning),
        e.long_context.map_or_else(
            || "-".to_string(),
            |l| {
                format!(
                    ">{}: {}/{}",
                    l.above_tokens, l.input_per_1m, l.output_per_1m
                )
            },
        ),
        usd(e.batch_input),
        usd(e.batch_output),
    ]
}

/// `smartllm prices [QUERY] [--json|--csv] [--limit N]`
pub fn prices_cmd(query: &str, json: bool, csv: bool, limit: usize) -> anyhow::Result<()> {
    let c = catalog();
    let found = c.search(query);
    if json {
        let v = serde_json::json!({
            "source": c.version,
            "date": c.date,
            "models": found.iter().take(limit).collect::<Vec<_>>(),
            "matches": found.len(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let header: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = found.iter().take(limit).map(|e| cells(e)).collect();
    if csv {
        printers::csv(&header, &rows);
        return Ok(());
    }
    printers::table(&header, &rows);
    println!(
        "{} of {} matching models (of {}); USD per 1M tokens; catalog {} of {}",
        rows.len(),
        found.len(),
        c.entries.len(),
        c.version,
        c.date
    );
    Ok(())
}

/// `smartllm prices --config DIR`: each model's price and its source.
pub fn configured_cmd(dir: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = smartllm_config::load_dir(dir)?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for m in &cfg.models {
        let Some(p) = cfg.price(&m.name) else {
            continue;
        };
        let source = match &p.source {
            PriceSource::Configured => "models.yaml".to_string(),
            PriceSource::Catalog(name) => format!("catalog: {name}"),
            PriceSource::Unpriced => "UNPRICED ($0)".to_string(),
        };
        out.push(serde_json::json!({
            "model": m.name, "source": source, "input": p.input_per_1m, "output": p.output_per_1m,
            "cache_read": p.cache_read_per_1m, "cache_write_5m": p.cache_write_5m_per_1m,
            "cache_write_1h": p.cache_write_1h_per_1m, "reasoning": p.reasoning_per_1m,
            "audio_input": p.audio_input_per_1m, "audio_output": p.audio_output_per_1m,
            "per_request": p.per_request, "long_context": p.long_context,
        }));
        rows.push(vec![
            m.name.clone(),
            source,
            format!("{}", p.input_per_1m),
            format!("{}", p.output_per_1m),
            format!("{}", p.cache_read_per_1m),
            format!("{}", p.cache_write_5m_per_1m),
            format!("{}", p.cache_write_1h_per_1m),
            usd(p.reasoning_per_1m),
            p.long_context.map_or_else(
                || "-".to_string(),
                |l| {
                    format!(
                        ">{}: {}/{}",
                        l.above_tokens, l.input_per_1m, l.output_per_1m
                    )
                },
            ),
        ]);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let header: Vec<String> = [
        "model",
        "price from",
        "input",
        "output",
        "cache_read",
        "cache_write_5m",
        "cache_write_1h",
        "reasoning",
        "long_context",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    printers::table(&header, &rows);
    Ok(())
}
