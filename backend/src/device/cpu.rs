//! How does a model run on the CPU? [`Device`] with matrix products through
//! `matrixmultiply`'s SIMD kernels and the fused kernels of [`quant`], and the element-wise
//! operations as plain loops over rows. Parallel work (products, attention, large
//! element-wise and row-wise operations) goes through the [`team`], whose threads stay
//! awake between a forward pass's operations.
//!
//! Work is split only when there is enough of it: below [`PARALLEL_FLOPS`] a hand-off costs
//! more than it saves, which matters for one short sentence.

use super::{check_scatter, rope_head_dim, Attention, Device, DeviceError, PagedAttention, Tensor};
use crate::quant::{self, QMatrix, SharedOut};
use crate::team;

/// Roughly the multiply-adds below which an operation runs on the calling thread.
const PARALLEL_FLOPS: usize = 1 << 16;

/// The CPU, using as many threads as rayon's global pool has (the [`team`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

pub type CpuTensor = Tensor<Vec<f32>>;

impl Cpu {
    fn threads() -> usize {
        team::threads()
    }
}

/// Elements below which an element-wise or row-wise operation runs on the calling thread
/// alone: a lone sequence's rows take a microsecond or two, less than a hand-off to the
/// team. A batch of 16 decoding sequences (9,216 to 24,576 elements) is worth splitting
/// (1.08× its decode), and a prompt's thousands of rows left the other threads idle for a
/// tenth of a prefill (docs/benchmarks.md).
const PARALLEL_ELEMENTS: usize = 1 << 13;

/// The sines and cosines [`Cpu::rope`] last turned rows by, with what they were for: a
/// forward pass turns queries and keys at the same positions in every layer, and working
/// them out (in f64) cost more than the turning.
#[derive(Default)]
struct RopeTurns {
    positions: Vec<u32>,
    base: u32,
    divisors: Vec<f32>,
    /// `(sin, cos)` for each position, then each pair of a head.
    turns: Vec<(f32, f32)>,
}

thread_local! {
    static ROPE_TURNS: std::cell::RefCell<RopeTurns> = std::cell::RefCell::new(RopeTurns::default());
}

/// `f(x, y)` for each element of `x` and the matching one of `y`, on the team's threads
/// when there are many.
fn elementwise(x: &mut [f32], y: &[f32], f: impl Fn(&mut f32, &f32) + Sync) {
    if x.len() < PARALLEL_ELEMENTS {
        x.iter_mut().zip(y).for_each(|(x, y)| f(x, y));
    } else {
        parts_on_team(x, PARALLEL_ELEMENTS / 4, |at, x| {
            x.iter_mut().zip(&y[at..]).for_each(|(x, y)| f(x, y))
        });
    }
}

/// `f(at, part)` for each part of `data` of `size` elements (the last may be shorter), `at`
/// its first element's index, on the team's threads.
fn parts_on_team(data: &mut [f32], size: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let (len, data) = (data.len(), SharedOut(data.as_mut_ptr()));
    team::for_each(len.div_ceil(size), |part| {
        let at = part * size;
        // SAFETY: data holds len elements; this task alone touches at..at + its size.
        f(at, unsafe {
            std::slice::from_raw_parts_mut(data.ptr().add(at), size.min(len - at))
        });
    });
}

/// Elements of whole rows of `d` making up a part of about `elements`.
fn row_parts(elements: usize, d: usize) -> usize {
    elements.div_ceil(d).max(1) * d
}

/// `c[m×n] = alpha · a[m×k] · b[k×n] + beta · c`, each operand with its own row and column
/// strides (in elements). Safe wrapper-by-convention: callers pass strides that stay inside
/// the buffers they point into.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    (rsa, csa): (isize, isize),
    b: *const f32,
    (rsb, csb): (isize, isize),
    beta: f32,
    c: *mut f32,
    (rsc, csc): (isize, isize),
) {
    matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
}

impl Device for Cpu {
    type Storage = Vec<f32>;
    type Matrix = QMatrix;

