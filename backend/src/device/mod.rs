//! What must hardware do to run a model? The tensor operations a model needs from it, and
//! nothing more; and on which hardware a model runs ([`Target`]).
//!
//! A model is written once against [`Device`]; the CPU ([`cpu::Cpu`]) and NVIDIA GPUs
//! ([`cuda::CudaDevice`]) implement it. The trait therefore speaks only
//! of whole-tensor operations a GPU can run as one kernel or one library call each (no
//! element access, no per-row callbacks), and every operation returns a `Result`, because a
//! GPU can fail where the CPU cannot (out of memory, a failed launch).
//!
//! Tensors are dense, row-major f32. Activations of a batch are *packed*: the tokens of
//! every sequence one after another, `[tokens, features]`, with the sequence lengths passed
//! to the operations that must not mix sequences (attention, pooling). Packing wastes no
//! work on padding and needs no attention mask.
//!
//! Shapes are checked by the caller's construction; an operation handed mismatched shapes
//! is a bug in the model code and panics rather than returning an error.

pub mod cpu;
pub mod cuda;

use std::fmt;

use crate::quant::QMatrix;

/// Where a model runs: `--device` with `auto` resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Target {
    #[default]
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl Target {
    /// `--device auto`: the first GPU if one can be used, else the CPU, with the reason.
    /// "Can be used" means set up in full (kernels compiled and loaded, a cuBLAS handle
    /// made), so a GPU that is there but breaks gives the CPU, not a failed start.
    pub fn auto() -> (Target, String) {
        match cuda::CudaDevice::new(0) {
            Ok(device) => (
                Target::Cuda(0),
                format!("running on {} (cuda:0)", device.gpu().name),
            ),
            Err(why) => (
                Target::Cpu,
                format!("no usable GPU ({why}); running on the CPU"),
            ),
        }
    }
}

/// A dense row-major f32 tensor whose data lives on some device.
#[derive(Clone)]
pub struct Tensor<S> {
    data: S,
    shape: Vec<usize>,
}

impl<S> Tensor<S> {
    /// Wraps device storage; for device implementations, which know that `data` holds
    /// exactly `shape.iter().product()` floats.
    pub fn from_parts(data: S, shape: Vec<usize>) -> Self {
        Self { data, shape }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of rows when read as a matrix: every dimension but the last.
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }

    /// The length of the last dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn data(&self) -> &S {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut S {
        &mut self.data
    }
}

impl<S> fmt::Debug for Tensor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

/// A device operation failed for a reason of the device's own (memory, a driver error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{device}: {message}")]
pub struct DeviceError {
    pub device: String,
    pub message: String,
}

/// Multi-head self-attention over packed sequences: which rows belong together, and how.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    /// Tokens per sequence, in packing order; they sum to the tensors' row count.
    pub seq_lens: &'a [usize],
    pub heads: usize,
    /// Multiplies the scores before the softmax: 1/sqrt(head_dim) for BERT.
    pub scale: f32,
}

/// One sequence's part of a [`PagedAttention`] batch.
#[derive(Debug, Clone, Copy)]
pub struct PagedSequence<'a> {
    /// Tokens already in the cache before this step's: new row `i` sits at position
    /// `past + i` and sees positions `0..=past + i`.
    pub past: usize,
    /// This step's tokens: `new` consecutive rows of the batch (1 for a decode step).
    pub new: usize,
    /// The cache blocks holding positions `0..past + new`, in order: position `p` is row
    /// `blocks[p / block_size] · block_size + p % block_size` of the cache.
    pub blocks: &'a [u32],
}

/// Causal grouped-query attention of a batch of sequences over a paged key/value cache.
#[derive(Debug, Clone, Copy)]
pub struct PagedAttention<'a> {
    /// In the order their rows are packed in the batch.
    pub seqs: &'a [PagedSequence<'a>],
    pub block_size: usize,
    pub heads: usize,
    /// Key/value heads, dividing `heads`: query head `h` reads key/value head
    /// `h / (heads / kv_heads)` (grouped-query attention).
    pub kv_heads: usize,
    /// Multiplies the scores before the softmax: 1/sqrt(head_dim).
    pub scale: f32,
}

impl Attention<'_> {
    /// The width of one head, once `q`, `k` and `v` are checked against this layout (a
    /// mismatch is a bug in the model code and panics).
    pub fn head_dim<S>(&self, q: &Tensor<S>, k: &Tensor<S>, v: &Tensor<S>) -> usize {
        let width = q.cols();
        assert!(
            k.shape() == q.shape() && v.shape() == q.shape(),
            "attention: q {q:?} k {k:?} v {v:?}"
        );
        assert_eq!(self.seq_lens.iter().sum::<usize>(), q.rows(), "attention");
        assert!(
            width.is_multiple_of(self.heads),
            "attention: {width} over {} heads",
            self.heads
        );
        width / self.heads
    }
}

