//! Which ONNX Runtime the process loads. ONNX Runtime can be initialised only
//! once per process, so the choice is made before the first session:
//! - `device: cpu`: the CPU build, `embedder.onnxruntime`;
//! - `device: cuda`: the CUDA build that `make assets-gpu` places in `gpu/`
//!   beside it (or `embedder.onnxruntime` itself when that is a CUDA build),
//!   once the NVIDIA driver answers with at least one device and the CUDA
//!   libraries of that directory are loaded ([`CUDA_LIBS`]). Without a GPU,
//!   the driver or those files, the CPU build, and the reason why.
//!
//! The CUDA build serves CPU sessions too, so an embedder asking for the CPU
//! after one got the GPU still works; one asking for CUDA after the CPU build
//! was loaded runs on the CPU, and says so.

use smartllm_config::{Device, EmbedderConfig};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Where `make assets-gpu` puts the CUDA build, beside the CPU build.
pub const GPU_DIR: &str = "gpu";
/// The library that makes an ONNX Runtime directory a CUDA build: ONNX
/// Runtime loads it from its own directory when a session asks for CUDA.
pub const CUDA_PROVIDER: &str = "libonnxruntime_providers_cuda.so";
/// The CUDA libraries of the GPU directory, in load order (each after the
/// ones it needs). The CUDA provider has no search path of its own and
/// finds what it links to (cuBLAS, cuRAND, the CUDA runtime) and what it
/// opens later (cuDNN, cuFFT, NVRTC) by soname among the libraries already
/// loaded; cuDNN opens its sub-libraries from its own directory.
/// `packaging/fetch-assets.sh --gpu` fetches exactly these (and the cuDNN
/// sub-libraries).
pub const CUDA_LIBS: &[&str] = &[
    "libcudart.so.13",
    "libnvJitLink.so.13",
    "libnvrtc-builtins.so.13.0",
    "libnvrtc.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
];

/// The ONNX Runtime this process loaded.
pub(crate) struct Runtime {
    pub lib: PathBuf,
    pub env: Arc<ort::environment::Environment>,
    /// `Ok` when the CUDA build is loaded and a GPU answered; otherwise why
    /// `device: cuda` runs on the CPU.
    pub cuda: Result<(), String>,
}

/// The library to load and whether CUDA can run on it.
#[derive(Debug, PartialEq)]
pub(crate) struct Choice {
    pub lib: PathBuf,
    pub cuda: Result<(), String>,
}

static RUNTIME: OnceLock<Result<Runtime, (PathBuf, String)>> = OnceLock::new();

/// The process's ONNX Runtime, loaded on first use as `cfg` asks (blocking).
pub(crate) fn runtime(cfg: &EmbedderConfig) -> Result<&'static Runtime, crate::EmbedError> {
    RUNTIME
        .get_or_init(|| load(choose(cfg, prepare_gpu), &cfg.onnxruntime))
        .as_ref()
        .map_err(|(path, message)| crate::EmbedError::Runtime {
            path: path.clone(),
            message: message.clone(),
        })
}

fn load(choice: Choice, cpu_lib: &Path) -> Result<Runtime, (PathBuf, String)> {
    match environment(&choice.lib) {
        Ok(env) => Ok(Runtime {
            lib: choice.lib,
            env,
            cuda: choice.cuda,
        }),
        // The CUDA build would not load: the CPU build still can.
        Err(e) if choice.cuda.is_ok() && choice.lib != cpu_lib => {
            let env = environment(cpu_lib).map_err(|m| (cpu_lib.to_path_buf(), m))?;
            Ok(Runtime {
                lib: cpu_lib.to_path_buf(),
                env,
                cuda: Err(format!(
                    "the CUDA build of ONNX Runtime {} did not load: {e}",
                    choice.lib.display()
                )),
            })
        }
        Err(e) => Err((choice.lib, e)),
    }
}

fn environment(lib: &Path) -> Result<Arc<ort::environment::Environment>, String> {
    quiet_telemetry();
    let builder = ort::init_from(lib).map_err(|e| e.to_string())?;
    // Microsoft's builds of ONNX Runtime (the PyPI wheels the assets come
    // from) send usage telemetry by default; a gateway never phones home.
    builder
        .with_name("smartllm")
        .with_telemetry(false)
        .build()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Keep ONNX Runtime from phoning home. Microsoft's builds (the PyPI wheels
/// the assets come from; 1.31 on Linux included) start a 1DS telemetry
/// client that resolves and posts to `mobile.events.data.microsoft.com`, and
/// `DisableTelemetryEvents` (ort's `with_telemetry(false)`, also set below)
/// does not stop it; the library's `ORT_DISABLE_TELEMETRY`, read as it sets
/// up, does (checked with strace: no such lookup with it, a few a minute
/// without). Set before the library loads, unless the operator set it.
fn quiet_telemetry() {
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
    }
}

