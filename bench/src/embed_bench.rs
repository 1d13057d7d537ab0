//! Embedder throughput, as ratios within one run (issue #22 items 1-3):
//! texts/s by model file x worker threads x text length x batch size, the
//! tokenizer's own cost, and the production `Embedder` (its batch policy,
//! 16 concurrent callers) against the fp32 model's one-text baseline.
//!
//!   embed-bench [--seconds 1.5] [--lengths 16,64,256] [--batches 1,4,16,64] [--threads 1,2]
//!   embed-bench --device cuda [--batches 1,2,4,...,256] [--threads 1] [--workers 1,2] [--callers 256]
//!   embed-bench --verifier [--seconds 1.5] [--lengths 16,64,256]
//!   embed-bench --fusions [--baseline-model FILE] [--seconds 1.0] [--rounds 3] [--lengths 16,64,256]
//!
//! With `--verifier` (issue #16 item 6) it measures the cache verifier's
//! cost next to the embedder's, per pair of texts of each length: the model
//! run that gives one text's token states against the one that gives its
//! embedding, and the verifier's own work (alignment features + trees).
//!
//! With `--device cuda` (issue #22 item 8; `bench/gpu-embed.sh`) the sessions
//! run on the GPU (the CUDA build from `make assets-gpu`); it fails if CUDA
//! is unavailable rather than print CPU figures under a GPU title.
//! The texts are synthetic (words drawn from a fixed list, cut to the token
//! length): speed depends on the length, not the words. Prints Markdown.

