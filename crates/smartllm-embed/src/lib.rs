//! Sentence embeddings in-process: tokenizers + ONNX Runtime (ort, `load-dynamic`)
//! running all-MiniLM-L6-v2 on dedicated threads. Callers only see
//! `async fn embed`: requests go through a bounded queue (full = overloaded, never
//! unbounded memory); each worker drains what is queued, tokenizes it, groups
//! the texts by length into micro-batches bounded in padded tokens, runs the
//! model, mean-pools `last_hidden_state` over the attention mask and
//! L2-normalises.
//!
//! Policies, each chosen by measurement (bench/README.md, "Embedder"):
//! - one single-threaded ONNX session per worker, one worker per CPU by
//!   default: two sessions of one thread beat one session of two at every
//!   batch size and length;
//! - on a CPU, one text per model run: batching gains at most ~20% (16
//!   texts of 16 tokens) and loses on long texts, and the int8 model
//!   quantises activations per run, so a text's vector would depend on its
//!   batch-mates; one text per run keeps every text's vector the same
//!   whatever the load. On a GPU, texts are sorted by length and run in
//!   batches of up to [`GPU_BATCH_TOKENS`] padded tokens;
//! - the workers run at a lower CPU priority ([`WORKER_NICE`]) than the
//!   proxy's threads: requests that need no embedding (exact hits, bypass,
//!   fixed models) never wait behind one for a core;
//! - recent embeddings are kept by text ([`EmbedderConfig::cache_entries`]),
//!   so a text seen again (another tenant's same question, a retry) skips
//!   the model; the lookup only ever `try_lock`s, so it never blocks the
//!   caller's (async) thread.
//!
//! `device: cuda` loads the CUDA build of ONNX Runtime fetched by `make
//! assets-gpu` (see [`runtime`]); without a GPU, the driver or those files it
//! runs on the CPU build, and `info().device` says why.

pub mod runtime;

use lru::LruCache;
use smartllm_config::{Device, EmbedderConfig};
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokenizers::{Encoding, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

pub const DIM: usize = 384;
/// Texts per model run (micro-batch size).
pub const METRIC_BATCH_SIZE: &str = "smartllm_embed_batch_size";
/// Model run time per micro-batch.
pub const METRIC_BATCH_SECONDS: &str = "smartllm_embed_batch_seconds";
/// Embeddings answered from the recent-embeddings cache, by result.
pub const METRIC_RECENT: &str = "smartllm_embed_recent_total";
/// Texts taken off the queue per wake-up, at most.
const MAX_DRAIN_TEXTS: usize = 64;
/// ONNX Runtime graph rewrites the CPU sessions leave out (its session
/// config key `optimization.disable_specified_optimizers`, `;`-separated).
/// Its CPU `SkipLayerNormalization` kernel (what `SkipLayerNormFusion` makes
/// of each residual Add + LayerNormalization) is slower than the two ops it
/// replaces: leaving the pair unfused makes one int8 MiniLM run 1.3x faster
/// at 16 and 64 tokens (`embed-bench --fusions`). Vectors move within cosine
/// 0.995 (the int8 activations are re-quantised at slightly different
/// points) and stay as close to the fp32 model's as before.
pub const CPU_DISABLED_FUSIONS: &str = "SkipLayerNormFusion";
/// Padded tokens (texts x longest) per model run on a GPU, at most: 64
/// texts of 256 tokens.
pub const GPU_BATCH_TOKENS: usize = 64 * 256;
/// The same on a CPU: 0, one text per run (see the module doc).
pub const CPU_BATCH_TOKENS: usize = 0;
const BATCH_WAIT: Duration = Duration::from_millis(1);
/// Niceness of the embedder's threads (Linux: per thread).
pub const WORKER_NICE: i32 = 10;
/// Texts longer than this (bytes) are not kept in the recent-embeddings cache.
const RECENT_MAX_TEXT: usize = 4096;
const RECENT_SHARDS: usize = 16;
/// Jobs shed, by reason: `queue_full` (refused at submit) or `queue_wait`
/// (waited longer than `embedder.max_queue_wait`, not run).
pub const METRIC_SHED: &str = "smartllm_embed_shed_total";

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding asset missing: {0} (run packaging/fetch-assets.sh, or set embedder.assets_dir / SMARTLLM_ASSETS_DIR)")]
    MissingAsset(PathBuf),
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Runtime { path: PathBuf, message: String },
    #[error("cannot load the embedding model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("cannot load the tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("embedding failed: {0}")]
    Inference(String),
    #[error("the embedder is overloaded ({0})")]
    Overloaded(&'static str),
    #[error("the embedder has stopped")]
    Stopped,
}

/// What was loaded, for `/readyz` and logs.
#[derive(Debug, Clone)]
pub struct EmbedderInfo {
    pub model: PathBuf,
    pub onnxruntime: PathBuf,
    pub device: String,
    pub threads: usize,
    pub max_seq_len: usize,
    pub dim: usize,
    pub load_ms: u64,
}

type Reply = Result<Vec<Vec<f32>>, EmbedError>;

struct Job {
    texts: Vec<String>,
    /// What to answer: pooled vectors, or each text's token states.
    output: Output,
    reply: oneshot::Sender<Reply>,
    queued: Instant,
}

/// What a model run answers for each text.
#[derive(Debug, Clone, Copy)]
enum Output {
    /// The mean-pooled, unit-length sentence vector (`DIM` values).
    Pooled,
    /// The last hidden state of every token (`[CLS]` and `[SEP]`
    /// included), row after row: `tokens x DIM` values, as they came out.
    Tokens,
    /// The pooled vector (`DIM`), then the [`task_vector_mapped`]
    /// (`TASK_DIM`, through the model's task map if it has one), then,
    /// with `states`, the token states: pooled on the worker's thread, not
    /// the caller's.
    Task {
        states: bool,
        map: Option<&'static [f32]>,
    },
}

/// Jobs with equal outputs share a model run: a task map compares by
/// address (one static per model), not by its 147,456 values.
impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Output::Pooled, Output::Pooled) | (Output::Tokens, Output::Tokens) => true,
            (Output::Task { states: a, map: m }, Output::Task { states: b, map: n }) => {
                a == b && m.map(<[f32]>::as_ptr) == n.map(<[f32]>::as_ptr)
            }
            _ => false,
        }
    }
}

pub struct Embedder {
    tx: SyncSender<Job>,
    info: EmbedderInfo,
    health: Arc<Health>,
    recent: Recent,
    /// Task vectors of recent texts, beside their embeddings (not counted
    /// in the recent-embeddings metric).
    recent_tasks: Recent,
    /// The workers' tokenizer (truncating at `max_seq_len`), for
    /// [`Embedder::window_end`].
    tokenizer: Arc<Tokenizer>,
    /// [`Embedder::fingerprint`], made once at load.
    fingerprint: String,
    /// The model's task map ([`task_map_for`]), if it has one.
    task_map: Option<&'static [f32]>,
}

/// How the worker threads are doing, for `/readyz`: how many still run, and
/// how many model runs in a row failed (a panic included: the worker lives
/// on and answers its callers with the error).
#[derive(Debug, Default)]
struct Health {
    live: std::sync::atomic::AtomicUsize,
    failing: std::sync::atomic::AtomicU64,
    /// When the last run failed (ms since the Unix epoch; 0: never).
    failed_ms: std::sync::atomic::AtomicU64,
}

