//! How are weights stored, and how are they multiplied as stored? GGML's weight encodings,
//! and matrix products that read them as they are.
//!
//! A quantised matrix is never widened to f32 as a whole: each thread dequantises one weight
//! row at a time into a small buffer and multiplies it with every activation row, in f32
//! with f32 accumulation. The result is that of a float32 product with the dequantised
//! matrix (up to summation order), which is what the references compute. Activations are
//! never quantised: SmolLM2's top two logits can lie within 0.1 of each other, and rounding
//! the activations (as llama.cpp's Q8 dot products do) changes its answers.

use half::{bf16, f16};
use std::cell::RefCell;

use crate::team;

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::prefetch;

/// The element encodings this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32: an f16 scale `d`, then 16 bytes of 4-bit values `q`; w = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 `d`, f16 `m`, then 16 bytes of 4-bit values `q`; w = d·q + m.
    /// Byte `i` holds weight `i` in its low nibble and weight `i + 16` in its high one.
    Q4_1,
    /// Blocks of 32: an f16 scale `d`, then 32 signed bytes `q`; w = d·q.
    Q8_0,
}

/// GGML's names for its type ids, for errors about types this engine does not read.
const GGML_TYPE_NAMES: [&str; 31] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
    "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
    "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
];

impl GgmlType {
    /// Every encoding this engine reads.
    pub const ALL: [GgmlType; 6] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
    ];

    /// The type with GGML id `id`, or that id's name (`"unknown"` past the table) when this
    /// engine does not read it.
    pub fn from_id(id: u32) -> Result<GgmlType, &'static str> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => {
                return Err(GGML_TYPE_NAMES
                    .get(id as usize)
                    .copied()
                    .unwrap_or("unknown"))
            }
        })
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
        }
    }

    /// Bytes of a block's scales (the f16 `d`, and `m` for Q4_1), the rest of it being its
    /// quantised values; 0 for the float encodings.
    pub fn scale_bytes(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 0,
            GgmlType::Q4_0 | GgmlType::Q8_0 => 2,
            GgmlType::Q4_1 => 4,
        }
    }

    /// The encoding's name in lower case (`q4_1`), as the CUDA kernels for it end.
    pub fn short_name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of `elements` values; `elements` is a whole number of blocks.
    pub fn row_bytes(self, elements: usize) -> usize {
        elements / self.block_len() * self.block_bytes()
    }
}

#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `out.len()` values from `bytes` (whole blocks of `dtype`).
// Inlined so that the matrix kernel's AVX2 copy below gets an AVX2 copy of this too.
#[inline(always)]
pub fn dequantize(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        dtype.row_bytes(out.len()),
        "{dtype:?}: {} bytes for {} values",
        bytes.len(),
        out.len()
    );
    match dtype {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let (bb, sb) = (dtype.block_bytes(), dtype.scale_bytes());
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bb)) {
                let (scales, q) = b.split_at(sb);
                dequantize_block(dtype, scales, q, o.try_into().expect("32 values"));
            }
        }
    }
}

