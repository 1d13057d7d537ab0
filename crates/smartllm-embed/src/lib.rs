//! Sentence embeddings in-process: tokenizers + ONNX Runtime (ort, `load-dynamic`)
//! running all-MiniLM-L6-v2 on dedicated threads. Callers only see
//! `async fn embed`: requests go through a bounded queue (full = overloaded, never
//! unbounded memory), each worker drains what is queued into one batch, runs the
//! model, mean-pools `last_hidden_state` over the attention mask and L2-normalises.

use smartllm_config::{Device, EmbedderConfig};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

pub const DIM: usize = 384;
/// Texts per model run (micro-batch size).
pub const METRIC_BATCH_SIZE: &str = "smartllm_embed_batch_size";
/// Model run time per micro-batch.
pub const METRIC_BATCH_SECONDS: &str = "smartllm_embed_batch_seconds";
const MAX_BATCH_TEXTS: usize = 32;
const BATCH_WAIT: Duration = Duration::from_millis(1);
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
    reply: oneshot::Sender<Reply>,
    queued: Instant,
}

pub struct Embedder {
    tx: SyncSender<Job>,
    info: EmbedderInfo,
}

static ENVIRONMENT: OnceLock<Result<Arc<ort::environment::Environment>, String>> = OnceLock::new();

fn environment(lib: &Path) -> Result<Arc<ort::environment::Environment>, EmbedError> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder = ort::init_from(lib).map_err(|e| e.to_string())?;
            builder
                .with_name("smartllm")
                .build()
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|message| EmbedError::Runtime {
            path: lib.to_path_buf(),
            message,
        })
}

struct Worker {
    session: ort::session::Session,
    tokenizer: Arc<Tokenizer>,
}

fn build_session(
    env: &ort::environment::Environment,
    cfg: &EmbedderConfig,
    cuda: bool,
) -> Result<ort::session::Session, ort::Error> {
    let mut builder = ort::session::Session::builder(env)?
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
        let env = environment(&cfg.onnxruntime)?;
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
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let tokenizer = Arc::new(tokenizer);

        let mut device = "cpu".to_string();
        let mut workers = Vec::new();
        for _ in 0..cfg.threads {
            let want_cuda = cfg.device == Device::Cuda && device != "cpu (cuda unavailable)";
            let session = match build_session(&env, cfg, want_cuda) {
                Ok(s) => {
                    if want_cuda {
                        device = "cuda".into();
                    }
                    s
                }
                Err(e) if want_cuda => {
                    tracing::warn!(error = %e, "embedder.device is cuda but the CUDA execution provider is unavailable; falling back to CPU");
                    device = "cpu (cuda unavailable)".into();
                    build_session(&env, cfg, false).map_err(|e| EmbedError::Model {
                        path: cfg.model.clone(),
                        message: e.to_string(),
                    })?
                }
                Err(e) => {
                    return Err(EmbedError::Model {
                        path: cfg.model.clone(),
                        message: e.to_string(),
                    })
                }
            };
            workers.push(Worker {
                session,
                tokenizer: tokenizer.clone(),
            });
        }

        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue_depth.max(1));
        let max_wait = cfg.max_queue_wait;
        let rx = Arc::new(Mutex::new(rx));
        for (i, mut w) in workers.into_iter().enumerate() {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("smartllm-embed-{i}"))
                .spawn(move || worker_loop(&mut w, &rx, max_wait))
                .map_err(|e| EmbedError::Inference(format!("cannot start embedder thread: {e}")))?;
        }
        let info = EmbedderInfo {
            model: cfg.model.clone(),
            onnxruntime: cfg.onnxruntime.clone(),
            device,
            threads: cfg.threads,
            max_seq_len: cfg.max_seq_len,
            dim: DIM,
            load_ms: started.elapsed().as_millis() as u64,
        };
        Ok(Embedder { tx, info })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn submit(&self, texts: Vec<String>) -> Result<oneshot::Receiver<Reply>, EmbedError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job {
            texts,
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

    /// Embed `texts` (unit-length 384-d vectors), off the caller's thread.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(texts)?.await.map_err(|_| EmbedError::Stopped)?
    }

    /// The same, for synchronous callers (CLI tools, tests).
    pub fn embed_blocking(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(texts)?
            .blocking_recv()
            .map_err(|_| EmbedError::Stopped)?
    }
}

/// Answers a job that waited too long with `Overloaded` instead of running it:
/// under overload the queue's wait, not the model, would set the latency.
fn fresh(job: Job, max_wait: Duration) -> Option<Job> {
    if job.queued.elapsed() <= max_wait {
        return Some(job);
    }
    metrics::counter!(METRIC_SHED, "reason" => "queue_wait").increment(1);
    let _ = job.reply.send(Err(EmbedError::Overloaded(
        "queue wait over embedder.max_queue_wait",
    )));
    None
}