impl PagedAttention<'_> {
    /// The width of one head, once `q` and the caches `k` and `v` are checked against this
    /// layout, every sequence's blocks included (a mismatch panics, as above).
    pub fn head_dim<S>(&self, q: &Tensor<S>, k: &Tensor<S>, v: &Tensor<S>) -> usize {
        let (heads, kv_heads, block_size) = (self.heads, self.kv_heads, self.block_size);
        let width = q.cols();
        assert!(
            heads.is_multiple_of(kv_heads) && width.is_multiple_of(heads),
            "paged_attention: {heads} heads over {kv_heads}"
        );
        let head_dim = width / heads;
        assert!(
            k.cols() == kv_heads * head_dim && v.shape() == k.shape(),
            "paged_attention: k {k:?} v {v:?}"
        );
        assert_eq!(
            self.seqs.iter().map(|s| s.new).sum::<usize>(),
            q.rows(),
            "paged_attention: sequences' rows"
        );
        for seq in self.seqs {
            let total = seq.past + seq.new;
            assert!(
                seq.blocks.len() * block_size >= total
                    && seq
                        .blocks
                        .iter()
                        .all(|&b| (b as usize + 1) * block_size <= k.rows()),
                "paged_attention: {total} positions in blocks {:?} of {block_size}",
                seq.blocks
            );
        }
        head_dim
    }
}

/// The width of one head of `x` for [`Device::rope`], once checked (panics on a mismatch).
pub fn rope_head_dim<S>(x: &Tensor<S>, heads: usize, positions: &[u32]) -> usize {
    let width = x.cols();
    assert_eq!(positions.len(), x.rows(), "rope: one position per row");
    assert!(
        width.is_multiple_of(heads) && (width / heads).is_multiple_of(2),
        "rope: {width} over {heads} heads"
    );
    width / heads
}

/// Checks the arguments of [`Device::scatter_rows`] (panics on a mismatch).
pub fn check_scatter<S>(dest: &Tensor<S>, x: &Tensor<S>, rows: &[u32]) {
    let capacity = dest.rows();
    assert_eq!(x.cols(), dest.cols(), "scatter_rows: {x:?} into {dest:?}");
    assert_eq!(x.rows(), rows.len(), "scatter_rows: one row index per row");
    if let Some(r) = rows.iter().find(|&&r| r as usize >= capacity) {
        panic!("scatter_rows: row {r} of {capacity}");
    }
}