    fn name(&self) -> String {
        "cpu".to_owned()
    }

    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        // `scope` runs its body on a worker of the global pool (the calling thread waits).
        rayon::scope(|_| work())
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor, DeviceError> {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{shape:?}");
        Ok(Tensor::from_parts(data.to_vec(), shape.to_vec()))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor, DeviceError> {
        Ok(Tensor::from_parts(
            vec![0.0; shape.iter().product()],
            shape.to_vec(),
        ))
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>, DeviceError> {
        Ok(x.data().clone())
    }

    fn gather_rows(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor, DeviceError> {
        let d = table.cols();
        let rows = table.rows();
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let id = id as usize;
            assert!(id < rows, "row {id} of a {rows}-row table");
            out.extend_from_slice(&table.data()[id * d..(id + 1) * d]);
        }
        Ok(Tensor::from_parts(out, vec![ids.len(), d]))
    }

    fn linear(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
    ) -> Result<CpuTensor, DeviceError> {
        let (m, k) = (x.rows(), x.cols());
        let n = weight.rows();
        assert_eq!(weight.cols(), k, "linear: x {x:?}, weight {weight:?}");
        let mut out = match bias {
            Some(bias) => {
                assert_eq!(bias.len(), n, "linear: bias {bias:?} for {n} outputs");
                let mut out = Vec::with_capacity(m * n);
                for _ in 0..m {
                    out.extend_from_slice(bias.data());
                }
                out
            }
            None => vec![0.0; m * n],
        };
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        // Each thread takes a band of output columns, that is a band of weight rows: the
        // weights (the large operand) are read once in all, not once per thread.
        let threads = if m * n * k < PARALLEL_FLOPS {
            1
        } else {
            Self::threads()
        };
        let band = n.div_ceil(threads).next_multiple_of(16).max(16);
        let c = SharedOut(out.as_mut_ptr());
        let (a, w) = (x.data().as_ptr() as usize, weight.data().as_ptr() as usize);
        let run = |start: usize| {
            let cols = band.min(n - start);
            // SAFETY: a is m×k and w is n×k, both contiguous; this band writes columns
            // start..start+cols of the m×n output, which no other band writes.
            unsafe {
                sgemm(
                    m,
                    k,
                    cols,
                    1.0,
                    a as *const f32,
                    (k as isize, 1),
                    (w as *const f32).add(start * k),
                    (1, k as isize),
                    beta,
                    c.ptr().add(start),
                    (n as isize, 1),
                );
            }
        };
        if threads == 1 {
            run(0);
        } else {
            team::for_each(n.div_ceil(band), |b| run(b * band));
        }
        Ok(Tensor::from_parts(out, vec![m, n]))
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &CpuTensor) -> Result<(), DeviceError> {
        let d = x.cols();
        assert_eq!(bias.len(), d, "add_bias: {bias:?} on rows of {d}");
        for row in x.data_mut().chunks_exact_mut(d) {
            row.iter_mut().zip(bias.data()).for_each(|(x, b)| *x += b);
        }
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), DeviceError> {
        assert_eq!(x.shape(), y.shape(), "add_assign");
        elementwise(x.data_mut(), y.data(), |x, y| *x += y);
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor, DeviceError> {
        let d = x.cols();
        assert!(weight.len() == d && bias.len() == d, "layer_norm over {d}");
        let mut out = x.data().clone();
        let (w, b) = (weight.data(), bias.data());
        let norm = |row: &mut [f32]| {
            // Two passes, in f64: the variance of activations with a large mean loses
            // digits in f32's one-pass formula.
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / d as f64;
            let inv = 1.0 / (var + f64::from(eps)).sqrt();
            for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                *v = ((f64::from(*v) - mean) * inv) as f32 * w + b;
            }
        };
        if out.len() < PARALLEL_FLOPS {
            out.chunks_mut(d).for_each(norm);
        } else {
            parts_on_team(&mut out, row_parts(PARALLEL_FLOPS / 4, d), |_, rows| {
                rows.chunks_mut(d).for_each(norm)
            });
        }
        Ok(Tensor::from_parts(out, x.shape().to_vec()))
    }

    fn gelu(&self, x: &mut CpuTensor) -> Result<(), DeviceError> {
        let gelu = |v: &mut f32| {
            let x = f64::from(*v);
            *v = (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32;
        };
        let data = x.data_mut();
        if data.len() < PARALLEL_FLOPS {
            data.iter_mut().for_each(gelu);
        } else {
            parts_on_team(data, 4096, |_, part| part.iter_mut().for_each(gelu));
        }
        Ok(())
    }

    fn softmax(&self, x: &mut CpuTensor) -> Result<(), DeviceError> {
        let d = x.cols();
        let data = x.data_mut();
        if data.len() < PARALLEL_FLOPS {
            data.chunks_mut(d).for_each(softmax_row);
        } else {
            parts_on_team(data, row_parts(PARALLEL_FLOPS / 4, d), |_, rows| {
                rows.chunks_mut(d).for_each(softmax_row)
            });
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        layout: Attention<'_>,
    ) -> Result<CpuTensor, DeviceError> {
        let (tokens, width) = (q.rows(), q.cols());
        let head_dim = layout.head_dim(q, k, v);
        let mut out = vec![0.0f32; tokens * width];

        // One task per (sequence, head): they read disjoint columns of disjoint rows, and
        // the strides let the products read each head in place, with no copies.
        let mut tasks = Vec::with_capacity(layout.seq_lens.len() * layout.heads);
        let mut start = 0;
        for &len in layout.seq_lens {
            for head in 0..layout.heads {
                tasks.push((start, len, head));
            }
            start += len;
        }
        let c = SharedOut(out.as_mut_ptr());
        let (qp, kp, vp) = (
            q.data().as_ptr() as usize,
            k.data().as_ptr() as usize,
            v.data().as_ptr() as usize,
        );
        let run = |&(start, len, head): &(usize, usize, usize)| {
            if len == 0 {
                return;
            }
            let offset = start * width + head * head_dim;
            let row = width as isize;
            let mut scores = vec![0.0f32; len * len];
            // SAFETY: rows start..start+len and columns head·head_dim.. of q, k and v are in
            // bounds (asserted above); the output block written is this task's alone.
            unsafe {
                // scores[len×len] = scale · Q[len×hd] · Kᵀ[hd×len]
                sgemm(
                    len,
                    head_dim,
                    len,
                    layout.scale,
                    (qp as *const f32).add(offset),
                    (row, 1),
                    (kp as *const f32).add(offset),
                    (1, row),
                    0.0,
                    scores.as_mut_ptr(),
                    (len as isize, 1),
                );
            }
            scores.chunks_mut(len).for_each(softmax_row);
            unsafe {
                // out[len×hd] = P[len×len] · V[len×hd]
                sgemm(
                    len,
                    len,
                    head_dim,
                    1.0,
                    scores.as_ptr(),
                    (len as isize, 1),
                    (vp as *const f32).add(offset),
                    (row, 1),
                    0.0,
                    c.ptr().add(offset),
                    (row, 1),
                );
            }
        };
        let work: usize = layout.seq_lens.iter().map(|l| l * l).sum::<usize>() * width;
        if work < PARALLEL_FLOPS {
            tasks.iter().for_each(run);
        } else {
            team::for_each(tasks.len(), |t| run(&tasks[t]));
        }
        Ok(Tensor::from_parts(out, vec![tokens, width]))
    }

    fn upload_matrix(&self, matrix: QMatrix) -> Result<QMatrix, DeviceError> {
        // The layout the fused decode kernels read (quant::RowLayout::ScalesFirst).
        Ok(matrix.with_scales_first())
    }

    fn matmul(
        &self,
        x: &CpuTensor,
        weight: &QMatrix,
        prompt_rows: &[bool],
    ) -> Result<CpuTensor, DeviceError> {
        let (m, k, n) = (x.rows(), x.cols(), weight.rows);
        assert_eq!(
            k, weight.cols,
            "matmul: x {x:?}, weight {n}×{}",
            weight.cols
        );
        assert_eq!(prompt_rows.len(), m, "matmul: {m} rows, {prompt_rows:?}");
        let mut out = vec![0.0f32; m * n];
        let prompts = prompt_rows.iter().filter(|&&p| p).count();
        if prompts == m {
            quant::gemm(x.data(), m, weight, &mut out);
        } else if prompts == 0 {
            quant::matmul(x.data(), m, weight, &mut out);
        } else {
            // Each kind on its own path, then each row back in its place.
            for kind in [true, false] {
                let rows: Vec<usize> = (0..m).filter(|&r| prompt_rows[r] == kind).collect();
                let picked: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| &x.data()[r * k..(r + 1) * k])
                    .copied()
                    .collect();
                let mut part = vec![0.0f32; rows.len() * n];
                let multiply = if kind { quant::gemm } else { quant::matmul };
                multiply(&picked, rows.len(), weight, &mut part);
                for (&r, values) in rows.iter().zip(part.chunks_exact(n)) {
                    out[r * n..(r + 1) * n].copy_from_slice(values);
                }
            }
        }
        Ok(Tensor::from_parts(out, vec![m, n]))
    }

    fn gather_matrix_rows(&self, table: &QMatrix, ids: &[u32]) -> Result<CpuTensor, DeviceError> {
        let d = table.cols;
        let mut out = vec![0.0f32; ids.len() * d];
        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            assert!(id < table.rows, "row {id} of a {}-row table", table.rows);
            table.dequantize_row(id, row);
        }
        Ok(Tensor::from_parts(out, vec![ids.len(), d]))
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor, DeviceError> {
        let d = x.cols();
        assert_eq!(weight.len(), d, "rms_norm over {d}");
        let mut out = x.data().clone();
        let w = weight.data();
        let norm = |row: &mut [f32]| {
            // The mean square in f64: 576 squares summed in f32 lose the last digits.
            let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            let inv = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
            row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w);
        };
        if out.len() < PARALLEL_ELEMENTS {
            out.chunks_exact_mut(d).for_each(norm);
        } else {
            parts_on_team(&mut out, row_parts(PARALLEL_ELEMENTS / 4, d), |_, rows| {
                rows.chunks_exact_mut(d).for_each(norm)
            });
        }
        Ok(Tensor::from_parts(out, x.shape().to_vec()))
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        positions: &[u32],
        base: f32,
        divisors: &CpuTensor,
    ) -> Result<(), DeviceError> {
        let width = x.cols();
        let head_dim = rope_head_dim(x, heads, positions);
        assert_eq!(divisors.len(), head_dim / 2, "rope: one divisor per pair");
        let pairs = head_dim / 2;
        ROPE_TURNS.with_borrow_mut(|cache| {
            if cache.positions != positions
                || cache.base != base.to_bits()
                || cache.divisors[..] != divisors.data()[..]
            {
                // The angles in f64: position · base^(−2i/d) in f32 is off by ~1e-3 radians
                // at positions in the thousands.
                let inv_freq: Vec<f64> = (0..pairs)
                    .zip(divisors.data())
                    .map(|(i, &div)| {
                        f64::from(base).powf(-2.0 * i as f64 / head_dim as f64) / f64::from(div)
                    })
                    .collect();
                cache.turns.clear();
                for &pos in positions {
                    cache.turns.extend(inv_freq.iter().map(|f| {
                        let (sin, cos) = (f64::from(pos) * f).sin_cos();
                        (sin as f32, cos as f32)
                    }));
                }
                cache.positions = positions.to_vec();
                cache.base = base.to_bits();
                cache.divisors = divisors.data().clone();
            }
            let rows = x.data_mut().chunks_exact_mut(width);
            for (row, turns) in rows.zip(cache.turns.chunks_exact(pairs)) {
                for head in row.chunks_exact_mut(head_dim) {
                    for (pair, &(sin, cos)) in head.chunks_exact_mut(2).zip(turns) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos - b * sin;
                        pair[1] = a * sin + b * cos;
                    }
                }
            }
        });
        Ok(())
    }

    fn silu_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<(), DeviceError> {
        assert_eq!(gate.shape(), up.shape(), "silu_mul");
        elementwise(gate.data_mut(), up.data(), |g, u| {
            *g = *g / (1.0 + (-*g).exp()) * u
        });
        Ok(())
    }

    fn scatter_rows(
        &self,
        dest: &mut CpuTensor,
        x: &CpuTensor,
        rows: &[u32],
    ) -> Result<(), DeviceError> {
        check_scatter(dest, x, rows);
        let d = dest.cols();
        let data = dest.data_mut();
        for (src, &r) in x.data().chunks_exact(d).zip(rows) {
            let r = r as usize;
            data[r * d..(r + 1) * d].copy_from_slice(src);
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        layout: PagedAttention<'_>,
    ) -> Result<CpuTensor, DeviceError> {
        let PagedAttention {
            seqs,
            block_size,
            heads,
            kv_heads,
            scale,
        } = layout;
        let (rows, width) = (q.rows(), q.cols());
        let head_dim = layout.head_dim(q, k, v);
        let kv_width = kv_heads * head_dim;
        let group = heads / kv_heads;
        // Query heads that share a key/value head go to one task together, as many as one
        // kernel holds, where there are enough such tasks to keep every thread busy (a lone
        // sequence's three groups would leave one of two threads idle for a third).
        let together = if seqs.len() * kv_heads >= 4 * team::threads() {
            heads_together(head_dim).min(group)
        } else {
            1
        };
        let mut tasks = Vec::with_capacity(seqs.len() * heads);
        let mut start = 0;
        for seq in seqs {
            for kv in 0..kv_heads {
                let heads = kv * group..(kv + 1) * group;
                tasks.extend(heads.step_by(together).map(|h| {
                    let count = together.min((kv + 1) * group - h);
                    (start, *seq, h, count)
                }));
            }
            start += seq.new;
        }
        let (qd, kd, vd) = (q.data(), k.data(), v.data());
        let mut out = vec![0.0f32; rows * width];
        let columns = SharedOut(out.as_mut_ptr());
        // Each task writes its own rows' columns of its heads.
        team::for_each(tasks.len(), |t| {
            let (start, seq, h, count) = tasks[t];
            let head = AttendedHead {
                q: &qd[start * width + h * head_dim..],
                width,
                head_dim,
                kv: (h / group) * head_dim,
                kv_width,
                block_size,
                scale,
            };
            let attended = attend_heads(&head, count, seq, kd, vd);
            let span = count * head_dim;
            for (i, row) in attended.chunks_exact(span).enumerate() {
                let at = (start + i) * width + h * head_dim;
                // SAFETY: out is rows×width; rows start..start + seq.new, the columns of
                // heads h..h + count, are this task's alone.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), columns.ptr().add(at), span) };
            }
        });
        Ok(Tensor::from_parts(out, vec![rows, width]))
    }

    fn mean_pool(&self, x: &CpuTensor, seq_lens: &[usize]) -> Result<CpuTensor, DeviceError> {
        let d = x.cols();
        assert_eq!(seq_lens.iter().sum::<usize>(), x.rows(), "mean_pool");
        let mut out = vec![0.0f32; seq_lens.len() * d];
        let mut rows = x.data().chunks(d);
        for (pooled, &len) in out.chunks_mut(d).zip(seq_lens) {
            // Summed in f64 so a long sequence's mean does not drift.
            let mut sum = vec![0.0f64; d];
            for row in rows.by_ref().take(len) {
                sum.iter_mut()
                    .zip(row)
                    .for_each(|(s, &v)| *s += f64::from(v));
            }
            let n = len.max(1) as f64;
            pooled
                .iter_mut()
                .zip(&sum)
                .for_each(|(p, s)| *p = (s / n) as f32);
        }
        Ok(Tensor::from_parts(out, vec![seq_lens.len(), d]))
    }
}

/// One query head of one sequence in [`Device::paged_attention`], and where its keys are.
struct AttendedHead<'a> {
    /// The sequence's first new row, at this head's columns; row `i` at `i · width`.
    q: &'a [f32],
    width: usize,
    head_dim: usize,
    /// The key/value head's first column, and the caches' row width.
    kv: usize,
    kv_width: usize,
    block_size: usize,
    scale: f32,
}

/// How many query heads of `head_dim` [`attend_heads`] takes at once: as many as keep a
/// kernel's running sums in registers (16 of AVX-512's 32), where the CPU has one for the
/// width.
fn heads_together(head_dim: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("fma")
    {
        return match head_dim {
            64 => 4,
            128 => 2,
            _ => 1,
        };
    }
    let _ = head_dim;
    1
}

/// [`attend`] for `count` consecutive query heads from `head` (sharing its key/value head):
/// `[seq.new, count · head_dim]`, each head's columns its own result, with the same bits.
fn attend_heads(
    head: &AttendedHead<'_>,
    count: usize,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    if count == 1 {
        return attend_fastest(head, seq, k, v);
    }
    assert!(count <= heads_together(head.head_dim), "{count} heads");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: heads_together allows more than one head only where the CPU has AVX-512F,
    // AVX-512VL and FMA (AVX2 with them), and only for these widths.
    unsafe {
        match (head.head_dim, count) {
            (64, 2) => attend_heads_avx512::<4, 2>(head, seq, k, v),
            (64, 3) => attend_heads_avx512::<4, 3>(head, seq, k, v),
            (64, 4) => attend_heads_avx512::<4, 4>(head, seq, k, v),
            (128, 2) => attend_heads_avx512::<8, 2>(head, seq, k, v),
            _ => unreachable!("heads_together allows {count} of {}", head.head_dim),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("heads_together allows one head at a time here")
}

/// [`attend`] by the fastest kernel this CPU has for the head's width (the same bits).
fn attend_fastest(
    head: &AttendedHead<'_>,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has both features, checked just now.
        return unsafe {
            match head.head_dim {
                64 => attend_in_registers::<8>(head, seq, k, v),
                128 => attend_in_registers::<16>(head, seq, k, v),
                _ => attend_avx2(head, seq, k, v),
            }
        };
    }
    attend::<false>(head, seq, k, v)
}

/// The attended values of `head` for each of `seq`'s new rows, `[seq.new, head_dim]`. Each
/// row's arithmetic is its own (scores by [`short_dot`], softmax, weighted sum in position
/// order), whatever else is in the batch.
#[inline(always)]
fn attend<const FMA: bool>(
    head: &AttendedHead<'_>,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    // Plain loops, no closures: a closure is compiled on its own, without the target
    // features of the function it is written in, and `dot` would call `fmaf` per element.
    let d = head.head_dim;
    let rows = cache_rows(head, seq, k.len().min(v.len()));
    let mut out = vec![0.0f32; seq.new * d];
    let mut scores = vec![0.0f32; seq.past + seq.new];
    for i in 0..seq.new {
        let qi = &head.q[i * head.width..][..d];
        let seen = seq.past + i + 1;
        for (p, &at) in rows[..seen].iter().enumerate() {
            let kp = &k[at..][..d];
            #[cfg(target_arch = "x86_64")]
            let dot = match FMA {
                // SAFETY: `attend::<true>` runs only inside `attend_avx2`, on a CPU with both.
                true => unsafe { short_dot_avx2(qi, kp) },
                false => short_dot(qi, kp),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let dot = short_dot(qi, kp);
            scores[p] = dot * head.scale;
        }
        softmax_row(&mut scores[..seen]);
        let oi = &mut out[i * d..][..d];
        for (p, &at) in rows[..seen].iter().enumerate() {
            let (w, vp) = (scores[p], &v[at..][..d]);
            for j in 0..d {
                oi[j] += w * vp[j];
            }
        }
    }
    out
}

/// A dot product of one head's width (64 for SmolLM2): 8 lane accumulators, folded as a
/// tree of halves. [`quant::dot`]'s 32 lanes would spend more adds folding than multiplying
/// at this length.
#[inline(always)]
fn short_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let quad = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let pair = [quad[0] + quad[2], quad[1] + quad[3]];
    pair[0] + pair[1] + tail
}

/// The sum of an 8-lane register as [`short_dot`] folds its lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fold8(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}

/// [`short_dot`] in one AVX2 register with fused multiply-adds, folded the same way. (Left
/// to itself, the compiler splits the portable one's 8 lanes into four 2-lane registers.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn short_dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 8 <= whole <= both lengths.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            let y = _mm256_loadu_ps(b.as_ptr().add(i));
            acc = _mm256_fmadd_ps(x, y, acc);
        }
        i += 8;
    }
    let mut tail = 0.0f32;
    for j in whole..n {
        tail += a[j] * b[j];
    }
    // SAFETY: the caller's CPU has AVX2 and FMA, as this function requires.
    unsafe { fold8(acc) + tail }
}

