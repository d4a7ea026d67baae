//! Does a device compute what a reference device does? Every operation of [`Device`]
//! run on both with the same random inputs, the results compared within the tolerance each
//! operation is held to. Also whether the device keeps [`Device::matmul`]'s promise that a
//! row's result does not depend on the rest of its batch.
//!
//! The GPU check (`backend/examples/gpu_check.rs`) runs it with the CPU as the reference and
//! the CUDA device as the one checked. CI, which has no GPU, runs it CPU against CPU, which
//! keeps the harness itself working.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::{Attention, Device, DeviceError, PagedAttention, PagedSequence, Tensor};
use crate::quant::{GgmlType, QMatrix};

/// One operation's agreement.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub op: String,
    /// The largest difference from the reference, over the largest reference value (both
    /// absolute): 0 when the two agree to the bit.
    pub error: f64,
    /// The most `error` may be.
    pub tolerance: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Element-wise results that copy or add values: the same bits on any device.
const EXACT: f64 = 0.0;
/// One f32 rounding's worth, for element-wise maths whose library functions (exp, erf,
/// sin) may round their last bit differently.
const ROUNDING: f64 = 1e-6;
/// Sums of a few hundred products or exponentials, taken in another order.
const REORDERED_SUMS: f64 = 1e-5;

/// SmolLM2-135M's and MiniLM's widths, so the kernels run the shapes they will serve.
const LLAMA_WIDTH: usize = 576;
const LLAMA_HEADS: usize = 9;
const LLAMA_KV_HEADS: usize = 3;
const BERT_WIDTH: usize = 384;
const BERT_HEADS: usize = 12;

/// Runs every operation on `reference` and on `device` with inputs drawn from `seed`.
pub fn compare<R: Device, D: Device>(
    reference: &R,
    device: &D,
    seed: u64,
) -> Result<Vec<Comparison>, DeviceError> {
    let mut pair = Pair {
        reference,
        device,
        rng: StdRng::seed_from_u64(seed),
        results: Vec::new(),
    };
    pair.elementwise()?;
    pair.linear_and_attention()?;
    for dtype in GgmlType::ALL {
        pair.matrices(dtype, 300, LLAMA_WIDTH)?;
    }
    // Rows whose width is no whole number of 32: the products' tail path.
    pair.matrices(GgmlType::F16, 70, 100)?;
    // A matrix larger than one decoded weight tile (the CUDA device decodes 2²³ values, 2048
    // rows of 4096, at a time), as a model's embedding table and output layer are.
    pair.matrices(GgmlType::Q8_0, 2048 + 64, 4096)?;
    pair.paged_attention()?;
    pair.batch_invariance(GgmlType::Q4_1)?;
    pair.batch_invariance(GgmlType::F32)?;
    Ok(pair.results)
}

struct Pair<'a, R: Device, D: Device> {
    reference: &'a R,
    device: &'a D,
    rng: StdRng,
    results: Vec<Comparison>,
}

type Both<R, D> = (
    Tensor<<R as Device>::Storage>,
    Tensor<<D as Device>::Storage>,
);

