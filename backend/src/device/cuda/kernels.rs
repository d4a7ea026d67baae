//! What will a CUDA device run? The kernels, CUDA C sources in `backend/kernels/` built
//! into the binary, compiled by NVRTC for the GPU in hand at start-up ([`compile_kernels`]),
//! kept on disk between runs ([`cached_kernels`]) and loaded into a device's context
//! ([`kernels`]).
//!
//! Only NVRTC is needed to compile, not a GPU; whether one is here is [`super::gpu`]'s
//! question.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::gpu::{probe, CudaUnavailable, GpuInfo};

/// The kernel sources, by file name.
pub const KERNELS: [(&str, &str); 3] = [
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("quant.cu", include_str!("../../../kernels/quant.cu")),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
];

/// Every kernel the CUDA device will load, by the name it loads it by.
pub const ENTRY_POINTS: [&str; 30] = [
    "add_assign",
    "add_bias_rows",
    "silu_mul",
    "gelu_erf",
    "rms_norm",
    "layer_norm",
    "softmax_rows",
    "rope",
    "gather_rows",
    "scatter_rows",
    "mean_pool",
    "gather_rows_f32",
    "gather_rows_f16",
    "gather_rows_bf16",
    "gather_rows_q4_0",
    "gather_rows_q4_1",
    "gather_rows_q8_0",
    "matvec_f32",
    "matvec_f16",
    "matvec_bf16",
    "matvec_q4_0",
    "matvec_q4_1",
    "matvec_q8_0",
    "dequantize_f16_to_f32",
    "dequantize_bf16_to_f32",
    "dequantize_q4_0_to_f32",
    "dequantize_q4_1_to_f32",
    "dequantize_q8_0_to_f32",
    "paged_attention",
    "attention_bidirectional",
];

/// Every kernel source compiled by NVRTC for `arch`, in [`KERNELS`] order: machine code (a
/// CUBIN) for a real architecture such as `sm_90`, PTX for a virtual one such as
/// `compute_90`. Only NVRTC is needed, not a GPU. The default options keep IEEE rounding and
/// subnormals, which the kernels' agreement with the CPU device relies on.
///
/// The device loads machine code, never PTX: the driver would have to compile PTX itself,
/// and it refuses PTX from an NVRTC newer than itself (NVRTC 13.5's for a CUDA 13.0 driver,
/// say), while machine code from a newer NVRTC of the same major version loads.
pub fn compile_kernels(arch: &str) -> Result<Vec<Vec<u8>>, String> {
    use cudarc::nvrtc::{result, sys};
    // SAFETY: only tries to open the library by name.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::MissingLibrary {
            library: "libnvrtc",
            what: "the CUDA runtime compiler",
        }
        .to_string());
    }
    let machine_code = arch.starts_with("sm_");
    let options = [format!("--gpu-architecture={arch}")];
    KERNELS
        .iter()
        .map(|(name, source)| {
            let fail = |what: String| format!("{name}: {what}");
            let source = std::ffi::CString::new(*source).map_err(|err| fail(err.to_string()))?;
            let file = std::ffi::CString::new(*name).map_err(|err| fail(err.to_string()))?;
            let program = result::create_program(&source, Some(&file))
                .map_err(|err| fail(err.to_string()))?;
            // SAFETY: `program` was just created and is destroyed once, below; the buffers
            // handed to NVRTC are as long as it says its output is.
            let output = unsafe {
                match result::compile_program(program, &options) {
                    Err(err) => {
                        let log = result::get_program_log(program).unwrap_or_default();
                        let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
                        Err(fail(format!(
                            "{err}: {}",
                            String::from_utf8_lossy(&log).trim_end_matches('\0')
                        )))
                    }
                    Ok(()) if machine_code => {
                        let mut size = 0usize;
                        let mut cubin = Vec::new();
                        let status = match sys::nvrtcGetCUBINSize(program, &mut size) {
                            sys::nvrtcResult::NVRTC_SUCCESS => {
                                cubin.resize(size, 0u8);
                                sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast())
                            }
                            status => status,
                        };
                        match status {
                            sys::nvrtcResult::NVRTC_SUCCESS => Ok(cubin),
                            status => Err(fail(format!("no machine code: {status:?}"))),
                        }
                    }
                    Ok(()) => result::get_ptx(program)
                        .map(|ptx| {
                            ptx.iter()
                                .map(|&c| c as u8)
                                .take_while(|&c| c != 0)
                                .collect()
                        })
                        .map_err(|err| fail(err.to_string())),
                }
            };
            // SAFETY: created above, not destroyed before.
            let _ = unsafe { result::destroy_program(program) };
            output
        })
        .collect()
}