/// Decodes one block of 32 values from its scales and its quantised values.
// Fixed-size arrays let the compiler drop bounds checks and vectorise.
#[inline(always)]
fn dequantize_block(dtype: GgmlType, scales: &[u8], q: &[u8], o: &mut [f32; 32]) {
    match dtype {
        GgmlType::Q4_0 => {
            let q: &[u8; 16] = q.try_into().expect("16 bytes");
            let d = f16_at(scales, 0);
            let (lo, hi) = o.split_at_mut(16);
            for (o, q) in lo.iter_mut().zip(q) {
                *o = d * (f32::from(q & 0x0f) - 8.0);
            }
            for (o, q) in hi.iter_mut().zip(q) {
                *o = d * (f32::from(q >> 4) - 8.0);
            }
        }
        GgmlType::Q4_1 => {
            let q: &[u8; 16] = q.try_into().expect("16 bytes");
            let (d, m) = (f16_at(scales, 0), f16_at(scales, 2));
            let (lo, hi) = o.split_at_mut(16);
            for (o, q) in lo.iter_mut().zip(q) {
                *o = d * f32::from(q & 0x0f) + m;
            }
            for (o, q) in hi.iter_mut().zip(q) {
                *o = d * f32::from(q >> 4) + m;
            }
        }
        GgmlType::Q8_0 => {
            let q: &[u8; 32] = q.try_into().expect("32 bytes");
            let d = f16_at(scales, 0);
            for (o, &q) in o.iter_mut().zip(q) {
                *o = d * f32::from(q as i8);
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("{dtype:?} has no blocks"),
    }
}

/// How the rows of a [`QMatrix`] of a block encoding keep their blocks' scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLayout {
    /// As GGUF stores them: each block's scales in front of its values.
    Interleaved,
    /// All of a row's scales first, in block order, then all its values: the same bytes,
    /// moved. What the CPU's fused kernels read ([`QMatrix::with_scales_first`]): a row's
    /// scales are widened to f32 eight or sixteen at a time, where one block's took four
    /// shuffles on the vector unit the weight lookups need (docs/benchmarks.md).
    ScalesFirst,
}

/// Decodes the row `row` of `dtype`, laid out as `layout`, into `out`.
#[inline(always)]
pub fn dequantize_row_in(dtype: GgmlType, layout: RowLayout, row: &[u8], out: &mut [f32]) {
    let sb = dtype.scale_bytes();
    if layout == RowLayout::Interleaved || sb == 0 {
        return dequantize(dtype, row, out);
    }
    assert_eq!(row.len(), dtype.row_bytes(out.len()), "{dtype:?} row");
    let blocks = out.len() / 32;
    let (scales, q) = row.split_at(blocks * sb);
    let qb = dtype.block_bytes() - sb;
    for ((o, s), q) in out
        .chunks_exact_mut(32)
        .zip(scales.chunks_exact(sb))
        .zip(q.chunks_exact(qb))
    {
        dequantize_block(dtype, s, q, o.try_into().expect("32 values"));
    }
}

/// A matrix of `rows × cols` values of `dtype`, row-major, as GGUF stores a weight (`cols`
/// is GGUF's first dimension: the layer's input width).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
    pub layout: RowLayout,
}

impl QMatrix {
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> QMatrix {
        assert!(
            cols.is_multiple_of(dtype.block_len()),
            "{dtype:?} rows of {cols}"
        );
        assert_eq!(
            bytes.len(),
            rows * dtype.row_bytes(cols),
            "{dtype:?} {rows}×{cols}"
        );
        QMatrix {
            dtype,
            rows,
            cols,
            bytes,
            layout: RowLayout::Interleaved,
        }
    }

    /// The same matrix with each row's scales moved in front of its values
    /// ([`RowLayout::ScalesFirst`]); float encodings, which have no scales, as they are.
    pub fn with_scales_first(mut self) -> QMatrix {
        let sb = self.dtype.scale_bytes();
        if sb == 0 || self.layout == RowLayout::ScalesFirst {
            return self;
        }
        let (bb, n) = (self.dtype.block_bytes(), self.row_bytes());
        let mut moved = Vec::with_capacity(self.bytes.len());
        for row in self.bytes.chunks_exact(n) {
            for block in row.chunks_exact(bb) {
                moved.extend_from_slice(&block[..sb]);
            }
            for block in row.chunks_exact(bb) {
                moved.extend_from_slice(&block[sb..]);
            }
        }
        self.bytes = moved;
        self.layout = RowLayout::ScalesFirst;
        self
    }

    #[inline(always)]
    fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols)
    }

    /// Row `r`, decoded into `out`.
    #[inline(always)]
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let n = self.row_bytes();
        dequantize_row_in(
            self.dtype,
            self.layout,
            &self.bytes[r * n..(r + 1) * n],
            out,
        );
    }
}

