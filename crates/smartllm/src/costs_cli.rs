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

/// Only the rows of a tenant, an app or a key name (`--tenant`, `--app`,
/// `--key`).
#[derive(Debug, Default)]
pub struct Only {
    pub tenant: Option<String>,
    pub app: Option<String>,
    pub key: Option<String>,
}

impl Only {
    /// The admin API's query parameters for it (`&tenant=...`).
    fn query(&self) -> String {
        let mut q = String::new();
        for (name, value) in [
            ("tenant", &self.tenant),
            ("app", &self.app),
            ("key", &self.key),
        ] {
            if let Some(v) = value {
                q.push_str(&format!("&{name}={}", crate::cache_cli::query_value(v)));
            }
        }
        q
    }
}

/// `smartllm costs [--since 24h] [--by model] [--csv] [--fleet] [--tenant T] [--app A] [--key K]`
pub fn costs_cmd(
    target: &AdminTarget,
    since: &str,
    by: &str,
    csv: bool,
    fleet: bool,
    only: &Only,
) -> anyhow::Result<()> {
    // As many rows as the admin API gives; beyond them, the cheapest are
    // summed into one `(other)` row, which is said.
    let scope = format!(
        "{}{}",
        if fleet {
            "&scope=fleet&limit=10000"
        } else {
            "&limit=10000"
        },
        only.query()
    );
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
                "cost_usd" | "saved_usd" => usd(r[c].as_f64().unwrap_or(0.0)),
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
        "total: {} requests, ${} spent, ${} saved by the cache ({} to {})",
        v["total"]["requests"],
        usd(v["total"]["cost_usd"].as_f64().unwrap_or(0.0)),
        usd(v["total"]["saved_usd"].as_f64().unwrap_or(0.0)),
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?")
    );
    if v["truncated"] == true {
        eprintln!("{cut}");
    }
    Ok(())
}

/// Dollars to six places, or to the nano-dollar (the ledger's unit) when
/// six would print a cost as 0.000000 ($0.00000016 for one embedding).
fn usd(x: f64) -> String {
    if x != 0.0 && x.abs() < 0.000_001 {
        format!("{x:.9}")
    } else {
        format!("{x:.6}")
    }
}

#[cfg(test)]
mod usd_tests {
    #[test]
    fn tiny_costs_are_not_printed_as_zero() {
        assert_eq!(super::usd(0.000_000_16), "0.000000160");
        assert_eq!(super::usd(0.0), "0.000000");
        assert_eq!(super::usd(1.5), "1.500000");
    }
}