impl Health {
    fn failed(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.failed_ms.store(now_ms(), Relaxed);
        self.failing.fetch_add(1, Relaxed) + 1
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Failed runs in a row after which the embedder reports itself failing,
/// while the last of them is recent ([`FAILING_FOR`]: with no request
/// needing a run, nothing would clear it).
const FAILING_UNREADY: u64 = 5;
const FAILING_FOR: Duration = Duration::from_secs(60);

/// The longest a caller waits for its answer once queued (a worker stuck
/// in a device call must not hold a request for ever).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts its worker as live until the thread ends, however it ends.
struct LiveWorker(Arc<Health>);

impl Drop for LiveWorker {
    fn drop(&mut self) {
        self.0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The embedder's state as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderHealth {
    /// Worker threads still running (of `EmbedderInfo::threads`).
    pub workers_live: usize,
    /// Model runs in a row that failed (answers waited for in vain
    /// included).
    pub failing_runs: u64,
    /// Seconds since the last of them.
    pub last_failure_s: Option<u64>,
}

impl EmbedderHealth {
    /// Workers run, and runs succeed (or the failures are not recent).
    pub fn ok(&self) -> bool {
        self.workers_live > 0
            && (self.failing_runs < FAILING_UNREADY
                || self
                    .last_failure_s
                    .is_none_or(|s| s >= FAILING_FOR.as_secs()))
    }
}

/// Recent embeddings by text: sharded LRUs, only ever `try_lock`ed (a
/// contended shard is a miss, never a wait).
type Shard = Mutex<LruCache<Box<str>, Arc<[f32]>>>;

struct Recent {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    counted: bool,
}

impl Recent {
    fn new(entries: usize) -> Recent {
        Self::with_metric(entries, true)
    }

    fn with_metric(entries: usize, counted: bool) -> Recent {
        let per_shard = entries.div_ceil(RECENT_SHARDS);
        let shards = NonZeroUsize::new(per_shard)
            .map(|n| {
                (0..RECENT_SHARDS)
                    .map(|_| Mutex::new(LruCache::new(n)))
                    .collect()
            })
            .unwrap_or_default();
        Recent {
            shards,
            hasher: Default::default(),
            counted,
        }
    }

    fn shard(&self, text: &str) -> Option<&Shard> {
        if !self.keeps(text) {
            return None;
        }
        let h = self.hasher.hash_one(text);
        Some(&self.shards[h as usize % self.shards.len()])
    }

    /// Whether `text` would be kept (and so is worth looking up).
    fn keeps(&self, text: &str) -> bool {
        !self.shards.is_empty() && text.len() <= RECENT_MAX_TEXT
    }

    fn get(&self, text: &str) -> Option<Vec<f32>> {
        let shard = self.shard(text)?;
        let found = shard.try_lock().ok()?.get(text).map(|v| v.to_vec());
        if self.counted {
            let result = if found.is_some() { "hit" } else { "miss" };
            metrics::counter!(METRIC_RECENT, "result" => result).increment(1);
        }
        found
    }

    fn put(&self, text: &str, v: &[f32]) {
        if let Some(mut shard) = self.shard(text).and_then(|s| s.try_lock().ok()) {
            shard.put(text.into(), v.into());
        }
    }
}

/// One ONNX session and the tokenizer: what each worker thread runs, and
/// what benchmarks drive directly (any batch policy).
pub struct Model {
    session: ort::session::Session,
    tokenizer: Arc<Tokenizer>,
}

impl Model {
    /// One CPU session of `cfg.model` (blocking).
    pub fn load_cpu(cfg: &EmbedderConfig) -> Result<Model, EmbedError> {
        Self::load_cpu_with(cfg, CpuFusions::Tuned)
    }

    /// One CPU session of `cfg.model` with the given graph rewrites: the
    /// gateway's (`Tuned`), or every ONNX Runtime default (the baseline
    /// `embed-bench --fusions` measures against).
    pub fn load_cpu_with(cfg: &EmbedderConfig, fusions: CpuFusions) -> Result<Model, EmbedError> {
        let rt = runtime::runtime(cfg)?;
        let session =
            build_session_with(&rt.env, cfg, false, fusions).map_err(|e| EmbedError::Model {
                path: cfg.model.clone(),
                message: e.to_string(),
            })?;
        Ok(Model {
            session,
            tokenizer: load_tokenizer(cfg)?,
        })
    }

    /// One session of `cfg.model` on `cfg.device`, and the device it got:
    /// `"cuda"`, or `"cpu (cuda unavailable: WHY)"` (blocking).
    pub fn load(cfg: &EmbedderConfig) -> Result<(Model, String), EmbedError> {
        let rt = runtime::runtime(cfg)?;
        let cfg = &EmbedderConfig {
            model: model_for(cfg),
            ..cfg.clone()
        };
        let (session, device) = device_session(rt, cfg)?;
        let model = Model {
            session,
            tokenizer: load_tokenizer(cfg)?,
        };
        Ok((model, device))
    }

    /// Tokens of `text` as the model sees it (specials included, truncated).
    pub fn tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().len())
            .unwrap_or(0)
    }

    /// Embed `texts` in length-grouped batches of at most `max_tokens`
    /// padded tokens (0: one text per run), in the order given.
    pub fn embed(
        &mut self,
        texts: &[&str],
        max_tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        embed_texts(self, texts, max_tokens, Output::Pooled).map_err(EmbedError::Inference)
    }
}

fn load_tokenizer(cfg: &EmbedderConfig) -> Result<Arc<Tokenizer>, EmbedError> {
    let mut tokenizer =
        Tokenizer::from_file(&cfg.tokenizer).map_err(|e| EmbedError::Tokenizer {
            path: cfg.tokenizer.clone(),
            message: e.to_string(),
        })?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: cfg.max_seq_len,
            ..Default::default()
        }))
        .map_err(|e| EmbedError::Tokenizer {
            path: cfg.tokenizer.clone(),
            message: e.to_string(),
        })?;
    // Padding is ours: batches are grouped by length after tokenizing.
    tokenizer.with_padding(None);
    Ok(Arc::new(tokenizer))
}

/// The model file a CUDA session runs for `model`: its fp32 twin (`X.onnx`
/// beside `X.int8.onnx`: the same network, before its MatMuls were
/// quantized) when there is one, else `model` itself. The int8 models'
/// quantized MatMuls (`DynamicQuantizeLinear`, `MatMulInteger` and their CPU
/// fusions) have no CUDA kernels: ONNX Runtime runs them on the CPU and
/// copies the activations across for each, so on an H200 the default
/// `paraphrase-l3.int8.onnx` ran at 827 texts/s at batch 256 where the fp32
/// L6 model ran 18,812, and got slower as batches grew (bench/README.md,
/// "Embedder on a GPU").
pub fn cuda_model(model: &Path) -> PathBuf {
    model
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".int8.onnx"))
        .map(|stem| model.with_file_name(format!("{stem}.onnx")))
        .filter(|twin| twin.is_file())
        .unwrap_or_else(|| model.to_path_buf())
}

/// The model file `cfg` runs: with `device: cuda`, [`cuda_model`] of the
/// configured one, whether or not CUDA then answers (a CPU fallback runs
/// the same file, so the vector space, and the cache's stored vectors, do
/// not depend on whether the driver was up at this start); the configured
/// one with `device: cpu`.
pub fn model_for(cfg: &EmbedderConfig) -> PathBuf {
    match cfg.device {
        Device::Cuda => cuda_model(&cfg.model),
        Device::Cpu => cfg.model.clone(),
    }
}

/// A session on `cfg.device`: CUDA when asked for and the runtime has it
/// (else the CPU, with the reason in the device string), running
/// `cfg.model` (the caller resolved it with [`model_for`]).
fn device_session(
    rt: &runtime::Runtime,
    cfg: &EmbedderConfig,
) -> Result<(ort::session::Session, String), EmbedError> {
    let model_error = |e: ort::Error| EmbedError::Model {
        path: cfg.model.clone(),
        message: e.to_string(),
    };
    let why = match (&cfg.device, &rt.cuda) {
        (Device::Cpu, _) => {
            return Ok((
                build_session(&rt.env, cfg, false).map_err(model_error)?,
                "cpu".into(),
            ))
        }
        (Device::Cuda, Ok(())) => match build_session(&rt.env, cfg, true) {
            Ok(s) => return Ok((s, "cuda".into())),
            Err(e) => format!("the CUDA execution provider failed: {e}"),
        },
        (Device::Cuda, Err(why)) => why.clone(),
    };
    let session = build_session(&rt.env, cfg, false).map_err(model_error)?;
    Ok((session, format!("cpu (cuda unavailable: {why})")))
}

/// Which graph rewrites a CPU session gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFusions {
    /// ONNX Runtime's defaults less [`CPU_DISABLED_FUSIONS`] (what the
    /// gateway runs).
    Tuned,
    /// Every default rewrite of ONNX Runtime.
    OrtDefaults,
}

fn build_session(
    env: &ort::environment::Environment,
    cfg: &EmbedderConfig,
    cuda: bool,
) -> Result<ort::session::Session, ort::Error> {
    build_session_with(env, cfg, cuda, CpuFusions::Tuned)
}

fn build_session_with(
    env: &ort::environment::Environment,
    cfg: &EmbedderConfig,
    cuda: bool,
    fusions: CpuFusions,
) -> Result<ort::session::Session, ort::Error> {
    let mut builder = ort::session::Session::builder(env)?;
    // The CUDA provider's fused kernels are the fast ones there.
    if !cuda && fusions == CpuFusions::Tuned {
        builder = builder.with_config_entry(
            "optimization.disable_specified_optimizers",
            CPU_DISABLED_FUSIONS,
        )?;
    }
    let mut builder = builder
        .with_intra_threads(1)?
        // Every batch has its own shape (texts x tokens): ONNX Runtime's
        // memory-pattern planner and CPU arena would keep every peak.
        .with_memory_pattern(false)?
        .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])?;
    if cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])?;
    }
    builder.commit_from_file(&cfg.model)
}

/// Lower the calling thread's CPU priority (Linux niceness is per thread;
/// threads it starts later, such as an OpenMP team, inherit it).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn lower_priority(nice: i32) {
    // SAFETY: gettid and setpriority take plain integers and touch no memory
    // of ours; failure (an unprivileged lower bound) only leaves the priority.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        tracing::debug!(nice, "could not lower a background thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_priority(_nice: i32) {}

