//! The CUDA side, on a machine with no GPU: every kernel source compiles under NVRTC for the
//! GPUs the backend targets (so a syntax error in a kernel fails CI), and asking for a GPU
//! where there is none gets a plain answer, not a panic.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc-cu12` PyPI package: scripts/test.sh installs it
//! into .venv and puts its folder on LD_LIBRARY_PATH. Without it the compile test says so
//! and passes, except under `CI=true`, where a missing NVRTC is a broken setup and fails it.

mod common;

use sluice_backend::device::cuda::kernels::{self, ENTRY_POINTS, KERNELS};
use sluice_backend::device::cuda::{self, CudaDevice, CudaUnavailable};
use sluice_backend::device::Target;
use sluice_backend::engine::EngineOptions;
use sluice_backend::engine::TextModel;

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_kernel_compiles_under_nvrtc_for_a100_and_h100_class_gpus() {
    if !common::nvrtc_present() {
        return;
    }
    // Machine code, which the device loads: an ELF image naming every entry point.
    for arch in ["sm_80", "sm_90"] {
        let code = kernels::compile_kernels(arch).unwrap_or_else(|err| panic!("{arch}: {err}"));
        assert_eq!(code.len(), KERNELS.len());
        for image in &code {
            assert!(image.starts_with(b"\x7fELF"), "{arch}: not an ELF image");
        }
        for name in ENTRY_POINTS {
            assert!(
                code.iter().any(|image| contains(image, name.as_bytes())),
                "{arch}: no kernel `{name}` in the machine code"
            );
        }
    }
    // PTX, where each kernel is plainly named.
    let ptx = kernels::compile_kernels("compute_90").unwrap();
    let all: String = ptx.iter().map(|p| String::from_utf8_lossy(p)).collect();
    for name in ENTRY_POINTS {
        assert!(
            all.contains(&format!(".entry {name}(")),
            "no kernel `{name}` in the PTX"
        );
    }
}

#[test]
fn compiled_kernels_are_kept_on_disk_and_read_back_instead_of_compiling_again() {
    if !common::nvrtc_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fresh = kernels::cached_kernels("sm_80", Some(&dir)).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), KERNELS.len(), "{files:?}");
    let stored: Vec<Vec<u8>> = KERNELS
        .iter()
        .map(|(name, _)| {
            let file = files
                .iter()
                .find(|f| f.to_string_lossy().ends_with(&format!("-{name}.bin")))
                .unwrap_or_else(|| panic!("no file for {name}: {files:?}"));
            std::fs::read(file).unwrap()
        })
        .collect();
    assert_eq!(stored, fresh);
    // What is read back is the file, not a new compile: mark one and see the mark.
    let mut marked = std::fs::read(&files[0]).unwrap();
    marked.extend_from_slice(b"marked by the test");
    std::fs::write(&files[0], &marked).unwrap();
    let again = kernels::cached_kernels("sm_80", Some(&dir)).unwrap();
    assert!(again.contains(&marked));
    // Another architecture is compiled, not taken from sm_80's files.
    kernels::cached_kernels("sm_90", Some(&dir)).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2 * KERNELS.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_kernel_with_a_syntax_error_is_reported_with_the_compilers_log() {
    if !common::nvrtc_present() {
        return;
    }
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = ; }";
    let err = cudarc::nvrtc::compile_ptx(broken).unwrap_err().to_string();
    assert!(err.contains("expected an expression"), "{err}");
}

#[test]
fn a_machine_without_a_driver_is_told_so_without_a_panic() {
    // SAFETY: only tries to open the library by name.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("skipping: this machine has an NVIDIA driver");
        return;
    }
    let err = cuda::probe(0).unwrap_err();
    assert!(
        matches!(
            err,
            CudaUnavailable::MissingLibrary {
                library: "libcuda",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("NVIDIA driver"), "{err}");

    // The device itself, and a model loaded onto it, say the same, as a usage error: the
    // server exits 2 (and `--device auto` picks the CPU) instead of crashing.
    let err = CudaDevice::new(0)
        .err()
        .expect("no device without a driver");
    assert!(err.is_absence(), "{err:?}");
    let (target, why) = Target::auto();
    assert_eq!(target, Target::Cpu);
    assert!(why.contains("NVIDIA driver"), "{why}");
    if let Some(path) = common::smollm2_weights() {
        let options = EngineOptions {
            target: Target::Cuda(0),
            ..EngineOptions::default()
        };
        let err = TextModel::load("smollm2", &path, options).unwrap_err();
        assert!(err.is_usage(), "{err}");
        assert!(err.to_string().contains("NVIDIA driver"), "{err}");
    }
}
