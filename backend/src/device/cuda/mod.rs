//! How does a model run on an NVIDIA GPU? [`CudaDevice`]: [`Device`] with the kernels of
//! `backend/kernels/` (compiled by NVRTC, see [`kernels`]) for everything but dense
//! products, and cuBLAS's SGEMM for those. Whether a GPU can be used at all is [`gpu`]'s
//! question; nothing CUDA is needed to build, since cudarc loads CUDA's libraries at run time.
//!
//! Each device owns one stream; every operation is queued on it, so operations run in the
//! order the model calls them and nothing waits until a result is downloaded. Temporaries
//! come from the driver's stream-ordered pool (cudarc allocates with `cuMemAllocAsync`), so
//! the many small tensors of a forward pass cost no `cudaMalloc` each.
//!
//! Numerics follow the CPU device ([`crate::device::cpu::Cpu`]):
//! - A generated (decode) row's products run through the `matvec_*` kernels, which sum as
//!   the CPU's dot product does, bit for bit, and depend on nothing but the row itself.
//! - Prompt rows run through SGEMM in f32 (never TF32 or 16-bit activations: either changes
//!   greedy answers), over weight tiles decoded to f32 a few thousand rows at a time. Every
//!   GEMM has the same shape whatever the batch — prompt rows padded with zeros to
//!   [`PROMPT_ROWS`] per call, weight tiles fixed per matrix — because cuBLAS picks its
//!   algorithm by shape, and a different algorithm sums in another order. So a prompt row's
//!   result, like a generated row's, is the same alone or batched, as [`Device::matmul`]
//!   asks; it differs from the CPU's GEMM only in rounding.
//! - Attention uses a streaming softmax and agrees with the CPU to rounding.

pub mod gpu;
pub mod kernels;

pub use gpu::{probe, CudaUnavailable, GpuInfo};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};

use crate::device::{
    check_scatter, rope_head_dim, Attention, Device, DeviceError, PagedAttention, Tensor,
};
use crate::quant::{GgmlType, QMatrix};

/// Activation rows per prompt-row GEMM: prompt rows are padded with zeros to a multiple of
/// it, so every GEMM of a matrix has one shape (see the module's comment). 128 keeps the
/// padding of a short prompt cheap next to the weight reads it shares them with.
pub const PROMPT_ROWS: usize = 128;

/// The most f32s a decoded weight tile takes (32 MiB): a tile of an encoded matrix is this
/// many values' worth of whole rows, a multiple of 64 so that every tile starts aligned.
const TILE_FLOATS: usize = 1 << 23;

/// Threads per block for the row-wise kernels (a power of two, as their reductions need).
const ROW_BLOCK: u32 = 256;
/// Threads per block for the attention kernels (a power of two in [32, 1024]).
const ATTENTION_BLOCK: u32 = 128;
/// The attention kernels keep one head's query and output in shared memory of this size.
const MAX_HEAD_DIM: usize = 256;
/// Weight rows per `matvec_*` block: one warp each (at most 8, the kernel's shared memory).
const MATVEC_WARPS: u32 = 8;

pub type CudaTensor = Tensor<CudaSlice<f32>>;

/// A weight matrix on the GPU in its stored encoding: the bytes of a [`QMatrix`].
pub struct CudaMatrix {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    bytes: CudaSlice<u8>,
}

/// One GPU, with its kernels loaded and a stream and a cuBLAS handle of its own.
pub struct CudaDevice {
    gpu: GpuInfo,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// The index arrays uploaded last, a few per purpose: the model passes the same
    /// positions, cache slots and block tables to every layer of a step, and they are
    /// uploaded once.
    indices: Mutex<HashMap<&'static str, Vec<Uploaded>>>,
}

/// Host values and their copy on the device.
type Uploaded = (Vec<u32>, Arc<CudaSlice<u32>>);