impl Embedder {
    /// Load the runtime, model and tokenizer and start the worker threads.
    /// Blocking: call it before the async runtime starts or from `spawn_blocking`.
    pub fn load(cfg: &EmbedderConfig) -> Result<Embedder, EmbedError> {
        let started = Instant::now();
        for p in [&cfg.onnxruntime, &cfg.model, &cfg.tokenizer] {
            if !p.is_file() {
                return Err(EmbedError::MissingAsset(p.clone()));
            }
        }
        let rt = runtime::runtime(cfg)?;
        let tokenizer = load_tokenizer(cfg)?;

        // With `device: cuda`, an int8 model's fp32 twin (its int8 MatMuls
        // have no CUDA kernels), on the GPU or on a CPU fallback alike.
        let model = model_for(cfg);
        if model != cfg.model {
            tracing::info!(configured = %cfg.model.display(), model = %model.display(), "embedder.device is cuda: embedding with the fp32 twin of the configured int8 model (its int8 MatMuls would run on the CPU)");
        }
        let cfg = &EmbedderConfig {
            model,
            ..cfg.clone()
        };
        // Hashed once, here, as the sessions are about to read the model:
        // the file they run, so vectors of an int8 model and of its fp32
        // twin are not taken for one another.
        let fingerprint = space_fingerprint(cfg, DIM)?;
        // The first session settles the device: a CUDA one that failed
        // leaves the rest on the CPU.
        let (first, device) = device_session(rt, cfg)?;
        if device != "cuda" && cfg.device == Device::Cuda {
            tracing::warn!(%device, onnxruntime = %rt.lib.display(), "embedder.device is cuda but CUDA is unavailable; embedding on the CPU");
        }
        let mut workers = vec![Model {
            session: first,
            tokenizer: tokenizer.clone(),
        }];
        let threads = match cfg.threads {
            0 if device == "cuda" => 2,
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(64),
            n => n,
        };
        for _ in 1..threads {
            let session = match build_session(&rt.env, cfg, device == "cuda") {
                Ok(s) => s,
                // The GPU has no room for one more session (each holds its
                // own device memory): the ones it has serve.
                Err(e) if device == "cuda" => {
                    tracing::warn!(error = %e, sessions = workers.len(), threads, "no further CUDA embedder session; running with those started");
                    break;
                }
                Err(e) => {
                    return Err(EmbedError::Model {
                        path: cfg.model.clone(),
                        message: e.to_string(),
                    })
                }
            };
            workers.push(Model {
                session,
                tokenizer: tokenizer.clone(),
            });
        }

        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue_depth.max(1));
        let max_wait = cfg.max_queue_wait;
        let rx = Arc::new(Mutex::new(rx));
        let gpu = device == "cuda";
        let health = Arc::new(Health::default());
        let sessions = workers.len();
        for (i, mut w) in workers.into_iter().enumerate() {
            let rx = rx.clone();
            health
                .live
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let live = LiveWorker(health.clone());
            std::thread::Builder::new()
                .name(format!("smartllm-embed-{i}"))
                .spawn(move || {
                    if !gpu {
                        lower_priority(WORKER_NICE);
                    }
                    worker_loop(&mut w, &rx, max_wait, gpu, &live.0)
                })
                .map_err(|e| EmbedError::Inference(format!("cannot start embedder thread: {e}")))?;
        }
        let info = EmbedderInfo {
            model: cfg.model.clone(),
            onnxruntime: rt.lib.clone(),
            device,
            threads: sessions,
            max_seq_len: cfg.max_seq_len,
            dim: DIM,
            load_ms: started.elapsed().as_millis() as u64,
        };
        Ok(Embedder {
            tx,
            info,
            health,
            recent: Recent::new(cfg.cache_entries),
            recent_tasks: Recent::with_metric(cfg.cache_entries, false),
            tokenizer,
            fingerprint,
            task_map: task_map_for(&cfg.model),
        })
    }

    /// The task classifier's whole-text view of a pooled `embedding` (a
    /// text whose task vector is not at hand): the embedding itself, or
    /// through the model's task map. `DIM` values, unit length.
    pub fn whole_task_view(&self, embedding: &[f32]) -> Vec<f32> {
        match self.task_map {
            Some(map) if embedding.len() == DIM => map_view(embedding, map),
            _ => embedding.to_vec(),
        }
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// The identity of the vector space this embedder maps texts into:
    /// `model=<hex16>;tok=<hex16>;seq=<max_seq_len>;dim=<dim>`, from the
    /// content of the model and tokenizer files (hashed once, at load), the
    /// window and the vectors' length. Vectors stored under another
    /// fingerprint are not comparable with this embedder's. Threads and
    /// batching do not change it: they move a vector by rounding only. The
    /// device setting can: `device: cuda` runs an int8 model's fp32 twin,
    /// another file ([`model_for`]), whether CUDA then answers or not.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Where the model's window ends in `text`: the byte offset after the
    /// last token it reads, or None when it reads all of it (what is left
    /// is only whitespace or characters the tokenizer drops). A text longer
    /// than `max_seq_len` tokens is embedded on its beginning alone, so two
    /// texts that share a long beginning embed alike whatever follows.
    /// What the queue cuts off a very long text (see `submit`) is never
    /// read either, however few tokens the rest held: the window then ends
    /// at the cut at the latest.
    /// Blocking (tokenizes on the caller's thread: up to `max_seq_len`
    /// tokens' worth of the text).
    pub fn window_end(&self, text: &str) -> Option<usize> {
        window_end(&self.tokenizer, text)
    }
}

/// [`Embedder::fingerprint`] of the files `cfg` names, as they are now,
/// for vectors of `dim` values (blocking: reads both files through).
fn space_fingerprint(cfg: &EmbedderConfig, dim: usize) -> Result<String, EmbedError> {
    let model = content_hash(&cfg.model).map_err(|e| EmbedError::Model {
        path: cfg.model.clone(),
        message: e.to_string(),
    })?;
    let tok = content_hash(&cfg.tokenizer).map_err(|e| EmbedError::Tokenizer {
        path: cfg.tokenizer.clone(),
        message: e.to_string(),
    })?;
    Ok(format!(
        "model={model:016x};tok={tok:016x};seq={};dim={dim}",
        cfg.max_seq_len
    ))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A 64-bit identity of a file's content: FNV-1a's step (xor, then times
/// the FNV prime), over 8-byte little-endian words and then the last
/// bytes. Fixed here, so it is the same in every build and release (std's
/// hashers promise neither); no defence against forgery, which the
/// operator's own files need none of. Words rather than bytes: a 60 MB
/// model takes 8 times fewer steps (it is hashed at every load, tests'
/// unoptimised builds included). Read in fixed-size blocks, each full but
/// the last, so the words are the same however the reads come back.
fn content_hash(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    const BLOCK: usize = 1 << 16;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK];
    let mut h = FNV_OFFSET;
    loop {
        let mut n = 0;
        while n < BLOCK {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let words = buf[..n].chunks_exact(8);
        let tail = words.remainder();
        for w in words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(FNV_PRIME);
        }
        for &b in tail {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        if n < BLOCK {
            return Ok(h);
        }
    }
}

/// [`Embedder::window_end`] with a given (truncating) tokenizer.
fn window_end(tokenizer: &Tokenizer, text: &str) -> Option<usize> {
    let max = tokenizer.get_truncation().map(|t| t.max_length)?;
    // Fewer bytes than the window has tokens: all of it is read.
    if text.len() + 2 <= max {
        return None;
    }
    // As the workers read it: cut before tokenizing, or whole (up to what
    // the queue keeps) when the cut held fewer tokens than the window.
    let queued = clip(
        text,
        max.saturating_mul(BYTES_PER_TOKEN_BOUND * QUEUED_BOUND_FACTOR),
    );
    let cut = clip(queued, max.saturating_mul(BYTES_PER_TOKEN_BOUND));
    let mut e = tokenizer.encode(cut, true).ok()?;
    if cut.len() < queued.len() && e.get_ids().len() < max {
        e = tokenizer.encode(queued, true).ok()?;
    }
    let end = e.get_offsets().iter().map(|o| o.1).max().unwrap_or(0);
    let end = end.min(queued.len());
    if !text.is_char_boundary(end) {
        return None;
    }
    // What follows in the whole text, not only in what the queue keeps:
    // past the queue's cut nothing is read, even when what was kept held
    // fewer tokens than the window (a blob of hundreds of KB that makes one
    // [UNK], then the question). Two such texts differ only there.
    let rest = &text[end..];
    // Letters, digits, punctuation or symbols past the window: unread.
    rest.chars()
        .any(|c| !c.is_whitespace() && !c.is_control())
        .then_some(end)
}

impl Embedder {
    /// Whether the workers run and their runs succeed (`/readyz`).
    pub fn health(&self) -> EmbedderHealth {
        use std::sync::atomic::Ordering::Relaxed;
        let failed = self.health.failed_ms.load(Relaxed);
        EmbedderHealth {
            workers_live: self.health.live.load(Relaxed),
            failing_runs: self.health.failing.load(Relaxed),
            last_failure_s: (failed > 0).then(|| now_ms().saturating_sub(failed) / 1000),
        }
    }

    /// Await a worker's reply, no longer than [`REPLY_TIMEOUT`] (a wait in
    /// vain counts as a failed run: a worker stuck in a device call).
    async fn reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, EmbedError>>,
    ) -> Result<T, EmbedError> {
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Ok(r) => r.map_err(|_| EmbedError::Stopped)?,
            Err(_) => {
                self.health.failed();
                Err(EmbedError::Inference(format!(
                    "no answer within {REPLY_TIMEOUT:?}"
                )))
            }
        }
    }

    /// The same for a blocking caller (a blocking-pool thread, a tool):
    /// [`wait_reply`] with [`REPLY_TIMEOUT`].
    fn reply_blocking<T>(
        &self,
        rx: oneshot::Receiver<Result<T, EmbedError>>,
    ) -> Result<T, EmbedError> {
        wait_reply(&self.health, rx, REPLY_TIMEOUT)
    }

    fn submit(
        &self,
        mut texts: Vec<String>,
        output: Output,
    ) -> Result<oneshot::Receiver<Reply>, EmbedError> {
        // Only the first `max_seq_len` tokens count: a prompt of megabytes
        // is not queued whole. (The worker cuts tighter before tokenizing,
        // and takes up to this much when the tighter cut held too few tokens.)
        let cap = self
            .info
            .max_seq_len
            .saturating_mul(BYTES_PER_TOKEN_BOUND * QUEUED_BOUND_FACTOR);
        for t in &mut texts {
            let keep = clip(t, cap).len();
            if keep < t.len() {
                t.truncate(keep);
                t.shrink_to_fit();
            }
        }
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job {
            texts,
            output,
            reply,
            queued: Instant::now(),
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                metrics::counter!(METRIC_SHED, "reason" => "queue_full").increment(1);
                Err(EmbedError::Overloaded("queue full"))
            }
            Err(TrySendError::Disconnected(_)) => Err(EmbedError::Stopped),
        }
    }

    /// For a one-text request the cache may keep: the recent-embeddings
    /// answer, or (`Err`) the text to remember once embedded.
    fn recent(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Option<String>> {
        match texts {
            [one] if self.recent.keeps(one) => match self.recent.get(one) {
                Some(v) => Ok(vec![v]),
                None => Err(Some(one.clone())),
            },
            _ => Err(None),
        }
    }

    fn remember(&self, text: Option<String>, vectors: &[Vec<f32>]) {
        if let (Some(text), [v]) = (text, vectors) {
            self.recent.put(&text, v);
        }
    }

    /// Embed `texts` (unit-length 384-d vectors), off the caller's thread.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let keep = match self.recent(&texts) {
            Ok(v) => return Ok(v),
            Err(keep) => keep,
        };
        let rx = self.submit(texts, Output::Pooled)?;
        let vectors = self.reply(rx).await?;
        self.remember(keep, &vectors);
        Ok(vectors)
    }

    /// The same, for synchronous callers (CLI tools, tests).
    pub fn embed_blocking(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let keep = match self.recent(&texts) {
            Ok(v) => return Ok(v),
            Err(keep) => keep,
        };
        let rx = self.submit(texts, Output::Pooled)?;
        let vectors = self.reply_blocking(rx)?;
        self.remember(keep, &vectors);
        Ok(vectors)
    }

    /// Each text's token states, off the caller's thread (see
    /// [`Self::token_states_blocking`]).
    pub async fn token_states(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let rx = self.submit(texts, Output::Tokens)?;
        self.reply(rx).await
    }

    /// Each text's [`task_vector`] (the router's task classifier's view),
    /// from one model run per text. Blocking: for blocking-pool threads and
    /// tools.
    pub fn task_vectors_blocking(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(self
            .token_states_blocking(texts)?
            .iter()
            .map(|s| task_vector_mapped(s, self.task_map))
            .collect())
    }

    /// A text's embedding, [`task_vector`] and (with `with_states`, else
    /// empty) token states from one model run, all pooled on the embedder's
    /// thread. The embedding is remembered like [`Self::embed`]'s, the task
    /// vector in its own recent cache.
    pub async fn embed_with_task(
        &self,
        text: String,
        with_states: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), EmbedError> {
        let rx = self.submit(
            vec![text.clone()],
            Output::Task {
                states: with_states,
                map: self.task_map,
            },
        )?;
        let mut out = self.reply(rx).await?.pop().unwrap_or_default();
        if out.len() < DIM + TASK_DIM {
            return Err(EmbedError::Inference("model output too short".into()));
        }
        let states = out.split_off(DIM + TASK_DIM);
        let t = out.split_off(DIM);
        self.recent.put(&text, &out);
        self.recent_tasks.put(&text, &t);
        Ok((out, t, states))
    }

    /// The task vector of `text` if a recent [`Self::embed_with_task`] made
    /// one (never waits: a busy shard is a miss).
    pub fn recent_task_vector(&self, text: &str) -> Option<Vec<f32>> {
        self.recent_tasks.get(text)
    }

    /// The recent-embeddings cache's vector of `text`, if it holds one
    /// (never waits: a busy shard is a miss).
    pub fn recent_embedding(&self, text: &str) -> Option<Vec<f32>> {
        self.recent.get(text)
    }

    /// Each text's token states (the model's last hidden state, one row of
    /// [`DIM`] values per token, `[CLS]` and `[SEP]` included), for the
    /// cache's verifier; on the embedder's threads like any embedding.
    /// Blocking: for blocking-pool threads and tools.
    pub fn token_states_blocking(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let rx = self.submit(texts, Output::Tokens)?;
        self.reply_blocking(rx)
    }
}