/// A dot product with 32 independent accumulators, which the compiler keeps in SIMD
/// registers (one running sum, or one register, would be a chain of dependent adds, each
/// waiting for the last), summed by [`reduce32`]. `FMA`: fused multiply-adds, for the copy
/// compiled with FMA enabled (elsewhere `mul_add` would be a slow library call). This is
/// the arithmetic of every generated row: the fused kernels in [`x86`] give the same bits.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        let x: &[f32; 32] = x.try_into().expect("32 values");
        let y: &[f32; 32] = y.try_into().expect("32 values");
        for i in 0..32 {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    reduce32(&acc) + tail
}

/// The sum of 32 lane accumulators as a tree of halves (lane `i` plus lane `i + 16`, then
/// `i + 8`, ...): five dependent adds, not 31, and the order in which a 16-lane register
/// pair, or four 8-lane ones, reduce by folding their upper halves down.
#[inline(always)]
pub(crate) fn reduce32(lanes: &[f32; 32]) -> f32 {
    let mut v = *lanes;
    let mut width = 16;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

/// Output rows (weight rows) per parallel task of [`matmul`], at least: a task decodes one
/// weight row at a time, so its size does not change what stays in cache.
const MIN_ROWS_PER_TASK: usize = 16;

/// Tasks per thread for [`matmul`] over a batch of rows: a few, so that a thread that
/// finishes early can take another's. One activation row (a lone sequence's decode step) is
/// a stream of weights: one contiguous band per thread streams best, and each claim moves a
/// cache line between cores (four per thread decoded SmolLM2 9% slower, docs/benchmarks.md).
const TASKS_PER_THREAD: usize = 4;

/// Weight rows `first..` of `w` against every row of `x`, into `part` (`[rows, m]`), through
/// `row`, a buffer of one decoded weight row, decoded by `decode`.
#[inline(always)]
fn band<const FMA: bool>(
    w: &QMatrix,
    x: &[f32],
    first: usize,
    row: &mut [f32],
    part: &mut [f32],
    decode: impl Fn(&[u8], &mut [f32]),
) {
    let m = x.len() / w.cols;
    let n = w.row_bytes();
    for (j, out) in part.chunks_exact_mut(m).enumerate() {
        let r = first + j;
        decode(&w.bytes[r * n..(r + 1) * n], row);
        for (o, xi) in out.iter_mut().zip(x.chunks_exact(w.cols)) {
            *o = dot::<FMA>(xi, row);
        }
    }
}

/// [`band`] compiled for AVX2 and FMA: 8-wide lanes and fused multiply-adds, where the
/// default x86-64 target has only SSE2's 4-wide ones; for the encodings the fused kernels
/// do not cover.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn band_avx2(w: &QMatrix, x: &[f32], first: usize, row: &mut [f32], part: &mut [f32]) {
    band::<true>(w, x, first, row, part, |bytes, out| {
        dequantize_row_in(w.dtype, w.layout, bytes, out)
    });
}

fn run_band(w: &QMatrix, x: &[f32], first: usize, row: &mut [f32], part: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
        let (bytes, k) = (&w.bytes[..], w.cols);
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2");
        // The fused kernels read rows whose scales come first (see `Cpu::upload_matrix`).
        let fused = w.layout == RowLayout::ScalesFirst;
        // SAFETY: each kernel runs only where the CPU has the features it is compiled for,
        // checked just now.
        unsafe {
            match (w.dtype, fused && avx512, fused && avx2) {
                (GgmlType::Q4_1, true, _) => x86::avx512::band_q4_1(bytes, k, x, first, part, row),
                (GgmlType::Q8_0, true, _) => x86::avx512::band_q8_0(bytes, k, x, first, part, row),
                (GgmlType::Q4_1, false, true) => {
                    x86::avx2::band_q4_1(bytes, k, x, first, part, row)
                }
                (GgmlType::Q8_0, false, true) => {
                    x86::avx2::band_q8_0(bytes, k, x, first, part, row)
                }
                _ if avx2 => band_avx2(w, x, first, row, part),
                _ => band::<true>(w, x, first, row, part, |bytes, out| {
                    dequantize_row_in(w.dtype, w.layout, bytes, out)
                }),
            }
        }
        return;
    }
    band::<false>(w, x, first, row, part, |bytes, out| {
        dequantize_row_in(w.dtype, w.layout, bytes, out)
    });
}