use smartllm_config::{Device, EmbedderConfig};
use smartllm_embed::{
    local_assets, CpuFusions, Embedder, Model, DEFAULT_MODEL, FP32_MODEL, INT8_MODEL, L3_FP32_MODEL,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod util;
use util::arg;

fn list(name: &str, default: &str) -> Vec<usize> {
    arg(name, default)
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

const WORDS: &[&str] = &[
    "route",
    "the",
    "request",
    "to",
    "a",
    "cheaper",
    "model",
    "when",
    "cache",
    "answers",
    "how",
    "do",
    "I",
    "reset",
    "my",
    "password",
    "explain",
    "difference",
    "between",
    "process",
    "thread",
    "summarise",
    "this",
    "contract",
    "clause",
    "for",
    "engineers",
    "write",
    "function",
    "sorts",
    "list",
    "numbers",
    "quickly",
    "budget",
    "alert",
    "tenant",
    "invoice",
    "march",
    "latency",
];

/// `n` distinct synthetic texts of exactly `tokens` tokens (specials included).
fn texts(model: &Model, tokens: usize, n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(tokens as u64);
    (0..n)
        .map(|i| {
            let mut words: Vec<&str> = vec![];
            let mut t = format!("{i}");
            // Each word is at least one token: add as many as are missing
            // (a handful of tokenizer calls a text, not one a word).
            loop {
                let have = model.tokens(&t);
                if have >= tokens {
                    break;
                }
                for _ in have..tokens {
                    words.push(WORDS[rng.usize(..WORDS.len())]);
                }
                t = format!("{i} {}", words.join(" "));
            }
            while model.tokens(&t) > tokens && !words.is_empty() {
                words.pop();
                t = format!("{i} {}", words.join(" "));
            }
            t
        })
        .collect()
}

/// The assets' config for `model_file` on `device`.
fn config(model_file: &str, device: Device) -> EmbedderConfig {
    let mut cfg = local_assets(512);
    cfg.model = cfg.model.with_file_name(model_file);
    cfg.device = device;
    cfg
}

/// One session of `cfg`; on CUDA only a CUDA one.
fn session(cfg: &EmbedderConfig) -> Result<Model, String> {
    let (model, device) = Model::load(cfg).map_err(|e| e.to_string())?;
    if cfg.device == Device::Cuda && device != "cuda" {
        return Err(format!("--device cuda, but the session got {device}"));
    }
    Ok(model)
}

/// `threads` sessions of `cfg` (on CUDA only CUDA ones), loaded once and
/// reused for every batch size: a CUDA session takes seconds to start.
fn sessions(cfg: &EmbedderConfig, threads: usize) -> Vec<Model> {
    (0..threads)
        .map(|_| session(cfg).expect("model loads"))
        .collect()
}

/// Texts per second of `models.len()` workers, each with its own session,
/// each running batches of `batch` texts for `secs`.
fn measure(models: &mut [Model], texts: &[String], batch: usize, secs: f64) -> f64 {
    let start = Instant::now() + Duration::from_millis(50);
    std::thread::scope(|scope| {
        let handles: Vec<_> = models
            .iter_mut()
            .enumerate()
            .map(|(w, m)| {
                scope.spawn(move || {
                    let mut i = w * 97;
                    let mut run = |m: &mut Model| {
                        let chunk: Vec<&str> = (0..batch)
                            .map(|k| texts[(i + k) % texts.len()].as_str())
                            .collect();
                        i += batch;
                        m.embed(&chunk, usize::MAX).expect("embeds");
                    };
                    run(m); // warm-up
                    while Instant::now() < start {}
                    // At least one run, however long it takes.
                    let mut done = 0usize;
                    loop {
                        run(m);
                        done += batch;
                        if start.elapsed().as_secs_f64() >= secs {
                            break;
                        }
                    }
                    done as f64 / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Texts per second through the production `Embedder` (its threads, its
/// batch policy) with `callers` concurrent one-text callers.
fn through_embedder(
    cfg: &EmbedderConfig,
    threads: usize,
    texts: &Arc<Vec<String>>,
    callers: usize,
    secs: f64,
) -> f64 {
    let mut cfg = cfg.clone();
    cfg.threads = threads;
    cfg.queue_depth = 4096;
    cfg.max_queue_wait = Duration::from_secs(10);
    let e = Arc::new(Embedder::load(&cfg).expect("embedder loads"));
    assert!(
        cfg.device == Device::Cpu || e.info().device == "cuda",
        "--device cuda, but the embedder got {}",
        e.info().device
    );
    let start = Instant::now();
    let handles: Vec<_> = (0..callers)
        .map(|c| {
            let (e, texts) = (e.clone(), texts.clone());
            std::thread::spawn(move || {
                let mut done = 0usize;
                let mut i = c * 131;
                while start.elapsed().as_secs_f64() < secs {
                    e.embed_blocking(vec![texts[i % texts.len()].clone()])
                        .expect("embeds");
                    i += 1;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let done: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() -> Result<(), String> {
    if arg("--device", "cpu") == "cuda" {
        return gpu_main();
    }
    if std::env::args().any(|a| a == "--verifier") {
        return verifier_main();
    }
    if std::env::args().any(|a| a == "--fusions") {
        return fusions_main();
    }
    let secs: f64 = arg("--seconds", "1.5").parse().unwrap_or(1.5);
    let lengths = list("--lengths", "16,64,256");
    let batches = list("--batches", "1,4,16,64");
    let threads = list("--threads", "1,2");
    let cfg = local_assets(512);
    let probe = Model::load_cpu(&cfg).expect("embedding assets: run packaging/fetch-assets.sh");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("# Embedder throughput (texts/s; synthetic texts; {cores} CPUs; {secs} s per cell)\n");

    // Tokenizer alone, per text.
    println!("## Tokenizer (one thread)\n\n| tokens | µs per text |\n|---|---|");
    for &len in &lengths {
        let t = texts(&probe, len, 256);
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed().as_secs_f64() < secs / 2.0 {
            for s in &t {
                std::hint::black_box(probe.tokens(s));
                n += 1;
            }
        }
        println!(
            "| {len} | {:.1} |",
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }

    println!("\n## Model runs: texts/s by model x workers x length x batch\n");
    print!("| model | workers | tokens |");
    for b in &batches {
        print!(" batch {b} |");
    }
    println!(" int8 / fp32 at batch 1 |");
    print!("|---|---|---|");
    for _ in &batches {
        print!("---|");
    }
    println!("---|");
    for &w in &threads {
        for &len in &lengths {
            let t = Arc::new(texts(&probe, len, 512));
            let mut base = 0.0;
            for model in [FP32_MODEL, INT8_MODEL, DEFAULT_MODEL] {
                print!("| {model} | {w} | {len} |");
                let mut first = 0.0;
                let mut models = sessions(&config(model, Device::Cpu), w);
                for &b in &batches {
                    let r = measure(&mut models, &t, b, secs);
                    if b == batches[0] {
                        first = r;
                    }
                    print!(" {r:.0} |");
                }
                if model == FP32_MODEL {
                    base = first;
                    println!(" |");
                } else {
                    println!(" {:.2}x |", first / base.max(1e-9));
                }
            }
        }
    }

    println!("\n## The production Embedder: 16 concurrent one-text callers\n");
    println!("| tokens | {FP32_MODEL}, 1 worker | {INT8_MODEL}, {cores} workers | {DEFAULT_MODEL}, 1 worker | {DEFAULT_MODEL}, {cores} workers (default) | default / {INT8_MODEL} | default / {FP32_MODEL} 1 worker |\n|---|---|---|---|---|---|---|");
    for &len in &lengths {
        let t = Arc::new(texts(&probe, len, 4096));
        let (fp32, l6, l3) = (
            config(FP32_MODEL, Device::Cpu),
            config(INT8_MODEL, Device::Cpu),
            config(DEFAULT_MODEL, Device::Cpu),
        );
        let a = through_embedder(&fp32, 1, &t, 16, secs);
        let b = through_embedder(&l6, cores, &t, 16, secs);
        let c = through_embedder(&l3, 1, &t, 16, secs);
        let d = through_embedder(&l3, cores, &t, 16, secs);
        println!(
            "| {len} | {a:.0} | {b:.0} | {c:.0} | {d:.0} | {:.2}x | {:.2}x |",
            d / b.max(1e-9),
            d / a.max(1e-9)
        );
    }
    Ok(())
}

/// The CPU sessions' graph rewrites against ONNX Runtime's defaults
/// (`CPU_DISABLED_FUSIONS`), and, with `--baseline-model FILE` (an earlier
/// `model.int8.onnx`, say), the shipped int8 file against that one: one text
/// per run, each length, the sessions taking turns over `rounds` so all see
/// the same machine; and the worst cosine between the vectors of the
/// baseline and of what the gateway runs.
fn fusions_main() -> Result<(), String> {
    let secs: f64 = arg("--seconds", "1.0").parse().unwrap_or(1.0);
    let rounds: usize = arg("--rounds", "3").parse().unwrap_or(3);
    let lengths = list("--lengths", "16,64,256");
    let baseline = arg("--baseline-model", "");
    println!(
        "# CPU graph rewrites: ONNX Runtime's defaults against the gateway's (less `{}`)\n",
        smartllm_embed::CPU_DISABLED_FUSIONS
    );
    println!("One session each, on a thread of its own as the embedder's workers are; one text per run; texts/s, the best of {rounds} alternating rounds of {secs} s.\n");
    let mut rows: Vec<(String, EmbedderConfig)> = vec![];
    if !baseline.is_empty() {
        let mut cfg = config(INT8_MODEL, Device::Cpu);
        cfg.model = baseline.clone().into();
        rows.push((format!("{baseline} (baseline)"), cfg));
    }
    rows.push((INT8_MODEL.into(), config(INT8_MODEL, Device::Cpu)));
    rows.push((FP32_MODEL.into(), config(FP32_MODEL, Device::Cpu)));
    rows.push((DEFAULT_MODEL.into(), config(DEFAULT_MODEL, Device::Cpu)));
    rows.push((L3_FP32_MODEL.into(), config(L3_FP32_MODEL, Device::Cpu)));
    let probe = Model::load_cpu(&config(INT8_MODEL, Device::Cpu)).map_err(|e| e.to_string())?;
    let sessions = rows
        .iter()
        .map(|(_, cfg)| {
            Ok((
                SessionThread::start(cfg, CpuFusions::OrtDefaults)?,
                SessionThread::start(cfg, CpuFusions::Tuned)?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    println!("| model | tokens | ORT defaults | gateway's rewrites | rewrites / defaults | vs the first row's ORT defaults | worst cosine to the first row's ORT defaults |");
    println!("|---|---|---|---|---|---|---|");
    for &len in &lengths {
        let t = Arc::new(texts(&probe, len, 64));
        let reference = sessions[0].0.call(Task::Vectors(t.clone())).vectors;
        let mut rates = vec![(0f64, 0f64); rows.len()];
        for _ in 0..rounds {
            for (r, (d, g)) in rates.iter_mut().zip(&sessions) {
                r.0 = r.0.max(d.call(Task::Rate(t.clone(), secs)).rate);
                r.1 = r.1.max(g.call(Task::Rate(t.clone(), secs)).rate);
            }
        }
        for (((name, _), (_, tuned)), (rd, rg)) in rows.iter().zip(&sessions).zip(&rates) {
            let worst = tuned
                .call(Task::Vectors(t.clone()))
                .vectors
                .iter()
                .zip(&reference)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
                .fold(1.0f32, f32::min);
            println!(
                "| {name} | {len} | {rd:.0} | {rg:.0} | {:.2}x | {:.2}x | {worst:.4} |",
                rg / rd,
                rg / rates[0].0
            );
        }
    }
    Ok(())
}

enum Task {
    Vectors(Arc<Vec<String>>),
    Rate(Arc<Vec<String>>, f64),
}

#[derive(Default)]
struct Done {
    vectors: Vec<Vec<f32>>,
    rate: f64,
}

/// One session on a long-lived thread of its own.
struct SessionThread {
    tx: std::sync::mpsc::Sender<Task>,
    rx: std::sync::mpsc::Receiver<Done>,
}

impl SessionThread {
    fn start(cfg: &EmbedderConfig, fusions: CpuFusions) -> Result<SessionThread, String> {
        let mut m = Model::load_cpu_with(cfg, fusions).map_err(|e| e.to_string())?;
        let (tx, tasks) = std::sync::mpsc::channel::<Task>();
        let (done, rx) = std::sync::mpsc::channel::<Done>();
        std::thread::spawn(move || {
            for task in tasks {
                let mut one = |t: &str| m.embed(&[t], usize::MAX).expect("embeds").remove(0);
                let out = match task {
                    Task::Vectors(t) => Done {
                        vectors: t.iter().map(|x| one(x)).collect(),
                        ..Done::default()
                    },
                    Task::Rate(t, secs) => {
                        let mut i = 0;
                        let per = per_call(secs, || {
                            i = (i + 1) % t.len();
                            std::hint::black_box(one(&t[i]));
                        });
                        Done {
                            rate: 1e6 / per,
                            ..Done::default()
                        }
                    }
                };
                if done.send(out).is_err() {
                    return;
                }
            }
        });
        Ok(SessionThread { tx, rx })
    }

    fn call(&self, task: Task) -> Done {
        self.tx.send(task).expect("the session thread runs");
        self.rx.recv().expect("the session thread answers")
    }
}

/// Per-call time of `f` over `secs` seconds, in microseconds.
fn per_call(secs: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn verifier_main() -> Result<(), String> {
    let secs: f64 = arg("--seconds", "1.5").parse().unwrap_or(1.5);
    let lengths = list("--lengths", "16,64,256");
    let cfg = config(DEFAULT_MODEL, Device::Cpu);
    let probe = Model::load_cpu(&cfg).map_err(|e| e.to_string())?;
    let embedder = Embedder::load(&cfg).map_err(|e| e.to_string())?;
    let verifier = smartllm_cache::Verifier::for_model(&cfg.model);
    println!("# The cache verifier next to the embedder (the default model, one embedder thread, one text per call; {secs} s per cell)\n");
    println!("| tokens | embedding (µs) | token states (µs) | states / embedding | verifier features + trees (µs) | verifier / embedding |");
    println!("|---|---|---|---|---|---|");
    for &len in &lengths {
        let t = texts(&probe, len, 64);
        let mut i = 0;
        let mut next = || {
            i = (i + 1) % t.len();
            t[i].clone()
        };
        let embed = per_call(secs, || {
            std::hint::black_box(embedder.embed_blocking(vec![next()]).unwrap());
        });
        let states = per_call(secs, || {
            std::hint::black_box(embedder.token_states_blocking(vec![next()]).unwrap());
        });
        let pair = embedder
            .token_states_blocking(vec![t[0].clone(), t[1].clone()])
            .map_err(|e| e.to_string())?;
        let score = per_call(secs, || {
            std::hint::black_box(verifier.score_pair(0.9, &pair[0], &pair[1], smartllm_embed::DIM));
        });
        println!(
            "| {len} | {embed:.0} | {states:.0} | {:.2}x | {score:.1} | {:.3}x |",
            states / embed,
            score / embed
        );
    }
    Ok(())
}

/// The model as a CUDA session runs it: "X.int8.onnx (as X.onnx)" when it
/// runs the fp32 twin (`smartllm_embed::cuda_model`).
fn on_cuda(cfg: &EmbedderConfig) -> String {
    let name = |p: &std::path::Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let runs = smartllm_embed::cuda_model(&cfg.model);
    if runs == cfg.model {
        name(&cfg.model)
    } else {
        format!("{} (as {})", name(&cfg.model), name(&runs))
    }
}

fn gpu_main() -> Result<(), String> {
    let secs: f64 = arg("--seconds", "1.5").parse().unwrap_or(1.5);
    let lengths = list("--lengths", "16,64,256");
    let batches = list("--batches", "1,2,4,8,16,32,64,128,256");
    let threads = list("--threads", "1");
    let workers = list("--workers", "1,2");
    let callers: usize = arg("--callers", "256").parse().unwrap_or(256);
    let default_models = [FP32_MODEL, DEFAULT_MODEL].join(",");
    let models: Vec<String> = arg("--models", &default_models)
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    // The first session loads ONNX Runtime: the CUDA build, here.
    let probe = session(&config(FP32_MODEL, Device::Cuda))?;
    let runtime = local_assets(512).onnxruntime;
    let lib = smartllm_embed::runtime::gpu_runtime(&runtime).unwrap_or(runtime);
    println!("# Embedder throughput on CUDA (texts/s; synthetic texts; {secs} s per cell)\n");
    println!("ONNX Runtime: {}\n", lib.display());
    println!("## Model runs: texts/s by model x sessions x length x batch\n");
    print!("| model | sessions | tokens |");
    for b in &batches {
        print!(" batch {b} |");
    }
    println!();
    print!("|---|---|---|");
    for _ in &batches {
        print!("---|");
    }
    println!();
    // The texts of each length, made once.
    let texts: Vec<(usize, Arc<Vec<String>>)> = lengths
        .iter()
        .map(|&len| (len, Arc::new(texts(&probe, len, 2048))))
        .collect();
    for &w in &threads {
        for (len, t) in &texts {
            for model in &models {
                let cfg = config(model, Device::Cuda);
                let mut runs = sessions(&cfg, w);
                print!("| {} | {w} | {len} |", on_cuda(&cfg));
                for &b in &batches {
                    print!(" {:.0} |", measure(&mut runs, t, b, secs));
                }
                println!();
            }
        }
    }
    println!("\n## The production Embedder on CUDA: {callers} concurrent one-text callers\n");
    println!("| model | workers | tokens | texts/s |\n|---|---|---|---|");
    for model in &models {
        let cfg = config(model, Device::Cuda);
        for &w in &workers {
            for (len, t) in &texts {
                let r = through_embedder(&cfg, w, t, callers, secs);
                println!("| {} | {w} | {len} | {r:.0} |", on_cuda(&cfg));
            }
        }
    }
    Ok(())
}
