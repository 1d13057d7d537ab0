//! `embedder:` of `smartllm.yaml`: the embedding model's files (under the
//! assets directory, which `SMARTLLM_ASSETS_DIR` overrides), device, threads
//! and queue bounds.

use super::{relative_to, ENV_ASSETS_DIR};
use crate::raw::RawEmbedder;
use crate::{Device, EmbedderConfig, Issues, MAIN_FILE};
use std::path::Path;
use std::time::Duration;

pub(super) fn resolve_embedder(dir: &Path, e: RawEmbedder, v: &mut Issues<'_>) -> EmbedderConfig {
    let assets_dir = std::env::var(ENV_ASSETS_DIR)
        .ok()
        .filter(|s| !s.is_empty())
        .or(e.assets_dir)
        .unwrap_or_else(|| "/usr/share/smartllm".to_string());
    let assets_dir = relative_to(dir, &assets_dir);
    let device = match e.device.as_deref().unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => {
            v.push(
                MAIN_FILE,
                "embedder.device",
                format!("unknown device {other:?}: use cpu or cuda"),
            );
            Device::Cpu
        }
    };
    let max_seq_len = e.max_seq_len.unwrap_or(256);
    if !(8..=512).contains(&max_seq_len) {
        v.push(
            MAIN_FILE,
            "embedder.max_seq_len",
            "must be between 8 and 512 (the model's limit)",
        );
    }
    if e.threads == Some(0) || e.threads.is_some_and(|t| t > 64) {
        v.push(MAIN_FILE, "embedder.threads", "must be between 1 and 64");
    }
    let queue_depth = e.queue_depth.unwrap_or(256);
    if !(1..=65_536).contains(&queue_depth) {
        v.push(
            MAIN_FILE,
            "embedder.queue_depth",
            "must be between 1 and 65536",
        );
    }
    let max_queue_wait = e
        .max_queue_wait
        .map(|d| d.0)
        .unwrap_or(Duration::from_millis(250));
    if max_queue_wait.is_zero() {
        v.push(MAIN_FILE, "embedder.max_queue_wait", "must be above 0");
    }
    EmbedderConfig {
        model: assets_dir.join(e.model.unwrap_or_else(|| "paraphrase-l3.int8.onnx".into())),
        tokenizer: assets_dir.join(e.tokenizer.unwrap_or_else(|| "tokenizer.json".into())),
        onnxruntime: assets_dir.join(
            e.onnxruntime
                .unwrap_or_else(|| "libonnxruntime.so.1.31.1".into()),
        ),
        // One single-threaded ONNX session per CPU by default: measured
        // faster than one session with intra-op threads at every batch size
        // and length (bench/README.md, "Embedder"). With `device: cuda`,
        // decided once the device is known (0): two sessions on a GPU (one
        // runs while the other gathers its batch; each holds its own device
        // memory), one per CPU when it fell back.
        threads: match (e.threads, device) {
            (Some(t), _) => t.clamp(1, 64),
            (None, Device::Cuda) => 0,
            (None, Device::Cpu) => cpu_count().clamp(1, 64),
        },
        cache_entries: e.cache_entries.unwrap_or(4096).min(1 << 20),
        max_seq_len: max_seq_len.clamp(8, 512),
        device,
        queue_depth: queue_depth.clamp(1, 65_536),
        max_queue_wait: max_queue_wait.max(Duration::from_millis(1)),
    }
}

/// The CPUs this process may use.
fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
