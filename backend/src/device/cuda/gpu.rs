//! Can a GPU be used here, and which one is it?
//!
//! Nothing CUDA is needed to build: cudarc loads libcuda, libnvrtc and libcublas when asked
//! (its `dynamic-loading` feature), and calling into a library that is missing panics, so
//! [`probe`] checks each one is present before anything else touches it. It must never
//! call into a library it has not found.

use std::sync::Arc;

use cudarc::driver::CudaContext;

/// Why no GPU can be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    /// A library CUDA needs did not load: no driver, or no NVRTC or cuBLAS beside it.
    #[error("no {library} ({what}) could be loaded; put its folder on LD_LIBRARY_PATH")]
    MissingLibrary {
        library: &'static str,
        what: &'static str,
    },
    /// The driver loaded but has no such GPU, or failed to start.
    #[error("cuda:{ordinal}: {message}")]
    NoDevice { ordinal: usize, message: String },
    /// The GPU is there, but setting it up failed: the kernels did not compile or load, or
    /// the driver refused a stream or cuBLAS a handle.
    #[error("cuda:{ordinal}: {message}")]
    Failed { ordinal: usize, message: String },
}

impl CudaUnavailable {
    /// Whether this machine simply has no usable GPU (a choice for the CPU, or a usage error
    /// for `--device cuda:N`), as opposed to a GPU that broke while being set up.
    pub fn is_absence(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }
}

/// A GPU that can be used: its name and compute capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
}

impl GpuInfo {
    /// NVRTC's `--gpu-architecture` for this GPU's machine code: `sm_90` for an H100 or H200.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("sm_{major}{minor}")
    }
}

/// Whether the CUDA libraries load, without starting the driver.
pub fn libraries() -> Result<(), CudaUnavailable> {
    let missing = |library, what| Err(CudaUnavailable::MissingLibrary { library, what });
    // SAFETY: these only try to open the libraries by name; nothing is called in them.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return missing("libcuda", "the NVIDIA driver");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return missing("libnvrtc", "the CUDA runtime compiler");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return missing("libcublas", "CUDA's BLAS");
        }
    }
    Ok(())
}

/// The GPU `ordinal`, if the libraries load and the driver has it.
pub fn probe(ordinal: usize) -> Result<GpuInfo, CudaUnavailable> {
    open(ordinal).map(|(_, gpu)| gpu)
}

/// [`probe`], keeping the context it opened: a device set up right after uses it rather
/// than letting the driver tear the GPU's context down and build it again.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo), CudaUnavailable> {
    libraries()?;
    let no_device = |err: cudarc::driver::DriverError| CudaUnavailable::NoDevice {
        ordinal,
        message: err.to_string(),
    };
    let context = CudaContext::new(ordinal).map_err(no_device)?;
    let gpu = GpuInfo {
        ordinal,
        name: context.name().map_err(no_device)?,
        compute_capability: context.compute_capability().map_err(no_device)?,
    };
    Ok((context, gpu))
}