/// [`attend`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    head: &AttendedHead<'_>,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    attend::<true>(head, seq, k, v)
}

/// [`attend`] for heads of `8 · CH` dimensions, with the same arithmetic (so the same
/// bits): four keys' scores at a time, each [`short_dot_avx2`]'s fused multiply-adds and
/// folding (one key at a time, each score waited on its own chain of eight dependent
/// multiply-adds), and the weighted sum of values kept in `CH` registers across positions
/// (a multiply, then an add, per element and position, as `attend`'s loop does through
/// memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_in_registers<const CH: usize>(
    head: &AttendedHead<'_>,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    use std::arch::x86_64::*;
    let d = head.head_dim;
    assert_eq!(d, 8 * CH, "a head of {d}");
    let seen_all = seq.past + seq.new;
    let at = cache_rows(head, seq, k.len().min(v.len()));
    let mut out = vec![0.0f32; seq.new * d];
    let mut scores = vec![0.0f32; seen_all];
    for i in 0..seq.new {
        let qi = &head.q[i * head.width..][..d];
        let seen = seq.past + i + 1;
        let mut p = 0;
        while p < seen {
            // Four consecutive positions, or what is left.
            let group = (seen - p).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut keys = [k.as_ptr(); 4];
            for (t, key) in keys.iter_mut().enumerate().take(group) {
                *key = k.as_ptr().add(at[p + t]);
            }
            for c in 0..CH {
                let q = _mm256_loadu_ps(qi.as_ptr().add(8 * c));
                for (acc, key) in acc.iter_mut().zip(keys).take(group) {
                    *acc = _mm256_fmadd_ps(q, _mm256_loadu_ps(key.add(8 * c)), *acc);
                }
            }
            for (t, &acc) in acc.iter().enumerate().take(group) {
                // `+ 0.0`: short_dot_avx2 adds its (empty) tail, which turns a -0 into +0.
                scores[p + t] = (fold8(acc) + 0.0) * head.scale;
            }
            p += group;
        }
        softmax_row(&mut scores[..seen]);
        let mut acc = [_mm256_setzero_ps(); CH];
        for (p, &w) in scores[..seen].iter().enumerate() {
            let vp = v.as_ptr().add(at[p]);
            let w = _mm256_set1_ps(w);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, _mm256_loadu_ps(vp.add(8 * c))));
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(i * d + 8 * c), *acc);
        }
    }
    out
}