/// `out[m × w.rows] = x[m × w.cols] · wᵀ` by dot products, one weight row decoded at a time
/// and dotted with every row of `x`: the fastest way for a few rows (one token being
/// decoded), where a GEMM's packing would cost more than the products. Each result is the
/// same [`dot`] whatever `m` is.
pub fn matmul(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x is not {m}×{k}");
    assert_eq!(out.len(), m * n, "matmul: out is not {m}×{n}");
    if m == 0 {
        return;
    }
    // Each task owns a band of weight rows, that is a band of output columns.
    let per_task = n
        .div_ceil(team::threads() * if m == 1 { 1 } else { TASKS_PER_THREAD })
        .max(MIN_ROWS_PER_TASK);
    let columns = SharedOut(out.as_mut_ptr());
    team::for_each(n.div_ceil(per_task), |band| {
        let first = band * per_task;
        let rows = per_task.min(n - first);
        BAND_SCRATCH.with_borrow_mut(|(row, part)| {
            row.resize(k, 0.0);
            if m == 1 {
                // One activation row: a band's results, `[rows, 1]`, are in output order.
                // SAFETY: out is 1×n; this task alone writes first..first + rows.
                let part =
                    unsafe { std::slice::from_raw_parts_mut(columns.ptr().add(first), rows) };
                run_band(w, x, first, row, part);
                return;
            }
            // A band's results come out `[rows, m]`; the task puts them into their columns
            // of `out` itself, so the transposition runs on every thread.
            part.resize(rows * m, 0.0);
            run_band(w, x, first, row, &mut part[..rows * m]);
            for i in 0..m {
                // SAFETY: out is m×n; this task alone writes columns first..first + rows.
                let out_row = unsafe {
                    std::slice::from_raw_parts_mut(columns.ptr().add(i * n + first), rows)
                };
                // Row by row of `out`: its writes are contiguous, the reads stay in L1.
                for (j, value) in out_row.iter_mut().enumerate() {
                    *value = part[j * m + i];
                }
            }
        });
    });
}

thread_local! {
    /// A [`matmul`] task's buffers, kept by each thread: a decoded weight row (or a row's
    /// widened scales) and its band's results.
    static BAND_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// About how many weight rows a task of [`gemm`] decodes into an f32 tile (`GEMM_TILE × k`:
/// 576 KiB at SmolLM2's widest common width, 576, within L2 while the GEMM packs it). The
/// GEMM packs the whole prompt again for every tile, so fewer, larger tiles cost less at
/// long prompts: 256 rows against 128 gave 1.05-1.1× the prefill tokens per second at 16
/// prompts of 128 tokens, the same at one (docs/benchmarks.md).
const GEMM_TILE: usize = 256;

/// Weight rows per task of [`gemm`] for a matrix of `n` rows: about [`GEMM_TILE`], and as
/// many tiles for every thread (576 rows in tiles of 256 would leave one of two threads a
/// single tile against two).
fn gemm_tile_rows(n: usize) -> usize {
    let threads = team::threads();
    let tiles_per_thread = n.div_ceil(threads * GEMM_TILE).max(1);
    n.div_ceil(threads * tiles_per_thread).max(1)
}

/// `out[m × w.rows] = x[m × w.cols] · wᵀ` through `matrixmultiply`'s GEMM, a band of
/// weight rows ([`gemm_tile_rows`]) decoded into an f32 tile at a time (never the whole
/// matrix): the fastest way for many rows (a prompt). Each result's sums run over `k` in
/// the same order whatever `m` is, or however the rows are banded, so a row gets the same
/// bits in any batch.
pub fn gemm(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "gemm: x is not {m}×{k}");
    assert_eq!(out.len(), m * n, "gemm: out is not {m}×{n}");
    if m == 0 {
        return;
    }
    // Each task writes its tile's columns of `out` in place (row stride n), where a part of
    // its own was zeroed, filled and copied over (a tenth of a long prompt's time).
    let columns = SharedOut(out.as_mut_ptr());
    let tile_rows = gemm_tile_rows(n);
    team::for_each(n.div_ceil(tile_rows), |band| {
        GEMM_TILE_SCRATCH.with_borrow_mut(|tile| {
            let first = band * tile_rows;
            let rows = tile_rows.min(n - first);
            tile.resize(rows * k, 0.0);
            decode_rows(w, first, &mut tile[..rows * k]);
            // SAFETY: x is m×k (row stride k); the tile, rows×k, is read transposed as
            // k×rows (row stride 1, column stride k); out is m×n (row stride n), of which
            // this task writes columns first..first + rows and no other task does.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    rows,
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    tile.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    columns.ptr().wrapping_add(first),
                    n as isize,
                    1,
                );
            }
        });
    });
}

