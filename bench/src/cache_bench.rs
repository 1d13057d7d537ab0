//! Cache component benchmarks, as ratios within one run:
//! 1. embedder throughput, concurrent callers (the Embedder's own policy) vs one text per call;
//! 2. FAISS search latency and recall@1 of the IVF-SQ8 index against exact
//!    (flat) search at 100k and 1M synthetic clustered vectors, with memory.
//!
//!   cache-bench [--sizes 100000,1000000] [--queries 500] [--texts 256]
//! 3. at scale (`--scale 1000000,10000000`): vectors generated and added in
//!    batches of 100,000 (never all in memory), IVF trained on a sample,
//!    IVF-SQ8 against IVF-PQ48, recall@1 against exact search (up to 2M; beyond,
//!    against the vector each query was made from); the embedder and
//!    small-index parts are skipped.
//!
//!   cache-bench --scale 1000000,10000000 [--queries 300] [--scale-nlist 2048]
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

/// Inner product in eight lanes (so the compiler can use SIMD).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

/// The clustered data set of `dataset`, generated a batch at a time from
/// per-batch seeds, so ten million vectors never have to be in memory.
struct Stream {
    centres: Vec<f32>,
    clusters: usize,
}

const BATCH: usize = 100_000;

impl Stream {
    fn new(n: usize, seed: u64) -> Stream {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clusters = (n / 100).max(10);
        let mut centres = Vec::with_capacity(clusters * DIM);
        for _ in 0..clusters {
            let mut c: Vec<f32> = (0..DIM).map(|_| rng.f32() - 0.5).collect();
            unit(&mut c);
            centres.extend(c);
        }
        Stream { centres, clusters }
    }

    /// Vectors `[b * BATCH, b * BATCH + len)`, row-major.
    fn batch(&self, b: usize, len: usize) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(0x5ca1e ^ (b as u64).wrapping_mul(0x9e37_79b9));
        let mut out = Vec::with_capacity(len * DIM);
        for _ in 0..len {
            let k = rng.usize(..self.clusters);
            let c = &self.centres[k * DIM..(k + 1) * DIM];
            let mut v: Vec<f32> = c.iter().map(|x| x + (rng.f32() - 0.5) * 0.08).collect();
            unit(&mut v);
            out.extend(v);
        }
        out
    }
}

/// IVF-SQ8 and IVF-PQ48 at `n` vectors, trained on a sample, filled batch by
/// batch; exact top-1 of every query computed batch by batch with a flat index.
fn scale_bench(n: usize, queries: usize, nlist: usize) {
    let stream = Stream::new(n, 42);
    let batches = n.div_ceil(BATCH);
    let len_of = |b: usize| BATCH.min(n - b * BATCH);
    // Queries: stored vectors plus noise.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut sources: Vec<usize> = (0..queries).map(|_| rng.usize(..n)).collect();
    sources.sort_unstable();
    let mut qs: Vec<Vec<f32>> = Vec::with_capacity(queries);
    let mut source_ids: Vec<u64> = Vec::with_capacity(queries);
    for b in 0..batches {
        let in_batch: Vec<usize> = sources.iter().copied().filter(|s| s / BATCH == b).collect();
        if in_batch.is_empty() {
            continue;
        }
        let data = stream.batch(b, len_of(b));
        for s in in_batch {
            let r = s % BATCH;
            let mut q: Vec<f32> = data[r * DIM..(r + 1) * DIM]
                .iter()
                .map(|x| x + (rng.f32() - 0.5) * 0.02)
                .collect();
            unit(&mut q);
            qs.push(q);
            source_ids.push(s as u64 + 1);
        }
    }
    // Truth: exact search (dot products against every batch, two threads)
    // up to 2M vectors; beyond, the stored vector each query was made from
    // (at 1M it is the exact answer for all but a few queries: reported).
    let exact = n <= 2_000_000;
    let truth: Vec<u64> = if exact {
        let mut best: Vec<(u64, f32)> = vec![(0, f32::NEG_INFINITY); queries];
        for b in 0..batches {
            let data = stream.batch(b, len_of(b));
            let half = queries / 2;
            let (lo, hi) = best.split_at_mut(half);
            std::thread::scope(|sc| {
                for (part, offset) in [(lo, 0), (hi, half)] {
                    let (qs, data) = (&qs, &data);
                    sc.spawn(move || {
                        for (i, row) in data.chunks_exact(DIM).enumerate() {
                            for (j, slot) in part.iter_mut().enumerate() {
                                let q = &qs[offset + j];
                                let d = dot(q, row);
                                if d > slot.1 {
                                    *slot = ((b * BATCH + i + 1) as u64, d);
                                }
                            }
                        }
                    });
                }
            });
        }
        let same = best
            .iter()
            .zip(&source_ids)
            .filter(|(t, s)| t.0 == **s)
            .count();
        eprintln!("{n}: the exact nearest is the query's source for {same} of {queries} queries");
        best.into_iter().map(|(id, _)| id).collect()
    } else {
        source_ids.clone()
    };
    // Training sample: 40 vectors a list, from spread-out batches.
    let want = (nlist * 40).min(n);
    let mut sample = Vec::with_capacity(want * DIM);
    let per_batch = want.div_ceil(batches);
    for b in 0..batches {
        let data = stream.batch(b, len_of(b));
        let take = per_batch.min(len_of(b)).min(want - sample.len() / DIM);
        sample.extend_from_slice(&data[..take * DIM]);
        if sample.len() / DIM >= want {
            break;
        }
    }
    let nprobe = (nlist / 32).clamp(8, 128);
    for encoding in ["SQ8", "PQ48np"] {
        let base = rss_mib();
        let t = Instant::now();
        let mut index =
            VectorIndex::train_ivf_sample(DIM, &sample, nlist, encoding, nprobe).unwrap();
        let trained = t.elapsed();
        // The cache's own PQ lookup re-scores its candidates on the vectors
        // RocksDB keeps: stored here too (not timed), up to 2M vectors.
        let store_dir = std::env::temp_dir().join(format!("cache-bench-{}", std::process::id()));
        let store = (encoding != "SQ8" && n <= 2_000_000)
            .then(|| smartllm_store::Store::open(&store_dir).unwrap());
        let mut filled = Duration::ZERO;
        for b in 0..batches {
            let data = stream.batch(b, len_of(b));
            let ids: Vec<u64> = (0..len_of(b)).map(|i| (b * BATCH + i + 1) as u64).collect();
            let t = Instant::now();
            index.add_batch(&ids, &data).unwrap();
            filled += t.elapsed();
            if let Some(store) = &store {
                for (id, row) in ids.iter().zip(data.chunks_exact(DIM)) {
                    let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
                    store
                        .put(smartllm_store::CF_VECTORS, &id.to_be_bytes(), &bytes)
                        .unwrap();
                }
            }
        }
        let rss = rss_mib() - base;
        // What the index holds: a code and an id per vector, the centroids.
        let code = if encoding == "SQ8" { DIM } else { 48 };
        let memory = (n * (code + 8) + nlist * DIM * 4) as f64 / (1 << 20) as f64;
        let mut times = Vec::with_capacity(queries);
        let mut agree = 0;
        for (qi, q) in qs.iter().enumerate() {
            let t = Instant::now();
            let got = index.search(q, 1).unwrap();
            times.push(t.elapsed());
            if got.first().map(|h| h.0) == Some(truth[qi]) {
                agree += 1;
            }
        }
        times.sort();
        println!(
            "| {n} | IVF{nlist},{encoding} (nprobe {nprobe}) | {:.0} + {:.0} | {:.2} | {:.2} | {:.3}{} | {:.0} (RSS +{:.0}) |",
            trained.as_secs_f64(),
            filled.as_secs_f64(),
            pct(&times, 0.5),
            pct(&times, 0.99),
            agree as f64 / queries as f64,
            if exact { "" } else { " (vs source)" },
            memory,
            rss.max(0.0)
        );
        if let Some(store) = store {
            store.flush().unwrap();
            let (times, agree) = rescored_lookups(&index, &store, &qs, &truth);
            println!(
                "| {n} | IVF{nlist},{encoding} (nprobe {nprobe}) + the cache's re-scoring of {RESCORED} candidates from RocksDB | | {:.2} | {:.2} | {:.3} | |",
                pct(&times, 0.5),
                pct(&times, 0.99),
                agree as f64 / queries as f64,
            );
            drop(store);
            let _ = std::fs::remove_dir_all(&store_dir);
        }
        drop(index);
    }
}