/// Wait on this thread for a worker's reply, no longer than `timeout` (a
/// wait in vain counts as a failed run, as in [`Embedder::reply`]): a
/// worker stuck in a device call must not hold a lookup's blocking thread
/// for ever. Needs no async runtime (tools call it from plain threads).
/// Giving up drops `rx`, so the worker skips the job if it gets to it.
fn wait_reply<T>(
    health: &Health,
    rx: oneshot::Receiver<Result<T, EmbedError>>,
    timeout: Duration,
) -> Result<T, EmbedError> {
    match block_on_timeout(rx, timeout) {
        Some(r) => r.map_err(|_| EmbedError::Stopped)?,
        None => {
            health.failed();
            Err(EmbedError::Inference(format!(
                "no answer within {timeout:?}"
            )))
        }
    }
}

/// Poll `fut` on this thread until it is ready, or None once `timeout` has
/// passed: `blocking_recv` with a deadline. Its waker unparks this thread,
/// which parks in between (a wake before the park is not lost: the park
/// then returns at once).
fn block_on_timeout<F: std::future::Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    use std::task::{Context, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }

    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        // (It may wake early, unparked for nothing: the loop polls again.)
        std::thread::park_timeout(left);
    }
}

/// Whether nobody waits for the job's answer any more: its caller dropped
/// the receiver (the client left, or it gave up after [`REPLY_TIMEOUT`]).
/// Such a job is not run: under load, its model time is another's wait.
fn abandoned(job: &Job) -> bool {
    job.reply.is_closed()
}

/// Answers a job that waited too long with `Overloaded` instead of running it:
/// under overload the queue's wait, not the model, would set the latency.
/// A job whose caller has gone is dropped unanswered.
fn fresh(job: Job, max_wait: Duration) -> Option<Job> {
    if abandoned(&job) {
        return None;
    }
    if job.queued.elapsed() <= max_wait {
        return Some(job);
    }
    metrics::counter!(METRIC_SHED, "reason" => "queue_wait").increment(1);
    let _ = job.reply.send(Err(EmbedError::Overloaded(
        "queue wait over embedder.max_queue_wait",
    )));
    None
}

/// Take one job (blocking); with `gather`, also whatever else arrives within
/// `BATCH_WAIT`, up to `MAX_DRAIN_TEXTS` texts. `None` when the embedder is
/// dropped. Without `gather` (CPU: one text per run) a worker holds the queue
/// only to take one job, so the workers run side by side.
fn drain(rx: &Mutex<Receiver<Job>>, max_wait: Duration, gather: bool) -> Option<Vec<Job>> {
    // (Nothing panics while holding it; were it poisoned, the queue is whole.)
    let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
    let mut jobs = Vec::new();
    loop {
        if let Some(j) = fresh(rx.recv().ok()?, max_wait) {
            jobs.push(j);
            break;
        }
    }
    if !gather {
        return Some(jobs);
    }
    let deadline = Instant::now() + BATCH_WAIT;
    let mut n: usize = jobs[0].texts.len();
    while n < MAX_DRAIN_TEXTS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(j) => {
                if let Some(j) = fresh(j, max_wait) {
                    n += j.texts.len();
                    jobs.push(j);
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(jobs)
}

/// Micro-batches of `lens` (token counts, in any order): indices sorted by
/// length, cut wherever one more text would take the batch's padded size
/// (texts x longest) over `max_tokens` (0: one text per batch).
pub fn plan_batches(lens: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending: the newcomer is the batch's longest.
        if !current.is_empty() && (current.len() + 1) * lens[i].max(1) > max_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn worker_loop(
    w: &mut Model,
    rx: &Mutex<Receiver<Job>>,
    max_wait: Duration,
    gpu: bool,
    health: &Health,
) {
    let max_tokens = if gpu {
        GPU_BATCH_TOKENS
    } else {
        CPU_BATCH_TOKENS
    };
    while let Some(mut all) = drain(rx, max_wait, gpu) {
        // One run per kind of output (a GPU drain mixes them).
        while let Some(output) = all.first().map(|j| j.output) {
            let (mut jobs, rest): (Vec<Job>, Vec<Job>) =
                all.into_iter().partition(|j| j.output == output);
            all = rest;
            // Callers may have gone since the drain took their jobs (while
            // it gathered, or during the run of another kind before).
            jobs.retain(|j| !abandoned(j));
            if jobs.is_empty() {
                continue;
            }
            let ok = answer(w, jobs, max_tokens, output);
            if ok {
                health
                    .failing
                    .store(0, std::sync::atomic::Ordering::Relaxed);
            } else if health.failed() == FAILING_UNREADY {
                tracing::error!(
                    runs = FAILING_UNREADY,
                    "embedding runs keep failing; /readyz reports the embedder unready until one succeeds"
                );
            }
        }
    }
}

/// Run `jobs` (all of one `output`) together and answer each; whether the
/// run succeeded. A panic in the run (the tokenizer, ONNX Runtime's
/// bindings) is answered as an error, and the worker goes on.
fn answer(w: &mut Model, jobs: Vec<Job>, max_tokens: usize, output: Output) -> bool {
    answer_with(jobs, &mut |texts: &[&str]| {
        embed_texts(w, texts, max_tokens, output)
    })
}

/// One model run over texts (in `answer`, the worker's model).
type RunFn<'a> = dyn FnMut(&[&str]) -> Result<Vec<Vec<f32>>, String> + 'a;

/// `answer` over any `run`. When a run of several jobs fails (a device out
/// of memory for the whole drain, one text the model cannot take), each job
/// is run again on its own and only those that fail again are answered with
/// the error; true when any run succeeded.
fn answer_with(jobs: Vec<Job>, run: &mut RunFn<'_>) -> bool {
    let texts: Vec<&str> = jobs
        .iter()
        .flat_map(|j| j.texts.iter().map(String::as_str))
        .collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&texts)))
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            Err(format!("the embedding run panicked: {why}"))
        });
    let texts = texts.len();
    match outcome {
        Ok(mut vectors) if vectors.len() == texts => {
            for job in jobs {
                let rest = vectors.split_off(job.texts.len());
                let mine = std::mem::replace(&mut vectors, rest);
                let _ = job.reply.send(Ok(mine));
            }
            true
        }
        Ok(vectors) => {
            let e = format!(
                "the run answered {} vectors for {texts} texts",
                vectors.len()
            );
            fail(jobs, e, run)
        }
        Err(e) => fail(jobs, e, run),
    }
}

/// A failed run of `jobs`: each on its own again when there are several.
fn fail(jobs: Vec<Job>, e: String, run: &mut RunFn<'_>) -> bool {
    let texts: usize = jobs.iter().map(|j| j.texts.len()).sum();
    if jobs.len() > 1 {
        tracing::warn!(error = %e, jobs = jobs.len(), texts, "embedding run failed; its requests are run again one by one");
        let mut any = false;
        // (Not for a caller that gave up during the failed run.)
        for job in jobs.into_iter().filter(|j| !abandoned(j)) {
            any |= answer_with(vec![job], run);
        }
        return any;
    }
    tracing::warn!(error = %e, texts, "embedding run failed");
    for job in jobs {
        let _ = job.reply.send(Err(EmbedError::Inference(e.clone())));
    }
    false
}

/// Bytes of text that surely hold more than one token (English averages
/// about 4 a token): a text is cut at `max_seq_len` times this before it is
/// tokenized, which leaves its first `max_seq_len` tokens, all the model
/// reads, as they were (the tokenizer would encode all of it, then truncate).
const BYTES_PER_TOKEN_BOUND: usize = 64;

/// How much more than the worker's cut a queued text keeps (a text of few
/// tokens for its bytes is tokenized up to this).
const QUEUED_BOUND_FACTOR: usize = 16;