/// Makes the driver's memory pool for this GPU keep what is freed instead of handing it
/// back at every synchronisation: a forward pass frees and allocates the same temporaries
/// every step, and each would otherwise be a fresh allocation from the driver. Best effort:
/// a driver without pools allocates as before.
fn keep_freed_memory(context: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the pool is the device's own, and the attribute takes a u64 by pointer.
    let status = unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ),
            status => status,
        }
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!(
            ?status,
            "the GPU's memory pool keeps its default release threshold"
        );
    }
}

/// `n` as the 32-bit size the kernels take; tensors that large are a bug upstream.
fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{n} does not fit a kernel's 32-bit size"))
}

/// A 1-D launch of `n` grid-stride work items.
fn elements(n: usize) -> LaunchConfig {
    // The grid-stride loops cover any n; more blocks than this only queue up.
    let blocks = n.div_ceil(256).clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn shape(grid: (usize, usize), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (u32_of(grid.0), u32_of(grid.1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Queues kernel `$name` on `$dev`'s stream with `$config` and the arguments in order (as
/// references: slices, views, or scalars bound to locals). A launch with no work is skipped:
/// an empty grid is an error to the driver.
macro_rules! launch {
    ($dev:expr, $name:expr, $config:expr; $($arg:expr),* $(,)?) => {{
        let config: LaunchConfig = $config;
        if config.grid_dim.0 == 0 || config.grid_dim.1 == 0 {
            Ok(())
        } else {
            let mut builder = $dev.stream.launch_builder($dev.kernel(&$name));
            $( builder.arg($arg); )*
            // SAFETY: the arguments match the kernel's signature in backend/kernels/ in
            // number, order and type, and every size passed is the size of the buffer it
            // describes (checked by the callers' asserts), so the kernel stays in bounds.
            unsafe { builder.launch(config) }
                .map(drop)
                .map_err(|err| $dev.error(format!("{}: {err}", $name)))
        }
    }};
}

impl CudaDevice {
    /// GPU `ordinal`, with the kernels compiled for its architecture (once per process) and
    /// loaded into its context.
    pub fn new(ordinal: usize) -> Result<Self, CudaUnavailable> {
        let (context, gpu) = gpu::open(ordinal)?;
        let failed = |message: String| CudaUnavailable::Failed { ordinal, message };
        keep_freed_memory(&context);
        // One stream per device and no tensor shared between devices: the per-tensor
        // events cudarc records to order work across streams would only cost time.
        // SAFETY: every tensor of this device is used on its one stream alone.
        unsafe { context.disable_event_tracking() };
        let stream = context
            .new_stream()
            .map_err(|err| failed(err.to_string()))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|err| failed(err.to_string()))?;
        let kernels = kernels::kernels(&context, &gpu.arch()).map_err(failed)?;
        Ok(CudaDevice {
            gpu,
            context,
            stream,
            blas,
            kernels,
            indices: Mutex::new(HashMap::new()),
        })
    }

    pub fn gpu(&self) -> &GpuInfo {
        &self.gpu
    }

    /// Waits for everything queued so far: for timing.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream
            .synchronize()
            .map_err(|err| self.error(err.to_string()))
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        // `new` loaded every entry point or failed.
        &self.kernels[name]
    }

    fn error(&self, message: String) -> DeviceError {
        DeviceError {
            device: self.name(),
            message,
        }
    }

    /// Room for `n` floats that the next kernel writes in full. An empty tensor gets one
    /// float nothing reads: a zero-byte allocation is an error to some drivers.
    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>, DeviceError> {
        // SAFETY: every caller hands the buffer to a kernel or copy that writes all of it
        // before anything reads it.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }
            .map_err(|err| self.error(format!("allocating {n} floats: {err}")))
    }

    fn zeroed(&self, n: usize) -> Result<CudaSlice<f32>, DeviceError> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|err| self.error(format!("allocating {n} floats: {err}")))
    }

    /// `values` on the device, for a kernel's index argument. Re-uploaded only when they
    /// differ from the last few uploaded for `purpose` (a step's layers all pass the same
    /// ones; BERT gathers from three tables in turn).
    fn indices(
        &self,
        purpose: &'static str,
        values: &[u32],
    ) -> Result<Arc<CudaSlice<u32>>, DeviceError> {
        const KEPT: usize = 4;
        let mut uploaded = self.indices.lock().unwrap_or_else(|p| p.into_inner());
        let recent = uploaded.entry(purpose).or_default();
        if let Some((_, device)) = recent.iter().find(|(host, _)| host.as_slice() == values) {
            return Ok(device.clone());
        }
        // A kernel given no indices reads none; one placeholder keeps the upload non-empty.
        let device = Arc::new(
            self.stream
                .clone_htod(if values.is_empty() {
                    &[0u32][..]
                } else {
                    values
                })
                .map_err(|err| self.error(err.to_string()))?,
        );
        // Dropping the oldest frees it in stream order, after the kernels that read it.
        recent.truncate(KEPT - 1);
        recent.insert(0, (values.to_vec(), device.clone()));
        Ok(device)
    }

    /// `c[rows × n]` (row-major, row stride `ldc`) = `x[rows × k] · w[n × k]ᵀ`, every
    /// operand row-major f32, through cuBLAS (column-major: it computes `cᵀ = w · xᵀ`).
    #[allow(clippy::too_many_arguments)]
    fn sgemm<W: DevicePtr<f32>, X: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        (rows, n, k): (usize, usize, usize),
        w: &W,
        x: &X,
        c: &mut C,
        ldc: usize,
    ) -> Result<(), DeviceError> {
        // cuBLAS calls the context current on this thread, which cudarc's own calls
        // (allocations, launches) make current but cuBLAS's do not.
        self.context
            .bind_to_thread()
            .map_err(|err| self.error(err.to_string()))?;
        let int = |v: usize| i32::try_from(v).expect("a GEMM dimension past i32");
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(n),
            n: int(rows),
            k: int(k),
            alpha: 1.0f32,
            lda: int(k),
            ldb: int(k),
            beta: 0.0f32,
            ldc: int(ldc),
        };
        // SAFETY: w holds n·k floats, x rows·k and c (rows − 1)·ldc + n, as the callers
        // size them; cuBLAS reads and writes nothing else.
        unsafe { self.blas.gemm(config, w, x, c) }.map_err(|err| self.error(err.to_string()))
    }

    /// Rows `rows` of `x` (`[_, d]`), packed; `purpose` as for [`Self::indices`].
    fn pick_rows(
        &self,
        x: &CudaTensor,
        rows: &[u32],
        purpose: &'static str,
    ) -> Result<CudaTensor, DeviceError> {
        let d = x.cols();
        let mut out = self.alloc(rows.len() * d)?;
        let ids = self.indices(purpose, rows)?;
        let (n, d32) = (u32_of(rows.len()), u32_of(d));
        launch!(self, "gather_rows", shape((rows.len(), 1), 256); &mut out, x.data(), &*ids, &n, &d32)?;
        Ok(Tensor::from_parts(out, vec![rows.len(), d]))
    }

    /// Generated rows: the bit-exact, batch-invariant matrix-vector kernel.
    fn matvec(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor, DeviceError> {
        let (m, k, n) = (x.rows(), w.cols, w.rows);
        let mut out = self.alloc(m * n)?;
        let (m32, n32, k32) = (u32_of(m), u32_of(n), u32_of(k));
        let config = shape((n.div_ceil(MATVEC_WARPS as usize), 1), 32 * MATVEC_WARPS);
        let name = format!("matvec_{}", w.dtype.short_name());
        launch!(self, name, config; &mut out, &w.bytes, x.data(), &m32, &n32, &k32)?;
        Ok(Tensor::from_parts(out, vec![m, n]))
    }

    /// Weight rows `first .. first + rows` decoded to f32 into `tile`.
    fn decode_tile(
        &self,
        tile: &mut CudaSlice<f32>,
        w: &CudaMatrix,
        first: usize,
        rows: usize,
    ) -> Result<(), DeviceError> {
        let (first32, rows32, cols32) = (u32_of(first), u32_of(rows), u32_of(w.cols));
        let config = shape((rows, 1), 256);
        assert!(
            w.dtype != GgmlType::F32,
            "f32 weights are multiplied in place"
        );
        let name = format!("dequantize_{}_to_f32", w.dtype.short_name());
        launch!(self, name, config; tile, &w.bytes, &first32, &rows32, &cols32)
    }

    /// Prompt rows: SGEMMs of fixed shape over weight tiles decoded to f32.
    fn gemm_prompt(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor, DeviceError> {
        let (m, k, n) = (x.rows(), w.cols, w.rows);
        let padded = m.next_multiple_of(PROMPT_ROWS);
        let mut staged;
        let xp = if padded == m {
            x.data()
        } else {
            staged = self.zeroed(padded * k)?;
            self.stream
                .memcpy_dtod(x.data(), &mut staged.slice_mut(0..m * k))
                .map_err(|err| self.error(err.to_string()))?;
            &staged
        };
        let mut product = self.alloc(padded * n)?;
        let tile_rows = (TILE_FLOATS / k).max(64) / 64 * 64;
        let mut tile = match w.dtype {
            GgmlType::F32 => None,
            _ => Some(self.alloc(tile_rows.min(n) * k)?),
        };
        for first in (0..n).step_by(tile_rows) {
            let rows = tile_rows.min(n - first);
            // SAFETY (transmute): F32 weights are n·k little-endian f32s, 4-byte aligned
            // as every cudaMalloc'd buffer is.
            let weights = match tile.as_mut() {
                None => unsafe { w.bytes.transmute::<f32>(n * k) }
                    .expect("f32 weights hold n·k floats")
                    .slice(first * k..(first + rows) * k),
                Some(tile) => {
                    self.decode_tile(tile, w, first, rows)?;
                    tile.slice(0..rows * k)
                }
            };
            for start in (0..padded).step_by(PROMPT_ROWS) {
                let xs = xp.slice(start * k..(start + PROMPT_ROWS) * k);
                let mut c = product.slice_mut(start * n + first..);
                self.sgemm((PROMPT_ROWS, rows, k), &weights, &xs, &mut c, n)?;
            }
        }
        if padded != m {
            let mut out = self.alloc(m * n)?;
            self.stream
                .memcpy_dtod(&product.slice(0..m * n), &mut out)
                .map_err(|err| self.error(err.to_string()))?;
            product = out;
        }
        Ok(Tensor::from_parts(product, vec![m, n]))
    }
}

impl Device for CudaDevice {
    type Storage = CudaSlice<f32>;
    type Matrix = CudaMatrix;

    fn name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal)
    }

    fn free_memory(&self) -> Option<usize> {
        self.context.mem_get_info().ok().map(|(free, _total)| free)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor, DeviceError> {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{shape:?}");
        let slice = if data.is_empty() {
            self.zeroed(0)?
        } else {
            self.stream
                .clone_htod(data)
                .map_err(|err| self.error(err.to_string()))?
        };
        Ok(Tensor::from_parts(slice, shape.to_vec()))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor, DeviceError> {
        let n = shape.iter().product();
        Ok(Tensor::from_parts(self.zeroed(n)?, shape.to_vec()))
    }

    fn download(&self, x: &CudaTensor) -> Result<Vec<f32>, DeviceError> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        // Through the tensor's length: an empty one's buffer holds a placeholder.
        self.stream
            .clone_dtoh(&x.data().slice(0..x.len()))
            .map_err(|err| self.error(err.to_string()))
    }

    fn gather_rows(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor, DeviceError> {
        let rows = table.rows();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= rows) {
            panic!("row {id} of a {rows}-row table");
        }
        self.pick_rows(table, ids, "gathered rows")
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor, DeviceError> {
        let (m, k, n) = (x.rows(), x.cols(), weight.rows());
        assert_eq!(weight.cols(), k, "linear: x {x:?}, weight {weight:?}");
        let mut out = self.alloc(m * n)?;
        if m > 0 {
            self.sgemm((m, n, k), weight.data(), x.data(), &mut out, n)?;
        }
        if let Some(bias) = bias {
            assert_eq!(bias.len(), n, "linear: bias {bias:?} for {n} outputs");
            let (rows, d) = (u32_of(m), u32_of(n));
            launch!(self, "add_bias_rows", elements(m * n); &mut out, bias.data(), &rows, &d)?;
        }
        Ok(Tensor::from_parts(out, vec![m, n]))
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaTensor) -> Result<(), DeviceError> {
        let (m, n) = (x.rows(), x.cols());
        assert_eq!(bias.len(), n, "add_bias: {bias:?} on rows of {n}");
        let (rows, d) = (u32_of(m), u32_of(n));
        launch!(self, "add_bias_rows", elements(m * n); x.data_mut(), bias.data(), &rows, &d)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<(), DeviceError> {
        assert_eq!(x.shape(), y.shape(), "add_assign");
        let n = u32_of(x.len());
        launch!(self, "add_assign", elements(x.len()); x.data_mut(), y.data(), &n)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor, DeviceError> {
        let d = x.cols();
        assert!(weight.len() == d && bias.len() == d, "layer_norm over {d}");
        let mut out = self.alloc(x.len())?;
        let (rows, d32) = (u32_of(x.rows()), u32_of(d));
        launch!(self, "layer_norm", shape((x.rows(), 1), ROW_BLOCK);
            &mut out, x.data(), weight.data(), bias.data(), &rows, &d32, &eps)?;
        Ok(Tensor::from_parts(out, x.shape().to_vec()))
    }

    fn gelu(&self, x: &mut CudaTensor) -> Result<(), DeviceError> {
        let n = u32_of(x.len());
        launch!(self, "gelu_erf", elements(x.len()); x.data_mut(), &n)
    }

    fn softmax(&self, x: &mut CudaTensor) -> Result<(), DeviceError> {
        let (rows, d) = (u32_of(x.rows()), u32_of(x.cols()));
        launch!(self, "softmax_rows", shape((x.rows(), 1), ROW_BLOCK); x.data_mut(), &rows, &d)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        layout: Attention<'_>,
    ) -> Result<CudaTensor, DeviceError> {
        let (tokens, width) = (q.rows(), q.cols());
        let head_dim = layout.head_dim(q, k, v);
        assert!(head_dim <= MAX_HEAD_DIM, "attention: head_dim {head_dim}");
        // Per row: where its sequence starts, then how long it is.
        let mut rows = Vec::with_capacity(2 * tokens);
        let mut start = 0u32;
        for &len in layout.seq_lens {
            rows.extend(std::iter::repeat_n(start, len));
            start += u32_of(len);
        }
        for &len in layout.seq_lens {
            rows.extend(std::iter::repeat_n(u32_of(len), len));
        }
        let rows = self.indices("attention", &rows)?;
        let (starts, lens) = (rows.slice(0..tokens), rows.slice(tokens..));
        let mut out = self.alloc(tokens * width)?;
        let (n, heads, hd) = (u32_of(tokens), u32_of(layout.heads), u32_of(head_dim));
        launch!(self, "attention_bidirectional", shape((tokens, layout.heads), ATTENTION_BLOCK);
            &mut out, q.data(), k.data(), v.data(), &starts, &lens, &n, &heads, &hd, &layout.scale)?;
        Ok(Tensor::from_parts(out, vec![tokens, width]))
    }

    fn upload_matrix(&self, matrix: QMatrix) -> Result<CudaMatrix, DeviceError> {
        // The kernels read blocks as GGUF lays them out.
        assert_eq!(
            matrix.layout,
            crate::quant::RowLayout::Interleaved,
            "CUDA upload"
        );
        let bytes = self.stream.clone_htod(&matrix.bytes).map_err(|err| {
            self.error(format!(
                "uploading a {}×{} matrix: {err}",
                matrix.rows, matrix.cols
            ))
        })?;
        Ok(CudaMatrix {
            dtype: matrix.dtype,
            rows: matrix.rows,
            cols: matrix.cols,
            bytes,
        })
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        weight: &CudaMatrix,
        prompt_rows: &[bool],
    ) -> Result<CudaTensor, DeviceError> {
        let (m, k, n) = (x.rows(), x.cols(), weight.rows);
        assert_eq!(
            k, weight.cols,
            "matmul: x {x:?}, weight {n}×{}",
            weight.cols
        );
        assert_eq!(prompt_rows.len(), m, "matmul: {m} rows, {prompt_rows:?}");
        let prompts = prompt_rows.iter().filter(|&&p| p).count();
        if prompts == m {
            return self.gemm_prompt(x, weight);
        }
        if prompts == 0 {
            return self.matvec(x, weight);
        }
        // Each kind on its own path, then each row back in its place.
        let mut out = self.alloc(m * n)?;
        for (kind, purpose) in [(true, "prompt rows"), (false, "generated rows")] {
            let rows: Vec<u32> = (0..m as u32)
                .filter(|&r| prompt_rows[r as usize] == kind)
                .collect();
            let picked = self.pick_rows(x, &rows, purpose)?;
            let part = match kind {
                true => self.gemm_prompt(&picked, weight)?,
                false => self.matvec(&picked, weight)?,
            };
            let targets = self.indices(purpose, &rows)?;
            let (count, d) = (u32_of(rows.len()), u32_of(n));
            launch!(self, "scatter_rows", shape((rows.len(), 1), 256);
                &mut out, part.data(), &*targets, &count, &d)?;
        }
        Ok(Tensor::from_parts(out, vec![m, n]))
    }

    fn gather_matrix_rows(
        &self,
        table: &CudaMatrix,
        ids: &[u32],
    ) -> Result<CudaTensor, DeviceError> {
        if let Some(id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            panic!("row {id} of a {}-row table", table.rows);
        }
        let d = table.cols;
        let mut out = self.alloc(ids.len() * d)?;
        let ids_on_device = self.indices("token ids", ids)?;
        let (n, cols) = (u32_of(ids.len()), u32_of(d));
        let config = shape((ids.len(), 1), 256);
        let name = format!("gather_rows_{}", table.dtype.short_name());
        launch!(self, name, config; &mut out, &table.bytes, &*ids_on_device, &n, &cols)?;
        Ok(Tensor::from_parts(out, vec![ids.len(), d]))
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor, DeviceError> {
        let d = x.cols();
        assert_eq!(weight.len(), d, "rms_norm over {d}");
        let mut out = self.alloc(x.len())?;
        let (rows, d32) = (u32_of(x.rows()), u32_of(d));
        launch!(self, "rms_norm", shape((x.rows(), 1), ROW_BLOCK);
            &mut out, x.data(), weight.data(), &rows, &d32, &eps)?;
        Ok(Tensor::from_parts(out, x.shape().to_vec()))
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        positions: &[u32],
        base: f32,
        divisors: &CudaTensor,
    ) -> Result<(), DeviceError> {
        let head_dim = rope_head_dim(x, heads, positions);
        assert_eq!(divisors.len(), head_dim / 2, "rope: one divisor per pair");
        let positions = self.indices("positions", positions)?;
        let (rows, heads32, hd) = (u32_of(x.rows()), u32_of(heads), u32_of(head_dim));
        // One thread per pair of a head, in whole warps.
        let block = (head_dim / 2).next_multiple_of(32).min(1024) as u32;
        launch!(self, "rope", shape((x.rows(), 1), block);
            x.data_mut(), &*positions, &rows, &heads32, &hd, &base, divisors.data())
    }

    fn silu_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<(), DeviceError> {
        assert_eq!(gate.shape(), up.shape(), "silu_mul");
        let n = u32_of(gate.len());
        launch!(self, "silu_mul", elements(gate.len()); gate.data_mut(), up.data(), &n)
    }

    fn scatter_rows(
        &self,
        dest: &mut CudaTensor,
        x: &CudaTensor,
        rows: &[u32],
    ) -> Result<(), DeviceError> {
        check_scatter(dest, x, rows);
        let d = dest.cols();
        let targets = self.indices("cache slots", rows)?;
        let (n, d32) = (u32_of(rows.len()), u32_of(d));
        launch!(self, "scatter_rows", shape((rows.len(), 1), 256);
            dest.data_mut(), x.data(), &*targets, &n, &d32)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        layout: PagedAttention<'_>,
    ) -> Result<CudaTensor, DeviceError> {
        let PagedAttention {
            seqs,
            block_size,
            heads,
            kv_heads,
            scale,
        } = layout;
        let (rows, width) = (q.rows(), q.cols());
        let head_dim = layout.head_dim(q, k, v);
        assert!(
            head_dim <= MAX_HEAD_DIM,
            "paged_attention: head_dim {head_dim}"
        );
        // One upload for the step, shared by every layer: each row's sequence, each row's
        // position, the block tables one after another, and where each table starts.
        let tables: usize = seqs.iter().map(|s| s.blocks.len()).sum();
        let mut meta = Vec::with_capacity(2 * rows + tables + seqs.len());
        for (s, seq) in seqs.iter().enumerate() {
            meta.extend(std::iter::repeat_n(s as u32, seq.new));
        }
        for seq in seqs {
            meta.extend((seq.past..seq.past + seq.new).map(u32_of));
        }
        for seq in seqs {
            meta.extend_from_slice(seq.blocks);
        }
        let mut offset = 0;
        for seq in seqs {
            meta.push(u32_of(offset));
            offset += seq.blocks.len();
        }
        let meta = self.indices("paged attention", &meta)?;
        let row_seq = meta.slice(0..rows);
        let row_pos = meta.slice(rows..2 * rows);
        let block_tables = meta.slice(2 * rows..2 * rows + tables);
        let table_offsets = meta.slice(2 * rows + tables..);
        let mut out = self.alloc(rows * width)?;
        let (n, h, kvh, hd, bs) = (
            u32_of(rows),
            u32_of(heads),
            u32_of(kv_heads),
            u32_of(head_dim),
            u32_of(block_size),
        );
        launch!(self, "paged_attention", shape((rows, heads), ATTENTION_BLOCK);
            &mut out, q.data(), k.data(), v.data(), &row_seq, &row_pos, &block_tables,
            &table_offsets, &n, &h, &kvh, &hd, &bs, &scale)?;
        Ok(Tensor::from_parts(out, vec![rows, width]))
    }

    fn mean_pool(&self, x: &CudaTensor, seq_lens: &[usize]) -> Result<CudaTensor, DeviceError> {
        let d = x.cols();
        assert_eq!(seq_lens.iter().sum::<usize>(), x.rows(), "mean_pool");
        let mut meta = Vec::with_capacity(2 * seq_lens.len());
        let mut start = 0;
        for &len in seq_lens {
            meta.push(u32_of(start));
            start += len;
        }
        meta.extend(seq_lens.iter().map(|&len| u32_of(len)));
        let meta = self.indices("pooling", &meta)?;
        let (starts, lens) = (meta.slice(0..seq_lens.len()), meta.slice(seq_lens.len()..));
        let mut out = self.alloc(seq_lens.len() * d)?;
        let (seqs, d32) = (u32_of(seq_lens.len()), u32_of(d));
        launch!(self, "mean_pool", shape((seq_lens.len(), 1), 128);
            &mut out, x.data(), &starts, &lens, &seqs, &d32)?;
        Ok(Tensor::from_parts(out, vec![seq_lens.len(), d]))
    }
}