impl<R: Device, D: Device> Pair<'_, R, D> {
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-1.0f32..1.0))
            .collect()
    }

    fn upload(&mut self, shape: &[usize]) -> Result<Both<R, D>, DeviceError> {
        let data = self.values(shape.iter().product());
        Ok((
            self.reference.upload(&data, shape)?,
            self.device.upload(&data, shape)?,
        ))
    }

    /// A random `rows × cols` matrix in `dtype`: any bytes are valid quantised values, so
    /// they are drawn directly, with scales of the size real weights have.
    fn matrix(&mut self, dtype: GgmlType, rows: usize, cols: usize) -> QMatrix {
        let mut bytes = Vec::with_capacity(rows * dtype.row_bytes(cols));
        let scale = |rng: &mut StdRng, range: std::ops::Range<f32>| {
            half::f16::from_f32(rng.random_range(range)).to_le_bytes()
        };
        for _ in 0..rows * cols / dtype.block_len() {
            match dtype {
                GgmlType::F32 => bytes.extend(self.rng.random_range(-0.1f32..0.1).to_le_bytes()),
                GgmlType::F16 => bytes.extend(scale(&mut self.rng, -0.1..0.1)),
                GgmlType::BF16 => bytes
                    .extend(half::bf16::from_f32(self.rng.random_range(-0.1..0.1)).to_le_bytes()),
                GgmlType::Q4_0 | GgmlType::Q8_0 => {
                    bytes.extend(scale(&mut self.rng, 0.001..0.02));
                    let quants = dtype.block_bytes() - 2;
                    bytes.extend((0..quants).map(|_| self.rng.random::<u8>()));
                }
                GgmlType::Q4_1 => {
                    bytes.extend(scale(&mut self.rng, 0.001..0.02));
                    bytes.extend(scale(&mut self.rng, -0.1..0.1));
                    bytes.extend((0..16).map(|_| self.rng.random::<u8>()));
                }
            }
        }
        QMatrix::new(dtype, rows, cols, bytes)
    }

    /// Downloads both results and records how far apart they are.
    fn record(
        &mut self,
        op: String,
        (expected, got): (&Tensor<R::Storage>, &Tensor<D::Storage>),
        tolerance: f64,
    ) -> Result<(), DeviceError> {
        assert_eq!(expected.shape(), got.shape(), "{op}: shapes differ");
        let expected = self.reference.download(expected)?;
        let got = self.device.download(got)?;
        self.results.push(Comparison {
            error: relative_error(&expected, &got),
            op,
            tolerance,
        });
        Ok(())
    }

    fn elementwise(&mut self) -> Result<(), DeviceError> {
        let (r, d) = (self.reference, self.device);
        let table = self.upload(&[100, 64])?;
        let ids = [3, 99, 0, 3, 41, 7, 7, 12, 88, 1];
        let rows = (
            r.gather_rows(&table.0, &ids)?,
            d.gather_rows(&table.1, &ids)?,
        );
        self.record("gather_rows".into(), (&rows.0, &rows.1), EXACT)?;

        let mut x = self.upload(&[13, LLAMA_WIDTH])?;
        let y = self.upload(&[13, LLAMA_WIDTH])?;
        r.add_assign(&mut x.0, &y.0)?;
        d.add_assign(&mut x.1, &y.1)?;
        self.record("add_assign".into(), (&x.0, &x.1), EXACT)?;

        let w = self.upload(&[LLAMA_WIDTH])?;
        let normed = (r.rms_norm(&x.0, &w.0, 1e-5)?, d.rms_norm(&x.1, &w.1, 1e-5)?);
        self.record("rms_norm".into(), (&normed.0, &normed.1), ROUNDING)?;

        let x = self.upload(&[7, BERT_WIDTH])?;
        let (w, b) = (self.upload(&[BERT_WIDTH])?, self.upload(&[BERT_WIDTH])?);
        let normed = (
            r.layer_norm(&x.0, &w.0, &b.0, 1e-12)?,
            d.layer_norm(&x.1, &w.1, &b.1, 1e-12)?,
        );
        self.record("layer_norm".into(), (&normed.0, &normed.1), ROUNDING)?;

        let mut x = self.upload(&[7, 4 * BERT_WIDTH])?;
        r.gelu(&mut x.0)?;
        d.gelu(&mut x.1)?;
        self.record("gelu".into(), (&x.0, &x.1), ROUNDING)?;

        let mut x = self.upload(&[9, 200])?;
        r.softmax(&mut x.0)?;
        d.softmax(&mut x.1)?;
        self.record("softmax".into(), (&x.0, &x.1), ROUNDING)?;

        let mut gate = self.upload(&[6, 1536])?;
        let up = self.upload(&[6, 1536])?;
        r.silu_mul(&mut gate.0, &up.0)?;
        d.silu_mul(&mut gate.1, &up.1)?;
        self.record("silu_mul".into(), (&gate.0, &gate.1), ROUNDING)?;

        // Positions in the thousands, where f32 angles would be visibly off.
        let positions = [0, 1, 2, 1000, 5000, 7];
        let mut x = self.upload(&[6, LLAMA_HEADS * 64])?;
        // Frequency scaling's divisors: 1 for the fast pairs, up to 8 for the slow ones.
        let divisors: Vec<f32> = (0..32)
            .map(|i| 1.0 + (i as f32 / 31.0).powi(2) * 7.0)
            .collect();
        let divisors = (r.upload(&divisors, &[32])?, d.upload(&divisors, &[32])?);
        r.rope(&mut x.0, LLAMA_HEADS, &positions, 100_000.0, &divisors.0)?;
        d.rope(&mut x.1, LLAMA_HEADS, &positions, 100_000.0, &divisors.1)?;
        self.record("rope".into(), (&x.0, &x.1), ROUNDING)?;

        let mut x = self.upload(&[5, LLAMA_WIDTH])?;
        let bias = self.upload(&[LLAMA_WIDTH])?;
        r.add_bias(&mut x.0, &bias.0)?;
        d.add_bias(&mut x.1, &bias.1)?;
        self.record("add_bias".into(), (&x.0, &x.1), EXACT)?;

        let width = LLAMA_KV_HEADS * 64;
        let mut dest = (r.zeros(&[64, width])?, d.zeros(&[64, width])?);
        let x = self.upload(&[5, width])?;
        let slots = [3, 17, 63, 0, 9];
        r.scatter_rows(&mut dest.0, &x.0, &slots)?;
        d.scatter_rows(&mut dest.1, &x.1, &slots)?;
        self.record("zeros + scatter_rows".into(), (&dest.0, &dest.1), EXACT)?;

        // An empty sequence pools to zeros.
        let x = self.upload(&[10, BERT_WIDTH])?;
        let lens = [3, 0, 7];
        let pooled = (r.mean_pool(&x.0, &lens)?, d.mean_pool(&x.1, &lens)?);
        self.record("mean_pool".into(), (&pooled.0, &pooled.1), ROUNDING)
    }

    fn linear_and_attention(&mut self) -> Result<(), DeviceError> {
        let (r, d) = (self.reference, self.device);
        let x = self.upload(&[7, BERT_WIDTH])?;
        let w = self.upload(&[4 * BERT_WIDTH, BERT_WIDTH])?;
        let b = self.upload(&[4 * BERT_WIDTH])?;
        let out = (
            r.linear(&x.0, &w.0, Some(&b.0))?,
            d.linear(&x.1, &w.1, Some(&b.1))?,
        );
        self.record("linear + bias".into(), (&out.0, &out.1), REORDERED_SUMS)?;
        let out = (r.linear(&x.0, &w.0, None)?, d.linear(&x.1, &w.1, None)?);
        self.record("linear".into(), (&out.0, &out.1), REORDERED_SUMS)?;

        let seq_lens = [5, 1, 12];
        let tokens = seq_lens.iter().sum();
        let (q, k, v) = (
            self.upload(&[tokens, BERT_WIDTH])?,
            self.upload(&[tokens, BERT_WIDTH])?,
            self.upload(&[tokens, BERT_WIDTH])?,
        );
        let layout = Attention {
            seq_lens: &seq_lens,
            heads: BERT_HEADS,
            scale: 1.0 / ((BERT_WIDTH / BERT_HEADS) as f32).sqrt(),
        };
        let out = (
            r.attention(&q.0, &k.0, &v.0, layout)?,
            d.attention(&q.1, &k.1, &v.1, layout)?,
        );
        self.record("attention".into(), (&out.0, &out.1), REORDERED_SUMS)
    }

    /// Products with generated rows, prompt rows and both, and the decoded gather.
    fn matrices(&mut self, dtype: GgmlType, rows: usize, cols: usize) -> Result<(), DeviceError> {
        let (r, d) = (self.reference, self.device);
        let matrix = self.matrix(dtype, rows, cols);
        let w = (r.upload_matrix(matrix.clone())?, d.upload_matrix(matrix)?);
        let name = dtype.short_name();
        let shape = format!("{rows}×{cols}");
        let kinds: [(&str, &[bool], f64); 3] = [
            // The decode product sums as the CPU's dot product does.
            ("generated rows", &[false; 3], ROUNDING),
            ("prompt rows", &[true; 5], REORDERED_SUMS),
            (
                "mixed rows",
                &[true, false, true, true, false],
                REORDERED_SUMS,
            ),
        ];
        for (kind, prompt_rows, tolerance) in kinds {
            let x = self.upload(&[prompt_rows.len(), cols])?;
            let out = (
                r.matmul(&x.0, &w.0, prompt_rows)?,
                d.matmul(&x.1, &w.1, prompt_rows)?,
            );
            self.record(
                format!("matmul {name} {shape}, {kind}"),
                (&out.0, &out.1),
                tolerance,
            )?;
        }
        let ids = [0, rows as u32 - 1, 5, 5];
        let out = (
            r.gather_matrix_rows(&w.0, &ids)?,
            d.gather_matrix_rows(&w.1, &ids)?,
        );
        self.record(
            format!("gather_matrix_rows {name}"),
            (&out.0, &out.1),
            EXACT,
        )
    }

    fn paged_attention(&mut self) -> Result<(), DeviceError> {
        let (r, d) = (self.reference, self.device);
        let (block_size, head_dim) = (16, 64);
        let cache_rows = 8 * block_size;
        let k = self.upload(&[cache_rows, LLAMA_KV_HEADS * head_dim])?;
        let v = self.upload(&[cache_rows, LLAMA_KV_HEADS * head_dim])?;
        // A decode step, a prompt's first chunk and a later chunk, in scattered blocks.
        let seqs = [
            PagedSequence {
                past: 20,
                new: 1,
                blocks: &[5, 2],
            },
            PagedSequence {
                past: 0,
                new: 7,
                blocks: &[0],
            },
            PagedSequence {
                past: 33,
                new: 4,
                blocks: &[1, 7, 3],
            },
        ];
        let q = self.upload(&[12, LLAMA_HEADS * head_dim])?;
        let layout = PagedAttention {
            seqs: &seqs,
            block_size,
            heads: LLAMA_HEADS,
            kv_heads: LLAMA_KV_HEADS,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let out = (
            r.paged_attention(&q.0, &k.0, &v.0, layout)?,
            d.paged_attention(&q.1, &k.1, &v.1, layout)?,
        );
        self.record("paged_attention".into(), (&out.0, &out.1), REORDERED_SUMS)
    }

    /// A row multiplied alone and among 200 others must come out the same on `device`,
    /// to the bit, for either kind of row.
    fn batch_invariance(&mut self, dtype: GgmlType) -> Result<(), DeviceError> {
        let d = self.device;
        let matrix = self.matrix(dtype, 1536, LLAMA_WIDTH);
        let w = d.upload_matrix(matrix)?;
        let batch = 200;
        let data = self.values(batch * LLAMA_WIDTH);
        let row = 137;
        let alone = &data[row * LLAMA_WIDTH..(row + 1) * LLAMA_WIDTH];
        let name = dtype.short_name();
        for (kind, prompt) in [("prompt", true), ("generated", false)] {
            let all = d.matmul(
                &d.upload(&data, &[batch, LLAMA_WIDTH])?,
                &w,
                &vec![prompt; batch],
            )?;
            let single = d.matmul(&d.upload(alone, &[1, LLAMA_WIDTH])?, &w, &[prompt])?;
            let together = d.download(&all)?;
            let single = d.download(&single)?;
            self.results.push(Comparison {
                op: format!("matmul {name}: a {kind} row alone and in a batch of {batch}"),
                error: relative_error(&single, &together[row * 1536..(row + 1) * 1536]),
                tolerance: EXACT,
            });
        }
        Ok(())
    }
}