/// The first `n` bytes of `t` or fewer (cut at a character's start).
fn clip(t: &str, n: usize) -> &str {
    if t.len() <= n {
        return t;
    }
    let mut end = n;
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// Tokenize `texts`, run them in length-grouped micro-batches, and return
/// their vectors in the order given.
fn embed_texts(
    w: &mut Model,
    texts: &[&str],
    max_tokens: usize,
    output: Output,
) -> Result<Vec<Vec<f32>>, String> {
    // One by one on this worker's thread: `encode_batch` hands even a single
    // text to rayon's pool (another thread, woken and waited for, at the
    // proxy's priority), and the workers already use every CPU.
    let cap = w.tokenizer.get_truncation().map_or(usize::MAX, |t| {
        t.max_length.saturating_mul(BYTES_PER_TOKEN_BOUND)
    });
    let encodings = texts
        .iter()
        .map(|t| {
            let cut = clip(t, cap);
            let e = w.tokenizer.encode(cut, true)?;
            // A text of few tokens for its bytes (long runs of spaces, words
            // the tokenizer cannot split): whole, as before.
            if cut.len() < t.len() && e.get_ids().len() < cap / BYTES_PER_TOKEN_BOUND {
                return w.tokenizer.encode(*t, true);
            }
            Ok(e)
        })
        .collect::<Result<Vec<Encoding>, _>>()
        .map_err(|e| e.to_string())?;
    let lens: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    for batch in plan_batches(&lens, max_tokens) {
        let t = Instant::now();
        let group: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
        let vectors = run_batch(&mut w.session, &group, output)?;
        metrics::histogram!(METRIC_BATCH_SIZE).record(batch.len() as f64);
        metrics::histogram!(METRIC_BATCH_SECONDS).record(t.elapsed().as_secs_f64());
        for (i, v) in batch.into_iter().zip(vectors) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// One model run over `encodings`, padded to the longest.
fn run_batch(
    session: &mut ort::session::Session,
    encodings: &[&Encoding],
    output: Output,
) -> Result<Vec<Vec<f32>>, String> {
    let batch = encodings.len();
    let seq = encodings
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = Vec::with_capacity(batch * seq);
    let mut mask = Vec::with_capacity(batch * seq);
    let mut types = Vec::with_capacity(batch * seq);
    for e in encodings {
        let pad = seq - e.get_ids().len();
        ids.extend(
            e.get_ids()
                .iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(0, pad)),
        );
        mask.extend(
            e.get_attention_mask()
                .iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(0, pad)),
        );
        types.extend(
            e.get_type_ids()
                .iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    let shape = [batch, seq];
    let t = |v: Vec<i64>| ort::value::Tensor::from_array((shape, v)).map_err(|e| e.to_string());
    let inputs = ort::inputs![
        "input_ids" => t(ids)?,
        "attention_mask" => t(mask.clone())?,
        "token_type_ids" => t(types)?,
    ];
    let outputs = session.run(inputs).map_err(|e| e.to_string())?;
    let (out_shape, data) = outputs["last_hidden_state"]
        .try_extract_tensor::<f32>()
        .map_err(|e| e.to_string())?;
    let dims: Vec<i64> = out_shape.iter().copied().collect();
    if dims.len() != 3 || dims[0] as usize != batch || dims[1] as usize != seq {
        return Err(format!("unexpected output shape {dims:?}"));
    }
    let hidden = dims[2] as usize;
    Ok(match output {
        Output::Pooled => mean_pool_normalize(data, &mask, batch, seq, hidden),
        Output::Tokens => token_rows(data, &mask, batch, seq, hidden),
        Output::Task { states, map } => token_rows(data, &mask, batch, seq, hidden)
            .into_iter()
            .map(|rows| {
                let mut out = pool(&rows);
                out.extend(task_vector_mapped(&rows, map));
                if states {
                    out.extend(rows);
                }
                out
            })
            .collect(),
    })
}

/// Each text's rows where `mask` is 1 (its tokens, padding dropped).
fn token_rows(
    data: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    hidden: usize,
) -> Vec<Vec<f32>> {
    (0..batch)
        .map(|b| {
            (0..seq)
                .filter(|&s| mask[b * seq + s] != 0)
                .flat_map(|s| &data[(b * seq + s) * hidden..(b * seq + s + 1) * hidden])
                .copied()
                .collect()
        })
        .collect()
}

/// A text's embedding from its token states ([`Embedder::token_states`]):
/// the same vector [`Embedder::embed`] answers (mean, then unit length).
pub fn pool(states: &[f32]) -> Vec<f32> {
    let n = states.len() / DIM;
    mean_pool_normalize(states, &vec![1; n], 1, n, DIM)
        .pop()
        .unwrap_or_default()
}

/// Tokens (`[CLS]` included) whose mean is a text's "head" view for the
/// router's task classifier: the instruction usually opens a prompt ("Write
/// a function…", "summarize: …", "Translate…"), while the whole text's mean
/// is dominated by what it is about.
pub const HEAD_TOKENS: usize = 32;
/// Length of a [`task_vector`]: the whole text's view and the head view.
pub const TASK_DIM: usize = 2 * DIM;

/// The task classifier's vector of a text, from its token states
/// ([`Embedder::token_states`]): `[mean ; sqrt(2) * head] / sqrt(3)`, both
/// unit length, so the dot product of two such vectors is
/// `(cos(mean, mean') + 2 cos(head, head')) / 3`, the weighting chosen by
/// leave-one-collection-out validation on the training collections
/// (`data/router/tasks/task_views.py`; bench/README.md, "Task classifier"). Its first [`DIM`] values are the
/// embedding ([`pool`]) divided by sqrt(3).
pub fn task_vector(states: &[f32]) -> Vec<f32> {
    let n = states.len() / DIM;
    let head = n.min(HEAD_TOKENS);
    let whole = pool(states);
    let head = mean_pool_normalize(&states[..head * DIM], &vec![1; head], 1, head, DIM)
        .pop()
        .unwrap_or_default();
    let (a, b) = (1.0 / 3f32.sqrt(), (2.0f32 / 3.0).sqrt());
    whole
        .iter()
        .map(|x| x * a)
        .chain(head.iter().map(|x| x * b))
        .collect()
}

/// [`task_vector`] with both views put through a task map first (`DIM` x
/// `DIM`, row-major: a view `x` maps to `x W`), then made unit length
/// again; without a map, [`task_vector`] itself.
pub fn task_vector_mapped(states: &[f32], map: Option<&[f32]>) -> Vec<f32> {
    let v = task_vector(states);
    let Some(map) = map else {
        return v;
    };
    let (a, b) = (1.0 / 3f32.sqrt(), (2.0f32 / 3.0).sqrt());
    let whole = map_view(&v[..DIM], map);
    let head = map_view(&v[DIM..], map);
    whole
        .iter()
        .map(|x| x * a)
        .chain(head.iter().map(|x| x * b))
        .collect()
}

/// `x W`, unit length (`W` is `DIM` x `DIM`, row-major).
fn map_view(x: &[f32], map: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; DIM];
    for (xi, row) in x.iter().zip(map.chunks_exact(DIM)) {
        for (o, w) in out.iter_mut().zip(row) {
            *o += xi * w;
        }
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    out.iter_mut().for_each(|v| *v /= norm);
    out
}

/// The task map of the model file at `model`: the default model
/// (paraphrase-MiniLM-L3-v2, `paraphrase-l3*.onnx`) has one, fitted by
/// `data/router/tasks/make_task_map.py` to bring its views of a text close
/// to all-MiniLM-L6-v2's, whose views tell tasks apart better (the task
/// classifier's leave-one-collection-out accuracy: 50.1% on the model's
/// own views, 56.3% mapped, 57.5% on all-MiniLM-L6's). Other files: none.
pub fn task_map_for(model: &Path) -> Option<&'static [f32]> {
    static L3: OnceLock<Vec<f32>> = OnceLock::new();
    let name = model.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.starts_with("paraphrase-l3") {
        return None;
    }
    Some(L3.get_or_init(|| {
        include_bytes!("task-map-l3.bin")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }))
}

/// Mean over the positions where `mask` is 1, then L2 normalisation.
pub fn mean_pool_normalize(
    data: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    hidden: usize,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut v = vec![0f32; hidden];
        let mut count = 0f32;
        for s in 0..seq {
            if mask[b * seq + s] == 0 {
                continue;
            }
            count += 1.0;
            let row = &data[(b * seq + s) * hidden..(b * seq + s + 1) * hidden];
            for (acc, x) in v.iter_mut().zip(row) {
                *acc += x;
            }
        }
        let count = count.max(1.0);
        v.iter_mut().for_each(|x| *x /= count);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        out.push(v);
    }
    out
}

/// The default model file: paraphrase-MiniLM-L3-v2 with its attention
/// fused and its MatMuls in int8 (fetch-assets.sh makes it).
pub const DEFAULT_MODEL: &str = "paraphrase-l3.int8.onnx";
/// paraphrase-MiniLM-L3-v2 computed in fp32, with the gateway's input and
/// output names (the reference for [`DEFAULT_MODEL`]).
pub const L3_FP32_MODEL: &str = "paraphrase-l3.onnx";
/// all-MiniLM-L6-v2 with MatMuls in int8 (the default before 2026-12-02).
pub const INT8_MODEL: &str = "model.int8.onnx";
/// all-MiniLM-L6-v2 as published (int8-stored weights, computed in fp32).
pub const FP32_MODEL: &str = "model.onnx";

/// The embedder config for the assets fetched by `packaging/fetch-assets.sh`
/// (`SMARTLLM_ASSETS_DIR`, else `~/.cache/smartllm-assets`), CPU, one thread,
/// the default (int8) model, no recent-embeddings cache: for tests,
/// benchmarks and tools.
pub fn local_assets(max_seq_len: usize) -> EmbedderConfig {
    let dir = std::env::var("SMARTLLM_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/smartllm-assets")
        });
    EmbedderConfig {
        model: dir.join(DEFAULT_MODEL),
        tokenizer: dir.join("tokenizer.json"),
        onnxruntime: dir.join("libonnxruntime.so.1.31.1"),
        threads: 1,
        max_seq_len,
        device: Device::Cpu,
        queue_depth: 256,
        max_queue_wait: Duration::from_millis(250),
        cache_entries: 0,
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread lowers its own priority, not the process's: the caller's
    /// stays, a thread it starts afterwards inherits it.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(unsafe_code)]
    fn lowering_a_threads_priority_leaves_the_others() {
        // SAFETY: plain integer calls on this process's own threads.
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = nice();
        let (own, child) = std::thread::spawn(move || {
            lower_priority(19);
            let child = std::thread::spawn(nice).join().unwrap();
            (nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!((own, child), (19, 19));
        assert_eq!(nice(), before);
    }

    #[test]
    fn pooling_ignores_padding() {
        // batch 1, seq 3 (last is padding), hidden 2
        let data = [1.0, 0.0, 3.0, 0.0, 100.0, 100.0];
        let v = mean_pool_normalize(&data, &[1, 1, 0], 1, 3, 2);
        assert_eq!(v[0], vec![1.0, 0.0]);
        let data = [3.0, 4.0];
        let v = mean_pool_normalize(&data, &[1], 1, 1, 2);
        assert!((v[0][0] - 0.6).abs() < 1e-6 && (v[0][1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn a_long_text_is_cut_before_tokenizing_without_changing_its_tokens() {
        assert_eq!(clip("h\u{e9}llo", 2), "h");
        assert_eq!(clip("short", 64), "short");
        let Some(cfg) = assets() else { return };
        let m = Model::load_cpu(&cfg).unwrap();
        let text = "The quick brown fox jumps over the lazy dog; ".repeat(2000);
        let cap = cfg.max_seq_len * BYTES_PER_TOKEN_BOUND;
        assert!(clip(&text, cap).len() < text.len());
        let full = m.tokenizer.encode(text.as_str(), true).unwrap();
        let cut = m.tokenizer.encode(clip(&text, cap), true).unwrap();
        assert_eq!(full.get_ids(), cut.get_ids());
        assert_eq!(full.get_ids().len(), cfg.max_seq_len);
        // A text of few tokens for its bytes is encoded whole: 20,000
        // spaces make no token, and the words after them still count.
        let mut m = m;
        let spaced = format!("{}hello world", " ".repeat(20_000));
        let v = m.embed(&[spaced.as_str(), "hello world"], 0).unwrap();
        assert!(v[0].iter().zip(&v[1]).all(|(a, b)| (a - b).abs() < 1e-5));
        // The same through the embedder's queue (which cuts texts too).
        let e = Embedder::load(&cfg).unwrap();
        let v = e
            .embed_blocking(vec![spaced.clone(), "hello world".into()])
            .unwrap();
        assert!(v[0].iter().zip(&v[1]).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    /// The window's end: None for a text the model reads whole; past the
    /// last token read for a longer one, so what follows can be compared.
    #[test]
    fn the_window_ends_where_the_model_stops_reading() {
        let Some(cfg) = assets() else { return };
        let t = load_tokenizer(&cfg).unwrap();
        assert_eq!(window_end(&t, "What is the capital of France?"), None);
        assert_eq!(window_end(&t, "short text, then spaces   \n\n  "), None);
        let rules = "Follow these rules when you classify the review. ".repeat(60);
        let long = format!("{rules}Review: the box arrived crushed");
        let end = window_end(&t, &long).expect("past the window");
        assert!(end < rules.len(), "{end} of {}", long.len());
        // What the model read, and only that.
        let read = t.encode(&long[..end], true).unwrap();
        assert!(
            read.get_ids().len() + 2 >= cfg.max_seq_len,
            "{}",
            read.len()
        );
        // Spaces make no tokens: the words after them are read.
        let spaced = format!("{}hello world", " ".repeat(20_000));
        assert_eq!(window_end(&t, &spaced), None);
    }

    /// A BERT-like tokenizer (WordPiece, `[CLS]` and `[SEP]`, no
    /// lower-casing) of a few words, truncating at `max` tokens: window
    /// tests that need no assets.
    fn toy_tokenizer(max: usize) -> Tokenizer {
        use tokenizers::models::wordpiece::WordPiece;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        use tokenizers::processors::bert::BertProcessing;
        let words = [
            "[UNK]", "[CLS]", "[SEP]", "what", "is", "this", "explain", "it", "?", ".",
        ];
        let vocab: [(String, u32); 10] = std::array::from_fn(|i| (words[i].to_string(), i as u32));
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(BertPreTokenizer));
        t.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), 2),
            ("[CLS]".into(), 1),
        )));
        t.with_truncation(Some(TruncationParams {
            max_length: max,
            ..Default::default()
        }))
        .unwrap();
        t
    }

    /// What the queue cuts off a text (past `max_seq_len` KiB) is never
    /// read, however few tokens the part it keeps held: a hex blob (one
    /// `[UNK]`) then a question ends its window at the cut at the latest,
    /// so two such prompts with different questions have different unread
    /// tails. A shorter blob, kept whole, is read to its end.
    #[test]
    fn nothing_past_the_queues_cut_is_read() {
        let check = |t: &Tokenizer, max: usize| {
            let cap = max * BYTES_PER_TOKEN_BOUND * QUEUED_BOUND_FACTOR;
            let blob = "0123456789abcdef".repeat(cap / 16 + 4096);
            let a = format!("{blob} what is this?");
            let b = format!("{blob} explain it.");
            let end = window_end(t, &a).expect("the queue's cut is past the window");
            assert!(end <= cap, "{end} of {}", a.len());
            assert_eq!(window_end(t, &b), Some(end));
            assert!(a[end..].ends_with(" what is this?"));
            assert!(b[end..].ends_with(" explain it."));
            let short = format!("{} what is this?", &blob[..cap / 2]);
            assert_eq!(window_end(t, &short), None);
        };
        check(&toy_tokenizer(128), 128);
        let Some(cfg) = assets() else { return };
        check(&load_tokenizer(&cfg).unwrap(), cfg.max_seq_len);
    }

    /// A blocking wait for a worker gives up after its timeout and counts a
    /// failed run (the job is then skipped: its receiver is gone); an
    /// answer in time wakes it, and a worker that drops the job is
    /// `Stopped`, not a timeout.
    #[test]
    fn a_blocking_wait_for_a_stuck_worker_times_out() {
        use std::sync::atomic::Ordering::Relaxed;
        let health = Health::default();
        let (stuck, rx) = oneshot::channel::<Reply>();
        let t = Instant::now();
        let r = wait_reply(&health, rx, Duration::from_millis(50));
        assert!(
            matches!(r, Err(EmbedError::Inference(ref e)) if e.contains("no answer")),
            "{r:?}"
        );
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(health.failing.load(Relaxed), 1);
        assert!(stuck.is_closed());

        let (tx, rx) = oneshot::channel::<Reply>();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = tx.send(Ok(vec![vec![1.0]]));
        });
        let r = wait_reply(&health, rx, Duration::from_secs(30));
        assert_eq!(r.unwrap(), vec![vec![1.0]]);
        sender.join().unwrap();

        let (tx, rx) = oneshot::channel::<Reply>();
        drop(tx);
        let r = wait_reply(&health, rx, Duration::from_secs(30));
        assert!(matches!(r, Err(EmbedError::Stopped)), "{r:?}");
        assert_eq!(health.failing.load(Relaxed), 1);
    }

    /// A job whose caller has gone (its receiver dropped) is not run: a
    /// drain passes over it, gathering or not, and a failed run's retries
    /// one by one skip it.
    #[test]
    fn jobs_whose_caller_has_gone_are_not_run() {
        let job = |text: &str| {
            let (reply, rx) = oneshot::channel();
            (
                Job {
                    texts: vec![text.to_string()],
                    output: Output::Pooled,
                    reply,
                    queued: Instant::now(),
                },
                rx,
            )
        };
        let wait = Duration::from_secs(60);
        let (gone, rx) = job("gone");
        drop(rx);
        assert!(fresh(gone, wait).is_none());
        let (live, _rx) = job("live");
        assert!(fresh(live, wait).is_some());

        let (tx, queue) = mpsc::sync_channel(8);
        let queue = Mutex::new(queue);
        for gather in [false, true] {
            let (a, ra) = job("gone");
            drop(ra);
            let (b, _rb) = job("live");
            tx.send(a).unwrap();
            tx.send(b).unwrap();
            let jobs = drain(&queue, wait, gather).unwrap();
            let texts: Vec<&str> = jobs
                .iter()
                .flat_map(|j| j.texts.iter().map(String::as_str))
                .collect();
            assert_eq!(texts, ["live"], "gather {gather}");
        }

        let (a, mut ra) = job("one");
        let (b, mut rb) = job("poison");
        let (c, rc) = job("three");
        drop(rc);
        let mut runs: Vec<Vec<String>> = Vec::new();
        let mut run = |texts: &[&str]| {
            runs.push(texts.iter().map(|t| t.to_string()).collect());
            if texts.contains(&"poison") {
                return Err("out of memory".to_string());
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        };
        assert!(answer_with(vec![a, b, c], &mut run));
        assert_eq!(
            runs,
            [vec!["one", "poison", "three"], vec!["one"], vec!["poison"]]
        );
        assert_eq!(ra.try_recv().unwrap().unwrap(), vec![vec![3.0]]);
        assert!(rb.try_recv().unwrap().is_err());
    }

    /// On CUDA an int8 model runs as its fp32 twin when the twin is there;
    /// any other model (and an int8 one without a twin) runs as configured.
    #[test]
    fn cuda_runs_the_fp32_twin_of_an_int8_model() {
        let dir = std::env::temp_dir().join(format!("smartllm-embed-twin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "paraphrase-l3.int8.onnx",
            "paraphrase-l3.onnx",
            "model.int8.onnx",
            "own.int8.onnx",
            "plain.onnx",
        ] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        assert_eq!(
            cuda_model(&dir.join("paraphrase-l3.int8.onnx")),
            dir.join("paraphrase-l3.onnx")
        );
        // No model.onnx beside it: the int8 model itself.
        assert_eq!(
            cuda_model(&dir.join("model.int8.onnx")),
            dir.join("model.int8.onnx")
        );
        std::fs::write(dir.join("model.onnx"), b"x").unwrap();
        assert_eq!(
            cuda_model(&dir.join("model.int8.onnx")),
            dir.join("model.onnx")
        );
        assert_eq!(cuda_model(&dir.join("plain.onnx")), dir.join("plain.onnx"));
        assert_eq!(
            cuda_model(&dir.join("own.int8.onnx")),
            dir.join("own.int8.onnx")
        );
        // A twin that is a directory is no model.
        std::fs::create_dir_all(dir.join("own.onnx")).unwrap();
        assert_eq!(
            cuda_model(&dir.join("own.int8.onnx")),
            dir.join("own.int8.onnx")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The fingerprint follows the model's and the tokenizer's content, the
    /// window and the vectors' length, and nothing else of the config.
    #[test]
    fn the_fingerprint_names_the_vector_space() {
        let dir =
            std::env::temp_dir().join(format!("smartllm-embed-fingerprint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = local_assets(256);
        cfg.model = dir.join("model.onnx");
        cfg.tokenizer = dir.join("tokenizer.json");
        // Over one read block, and not a whole number of words.
        let model: Vec<u8> = (0..200_003u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&cfg.model, &model).unwrap();
        std::fs::write(&cfg.tokenizer, b"{\"version\": \"1.0\"}").unwrap();
        let f = space_fingerprint(&cfg, DIM).unwrap();
        assert!(
            f.starts_with("model=") && f.ends_with(";seq=256;dim=384"),
            "{f}"
        );
        assert_eq!(f.len(), "model=;tok=;seq=256;dim=384".len() + 32, "{f}");
        assert_eq!(space_fingerprint(&cfg, DIM).unwrap(), f);
        // Threads, device, queueing and the recent cache: the same space.
        let other = EmbedderConfig {
            threads: 8,
            device: Device::Cuda,
            queue_depth: 1,
            max_queue_wait: Duration::from_secs(5),
            cache_entries: 100,
            ..cfg.clone()
        };
        assert_eq!(space_fingerprint(&other, DIM).unwrap(), f);
        // Another window or length: another space.
        let shorter = EmbedderConfig {
            max_seq_len: 128,
            ..cfg.clone()
        };
        assert_ne!(space_fingerprint(&shorter, DIM).unwrap(), f);
        assert_ne!(space_fingerprint(&cfg, 2 * DIM).unwrap(), f);
        // One byte of the model (in a word, in the last bytes), or the
        // tokenizer: another space.
        let tok = |fp: &str| fp[fp.find(";tok=").unwrap()..].to_string();
        for at in [100_001, 200_002] {
            let mut changed = model.clone();
            changed[at] ^= 1;
            std::fs::write(&cfg.model, &changed).unwrap();
            let g = space_fingerprint(&cfg, DIM).unwrap();
            assert_ne!(g, f, "byte {at}");
            assert_eq!(tok(g.as_str()), tok(f.as_str()));
        }
        std::fs::write(&cfg.model, &model).unwrap();
        std::fs::write(&cfg.tokenizer, b"{\"version\": \"1.1\"}").unwrap();
        let h = space_fingerprint(&cfg, DIM).unwrap();
        assert_ne!(tok(h.as_str()), tok(f.as_str()));
        assert_eq!(h[..h.find(";tok=").unwrap()], f[..f.find(";tok=").unwrap()]);
        // A file gone: the load's error for it.
        std::fs::remove_file(&cfg.tokenizer).unwrap();
        assert!(matches!(
            space_fingerprint(&cfg, DIM),
            Err(EmbedError::Tokenizer { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two embedders over the same files share a fingerprint, whatever
    /// their threads; another window makes another.
    #[test]
    fn embedders_over_the_same_files_share_a_fingerprint() {
        let Some(cfg) = assets() else {
            eprintln!("skipped: no embedder assets");
            return;
        };
        let a = Embedder::load(&cfg).unwrap();
        let b = Embedder::load(&EmbedderConfig {
            threads: 2,
            ..cfg.clone()
        })
        .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = Embedder::load(&EmbedderConfig {
            max_seq_len: 256,
            ..cfg.clone()
        })
        .unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(
            c.fingerprint().ends_with(";seq=256;dim=384"),
            "{}",
            c.fingerprint()
        );
    }

    #[test]
    fn a_failed_run_of_several_requests_fails_only_the_one_that_fails_alone() {
        let job = |texts: &[&str]| {
            let (reply, rx) = oneshot::channel();
            (
                Job {
                    texts: texts.iter().map(|t| t.to_string()).collect(),
                    output: Output::Pooled,
                    reply,
                    queued: Instant::now(),
                },
                rx,
            )
        };
        let (a, mut ra) = job(&["one", "two"]);
        let (b, mut rb) = job(&["poison"]);
        let (c, mut rc) = job(&["three"]);
        let mut runs = 0;
        let mut run = |texts: &[&str]| {
            runs += 1;
            if texts.contains(&"poison") {
                if texts.len() == 1 {
                    panic!("cannot take it");
                }
                return Err("out of memory".to_string());
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        };
        assert!(answer_with(vec![a, b, c], &mut run));
        assert_eq!(runs, 4, "the drain, then each request alone");
        assert_eq!(ra.try_recv().unwrap().unwrap(), vec![vec![3.0], vec![3.0]]);
        assert!(matches!(
            rb.try_recv().unwrap(),
            Err(EmbedError::Inference(e)) if e.contains("cannot take it")
        ));
        assert_eq!(rc.try_recv().unwrap().unwrap(), vec![vec![5.0]]);
        // One request alone is not run twice; a short answer is a failure.
        let (d, mut rd) = job(&["x", "y"]);
        let mut short = |_: &[&str]| Ok(vec![vec![1.0]]);
        assert!(!answer_with(vec![d], &mut short));
        assert!(rd.try_recv().unwrap().is_err());
    }

    #[test]
    fn health_counts_live_workers_and_failing_runs() {
        let h = |workers_live, failing_runs| EmbedderHealth {
            workers_live,
            failing_runs,
            last_failure_s: (failing_runs > 0).then_some(1),
        };
        assert!(h(1, FAILING_UNREADY - 1).ok());
        assert!(!h(1, FAILING_UNREADY).ok());
        assert!(!h(0, 0).ok());
        // Failures long past no longer count: nothing may have needed a
        // run since.
        let old = EmbedderHealth {
            last_failure_s: Some(FAILING_FOR.as_secs()),
            ..h(1, FAILING_UNREADY)
        };
        assert!(old.ok());
        let Some(mut cfg) = assets() else { return };
        cfg.threads = 2;
        let e = Embedder::load(&cfg).unwrap();
        e.embed_blocking(vec!["hello there".into()]).unwrap();
        assert_eq!(e.health(), h(2, 0));
        // A worker that ends is no longer counted.
        let health = e.health.clone();
        drop(e);
        for _ in 0..200 {
            if health.live.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(health.live.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    fn assets() -> Option<EmbedderConfig> {
        let cfg = local_assets(128);
        cfg.model.is_file().then_some(cfg)
    }

    fn reference(file: &str) -> (usize, Vec<String>, Vec<Vec<f32>>) {
        // CARGO_MANIFEST_DIR at run time: the test binary may come from a
        // shared target dir built in another checkout.
        let dir: std::path::PathBuf = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        let text = std::fs::read_to_string(dir.join("testdata").join(file)).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sentences: Vec<String> = reference["sentences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let want: Vec<Vec<f32>> = reference["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let max_seq_len = reference["max_seq_len"].as_u64().unwrap() as usize;
        (max_seq_len, sentences, want)
    }

    /// Vectors of each text alone and inside one request of all, with their
    /// cosine to `want`: at least `min`, or `min_one_word` for texts of
    /// one word (3 tokens with [CLS] and [SEP]).
    fn cosines(model: &str, min: f32, min_one_word: f32) {
        // Each model family against its own fp32 reference.
        let file = if model.starts_with("paraphrase-l3") {
            "reference-l3.json"
        } else {
            "reference.json"
        };
        let (max_seq_len, sentences, want) = reference(file);
        let mut cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        cfg.max_seq_len = max_seq_len;
        cfg.model = cfg.model.with_file_name(model);
        let e = Embedder::load(&cfg).unwrap();
        let batched = e.embed_blocking(sentences.clone()).unwrap();
        for (i, s) in sentences.iter().enumerate() {
            let alone = e.embed_blocking(vec![s.clone()]).unwrap().pop().unwrap();
            let c1 = cosine(&alone, &want[i]);
            let c2 = cosine(&batched[i], &want[i]);
            let min = if s.split_whitespace().count() == 1 && s.len() < 4 {
                min_one_word
            } else {
                min
            };
            assert!(
                c1 >= min && c2 >= min,
                "{model} sentence {i} {s:?}: alone {c1}, batched {c2} (want >= {min})"
            );
        }
    }

    /// Vectors made by the onnxruntime Python package from model.onnx
    /// (packaging/make-reference-vectors.py, fp32 compute): ours must match
    /// within cosine 0.999, one text at a time and inside micro-batches.
    /// A loaded embedder has told ONNX Runtime not to send telemetry (its
    /// 1DS client only listens to `ORT_DISABLE_TELEMETRY`).
    #[test]
    fn onnx_runtime_telemetry_is_off_once_loaded() {
        let Some(cfg) = assets() else {
            eprintln!("skipped: no embedder assets");
            return;
        };
        let _e = Embedder::load(&cfg).unwrap();
        assert_eq!(
            std::env::var("ORT_DISABLE_TELEMETRY").ok().as_deref(),
            Some("1")
        );
    }

    #[test]
    fn matches_python_onnxruntime_reference_vectors() {
        cosines(FP32_MODEL, 0.999, 0.999);
    }

    /// The int8 model (MatMuls in int8) stays within cosine 0.99 of the
    /// fp32-compute reference vectors (0.9892 measured on a one-letter text,
    /// 0.9921 at worst on the others).
    #[test]
    fn int8_model_stays_within_cosine_0_99_of_fp32() {
        cosines(INT8_MODEL, 0.99, 0.985);
    }

    /// The default model (paraphrase-MiniLM-L3-v2): the fp32 file matches
    /// the onnxruntime Python package's vectors of the file as published
    /// (packaging/make-reference-vectors.py --l3), and the fused int8 file
    /// stays within cosine 0.99 of them.
    #[test]
    fn default_model_matches_its_fp32_reference() {
        cosines(L3_FP32_MODEL, 0.999, 0.999);
        cosines(DEFAULT_MODEL, 0.99, 0.985);
    }

    /// The default model's task map is compiled in and applied to both
    /// views; the all-MiniLM-L6 files have none.
    #[test]
    fn the_task_map_goes_with_the_default_model() {
        let dir = Path::new("/usr/share/smartllm");
        assert!(task_map_for(&dir.join(INT8_MODEL)).is_none());
        assert!(task_map_for(&dir.join(FP32_MODEL)).is_none());
        let map = task_map_for(&dir.join(DEFAULT_MODEL)).unwrap();
        assert_eq!(map.len(), DIM * DIM);
        assert!(map.iter().all(|x| x.is_finite()) && map.iter().any(|&x| x != 0.0));
        assert!(std::ptr::eq(
            map,
            task_map_for(&dir.join(L3_FP32_MODEL)).unwrap()
        ));
        let states: Vec<f32> = (0..40 * DIM)
            .map(|i| ((i * 7919) % 97) as f32 - 48.0)
            .collect();
        let plain = task_vector(&states);
        let mapped = task_vector_mapped(&states, Some(map));
        assert_eq!(task_vector_mapped(&states, None), plain);
        assert_eq!(mapped.len(), TASK_DIM);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm(&mapped[..DIM]) - 1.0 / 3f32.sqrt()).abs() < 1e-4);
        assert!((norm(&mapped[DIM..]) - (2.0f32 / 3.0).sqrt()).abs() < 1e-4);
        assert_ne!(mapped, plain);
        // The whole view alone maps as the first half of the task vector.
        let whole = map_view(&pool(&states), map);
        let first: Vec<f32> = mapped[..DIM].iter().map(|x| x * 3f32.sqrt()).collect();
        assert!(cosine(&whole, &first) > 0.9999);
    }

    #[test]
    fn batches_are_grouped_by_length_and_bounded_in_padded_tokens() {
        // Sorted by length; 16 x 16 fits 256, the 17th short text starts a new batch.
        let lens = vec![16; 17];
        let b = plan_batches(&lens, 256);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 1]);
        // Mixed lengths: short ones together, long ones alone.
        let lens = [250, 10, 60, 12, 64, 11, 256];
        let b = plan_batches(&lens, 256);
        assert_eq!(b, vec![vec![1, 5, 3, 2], vec![4], vec![0], vec![6]]);
        // Every index exactly once.
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        // Unbounded: one batch; 0 (the CPU policy): one text per batch.
        assert_eq!(plan_batches(&lens, usize::MAX).len(), 1);
        assert_eq!(plan_batches(&lens, CPU_BATCH_TOKENS).len(), lens.len());
        assert!(plan_batches(&[], 256).is_empty());
        // A text longer than the bound still runs, alone.
        assert_eq!(plan_batches(&[300, 300], 256), vec![vec![0], vec![1]]);
    }

    /// A text seen before is answered from the recent-embeddings cache with
    /// the same vector, without a model run.
    #[test]
    fn recent_embeddings_are_reused() {
        let mut cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        cfg.cache_entries = 64;
        let e = Embedder::load(&cfg).unwrap();
        let text = "How many moons does Jupiter have?".to_string();
        let first = e.embed_blocking(vec![text.clone()]).unwrap();
        assert!(e.recent.get(&text).is_some());
        let again = e.embed_blocking(vec![text.clone()]).unwrap();
        assert_eq!(first, again);
        // Not kept: texts of multi-text requests, over-long texts; a zero-size cache keeps nothing.
        e.embed_blocking(vec!["a".into(), "b".into()]).unwrap();
        assert!(e.recent.get("a").is_none());
        let long = "x".repeat(RECENT_MAX_TEXT + 1);
        e.embed_blocking(vec![long.clone()]).unwrap();
        assert!(e.recent.get(&long).is_none());
        assert!(Recent::new(0).get(&text).is_none());
    }

    /// `device: cuda` without a usable CUDA execution provider (no GPU, no
    /// GPU assets, or the CPU build already loaded by another test of this
    /// process) falls back to CPU, saying why. tests/gpu.rs covers the
    /// choice of the CUDA build in a process of its own.
    #[test]
    fn cuda_request_falls_back_to_cpu() {
        let mut cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        cfg.device = Device::Cuda;
        let e = Embedder::load(&cfg).unwrap();
        if e.info().device == "cuda" {
            // A GPU build on a GPU machine: CUDA really runs.
            assert_eq!(e.embed_blocking(vec!["gpu".into()]).unwrap()[0].len(), DIM);
            return;
        }
        assert!(
            e.info().device.starts_with("cpu (cuda unavailable: "),
            "{}",
            e.info().device
        );
        assert_eq!(
            e.embed_blocking(vec!["fallback works".into()]).unwrap()[0].len(),
            DIM
        );
    }

    #[test]
    fn real_model_embeds_and_ranks_paraphrases() {
        // `make test` fetches the assets first; a bare `cargo test` without them fails loudly.
        let cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        let e = Embedder::load(&cfg).unwrap();
        let v = e
            .embed_blocking(vec![
                "How do I reset my password?".into(),
                "What is the way to reset my password?".into(),
                "The stock market fell sharply today.".into(),
            ])
            .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].len(), DIM);
        let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        let close = cosine(&v[0], &v[1]);
        let far = cosine(&v[0], &v[2]);
        assert!(close > 0.8 && far < 0.3, "close {close} far {far}");
        // Same text alone and inside a padded batch: same vector.
        let alone = e
            .embed_blocking(vec!["What is the way to reset my password?".into()])
            .unwrap();
        assert!(cosine(&alone[0], &v[1]) > 0.9999);
    }

    /// Token states: one row per token, `[CLS]` and `[SEP]` included, no
    /// padding (a short text next to a long one in the same job), and pooled
    /// they are the text's embedding.
    #[test]
    fn token_states_pool_to_the_embedding() {
        let cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        let e = Embedder::load(&cfg).unwrap();
        let texts = vec![
            "Reset my password".to_string(),
            "What is the fastest way to reset the password of my account?".to_string(),
        ];
        let states = e.token_states_blocking(texts.clone()).unwrap();
        let vectors = e.embed_blocking(texts).unwrap();
        // [CLS] reset my password [SEP]
        assert_eq!(states[0].len(), 5 * DIM);
        assert!(states[1].len() > states[0].len() && states[1].len().is_multiple_of(DIM));
        for (s, v) in states.iter().zip(&vectors) {
            assert!(cosine(&pool(s), v) > 0.99999);
        }
    }

    #[test]
    fn task_vectors_are_the_embedding_and_the_head_weighted_double() {
        // Synthetic states: 40 tokens, the first 32 along one axis, the
        // rest along another.
        let mut states = vec![0f32; 40 * DIM];
        for t in 0..40 {
            states[t * DIM + usize::from(t >= HEAD_TOKENS)] = 1.0;
        }
        let v = task_vector(&states);
        assert_eq!(v.len(), TASK_DIM);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        // First half: the embedding over sqrt(3); second: the head (axis 0
        // only) times sqrt(2/3).
        let whole = pool(&states);
        for (a, b) in v[..DIM].iter().zip(&whole) {
            assert!((a * 3f32.sqrt() - b).abs() < 1e-5);
        }
        assert!((v[DIM] - (2.0f32 / 3.0).sqrt()).abs() < 1e-5);
        assert!(v[DIM + 1].abs() < 1e-6);
        // Two texts whose heads agree and whose rests differ are closer than
        // their embeddings alone say.
        let mut other = states.clone();
        for t in HEAD_TOKENS..40 {
            other[t * DIM + 1] = 0.0;
            other[t * DIM + 2] = 1.0;
        }
        let w = task_vector(&other);
        let tv: f32 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!(tv > cosine(&whole, &pool(&other)));
        // Shorter than the head: the head is the whole text.
        let short = task_vector(&states[..3 * DIM]);
        assert!((short[0] * 3f32.sqrt() - short[DIM] * 1.5f32.sqrt()).abs() < 1e-5);
    }

    /// Under overload the embedder refuses work (full queue) or drops work that
    /// waited too long, instead of letting the queue set the latency.
    #[test]
    fn overload_is_shed_not_queued() {
        let run = |queue_depth: usize, max_queue_wait: Duration| {
            let mut cfg = assets()
                .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
            cfg.max_seq_len = 256;
            cfg.queue_depth = queue_depth;
            cfg.max_queue_wait = max_queue_wait;
            let e = Arc::new(Embedder::load(&cfg).unwrap());
            let text = "a long sentence about routing, caching and costs ".repeat(20);
            let threads: Vec<_> = (0..48)
                .map(|i| {
                    let (e, text) = (e.clone(), format!("{i} {text}"));
                    std::thread::spawn(move || e.embed_blocking(vec![text]))
                })
                .collect();
            let (mut ok, mut shed) = (0, 0);
            for t in threads {
                match t.join().unwrap() {
                    Ok(v) => {
                        assert_eq!(v[0].len(), DIM);
                        ok += 1;
                    }
                    Err(EmbedError::Overloaded(_)) => shed += 1,
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            (ok, shed)
        };
        // A queue of 2: most of 48 simultaneous callers are refused at once.
        let (ok, shed) = run(2, Duration::from_secs(10));
        assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
        // A deep queue but a 50 ms wait bound: jobs behind the first batches
        // are dropped (48 texts of ~200 tokens are several hundred ms of
        // work). 1 ms was too short for the first job on a loaded machine:
        // the workers run at nice +10 and may not be scheduled that soon.
        let (ok, shed) = run(1024, Duration::from_millis(50));
        assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
    }
}