thread_local! {
    /// A [`gemm`] task's decoded tile, kept by each thread.
    static GEMM_TILE_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw output pointer shared by threads that write disjoint parts of one buffer (here
/// [`gemm`]'s tiles, each its own columns; the CPU device's products and attention).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user writes through it only to elements no other thread touches, and the
// buffer outlives the parallel section that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    // A method, not field access, so closures capture the whole Send wrapper (edition 2021
    // closures would otherwise capture the bare pointer field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Weight rows `first..` of `w`, as many as `out` holds, decoded into `out`.
fn decode_rows(w: &QMatrix, first: usize, out: &mut [f32]) {
    let n = w.row_bytes();
    #[cfg(target_arch = "x86_64")]
    if w.layout == RowLayout::ScalesFirst && std::is_x86_feature_detected!("avx2") {
        let sb = w.dtype.scale_bytes() * w.cols / 32;
        for (r, out) in out.chunks_exact_mut(w.cols).enumerate() {
            let (scales, q) = w.bytes[(first + r) * n..][..n].split_at(sb);
            // SAFETY: the CPU has AVX2, checked just now.
            match w.dtype {
                GgmlType::Q4_1 => unsafe { x86::avx2::dequantize_q4_1(scales, q, out) },
                GgmlType::Q8_0 => unsafe { x86::avx2::dequantize_q8_0(scales, q, out) },
                _ => dequantize_row_in(w.dtype, w.layout, &w.bytes[(first + r) * n..][..n], out),
            }
        }
        return;
    }
    for (r, out) in out.chunks_exact_mut(w.cols).enumerate() {
        w.dequantize_row(first + r, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        values(n, seed)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect()
    }

    /// Random blocks whose scales are sane f16s (random bytes would include NaNs and
    /// infinities in the scale fields).
    fn random_matrix(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let mut raw = bytes(rows * dtype.row_bytes(cols), seed);
        let scale = |raw: &mut [u8], at: usize, v: f32| {
            raw[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
        };
        match dtype {
            GgmlType::F32 => {
                for (chunk, v) in raw.chunks_exact_mut(4).zip(values(rows * cols, seed)) {
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
            }
            GgmlType::F16 => {
                for (chunk, v) in raw.chunks_exact_mut(2).zip(values(rows * cols, seed)) {
                    chunk.copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            GgmlType::BF16 => {
                for (chunk, v) in raw.chunks_exact_mut(2).zip(values(rows * cols, seed)) {
                    chunk.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_1 => {
                let bb = dtype.block_bytes();
                let s = values(raw.len() / bb * 2, seed + 1);
                for (i, block) in raw.chunks_exact_mut(bb).enumerate() {
                    scale(block, 0, s[2 * i] * 0.05);
                    if dtype == GgmlType::Q4_1 {
                        scale(block, 2, s[2 * i + 1]);
                    }
                }
            }
        }
        QMatrix::new(dtype, rows, cols, raw)
    }

    #[test]
    fn q4_1_and_q8_0_blocks_decode_as_ggml_lays_them_out() {
        // Q4_1: d = 0.5, m = -1; byte i = (i+1)<<4 | i: weight i = i, weight 16+i = i+1.
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| ((i + 1) & 0x0f) << 4 | i));
        let mut out = [0.0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out);
        for i in 0..16 {
            assert_eq!(out[i], 0.5 * i as f32 - 1.0, "weight {i}");
            assert_eq!(
                out[16 + i],
                0.5 * ((i + 1) % 16) as f32 - 1.0,
                "weight {}",
                16 + i
            );
        }
        // Q8_0: d = 0.25, q = -16..16.
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((-16i8..16).map(|q| q as u8));
        dequantize(GgmlType::Q8_0, &block, &mut out);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.25 * (i as f32 - 16.0));
        }
    }

    #[test]
    fn matmul_matches_dequantise_then_multiply() {
        for dtype in GgmlType::ALL {
            // One row (decode), a few (prefill), and a row count that leaves a ragged band.
            for (m, n, k) in [
                (1, 37, 64),
                (5, 96, 576),
                (3, 16 * 3 + 5, 96),
                (4, 128 + 37, 64),
            ] {
                let w = random_matrix(dtype, n, k, 7);
                let moved = w.clone().with_scales_first();
                let x = values(m * k, 8);
                let mut dense = vec![0.0f32; n * k];
                dequantize(dtype, &w.bytes, &mut dense);
                let mut got = vec![0.0f32; m * n];
                matmul(&x, m, &w, &mut got);
                let mut by_gemm = vec![0.0f32; m * n];
                gemm(&x, m, &w, &mut by_gemm);
                // The CPU's own layout (its fused kernels, where this CPU has them) gives the
                // same bits on either path.
                let mut moved_dot = vec![0.0f32; m * n];
                matmul(&x, m, &moved, &mut moved_dot);
                let mut moved_gemm = vec![0.0f32; m * n];
                gemm(&x, m, &moved, &mut moved_gemm);
                assert!(
                    bits(&moved_dot) == bits(&got),
                    "{dtype:?} dot, scales first"
                );
                assert!(
                    bits(&moved_gemm) == bits(&by_gemm),
                    "{dtype:?} gemm, scales first"
                );
                // The portable kernel too, which this machine's AVX2 dispatch skips: its
                // output is [n, m], the transpose.
                let mut portable = vec![0.0f32; n * m];
                band::<false>(&w, &x, 0, &mut vec![0.0; k], &mut portable, |b, o| {
                    dequantize(dtype, b, o)
                });
                for i in 0..m {
                    for j in 0..n {
                        let (a, b) = (got[i * n + j], portable[j * m + i]);
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                            "{dtype:?} [{i},{j}]"
                        );
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| f64::from(x[i * k + p]) * f64::from(dense[j * k + p]))
                            .sum();
                        for (path, got) in [("dot", &got), ("gemm", &by_gemm)] {
                            let g = f64::from(got[i * n + j]);
                            assert!(
                                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{path} {dtype:?} {m}×{n}×{k} [{i},{j}]: got {g}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_among_others_on_either_path() {
        let (m, n, k) = (9, 300, 576);
        let w = random_matrix(GgmlType::Q4_1, n, k, 11).with_scales_first();
        let x = values(m * k, 12);
        for path in [matmul as fn(&[f32], usize, &QMatrix, &mut [f32]), gemm] {
            let mut batch = vec![0.0f32; m * n];
            path(&x, m, &w, &mut batch);
            for (row, want) in x.chunks_exact(k).zip(batch.chunks_exact(n)) {
                let mut alone = vec![0.0f32; n];
                path(row, 1, &w, &mut alone);
                assert!(alone == want, "a row's products changed with the batch");
            }
        }
    }

    #[test]
    fn scales_first_rows_decode_to_the_same_values() {
        for dtype in GgmlType::ALL {
            let w = random_matrix(dtype, 5, 576, 3);
            let moved = w.clone().with_scales_first();
            assert_eq!(moved.bytes.len(), w.bytes.len(), "{dtype:?}");
            let expected = if dtype.scale_bytes() == 0 {
                RowLayout::Interleaved
            } else {
                RowLayout::ScalesFirst
            };
            assert_eq!(moved.layout, expected, "{dtype:?}");
            for r in 0..w.rows {
                let (mut a, mut b) = (vec![0.0f32; 576], vec![1.0f32; 576]);
                w.dequantize_row(r, &mut a);
                moved.dequantize_row(r, &mut b);
                let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} row {r}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_decoders_match_the_portable_ones_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, k) = (3, 256);
            let w = random_matrix(dtype, rows, k, 21);
            let mut portable = vec![0.0f32; rows * k];
            dequantize(dtype, &w.bytes, &mut portable);
            let moved = w.with_scales_first();
            let mut simd = vec![1.0f32; rows * k];
            decode_rows(&moved, 0, &mut simd);
            assert!(
                portable
                    .iter()
                    .zip(&simd)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?}"
            );
        }
    }

    /// Every fused kernel this CPU can run, for every group size, gives the bits of
    /// `dot::<true>` over the decoded weight row: the arithmetic a generated row gets can
    /// depend neither on the batch it runs in nor on the instruction set.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_kernels_give_the_portable_dot_products_bits_for_any_group() {
        type Kernel = unsafe fn(&[u8], usize, &[f32], usize, &mut [f32], &mut [f32]);
        let has = |f: &str| match f {
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            _ => std::is_x86_feature_detected!("avx2"),
        };
        if !(std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")) {
            eprintln!("skipping: this CPU has no FMA or F16C");
            return;
        }
        let kernels: [(&str, GgmlType, Kernel); 4] = [
            ("avx512f", GgmlType::Q4_1, x86::avx512::band_q4_1),
            ("avx512f", GgmlType::Q8_0, x86::avx512::band_q8_0),
            ("avx2", GgmlType::Q4_1, x86::avx2::band_q4_1),
            ("avx2", GgmlType::Q8_0, x86::avx2::band_q8_0),
        ];
        let mut ran = 0;
        for (feature, dtype, kernel) in kernels {
            if !has(feature) {
                eprintln!("skipping {feature} {dtype:?}: not on this CPU");
                continue;
            }
            // Row widths whose scale counts leave every tail of the widening (8, 4, 1); an
            // odd number of rows, so that a lone activation row's pairs leave one over; a
            // band that does not start at the first row.
            for (n, k, first) in [(7, 96, 0), (9, 576, 2), (4, 288, 1)] {
                let w = random_matrix(dtype, n, k, 31 + k as u64);
                let moved = w.clone().with_scales_first();
                for m in 1..=17 {
                    let x = values(m * k, 40 + m as u64);
                    let rows = n - first;
                    let mut want = vec![0.0f32; rows * m];
                    // SAFETY: AVX2 and FMA are present (checked above: AVX-512 implies AVX2).
                    unsafe { band_avx2(&w, &x, first, &mut vec![0.0; k], &mut want) };
                    let mut got = vec![f32::NAN; rows * m];
                    // SAFETY: the kernel's features are present, checked above.
                    unsafe { kernel(&moved.bytes, k, &x, first, &mut got, &mut vec![0.0; k]) };
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{feature} {dtype:?} {n}×{k} from {first}, {m} rows: {got:?} against {want:?}"
                    );
                    ran += 1;
                }
            }
        }
        assert!(ran > 0, "no kernel ran");
    }

    #[test]
    fn a_tree_of_halves_sums_the_lanes() {
        let lanes: [f32; 32] = std::array::from_fn(|i| i as f32);
        assert_eq!(reduce32(&lanes), (0..32).sum::<i32>() as f32);
        // Lane 0 meets lane 16 first, so the 1 survives; left to right, 1e8 + 1 loses it.
        let mut big = [0.0f32; 32];
        big[0] = 1.0e8;
        big[16] = -1.0e8;
        big[1] = 1.0;
        assert_eq!(reduce32(&big), 1.0);
    }

    #[test]
    fn unknown_types_are_named() {
        assert_eq!(GgmlType::from_id(12), Err("Q4_K"));
        assert_eq!(GgmlType::from_id(999), Err("unknown"));
        assert_eq!(GgmlType::from_id(3), Ok(GgmlType::Q4_1));
    }
}