/// The CUDA build for `cpu_lib`'s configuration: `gpu/` beside it, else
/// `cpu_lib` itself when it is one (a CUDA provider in its directory).
pub fn gpu_runtime(cpu_lib: &Path) -> Option<PathBuf> {
    let beside = cpu_lib
        .parent()
        .map(|d| d.join(GPU_DIR))
        .zip(cpu_lib.file_name())
        .map(|(d, f)| d.join(f));
    beside
        .into_iter()
        .chain([cpu_lib.to_path_buf()])
        .find(|lib| lib.is_file() && lib.with_file_name(CUDA_PROVIDER).is_file())
}

/// The library to load for `cfg`; `prepare_gpu` checks for a GPU and loads
/// the CUDA libraries of the GPU directory (a parameter for the tests).
pub(crate) fn choose(
    cfg: &EmbedderConfig,
    prepare_gpu: impl FnOnce(&Path) -> Result<(), String>,
) -> Choice {
    let cpu = |why: String| Choice {
        lib: cfg.onnxruntime.clone(),
        cuda: Err(why),
    };
    if cfg.device != Device::Cuda {
        return cpu(format!(
            "ONNX Runtime was loaded for embedder.device: cpu ({}) before; it loads once a process",
            cfg.onnxruntime.display()
        ));
    }
    let Some(gpu) = gpu_runtime(&cfg.onnxruntime) else {
        let dir = cfg.onnxruntime.parent().unwrap_or(Path::new("."));
        return cpu(format!(
            "no CUDA build of ONNX Runtime in {} (make assets-gpu)",
            dir.join(GPU_DIR).display()
        ));
    };
    match prepare_gpu(gpu.parent().unwrap_or(Path::new("."))) {
        Ok(()) => Choice {
            lib: gpu,
            cuda: Ok(()),
        },
        Err(why) => cpu(why),
    }
}

fn prepare_gpu(dir: &Path) -> Result<(), String> {
    cuda_devices()?;
    preload_cuda_libs(dir)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the
    // next dl* call on this thread; it is copied at once.
    #[allow(unsafe_code)]
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// `dlopen` with `RTLD_NOW | RTLD_GLOBAL`; the handle is kept for the
/// process's life (never closed).
fn dlopen(name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; loading runs the library's
    // initialisers, which is what loading these libraries is for.
    #[allow(unsafe_code)]
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        Err(dlerror())
    } else {
        Ok(handle)
    }
}

/// CUDA devices the NVIDIA driver sees (`cuInit`, `cuDeviceGetCount`):
/// `Err` without the driver (`libcuda.so.1`), when it fails to initialise,
/// or when it sees no device.
pub fn cuda_devices() -> Result<usize, String> {
    let driver = dlopen("libcuda.so.1")
        .map_err(|e| format!("no NVIDIA driver (libcuda.so.1 does not load: {e})"))?;
    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
    let symbol = |name: &CStr| {
        // SAFETY: a live handle and a NUL-terminated name.
        #[allow(unsafe_code)]
        let f = unsafe { libc::dlsym(driver, name.as_ptr() as *const c_char) };
        if f.is_null() {
            Err(format!("libcuda.so.1 has no {}", name.to_string_lossy()))
        } else {
            Ok(f)
        }
    };
    let init = symbol(c"cuInit")?;
    let count = symbol(c"cuDeviceGetCount")?;
    // SAFETY: the driver API's documented signatures: cuInit(unsigned int
    // flags), cuDeviceGetCount(int *count); the pointer is to a local.
    #[allow(unsafe_code)]
    let (rc, n) = unsafe {
        let init: CuInit = std::mem::transmute::<*mut c_void, CuInit>(init);
        let count: CuDeviceGetCount = std::mem::transmute::<*mut c_void, CuDeviceGetCount>(count);
        let rc = init(0);
        let mut n: c_int = 0;
        if rc == 0 {
            (count(&mut n), n)
        } else {
            (rc, 0)
        }
    };
    match rc {
        0 if n > 0 => Ok(n as usize),
        0 | 100 => Err("the NVIDIA driver sees no CUDA device".into()),
        rc => Err(format!(
            "the NVIDIA driver failed to initialise (CUresult {rc})"
        )),
    }
}

