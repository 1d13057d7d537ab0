//! Cache component benchmarks, as ratios within one run:
//! 1. embedder throughput, concurrent callers (the Embedder's own policy) vs one text per call;
//! 2. FAISS search latency and recall@1 of the IVF-SQ8 index against exact
//!    (flat) search at 100k and 1M synthetic clustered vectors, with memory.
//!
//!   cache-bench [--sizes 100000,1000000] [--queries 500] [--texts 256]
//!
//! Prints a Markdown report on stdout.

use smartllm_cache::VectorIndex;
use smartllm_embed::Embedder;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DIM: usize = 384;

mod util;
use util::arg;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Clustered unit vectors (like sentence embeddings: many near neighbours).
fn dataset(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let clusters = (n / 100).max(10);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| {
            let mut c: Vec<f32> = (0..DIM).map(|_| rng.f32() - 0.5).collect();
            unit(&mut c);
            c
        })
        .collect();
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let c = &centres[rng.usize(..clusters)];
        let mut v: Vec<f32> = c.iter().map(|x| x + (rng.f32() - 0.5) * 0.08).collect();
        unit(&mut v);
        out.extend(v);
    }
    out
}

fn embedder_bench(texts: usize) {
    let cfg = smartllm_embed::local_assets(128);
    let e =
        Arc::new(Embedder::load(&cfg).expect("embedding assets: run packaging/fetch-assets.sh"));
    let sentences: Vec<String> = (0..texts)
        .map(|i| format!("How do I configure feature number {i} of the gateway for my team?"))
        .collect();
    // Warm up.
    e.embed_blocking(sentences[..8].to_vec()).unwrap();

    let t = Instant::now();
    for s in &sentences {
        e.embed_blocking(vec![s.clone()]).unwrap();
    }
    let single = texts as f64 / t.elapsed().as_secs_f64();

    // 16 concurrent callers, one text each, through the Embedder's queue.
    let t = Instant::now();
    let per = texts / 16;
    let handles: Vec<_> = (0..16)
        .map(|w| {
            let e = e.clone();
            let mine: Vec<String> = sentences[w * per..(w + 1) * per].to_vec();
            std::thread::spawn(move || {
                for s in mine {
                    e.embed_blocking(vec![s]).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let batched = (per * 16) as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for chunk in sentences.chunks(32) {
        e.embed_blocking(chunk.to_vec()).unwrap();
    }
    let explicit = texts as f64 / t.elapsed().as_secs_f64();

    println!("## Embedder throughput (1 worker thread, ~14-token texts, max_seq_len 128)\n");
    println!("| mode | texts/s | vs one per call |");
    println!("|---|---|---|");
    println!("| one text per call, sequential | {single:.0} | 1.00 |");
    println!(
        "| 16 concurrent callers (the Embedder's policy: one text per run on a CPU) | {batched:.0} | {:.2} |",
        batched / single
    );
    println!(
        "| explicit batches of 32 | {explicit:.0} | {:.2} |\n",
        explicit / single
    );
}

fn index_bench(n: usize, queries: usize) {
    let base = rss_mib();
    let data = dataset(n, 42);
    let ids: Vec<u64> = (1..=n as u64).collect();
    let after_data = rss_mib();

    let t = Instant::now();
    let mut flat = VectorIndex::new_flat(DIM).unwrap();
    for (i, id) in ids.iter().enumerate() {
        flat.add(*id, &data[i * DIM..(i + 1) * DIM]).unwrap();
    }
    let flat_build = t.elapsed();
    let after_flat = rss_mib();

    let t = Instant::now();
    let ivf = VectorIndex::train_ivf(DIM, &data, &ids).unwrap();
    let ivf_build = t.elapsed();
    let after_ivf = rss_mib();
    let (nlist, nprobe) = ivf.ivf_params().unwrap();

    // Queries: stored vectors with a little noise; truth = exact search.
    let mut rng = fastrand::Rng::with_seed(7);
    let qs: Vec<Vec<f32>> = (0..queries)
        .map(|_| {
            let r = rng.usize(..n);
            let mut q: Vec<f32> = data[r * DIM..(r + 1) * DIM]
                .iter()
                .map(|x| x + (rng.f32() - 0.5) * 0.02)
                .collect();
            unit(&mut q);
            q
        })
        .collect();
    let (mut flat_t, mut ivf_t, mut agree) = (Vec::new(), Vec::new(), 0usize);
    for q in &qs {
        let t = Instant::now();
        let truth = flat.search(q, 1).unwrap();
        flat_t.push(t.elapsed());
        let t = Instant::now();
        let got = ivf.search(q, 1).unwrap();
        ivf_t.push(t.elapsed());
        if truth.first().map(|h| h.0) == got.first().map(|h| h.0) {
            agree += 1;
        }
    }
    flat_t.sort();
    ivf_t.sort();
    println!(
        "| {n} | flat | {:.1} | {:.3} | {:.3} | 1.000 | {:.0} |",
        flat_build.as_secs_f64(),
        pct(&flat_t, 0.5),
        pct(&flat_t, 0.99),
        after_flat - after_data
    );
    println!(
        "| {n} | ivf-sq8 (nlist {nlist}, nprobe {nprobe}) | {:.1} | {:.3} | {:.3} | {:.3} | {:.0} |",
        ivf_build.as_secs_f64(),
        pct(&ivf_t, 0.5),
        pct(&ivf_t, 0.99),
        agree as f64 / queries as f64,
        after_ivf - after_flat
    );
    println!(
        "| {n} | ivf-sq8 vs flat | | p50 {:.2}x faster | p99 {:.2}x faster | | memory {:.2}x |",
        pct(&flat_t, 0.5) / pct(&ivf_t, 0.5).max(1e-9),
        pct(&flat_t, 0.99) / pct(&ivf_t, 0.99).max(1e-9),
        (after_ivf - after_flat) / (after_flat - after_data).max(1e-9)
    );
    drop((flat, ivf, data));
    let _ = base;
}

fn main() {
    let sizes: Vec<usize> = arg("--sizes", "100000,1000000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let queries: usize = arg("--queries", "500").parse().unwrap_or(500);
    let texts: usize = arg("--texts", "256").parse().unwrap_or(256);
    println!("# Cache component benchmark\n");
    println!(
        "Machine: {} cores; build: release. Command: cache-bench --sizes {} --queries {queries} --texts {texts}\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
    );
    embedder_bench(texts);
    println!("## Vector index: search latency and recall@1 against exact search\n");
    println!("Synthetic clustered unit vectors (384-d); queries are stored vectors plus noise; truth = flat (exact) search.\n");
    println!(
        "| vectors | index | build s | search p50 ms | search p99 ms | recall@1 | memory MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for n in sizes {
        index_bench(n, queries);
    }
}