/// [`attend`] for `H` query heads that share one key/value head (`head` is the first; the
/// others follow it, `head_dim` columns apart), of `16 · CH` dimensions, with AVX-512:
/// `[seq.new, H · head_dim]`. Each cached key and value is loaded once for all `H` heads,
/// and the `4 · H` scores of four keys, and the `H · CH` running sums of values, are
/// independent chains, where one head's four scores left half of the multiply-adds' slots
/// empty waiting on their latency. Each head's arithmetic is [`attend_in_registers`]'s
/// (8-lane score chains folded by [`fold8`]; each value element a multiply then an add, in
/// position order), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn attend_heads_avx512<const CH: usize, const H: usize>(
    head: &AttendedHead<'_>,
    seq: super::PagedSequence<'_>,
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    use std::arch::x86_64::*;
    let d = head.head_dim;
    assert_eq!(d, 16 * CH, "a head of {d}");
    if seq.new == 0 {
        return Vec::new();
    }
    assert!(
        head.q.len() >= (seq.new - 1) * head.width + H * d,
        "{H} heads' queries"
    );
    let at = cache_rows(head, seq, k.len().min(v.len()));
    let seen_all = seq.past + seq.new;
    let mut out = vec![0.0f32; seq.new * H * d];
    let mut scores = vec![0.0f32; H * seen_all];
    for i in 0..seq.new {
        let q = head.q.as_ptr().add(i * head.width);
        let seen = seq.past + i + 1;
        let mut p = 0;
        while p < seen {
            // Four consecutive positions; past the last, the last again (its scores unused).
            let group = (seen - p).min(4);
            let mut keys = [k.as_ptr(); 4];
            for (t, key) in keys.iter_mut().enumerate() {
                *key = k.as_ptr().add(at[p + t.min(group - 1)]);
            }
            for &row in at[..seen].iter().skip(p + PREFETCH_POSITIONS).take(4) {
                quant::prefetch(k, row, d);
            }
            let mut acc = [[_mm256_setzero_ps(); 4]; H];
            for c in 0..2 * CH {
                let mut qc = [_mm256_setzero_ps(); H];
                for (h, qc) in qc.iter_mut().enumerate() {
                    *qc = _mm256_loadu_ps(q.add(h * d + 8 * c));
                }
                for (t, key) in keys.iter().enumerate() {
                    let key = _mm256_loadu_ps(key.add(8 * c));
                    for (acc, &qc) in acc.iter_mut().zip(&qc) {
                        acc[t] = _mm256_fmadd_ps(qc, key, acc[t]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (t, &acc) in acc.iter().enumerate().take(group) {
                    // `+ 0.0`: short_dot_avx2 adds its (empty) tail, which turns -0 into +0.
                    scores[h * seen_all + p + t] = (fold8(acc) + 0.0) * head.scale;
                }
            }
            p += group;
        }
        for h in 0..H {
            softmax_row(&mut scores[h * seen_all..][..seen]);
        }
        let mut acc = [[_mm512_setzero_ps(); CH]; H];
        for (p, &row) in at[..seen].iter().enumerate() {
            let vp = v.as_ptr().add(row);
            if let Some(&ahead) = at[..seen].get(p + PREFETCH_POSITIONS) {
                quant::prefetch(v, ahead, d);
            }
            let mut w = [_mm512_setzero_ps(); H];
            for (h, w) in w.iter_mut().enumerate() {
                *w = _mm512_set1_ps(scores[h * seen_all + p]);
            }
            for c in 0..CH {
                let value = _mm512_loadu_ps(vp.add(16 * c));
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    acc[c] = _mm512_add_ps(acc[c], _mm512_mul_ps(w, value));
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (c, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((i * H + h) * d + 16 * c), acc);
            }
        }
    }
    out
}

/// How many positions ahead of the one being read [`attend_heads_avx512`] asks for cached
/// keys and values: a 16-sequence decode step reads more of the caches than of the weights,
/// from memory, each position a few cache lines in rows a stride apart.
#[cfg(target_arch = "x86_64")]
const PREFETCH_POSITIONS: usize = 16;

/// Where each of `seq`'s positions' key and value start in the caches (`len` elements
/// each), worked out once per task: finding a position's block takes a division.
fn cache_rows(head: &AttendedHead<'_>, seq: super::PagedSequence<'_>, len: usize) -> Vec<usize> {
    let bs = head.block_size;
    let seen_all = seq.past + seq.new;
    assert!(
        seq.blocks.len() * bs >= seen_all,
        "{seen_all} positions in {} rows",
        seq.blocks.len() * bs
    );
    for &b in seq.blocks {
        let last = (b as usize + 1) * bs - 1;
        assert!(
            last * head.kv_width + head.kv + head.head_dim <= len,
            "block {b}"
        );
    }
    seq.blocks
        .iter()
        .flat_map(|&b| b as usize * bs..(b as usize + 1) * bs)
        .take(seen_all)
        .map(|row| row * head.kv_width + head.kv)
        .collect()
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::PagedSequence;

    /// Deterministic values in [-1, 1), so failures reproduce.
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

    fn tensor(data: Vec<f32>, shape: &[usize]) -> CpuTensor {
        Cpu.upload(&data, shape).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= tol,
                "element {i}: got {g}, want {w}"
            );
        }
    }

    fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, k: usize) -> Vec<f64> {
        let n = w.len() / k;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = b.map_or(0.0, |b| f64::from(b[j]));
                for p in 0..k {
                    acc += f64::from(x[i * k + p]) * f64::from(w[j * k + p]);
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    #[test]
    fn linear_matches_a_naive_loop_small_and_threaded() {
        // The second shape is large enough to be split into column bands, with a ragged last
        // band (n is not a multiple of the band width).
        for (m, k, n) in [(3, 5, 7), (37, 96, 203), (1, 384, 1536)] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let b = values(n, 3);
            let got = Cpu
                .linear(
                    &tensor(x.clone(), &[m, k]),
                    &tensor(w.clone(), &[n, k]),
                    Some(&tensor(b.clone(), &[n])),
                )
                .unwrap();
            assert_eq!(got.shape(), [m, n]);
            assert_close(got.data(), &naive_linear(&x, &w, Some(&b), m, k), 1e-4);
            let got = Cpu
                .linear(
                    &tensor(x.clone(), &[m, k]),
                    &tensor(w.clone(), &[n, k]),
                    None,
                )
                .unwrap();
            assert_close(got.data(), &naive_linear(&x, &w, None, m, k), 1e-4);
        }
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance_then_scales_and_shifts() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0];
        let w = [1.0f32, 2.0, 1.0, 0.5];
        let b = [0.0f32, 1.0, 0.0, -1.0];
        let got = Cpu
            .layer_norm(
                &tensor(x.to_vec(), &[2, 4]),
                &tensor(w.to_vec(), &[4]),
                &tensor(b.to_vec(), &[4]),
                1e-12,
            )
            .unwrap();
        // Row 1: mean 2.5, variance 1.25.
        let s = 1.25f64.sqrt();
        let want = [
            -1.5 / s,
            2.0 * (-0.5 / s) + 1.0,
            0.5 / s,
            0.5 * (1.5 / s) - 1.0,
            // A constant row normalises to zero, leaving only the shift.
            0.0,
            1.0,
            0.0,
            -1.0,
        ];
        assert_close(got.data(), &want, 1e-5);
    }

    #[test]
    fn gelu_is_the_exact_erf_form() {
        // x·Φ(x), from tables of the normal distribution.
        let x = [-3.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0];
        let want = [
            -0.004_049_694_8,
            -0.158_655_253_9,
            -0.154_268_759_8,
            0.0,
            0.345_731_240_2,
            0.841_344_746_1,
            1.954_499_736_1,
            4.999_998_566_7,
        ];
        let mut t = tensor(x.to_vec(), &[x.len()]);
        Cpu.gelu(&mut t).unwrap();
        assert_close(t.data(), &want, 1e-6);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_scores() {
        let mut t = tensor(vec![1.0, 2.0, 3.0, 1000.0, 1000.0, -1000.0], &[2, 3]);
        Cpu.softmax(&mut t).unwrap();
        let e = [1f64.exp(), 2f64.exp(), 3f64.exp()];
        let sum: f64 = e.iter().sum();
        let want = [e[0] / sum, e[1] / sum, e[2] / sum, 0.5, 0.5, 0.0];
        assert_close(t.data(), &want, 1e-6);
    }

    /// Attention per sequence and head, by the definition, in f64.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lens: &[usize],
        heads: usize,
        width: usize,
    ) -> Vec<f64> {
        let hd = width / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; q.len()];
        let mut start = 0;
        for &len in lens {
            for h in 0..heads {
                for i in 0..len {
                    let qi = (start + i) * width + h * hd;
                    let scores: Vec<f64> = (0..len)
                        .map(|j| {
                            let kj = (start + j) * width + h * hd;
                            (0..hd)
                                .map(|d| f64::from(q[qi + d]) * f64::from(k[kj + d]))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exp.iter().sum();
                    for d in 0..hd {
                        out[qi + d] = (0..len)
                            .map(|j| exp[j] / sum * f64::from(v[(start + j) * width + h * hd + d]))
                            .sum();
                    }
                }
            }
            start += len;
        }
        out
    }

    #[test]
    fn attention_keeps_sequences_and_heads_apart() {
        for (lens, heads, width) in [(vec![3usize, 1, 4], 2usize, 8usize), (vec![40, 25], 4, 64)] {
            let tokens: usize = lens.iter().sum();
            let (q, k, v) = (
                values(tokens * width, 4),
                values(tokens * width, 5),
                values(tokens * width, 6),
            );
            let got = Cpu
                .attention(
                    &tensor(q.clone(), &[tokens, width]),
                    &tensor(k.clone(), &[tokens, width]),
                    &tensor(v.clone(), &[tokens, width]),
                    Attention {
                        seq_lens: &lens,
                        heads,
                        scale: 1.0 / ((width / heads) as f32).sqrt(),
                    },
                )
                .unwrap();
            assert_close(
                got.data(),
                &naive_attention(&q, &k, &v, &lens, heads, width),
                1e-5,
            );
        }
    }

    #[test]
    fn gather_add_and_mean_pool() {
        let table = tensor(vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2]);
        let mut rows = Cpu.gather_rows(&table, &[2, 0, 1]).unwrap();
        assert_eq!(rows.data(), &[20.0, 21.0, 0.0, 1.0, 10.0, 11.0]);
        let ones = tensor(vec![1.0; 6], &[3, 2]);
        Cpu.add_assign(&mut rows, &ones).unwrap();
        assert_eq!(rows.data(), &[21.0, 22.0, 1.0, 2.0, 11.0, 12.0]);
        let pooled = Cpu.mean_pool(&rows, &[2, 1]).unwrap();
        assert_eq!(pooled.shape(), [2, 2]);
        assert_eq!(pooled.data(), &[11.0, 12.0, 11.0, 12.0]);
    }

    #[test]
    fn rope_turns_adjacent_pairs_of_each_head_by_position() {
        // Two heads of 4: pair 0 turns by pos·1, pair 1 by pos·base^(-1/2) = pos/10.
        // The second pair's divisor of 2 halves its angle.
        let mut t = tensor(vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], &[1, 8]);
        let divisors = tensor(vec![1.0, 2.0], &[2]);
        Cpu.rope(&mut t, 2, &[3], 100.0, &divisors).unwrap();
        let (a, b) = (3.0f64, 0.15f64);
        let want = [
            a.cos(),
            a.sin(),
            b.cos(),
            b.sin(),
            -a.sin(),
            a.cos(),
            -b.sin(),
            b.cos(),
        ];
        assert_close(t.data(), &want, 1e-6);
    }

    /// A prompt's rows are normed, gated and added on the pool's threads: each element
    /// and row gets the bits it gets alone.
    #[test]
    fn large_element_wise_operations_give_each_rows_own_bits() {
        let (rows, d) = (200, 576);
        assert!(rows * d >= PARALLEL_ELEMENTS);
        let x = tensor(values(rows * d, 31), &[rows, d]);
        let y = tensor(values(rows * d, 32), &[rows, d]);
        let weight = tensor(values(d, 33), &[d]);
        let normed = Cpu.rms_norm(&x, &weight, 1e-5).unwrap();
        let mut gated = x.clone();
        Cpu.silu_mul(&mut gated, &y).unwrap();
        let mut added = x.clone();
        Cpu.add_assign(&mut added, &y).unwrap();
        for r in 0..rows {
            let row = |t: &CpuTensor| tensor(t.data()[r * d..(r + 1) * d].to_vec(), &[1, d]);
            let bits = |t: &CpuTensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut alone = [row(&x), row(&x), row(&x)];
            alone[0] = Cpu.rms_norm(&alone[0], &weight, 1e-5).unwrap();
            Cpu.silu_mul(&mut alone[1], &row(&y)).unwrap();
            Cpu.add_assign(&mut alone[2], &row(&y)).unwrap();
            for (name, all, alone) in [
                ("rms_norm", &normed, &alone[0]),
                ("silu_mul", &gated, &alone[1]),
                ("add_assign", &added, &alone[2]),
            ] {
                assert!(bits(&row(all)) == bits(alone), "{name}, row {r}");
            }
        }
    }

    #[test]
    fn rms_norm_and_silu_gating() {
        let x = tensor(vec![3.0, 4.0], &[1, 2]);
        let w = tensor(vec![1.0, 2.0], &[2]);
        // mean square 12.5
        let s = 12.5f64.sqrt();
        assert_close(
            Cpu.rms_norm(&x, &w, 0.0).unwrap().data(),
            &[3.0 / s, 8.0 / s],
            1e-6,
        );
        let mut gate = tensor(vec![-1.0, 0.0, 2.0], &[3]);
        Cpu.silu_mul(&mut gate, &tensor(vec![2.0, 5.0, 0.5], &[3]))
            .unwrap();
        let silu = |v: f64| v / (1.0 + (-v).exp());
        assert_close(gate.data(), &[silu(-1.0) * 2.0, 0.0, silu(2.0) * 0.5], 1e-6);
    }

    /// Heads of 64 and 128 dimensions (SmolLM2's, Llama's) take the register-held kernel:
    /// the same bits as the general one, over blocks that split its groups of four keys.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn heads_attended_together_get_each_heads_own_bits() {
        let (heads, kv_heads, bs) = (8usize, 2usize, 3usize);
        for hd in [64usize, 128] {
            let most = heads_together(hd);
            if most == 1 {
                eprintln!("skipping {hd}: no kernel for several heads on this CPU");
                continue;
            }
            let kvw = kv_heads * hd;
            let blocks = [4u32, 0, 6, 2, 5];
            let (k, v) = (values(7 * bs * kvw, 31), values(7 * bs * kvw, 32));
            for (past, new) in [(9usize, 1usize), (5, 3), (0, 13), (0, 1), (2, 2)] {
                let width = heads * hd;
                let q = values(new * width, 33 + past as u64);
                let seq = PagedSequence {
                    past,
                    new,
                    blocks: &blocks,
                };
                let head = |h: usize| AttendedHead {
                    q: &q[h * hd..],
                    width,
                    head_dim: hd,
                    kv: (h / (heads / kv_heads)) * hd,
                    kv_width: kvw,
                    block_size: bs,
                    scale: 1.0 / (hd as f32).sqrt(),
                };
                for count in 2..=most {
                    // The first heads of the second key/value head: a kv column not at 0.
                    let first = heads / kv_heads;
                    let together = attend_heads(&head(first), count, seq, &k, &v);
                    for j in 0..count {
                        let alone = attend::<false>(&head(first + j), seq, &k, &v);
                        let fastest = attend_fastest(&head(first + j), seq, &k, &v);
                        for i in 0..new {
                            let got = &together[(i * count + j) * hd..][..hd];
                            let want = &fastest[i * hd..][..hd];
                            let same = got
                                .iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(
                                same,
                                "{count} heads of {hd}: head {j}, row {i}, {past} past"
                            );
                            let close = got
                                .iter()
                                .zip(&alone[i * hd..][..hd])
                                .all(|(a, b)| (a - b).abs() < 1e-5);
                            assert!(
                                close,
                                "{count} heads of {hd}: head {j}, row {i} against attend"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_in_registers_gives_the_general_kernels_bits() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipping: this CPU has no AVX2 and FMA");
            return;
        }
        let (heads, kv_heads, bs) = (6usize, 2usize, 3usize);
        for hd in [64usize, 128] {
            let kvw = kv_heads * hd;
            let blocks = [4u32, 0, 6, 2, 5];
            let (k, v) = (values(7 * bs * kvw, 21), values(7 * bs * kvw, 22));
            for (past, new) in [(9usize, 1usize), (5, 3), (0, 13), (0, 1)] {
                let width = heads * hd;
                let q = values(new * width, 23 + past as u64);
                let seq = PagedSequence {
                    past,
                    new,
                    blocks: &blocks,
                };
                for h in 0..heads {
                    let head = AttendedHead {
                        q: &q[h * hd..],
                        width,
                        head_dim: hd,
                        kv: (h / (heads / kv_heads)) * hd,
                        kv_width: kvw,
                        block_size: bs,
                        scale: 1.0 / (hd as f32).sqrt(),
                    };
                    // SAFETY: AVX2 and FMA are present, checked above.
                    let (general, registers) = unsafe {
                        let registers = match hd {
                            64 => attend_in_registers::<8>(&head, seq, &k, &v),
                            _ => attend_in_registers::<16>(&head, seq, &k, &v),
                        };
                        (attend_avx2(&head, seq, &k, &v), registers)
                    };
                    let same = general
                        .iter()
                        .zip(&registers)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "head {h} of {hd}, {past} past, {new} new");
                }
            }
        }
    }

    #[test]
    fn paged_attention_sees_only_its_own_past_through_scattered_blocks_and_shared_kv_heads() {
        // 6 query heads over 2 key/value heads of 8; blocks of 2 rows. Sequence A has 3
        // tokens cached and 4 new in blocks 5, 0, 3, 6; sequence B 2 new in block 2.
        let (heads, kv_heads, hd, bs) = (6usize, 2usize, 8usize, 2usize);
        let kvw = kv_heads * hd;
        let seqs = [(3usize, 4usize, vec![5u32, 0, 3, 6]), (0, 2, vec![2])];
        let rows: usize = seqs.iter().map(|s| s.1).sum();
        let q = values(rows * heads * hd, 11);
        // Slots never written stay NaN: reading one would poison the result.
        let mut kc = tensor(vec![f32::NAN; 8 * bs * kvw], &[8 * bs, kvw]);
        let mut vc = kc.clone();
        let mut kv_of = Vec::new();
        for (n, (past, new, blocks)) in seqs.iter().enumerate() {
            let total = past + new;
            let (k, v) = (
                values(total * kvw, 12 + n as u64),
                values(total * kvw, 14 + n as u64),
            );
            let slots: Vec<u32> = (0..total)
                .map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            Cpu.scatter_rows(&mut kc, &tensor(k.clone(), &[total, kvw]), &slots)
                .unwrap();
            Cpu.scatter_rows(&mut vc, &tensor(v.clone(), &[total, kvw]), &slots)
                .unwrap();
            kv_of.push((k, v));
        }
        let layout: Vec<PagedSequence<'_>> = seqs
            .iter()
            .map(|(past, new, blocks)| PagedSequence {
                past: *past,
                new: *new,
                blocks,
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let got = Cpu
            .paged_attention(
                &tensor(q.clone(), &[rows, heads * hd]),
                &kc,
                &vc,
                PagedAttention {
                    seqs: &layout,
                    block_size: bs,
                    heads,
                    kv_heads,
                    scale,
                },
            )
            .unwrap();
        let mut want = vec![0.0f64; rows * heads * hd];
        let mut start = 0;
        for ((past, new, _), (k, v)) in seqs.iter().zip(&kv_of) {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for i in 0..*new {
                    let qi = &q[((start + i) * heads + h) * hd..][..hd];
                    let scores: Vec<f64> = (0..=past + i)
                        .map(|j| {
                            let kj = &k[(j * kv_heads + g) * hd..][..hd];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| f64::from(a * b))
                                .sum::<f64>()
                                * f64::from(scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exp.iter().sum();
                    for d in 0..hd {
                        want[((start + i) * heads + h) * hd + d] = exp
                            .iter()
                            .enumerate()
                            .map(|(j, e)| e / sum * f64::from(v[(j * kv_heads + g) * hd + d]))
                            .sum();
                    }
                }
            }
            start += new;
        }
        assert_close(got.data(), &want, 1e-5);
    }

    #[test]
    fn quantised_matmul_and_row_gather_decode_the_stored_rows() {
        // Q8_0, two rows of one block: row r is (r+1)·0.5·(i − 16).
        let mut bytes = Vec::new();
        for r in 0..2 {
            bytes.extend(half::f16::from_f32((r + 1) as f32 * 0.5).to_le_bytes());
            bytes.extend((-16i8..16).map(|q| q as u8));
        }
        let w = Cpu
            .upload_matrix(QMatrix::new(quant::GgmlType::Q8_0, 2, 32, bytes))
            .unwrap();
        let rows = Cpu.gather_matrix_rows(&w, &[1, 0]).unwrap();
        assert_eq!(rows.shape(), [2, 32]);
        assert_eq!(rows.data()[0], -16.0);
        assert_eq!(rows.data()[32], -8.0);
        let ones = tensor(vec![1.0; 32], &[1, 32]);
        // Σ(i − 16) over 0..32 = −16.
        for kinds in [[true], [false]] {
            assert_eq!(
                Cpu.matmul(&ones, &w, &kinds).unwrap().data(),
                &[-8.0, -16.0]
            );
        }
    }
}