/// Load [`CUDA_LIBS`] from `dir`, in order.
pub fn preload_cuda_libs(dir: &Path) -> Result<(), String> {
    for name in CUDA_LIBS {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(format!("{} is missing (make assets-gpu)", path.display()));
        }
        dlopen(&path.to_string_lossy())
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(dir: &Path, device: Device) -> EmbedderConfig {
        EmbedderConfig {
            model: dir.join("model.onnx"),
            tokenizer: dir.join("tokenizer.json"),
            onnxruntime: dir.join("libonnxruntime.so.1.31.1"),
            threads: 1,
            max_seq_len: 128,
            device,
            queue_depth: 1,
            max_queue_wait: Duration::from_millis(1),
            cache_entries: 0,
        }
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "smartllm-embed-runtime-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_cuda_build_is_chosen_only_for_cuda_with_a_gpu() {
        let dir = tempdir("choose");
        let cpu_lib = dir.join("libonnxruntime.so.1.31.1");
        let gpu_lib = dir.join("gpu/libonnxruntime.so.1.31.1");
        touch(&cpu_lib);
        let never =
            |_: &Path| -> Result<(), String> { panic!("no GPU check without a CUDA build") };

        // No gpu/: the CPU build, saying what to run.
        let c = choose(&cfg(&dir, Device::Cuda), never);
        assert_eq!(c.lib, cpu_lib);
        assert!(c.cuda.unwrap_err().contains("make assets-gpu"));
        // A library in gpu/ without the CUDA provider beside it is no CUDA build.
        touch(&gpu_lib);
        assert_eq!(gpu_runtime(&cpu_lib), None);
        touch(&dir.join("gpu").join(CUDA_PROVIDER));
        assert_eq!(gpu_runtime(&cpu_lib), Some(gpu_lib.clone()));

        // device: cpu never checks for a GPU nor loads the CUDA build.
        let c = choose(&cfg(&dir, Device::Cpu), never);
        assert_eq!(c.lib, cpu_lib);
        assert!(c.cuda.is_err());
        // cuda without a GPU: the CPU build, with the check's reason.
        let c = choose(&cfg(&dir, Device::Cuda), |_| Err("no NVIDIA driver".into()));
        assert_eq!(
            c,
            Choice {
                lib: cpu_lib.clone(),
                cuda: Err("no NVIDIA driver".into())
            }
        );
        // cuda with a GPU: the CUDA build, its libraries loaded from gpu/.
        let mut checked = None;
        let c = choose(&cfg(&dir, Device::Cuda), |d| {
            checked = Some(d.to_path_buf());
            Ok(())
        });
        assert_eq!(
            c,
            Choice {
                lib: gpu_lib,
                cuda: Ok(())
            }
        );
        assert_eq!(checked.as_deref(), Some(dir.join("gpu").as_path()));

        // embedder.onnxruntime naming a CUDA build itself.
        let own = tempdir("own");
        touch(&own.join("libonnxruntime.so.1.31.1"));
        touch(&own.join(CUDA_PROVIDER));
        let c = choose(&cfg(&own, Device::Cuda), |_| Ok(()));
        assert_eq!(c.lib, own.join("libonnxruntime.so.1.31.1"));
        assert!(c.cuda.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&own);
    }

    #[test]
    fn missing_cuda_libraries_are_named() {
        let dir = tempdir("preload");
        let e = preload_cuda_libs(&dir).unwrap_err();
        assert!(e.contains("libcudart.so.13 is missing"), "{e}");
        // A file that is no library: the loader's reason.
        touch(&dir.join(CUDA_LIBS[0]));
        let e = preload_cuda_libs(&dir).unwrap_err();
        assert!(e.starts_with("cannot load"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Without a GPU device node (/dev/nvidia*, or /dev/dxg under WSL) the
    /// driver check must say no.
    #[test]
    fn the_driver_check_matches_the_machine() {
        let gpu_nodes = std::fs::read_dir("/dev")
            .map(|d| {
                d.flatten().any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("nvidia") || name == "dxg"
                })
            })
            .unwrap_or(false);
        match cuda_devices() {
            Ok(n) => assert!(gpu_nodes && n > 0, "{n} CUDA devices without a device node"),
            Err(why) => {
                assert!(!why.is_empty());
                if gpu_nodes {
                    eprintln!("a GPU device node is present but CUDA is unusable: {why}");
                }
            }
        }
    }
}