/// NVRTC's version, `(major, minor)`: compiled kernels are kept per version.
fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: callers have checked that the library loads; the call only writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Where compiled kernels are kept between runs: `SLUICE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/sluice/kernels`, else `~/.cache/sluice/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SLUICE_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("sluice").join("kernels"))
}

/// The kernels for `arch` as [`compile_kernels`] makes them, read from `dir` when this
/// NVRTC compiled these very sources for `arch` before, else compiled and written there.
/// The file is named after a SHA-256 of all three, so an edited kernel or another NVRTC is
/// never served from an old file. The cache is only a shortcut (NVRTC takes a second or
/// two at every start): a folder that cannot be read or written is compiled past, and said
/// so in the log.
pub fn cached_kernels(arch: &str, dir: Option<&Path>) -> Result<Vec<Vec<u8>>, String> {
    use sha2::{Digest, Sha256};
    let Some(dir) = dir else {
        return compile_kernels(arch);
    };
    let mut key = Sha256::new();
    key.update(format!("{arch} {:?}", nvrtc_version()));
    for (name, source) in KERNELS {
        key.update(name);
        key.update(source);
    }
    let key: String = key.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let files: Vec<PathBuf> = KERNELS
        .iter()
        .map(|(name, _)| dir.join(format!("{arch}-{key}-{name}.bin")))
        .collect();
    let cached: Option<Vec<Vec<u8>>> = files.iter().map(|file| std::fs::read(file).ok()).collect();
    if let Some(code) = cached {
        return Ok(code);
    }
    let code = compile_kernels(arch)?;
    let stored = std::fs::create_dir_all(dir).and_then(|()| {
        for (file, code) in files.iter().zip(&code) {
            // Written aside and renamed, so a concurrent start never reads half a file.
            let partial = file.with_extension(format!("{}.partial", std::process::id()));
            std::fs::write(&partial, code)?;
            std::fs::rename(&partial, file)?;
        }
        Ok(())
    });
    if let Err(err) = stored {
        tracing::warn!(dir = %dir.display(), %err, "cannot keep the compiled CUDA kernels");
    }
    Ok(code)
}

/// Every entry point, loaded into `context` from the kernels compiled for `arch`. NVRTC
/// runs at most once per architecture per process, and not at all when [`cache_dir`] holds
/// its output already; each device loads the result into its context.
/// Fails when the driver refuses the machine code (an NVRTC of a newer major version than
/// the driver) or an entry point is missing.
pub fn kernels(
    context: &Arc<CudaContext>,
    arch: &str,
) -> Result<HashMap<&'static str, CudaFunction>, String> {
    static COMPILED: Mutex<Vec<(String, Vec<Vec<u8>>)>> = Mutex::new(Vec::new());
    let code = {
        let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
        match compiled.iter().find(|(a, _)| a == arch) {
            Some((_, code)) => code.clone(),
            None => {
                let code = cached_kernels(arch, cache_dir().as_deref())?;
                compiled.push((arch.to_owned(), code.clone()));
                code
            }
        }
    };
    let mut found = HashMap::new();
    for ((name, _), code) in KERNELS.iter().zip(code) {
        let module = context
            .load_module(Ptx::from_binary(code))
            .map_err(|err| format!("{name}: the driver refused the machine code: {err}"))?;
        for entry in ENTRY_POINTS {
            if let Ok(function) = module.load_function(entry) {
                found.insert(entry, function);
            }
        }
    }
    match ENTRY_POINTS
        .iter()
        .find(|entry| !found.contains_key(*entry))
    {
        Some(missing) => Err(format!("no kernel `{missing}` in any module")),
        None => Ok(found),
    }
}

/// On a machine with a GPU: the kernels compiled for it, loaded into a context on it, and
/// every entry point looked up, as the CUDA device does at start-up.
pub fn load_kernels(ordinal: usize) -> Result<GpuInfo, String> {
    let gpu = probe(ordinal).map_err(|err| err.to_string())?;
    let context = CudaContext::new(ordinal).map_err(|err| err.to_string())?;
    kernels(&context, &gpu.arch())?;
    Ok(gpu)
}