/// max |expected − got| / max |expected|; 0 for identical slices, infinite when lengths
/// differ or a NaN appears on one side only.
pub fn relative_error(expected: &[f32], got: &[f32]) -> f64 {
    if expected.len() != got.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    for (&e, &g) in expected.iter().zip(got) {
        if e.to_bits() == g.to_bits() {
            scale = scale.max(f64::from(e).abs());
            continue;
        }
        let diff = (f64::from(e) - f64::from(g)).abs();
        if diff.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(diff);
        scale = scale.max(f64::from(e).abs());
    }
    if worst == 0.0 {
        0.0
    } else {
        worst / scale.max(f64::MIN_POSITIVE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::Cpu;

    #[test]
    fn the_harness_runs_every_operation_and_finds_the_cpu_equal_to_itself() {
        let results = compare(&Cpu, &Cpu, 7).unwrap();
        let ops: Vec<&str> = results.iter().map(|c| c.op.as_str()).collect();
        for op in [
            "gather_rows",
            "add_assign",
            "rms_norm",
            "layer_norm",
            "gelu",
            "softmax",
            "silu_mul",
            "rope",
            "add_bias",
            "zeros + scatter_rows",
            "mean_pool",
            "linear + bias",
            "linear",
            "attention",
            "paged_attention",
        ] {
            assert!(ops.contains(&op), "{op} not checked: {ops:?}");
        }
        for dtype in GgmlType::ALL {
            let name = dtype.short_name();
            assert!(
                ops.iter()
                    .filter(|op| op.starts_with(&format!("matmul {name} ")))
                    .count()
                    >= 3,
                "{name}: {ops:?}"
            );
            assert!(ops.contains(&format!("gather_matrix_rows {name}").as_str()));
        }
        assert!(ops.iter().any(|op| op.contains("prompt row alone")));
        for c in &results {
            assert_eq!(c.error, 0.0, "{}: the CPU against itself", c.op);
        }
    }

    #[test]
    fn relative_error_is_zero_only_for_the_same_bits() {
        assert_eq!(relative_error(&[1.0, -2.0], &[1.0, -2.0]), 0.0);
        let e = relative_error(&[1.0, -2.0], &[1.0, -2.002]);
        assert!((e - 0.001).abs() < 1e-6, "{e}");
        assert_eq!(relative_error(&[1.0], &[f32::NAN]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }
}
