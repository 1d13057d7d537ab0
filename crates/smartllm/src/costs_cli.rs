//! `smartllm costs` and `smartllm costs suggest`: the ledger of the running
//! gateway, read through its admin API.

use crate::admin_client::{admin_call, AdminTarget};
use crate::printers;
use anyhow::Context;

/// `smartllm costs suggest [--since 7d] [--json]`
pub fn suggest_cmd(target: &AdminTarget, since: &str, json: bool) -> anyhow::Result<()> {
    let body = admin_call(target, "GET", &format!("/admin/suggestions?since={since}"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("parsing the admin API's answer")?;
    let r = &v["report"];
    let usd = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    println!(
        "{} .. {}: {} requests, ${:.4} spent, ${:.4} saved by the cache.",
        v["from"].as_str().unwrap_or("-"),
        v["to"].as_str().unwrap_or("-"),
        r["requests"].as_u64().unwrap_or(0),
        usd(&r["cost_usd"]),
        usd(&r["saved_by_cache_usd"]),
    );
    let list = r["suggestions"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("No suggestions: nothing in this window would have been cheaper.");
        return Ok(());
    }
    println!(
        "Potential saving: ${:.4} ({} suggestions)\n",
        usd(&r["potential_saving_usd"]),
        list.len()
    );
    for (i, s) in list.iter().enumerate() {
        println!(
            "{:>2}. ${:<10.4} {:<16} {}",
            i + 1,
            usd(&s["saving_usd"]),
            s["kind"].as_str().unwrap_or("-"),
            s["action"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

/// `smartllm costs [--since 24h] [--by model] [--csv] [--fleet]`
pub fn costs_cmd(
    target: &AdminTarget,
    since: &str,
    by: &str,
    csv: bool,
    fleet: bool,
) -> anyhow::Result<()> {
    // As many rows as the admin API gives; beyond them, the cheapest are
    // summed into one `(other)` row, which is said.
    let scope = if fleet {
        "&scope=fleet&limit=10000"
    } else {
        "&limit=10000"
    };
    let cut = "note: more rows than the admin API's limit (10000); the cheapest are summed in the (other) row";
    if csv {
        // The gateway's own CSV (every counter, RFC 4180 quoting).
        let body = admin_call(
            target,
            "GET",
            &format!("/admin/costs?since={since}&group_by={by}&format=csv{scope}"),
        )?;
        print!("{body}");
        if body
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("(other)"))
        {
            eprintln!("{cut}");
        }
        return Ok(());
    }
    let body = admin_call(
        target,
        "GET",
        &format!("/admin/costs?since={since}&group_by={by}{scope}"),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&body).context("parsing the admin API's answer")?;
    let dims: Vec<String> = by
        .split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    let cols = [
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "cost_usd",
        "saved_usd",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for r in v["rows"].as_array().into_iter().flatten() {
        let mut row: Vec<String> = dims
            .iter()
            .map(|d| r["group"][d].as_str().unwrap_or("-").to_string())
            .collect();
        for c in cols {
            row.push(match c {
                "cost_usd" | "saved_usd" => format!("{:.6}", r[c].as_f64().unwrap_or(0.0)),
                _ => r[c].as_u64().unwrap_or(0).to_string(),
            });
        }
        rows.push(row);
    }
    let header: Vec<String> = dims
        .iter()
        .cloned()
        .chain(cols.iter().map(|c| c.to_string()))
        .collect();
    printers::table(&header, &rows);
    println!(
        "total: {} requests, ${:.6} spent, ${:.6} saved by the cache ({} to {})",
        v["total"]["requests"],
        v["total"]["cost_usd"].as_f64().unwrap_or(0.0),
        v["total"]["saved_usd"].as_f64().unwrap_or(0.0),
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?")
    );
    if v["truncated"] == true {
        eprintln!("{cut}");
    }
    Ok(())
}