/// Candidates a lookup on IVF-PQ codes takes and scores again on their
/// stored vectors (the cache's `COARSE_MIN_CANDIDATES`, top_k 8 x 4).
const RESCORED: usize = 32;

/// What the cache's lookup does on an IVF-PQ index: the best [`RESCORED`]
/// by the codes, their vectors read from RocksDB in one batch, the best
/// cosine. Times per query, and how many found `truth`.
fn rescored_lookups(
    index: &VectorIndex,
    store: &smartllm_store::Store,
    qs: &[Vec<f32>],
    truth: &[u64],
) -> (Vec<Duration>, usize) {
    let db = store.db();
    let cf = db.cf_handle(smartllm_store::CF_VECTORS).unwrap();
    let (mut times, mut agree) = (Vec::with_capacity(qs.len()), 0);
    for (q, want) in qs.iter().zip(truth) {
        let t = Instant::now();
        let hits = index.search(q, RESCORED).unwrap();
        let keys: Vec<[u8; 8]> = hits.iter().map(|h| h.0.to_be_bytes()).collect();
        let mut best = (0u64, f32::NEG_INFINITY);
        for (h, got) in hits.iter().zip(db.batched_multi_get_cf(cf, &keys, false)) {
            if let Some(bytes) = got.unwrap() {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let s = dot(q, &v);
                if s > best.1 {
                    best = (h.0, s);
                }
            }
        }
        times.push(t.elapsed());
        if best.0 == *want {
            agree += 1;
        }
    }
    times.sort();
    (times, agree)
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
    let scale: Vec<usize> = arg("--scale", "")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if !scale.is_empty() {
        let nlist: usize = arg("--scale-nlist", "2048").parse().unwrap_or(2048);
        println!("# Vector index at scale\n");
        println!(
            "Machine: {} cores; build: release. Command: cache-bench --scale {} --queries {queries} --scale-nlist {nlist}\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            scale.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
        );
        println!("Synthetic clustered unit vectors (384-d), generated and added 100,000 at a time; IVF trained on 40 vectors a list; queries are stored vectors plus noise; truth = exact search up to 2M vectors, beyond that the stored vector each query was made from. Memory: the index's codes, ids and centroids (RSS growth while it was built in brackets; the allocator keeps what the previous index freed, so only the first row's is meaningful).\n");
        println!("| vectors | index | train + fill s | search p50 ms | search p99 ms | recall@1 | index MiB |");
        println!("|---|---|---|---|---|---|---|");
        for n in scale {
            scale_bench(n, queries, nlist);
        }
        return;
    }
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
