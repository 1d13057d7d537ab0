//! Routing decision time without the embedding: features (tokens, language,
//! code/math markers, k-NN task vote over the shipped examples) plus the
//! decision over the shipped `auto` route's four candidates. The prompt
//! embeddings are computed once up front. Criterion reports the mean; the
//! percentile pass after it prints p50/p99 over 200k decisions.
//!
//! cargo bench -p smartllm-bench --bench route_decision

use criterion::Criterion;
use serde_json::{json, Map, Value};
use smartllm_router::decide::StaticState;
use smartllm_router::{RequestInfo, RouterAssets};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let root = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..");
    if std::env::var_os("SMARTLLM_ASSETS_DIR").is_none() {
        let home = std::env::var("HOME").unwrap_or_default();
        std::env::set_var(
            "SMARTLLM_ASSETS_DIR",
            format!("{home}/.cache/smartllm-assets"),
        );
    }
    let cfg = smartllm_config::load_dir(&root.join("conf")).expect("conf/ loads");
    let embedder = smartllm_embed::Embedder::load(&cfg.embedder).expect("embedder (make assets)");
    let embed = |t: Vec<String>| {
        embedder
            .task_vectors_blocking(t)
            .map_err(smartllm_router::assets::EmbedFnError::from)
    };
    let assets = RouterAssets::build(&cfg, Some(&embed), None).expect("router assets");
    let route = cfg.routes.get("auto").expect("route auto");
    let prompts = [
        "Hi, how are you today?",
        "Implement a thread-safe LRU cache in Rust with O(1) operations and explain the memory ordering.",
        "Summarise the following meeting notes in three bullet points: the launch moved to May; budget approved; hiring paused.",
        "Why does the Monty Hall problem favour switching? Explain step by step.",
    ];
    // The request body, its embedding and its task vector.
    type Case = (Map<String, Value>, Vec<f32>, Vec<f32>);
    let cases: Vec<Case> = prompts
        .iter()
        .map(|p| {
            let body = json!({"model": "auto", "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": p}], "max_tokens": 400});
            let states = embedder
                .token_states_blocking(vec![p.to_string()])
                .unwrap()
                .pop()
                .unwrap();
            let (e, tv) = (
                smartllm_embed::pool(&states),
                smartllm_embed::task_vector_mapped(
                    &states,
                    smartllm_embed::task_map_for(&cfg.embedder.model),
                ),
            );
            (body.as_object().cloned().unwrap(), e, tv)
        })
        .collect();
    let info = RequestInfo {
        headers: vec![("content-type".into(), "application/json".into())],
        tenant: "demo",
        app: "playground",
        key: "demo",
        user: Some("u1"),
        budget_pressure: 0.3,
        budget_left_usd: Some(2.5),
    };
    let decide = |i: usize| {
        let (body, e, tv) = &cases[i % cases.len()];
        let f = smartllm_router::extract(body, Some(tv), assets.classifier.as_deref());
        smartllm_router::decide(&cfg, route, &f, None, Some(e), &info, &StaticState)
    };

    let mut c = Criterion::default().configure_from_args();
    let mut i = 0usize;
    c.bench_function("route_decision (features + decide, no embedding)", |b| {
        b.iter(|| {
            i += 1;
            black_box(decide(i))
        })
    });
    c.final_summary();

    let n = 200_000;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        black_box(decide(i));
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    let pct = |q: f64| times[((n as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "route decision over {n} runs: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs (goal: p99 <= 50 µs)",
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    // Baseline in the same run: the one embedding a request needs anyway.
    let mut embeds: Vec<u64> = (0..200)
        .map(|i| {
            let t = Instant::now();
            black_box(
                embedder
                    // A new text each time: the recent-embeddings cache
                    // would answer a repeated one without the model.
                    .embed_blocking(vec![format!("{} ({i})", prompts[i % prompts.len()])])
                    .unwrap(),
            );
            t.elapsed().as_nanos() as u64
        })
        .collect();
    embeds.sort_unstable();
    let embed_p50 = embeds[100] as f64 / 1000.0;
    println!(
        "one prompt embedding (baseline): p50 {embed_p50:.0} µs; route decision p50 = {:.3}x of it",
        pct(0.5) / embed_p50
    );
}