fn worker_loop(w: &mut Worker, rx: &Mutex<Receiver<Job>>, max_wait: Duration) {
    loop {
        // Take one job, then whatever else arrives within BATCH_WAIT, up to the batch size.
        let mut jobs = Vec::new();
        {
            let Ok(rx) = rx.lock() else { return };
            loop {
                match rx.recv() {
                    Ok(j) => {
                        if let Some(j) = fresh(j, max_wait) {
                            jobs.push(j);
                            break;
                        }
                    }
                    Err(_) => return,
                }
            }
            let deadline = Instant::now() + BATCH_WAIT;
            let mut n: usize = jobs[0].texts.len();
            while n < MAX_BATCH_TEXTS {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => {
                        if let Some(j) = fresh(j, max_wait) {
                            n += j.texts.len();
                            jobs.push(j);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        let texts: Vec<&str> = jobs
            .iter()
            .flat_map(|j| j.texts.iter().map(String::as_str))
            .collect();
        match run_batch(w, &texts) {
            Ok(mut vectors) => {
                for job in jobs {
                    let rest = vectors.split_off(job.texts.len());
                    let mine = std::mem::replace(&mut vectors, rest);
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(EmbedError::Inference(e.clone())));
                }
            }
        }
    }
}

fn run_batch(w: &mut Worker, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
    let encodings = w
        .tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| e.to_string())?;
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
    for e in &encodings {
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
    let outputs = w.session.run(inputs).map_err(|e| e.to_string())?;
    let (out_shape, data) = outputs["last_hidden_state"]
        .try_extract_tensor::<f32>()
        .map_err(|e| e.to_string())?;
    let dims: Vec<i64> = out_shape.iter().copied().collect();
    if dims.len() != 3 || dims[0] as usize != batch || dims[1] as usize != seq {
        return Err(format!("unexpected output shape {dims:?}"));
    }
    let hidden = dims[2] as usize;
    Ok(mean_pool_normalize(data, &mask, batch, seq, hidden))
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

/// The embedder config for the assets fetched by `packaging/fetch-assets.sh`
/// (`SMARTLLM_ASSETS_DIR`, else `~/.cache/smartllm-assets`), CPU, one thread:
/// for tests, benchmarks and tools.
pub fn local_assets(max_seq_len: usize) -> EmbedderConfig {
    let dir = std::env::var("SMARTLLM_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/smartllm-assets")
        });
    EmbedderConfig {
        model: dir.join("model.onnx"),
        tokenizer: dir.join("tokenizer.json"),
        onnxruntime: dir.join("libonnxruntime.so.1.31.1"),
        threads: 1,
        max_seq_len,
        device: Device::Cpu,
        queue_depth: 256,
        max_queue_wait: Duration::from_millis(250),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn assets() -> Option<EmbedderConfig> {
        let cfg = local_assets(128);
        cfg.model.is_file().then_some(cfg)
    }

    /// Vectors made by the onnxruntime Python package from the same model file
    /// (packaging/make-reference-vectors.py): ours must match within cosine 0.999,
    /// one text at a time and inside padded micro-batches.
    #[test]
    fn matches_python_onnxruntime_reference_vectors() {
        // CARGO_MANIFEST_DIR at run time: the test binary may come from a
        // shared target dir built in another checkout.
        let dir: std::path::PathBuf = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        let text = std::fs::read_to_string(dir.join("testdata/reference.json")).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut cfg = assets()
            .expect("embedding assets missing: run packaging/fetch-assets.sh (make test does)");
        cfg.max_seq_len = reference["max_seq_len"].as_u64().unwrap() as usize;
        let e = Embedder::load(&cfg).unwrap();
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
        let batched = e.embed_blocking(sentences.clone()).unwrap();
        for (i, s) in sentences.iter().enumerate() {
            let alone = e.embed_blocking(vec![s.clone()]).unwrap().pop().unwrap();
            let c1 = cosine(&alone, &want[i]);
            let c2 = cosine(&batched[i], &want[i]);
            assert!(
                c1 >= 0.999 && c2 >= 0.999,
                "sentence {i} {s:?}: alone {c1}, batched {c2}"
            );
        }
    }

    /// `device: cuda` without a usable CUDA execution provider (the CPU build of
    /// ONNX Runtime here, or no GPU) falls back to CPU with a warning.
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
        assert_eq!(e.info().device, "cpu (cuda unavailable)");
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
        // A deep queue but a 1 ms wait bound: jobs behind the first batches are dropped.
        let (ok, shed) = run(1024, Duration::from_millis(1));
        assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
    }
}
