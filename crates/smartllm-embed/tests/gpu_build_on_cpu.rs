//! What `make assets-gpu` fetched works before any GPU is involved (a
//! process of its own: ONNX Runtime loads once, and the CUDA libraries
//! stay loaded): the CUDA libraries load in [`CUDA_LIBS`] order (none needs
//! the driver to load), and the CUDA build of ONNX Runtime, named as
//! `embedder.onnxruntime` with `device: cpu`, gives the fp32 reference
//! vectors. Skipped, saying so, without the GPU assets.

use smartllm_config::Device;
use smartllm_embed::runtime::{gpu_runtime, preload_cuda_libs, CUDA_LIBS};
use smartllm_embed::{cosine, local_assets, Embedder, FP32_MODEL};

mod common;
use common::reference;

#[test]
fn the_fetched_cuda_libraries_load_and_the_cuda_build_runs_cpu_sessions() {
    let (sentences, want, max_seq_len) = reference();
    let mut cfg = local_assets(max_seq_len);
    let Some(gpu_lib) = gpu_runtime(&cfg.onnxruntime) else {
        eprintln!(
            "skipped: no GPU assets beside {} (make assets-gpu)",
            cfg.onnxruntime.display()
        );
        return;
    };
    let dir = gpu_lib.parent().unwrap();
    preload_cuda_libs(dir).unwrap();
    assert!(CUDA_LIBS.iter().all(|l| dir.join(l).is_file()));
    cfg.onnxruntime = gpu_lib.clone();
    cfg.model = cfg.model.with_file_name(FP32_MODEL);
    cfg.device = Device::Cpu;
    let e = Embedder::load(&cfg).unwrap();
    assert_eq!(e.info().onnxruntime, gpu_lib);
    assert_eq!(e.info().device, "cpu");
    let got = e.embed_blocking(sentences.clone()).unwrap();
    for (i, s) in sentences.iter().enumerate() {
        let c = cosine(&got[i], &want[i]);
        assert!(c >= 0.999, "sentence {i} {s:?}: cosine {c}");
    }
}