/// Where tensors live and how they are computed on.
pub trait Device: Send + Sync + 'static {
    /// The device's buffer of f32s (a `Vec<f32>` on the CPU, device memory on a GPU).
    type Storage: Send + Sync;

    /// A weight matrix kept in its stored encoding (F32, F16, Q8_0, Q4_1...), so quantised
    /// weights take their quantised size in device memory.
    type Matrix: Send + Sync;

    /// A short name for logs and errors: `cpu`, `cuda:0`.
    fn name(&self) -> String;

    /// Runs `work`, a whole forward pass, where the device's operations are cheapest to
    /// start. The CPU runs it on one of its worker threads: an operation split from there
    /// hands parts to the other workers directly, where from an outside thread each of a
    /// decode step's few hundred operations would wake the pool and sleep until it is done.
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    /// Copies host floats to the device as a tensor of `shape`.
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// A tensor of `shape` holding zeros, made on the device (a key/value cache can be most
    /// of a GPU's memory: it is not worth sending over from the host).
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// Memory the device has free for a key/value cache, in bytes; `None` where it has no
    /// memory of its own to budget (the CPU).
    fn free_memory(&self) -> Option<usize> {
        None
    }

    /// Copies a tensor back to the host.
    fn download(&self, x: &Tensor<Self::Storage>) -> Result<Vec<f32>, DeviceError>;

    /// Row `ids[i]` of `table` as row `i` of the result: embedding look-up. Every id must be
    /// below `table.rows()`; callers check ids that come from outside.
    fn gather_rows(
        &self,
        table: &Tensor<Self::Storage>,
        ids: &[u32],
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// `x · weightᵀ + bias`: a linear layer with weights stored `[out, in]`, as PyTorch and
    /// safetensors store them. `x` is `[rows, in]`, the result `[rows, out]`.
    fn linear(
        &self,
        x: &Tensor<Self::Storage>,
        weight: &Tensor<Self::Storage>,
        bias: Option<&Tensor<Self::Storage>>,
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// `bias` (one value per column) added to every row of `x`: the query/key/value biases
    /// of Qwen2-style attention.
    fn add_bias(
        &self,
        x: &mut Tensor<Self::Storage>,
        bias: &Tensor<Self::Storage>,
    ) -> Result<(), DeviceError>;

    /// `x += y`, element-wise, for residual connections.
    fn add_assign(
        &self,
        x: &mut Tensor<Self::Storage>,
        y: &Tensor<Self::Storage>,
    ) -> Result<(), DeviceError>;

    /// Layer normalisation over the last dimension, with a learned scale and shift.
    fn layer_norm(
        &self,
        x: &Tensor<Self::Storage>,
        weight: &Tensor<Self::Storage>,
        bias: &Tensor<Self::Storage>,
        eps: f32,
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// GELU in its exact form, `x·Φ(x) = x/2·(1 + erf(x/√2))`, in place. BERT was trained
    /// with this one; the tanh approximation moves embeddings by ~1e-4.
    fn gelu(&self, x: &mut Tensor<Self::Storage>) -> Result<(), DeviceError>;

    /// Softmax over the last dimension, in place.
    fn softmax(&self, x: &mut Tensor<Self::Storage>) -> Result<(), DeviceError>;

    /// Bidirectional multi-head attention, `softmax(scale · Q·Kᵀ) · V` per sequence and
    /// head, each sequence seeing only its own tokens. `q`, `k` and `v` are
    /// `[tokens, heads · head_dim]` with head `h` in columns `h·head_dim ..`; so is the result.
    fn attention(
        &self,
        q: &Tensor<Self::Storage>,
        k: &Tensor<Self::Storage>,
        v: &Tensor<Self::Storage>,
        layout: Attention<'_>,
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// Moves a weight matrix, in its own encoding, to the device.
    fn upload_matrix(&self, matrix: QMatrix) -> Result<Self::Matrix, DeviceError>;

    /// `x · weightᵀ` for a weight of `[out, in]` in any encoding, `x` being `[rows, in]`:
    /// f32 activations and accumulation, the weight decoded block by block as it is read,
    /// never as a whole.
    ///
    /// `prompt_rows[r]` says whether row `r` is a prompt token's (else a generated one's).
    /// A device may compute the two kinds differently (the CPU runs prompt rows as a GEMM
    /// and generated rows as dot products, the fastest way for each), but a row's result
    /// must depend only on its own values and kind, never on the other rows of the batch:
    /// then a sequence gets the same logits alone or batched, chunked or preempted and
    /// recomputed, and batching never changes a greedy answer.
    fn matmul(
        &self,
        x: &Tensor<Self::Storage>,
        weight: &Self::Matrix,
        prompt_rows: &[bool],
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// Rows `ids` of an encoded matrix, decoded: the embedding look-up of a model whose
    /// table is quantised (and, tied, also its output head).
    fn gather_matrix_rows(
        &self,
        table: &Self::Matrix,
        ids: &[u32],
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// RMS normalisation over the last dimension, `x / sqrt(mean(x²) + eps) · weight`.
    fn rms_norm(
        &self,
        x: &Tensor<Self::Storage>,
        weight: &Tensor<Self::Storage>,
        eps: f32,
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// Rotary position embedding in place, on `x` of `[rows, heads · head_dim]` with row `r`
    /// at position `positions[r]`. Pairs are *adjacent* columns `(2i, 2i + 1)` of each head,
    /// turned by `position · base^(−2i / head_dim) / divisors[i]`: GGUF's llama weights are
    /// permuted for this pairing (not the "rotate half" one of Hugging Face's code), and
    /// `divisors` (`head_dim / 2` values, all 1 but for frequency scaling such as Llama 3's)
    /// slow each pair's turning.
    fn rope(
        &self,
        x: &mut Tensor<Self::Storage>,
        heads: usize,
        positions: &[u32],
        base: f32,
        divisors: &Tensor<Self::Storage>,
    ) -> Result<(), DeviceError>;

    /// `gate = silu(gate) · up`, element-wise: the SwiGLU feed-forward's gating.
    fn silu_mul(
        &self,
        gate: &mut Tensor<Self::Storage>,
        up: &Tensor<Self::Storage>,
    ) -> Result<(), DeviceError>;

    /// Row `i` of `x` into row `rows[i]` of `dest`: writes new keys and values into their
    /// cache slots, wherever their blocks are.
    fn scatter_rows(
        &self,
        dest: &mut Tensor<Self::Storage>,
        x: &Tensor<Self::Storage>,
        rows: &[u32],
    ) -> Result<(), DeviceError>;

    /// Causal grouped-query attention of `q` (`[batch rows, heads · head_dim]`, packed by
    /// sequence) over the caches `k` and `v` (`[blocks · block_size, kv_heads · head_dim]`),
    /// which already hold this step's keys and values. Each sequence sees only its own
    /// positions, through its block table. The result is shaped like `q`.
    fn paged_attention(
        &self,
        q: &Tensor<Self::Storage>,
        k: &Tensor<Self::Storage>,
        v: &Tensor<Self::Storage>,
        layout: PagedAttention<'_>,
    ) -> Result<Tensor<Self::Storage>, DeviceError>;

    /// The mean of each sequence's rows: `[tokens, d]` packed by `seq_lens` to
    /// `[seq_lens.len(), d]`.
    fn mean_pool(
        &self,
        x: &Tensor<Self::Storage>,
        seq_lens: &[usize],
    ) -> Result<Tensor<Self::Storage>, DeviceError>;
}
