//! `embedder.device: cuda`, in a process of its own (ONNX Runtime loads once a
//! process, and here the first load asks for CUDA):
//! - with the GPU assets (`make assets-gpu`) and a GPU: the CUDA build is
//!   loaded, runs on the GPU, and its vectors match the fp32 reference
//!   within cosine 0.999, one text at a time and in length-grouped batches;
//! - without either: the CPU build is loaded, the device says why, and the
//!   embedder works. The GPU run is skipped with the reason printed;
//! - with device: cuda an int8 model runs as its fp32 twin, on the GPU or
//!   on the CPU it falls back to.

use smartllm_config::Device;
use smartllm_embed::runtime::{cuda_devices, gpu_runtime};
use smartllm_embed::{
    cosine, local_assets, Embedder, DEFAULT_MODEL, DIM, FP32_MODEL, L3_FP32_MODEL,
};

mod common;
use common::reference;

#[test]
fn cuda_runs_on_the_gpu_build_or_falls_back_to_the_cpu_build() {
    let (sentences, want, max_seq_len) = reference();
    let mut cfg = local_assets(max_seq_len);
    assert!(
        cfg.model.is_file(),
        "embedding assets missing: run packaging/fetch-assets.sh (make test does)"
    );
    cfg.model = cfg.model.with_file_name(FP32_MODEL);
    cfg.device = Device::Cuda;
    cfg.threads = 2;
    let gpu_lib = gpu_runtime(&cfg.onnxruntime);
    let gpu = cuda_devices();
    let e = Embedder::load(&cfg).unwrap();
    let info = e.info();
    match (&gpu_lib, &gpu) {
        (Some(lib), Ok(n)) => {
            eprintln!("GPU run: {n} CUDA device(s), {}", lib.display());
            assert_eq!(info.device, "cuda");
            assert_eq!(&info.onnxruntime, lib);
        }
        (None, _) => {
            eprintln!(
                "skipped the GPU run: no GPU assets beside {} (make assets-gpu)",
                cfg.onnxruntime.display()
            );
            assert!(
                info.device
                    .starts_with("cpu (cuda unavailable: no CUDA build of ONNX Runtime in "),
                "{}",
                info.device
            );
            assert_eq!(info.onnxruntime, cfg.onnxruntime);
        }
        (Some(_), Err(why)) => {
            eprintln!("skipped the GPU run: {why}");
            assert_eq!(info.device, format!("cpu (cuda unavailable: {why})"));
            // Without a GPU the CUDA build is not even loaded.
            assert_eq!(info.onnxruntime, cfg.onnxruntime);
        }
    }
    // Whatever the device: the reference vectors, alone and batched.
    let batched = e.embed_blocking(sentences.clone()).unwrap();
    assert_eq!(batched.len(), sentences.len());
    for (i, s) in sentences.iter().enumerate() {
        let alone = e.embed_blocking(vec![s.clone()]).unwrap().pop().unwrap();
        assert_eq!(alone.len(), DIM);
        let (c1, c2) = (cosine(&alone, &want[i]), cosine(&batched[i], &want[i]));
        assert!(
            c1 >= 0.999 && c2 >= 0.999,
            "{} sentence {i} {s:?}: alone {c1}, batched {c2}",
            info.device
        );
    }
    // With device: cuda the default int8 model runs as its fp32 twin (its
    // int8 MatMuls have no CUDA kernels), on a CPU fallback too: the vector
    // space does not depend on whether the driver answered.
    let mut default = cfg.clone();
    default.model = cfg.model.with_file_name(DEFAULT_MODEL);
    default.threads = 1;
    let d = Embedder::load(&default).unwrap();
    assert_eq!(d.info().model, cfg.model.with_file_name(L3_FP32_MODEL));
    assert_eq!(d.info().device, info.device);
    assert_eq!(
        d.embed_blocking(vec!["hello".into()]).unwrap()[0].len(),
        DIM
    );
}
