//! The kernels of [`super`] for x86-64's vector units: the decoders that feed GEMM tiles
//! (AVX2), and fused decode-and-dot kernels for generated rows (AVX-512 where the CPU has
//! it, AVX2 and FMA otherwise).
//!
//! A fused kernel never stores a decoded weight: each block of 32 weights is decoded into
//! registers and multiplied straight into every activation row of a group (up to 8 rows
//! with AVX-512's 32 registers, 2 with AVX2's 16), so a batch reads each weight once per
//! group and a lone row pays no store and reload. Every kernel here computes a row's result
//! exactly as [`super::dot`] does over the decoded row (the same decoding, lane `l`
//! accumulating positions `l mod 32` by fused multiply-adds in block order, the same
//! [`super::reduce32`]), so the bits depend on neither the group nor the instruction set.
//! Weight rows are prefetched a few rows ahead ([`prefetch`]).

use std::arch::x86_64::*;

use super::{f16_at, reduce32};

/// Scale and minimum of a Q4_1 block (two f16s at its start), widened by F16C's exact
/// conversion: the same values as [`f16_at`].
#[inline(always)]
unsafe fn q4_1_scale_min(b: *const u8) -> (f32, f32) {
    // SAFETY (caller): b points at a block's 4 header bytes.
    let dm = unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(b.cast::<i32>().read_unaligned())) };
    (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
}

#[inline(always)]
unsafe fn f16_scale(b: *const u8) -> f32 {
    // SAFETY (caller): b points at 2 readable bytes.
    let d = unsafe {
        _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            b.cast::<u16>().read_unaligned(),
        )))
    };
    _mm_cvtss_f32(d)
}

/// How many weight rows ahead of the one being multiplied its cache lines are asked for.
const PREFETCH_ROWS: usize = 4;

/// Asks for the cache lines of `bytes[at..at + len]` (as far as `bytes` goes). Decoding a
/// lone row is quick enough that it waits on memory; asking a few rows ahead took SmolLM2's
/// one-sequence decode from 51 to 120 tokens/s (docs/benchmarks.md). Two to eight rows
/// ahead measured the same; one row is a few hundred bytes.
#[inline(always)]
fn prefetch(bytes: &[u8], at: usize, len: usize) {
    let end = (at + len).min(bytes.len());
    let mut line = at;
    while line < end {
        // SAFETY: the address is inside `bytes`; a prefetch never faults anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(line).cast()) };
        line += 64;
    }
}

/// A band kernel: weight rows `first..` of the matrix in `bytes` (rows of `k` weights, in
/// blocks of `$block_bytes`) against the `m` rows of `x`, into `part` (`[weight rows, m]`),
/// by `$dots` over groups of up to `$largest` activation rows. Every group size listed,
/// and one, has its own kernel: a group decodes the weights once, so five rows go in one
/// pass, not four and one.
macro_rules! band {
    ($features:literal, $name:ident, $dots:ident, $block_bytes:expr, $largest:literal; $($size:literal)*) => {
        #[doc = concat!("The band kernel (see `band!`) for `", $features, "`.")]
        #[target_feature(enable = $features)]
        pub unsafe fn $name(bytes: &[u8], k: usize, x: &[f32], first: usize, part: &mut [f32]) {
            let m = x.len() / k;
            let n = k / 32 * $block_bytes;
            prefetch(bytes, first * n, PREFETCH_ROWS * n);
            for (j, out) in part.chunks_exact_mut(m).enumerate() {
                let row = &bytes[(first + j) * n..][..n];
                prefetch(bytes, (first + j + PREFETCH_ROWS) * n, n);
                let mut i = 0;
                while i < m {
                    let xs = &x[i * k..];
                    // SAFETY: xs holds at least as many rows as each arm takes.
                    i += unsafe {
                        match m - i {
                            $largest.. => put(out, i, $dots::<$largest>(row, xs, k)),
                            $($size => put(out, i, $dots::<$size>(row, xs, k)),)*
                            _ => put(out, i, $dots::<1>(row, xs, k)),
                        }
                    };
                }
            }
        }
    };
}

/// Writes a group's results at `at`; returns how many rows it covered.
#[inline(always)]
fn put<const R: usize>(out: &mut [f32], at: usize, values: [f32; R]) -> usize {
    out[at..at + R].copy_from_slice(&values);
    R
}

pub mod avx512 {
    use super::*;

    /// `R` dot products of one Q4_1 weight row with `R` activation rows `x[r·k..]`.
    #[inline(always)]
    unsafe fn dots_q4_1<const R: usize>(row: &[u8], x: &[f32], k: usize) -> [f32; R] {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let levels = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        for (blk, b) in row.chunks_exact(20).enumerate() {
            // SAFETY: b is one 20-byte block; x holds R rows of k = 32 · blocks floats.
            unsafe {
                let (d, m) = q4_1_scale_min(b.as_ptr());
                let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
                // The block's 16 possible weights, d·q + m for q = 0..15 (a multiply then an
                // add, as everywhere), looked up by nibble: two permutes in place of masking
                // and converting each half, and the same values.
                let table = _mm512_add_ps(_mm512_mul_ps(d, levels), m);
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().add(4).cast()));
                // A permute reads only an index's low 4 bits: the low nibble as it is, the
                // high one shifted down.
                let w = [
                    _mm512_permutexvar_ps(bytes, table),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table),
                ];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(r * k + 32 * blk);
                    acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs), w[0], acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xs.add(16)), w[1], acc[1]);
                }
            }
        }
        let mut out = [0.0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = lanes(a);
        }
        out
    }

    /// `R` dot products of one Q8_0 weight row with `R` activation rows.
    #[inline(always)]
    unsafe fn dots_q8_0<const R: usize>(row: &[u8], x: &[f32], k: usize) -> [f32; R] {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (blk, b) in row.chunks_exact(34).enumerate() {
            // SAFETY: b is one 34-byte block; x as above.
            unsafe {
                let d = _mm512_set1_ps(f16_scale(b.as_ptr()));
                let q0 = _mm_loadu_si128(b.as_ptr().add(2).cast());
                let q1 = _mm_loadu_si128(b.as_ptr().add(18).cast());
                let w = [
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))),
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))),
                ];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(r * k + 32 * blk);
                    acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs), w[0], acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xs.add(16)), w[1], acc[1]);
                }
            }
        }
        let mut out = [0.0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = lanes(a);
        }
        out
    }

    #[inline(always)]
    fn lanes(acc: [__m512; 2]) -> f32 {
        // SAFETY: two 16-float registers are 32 floats, in lane order.
        reduce32(&unsafe { std::mem::transmute::<[__m512; 2], [f32; 32]>(acc) })
    }

    band!("avx512f,f16c,fma", band_q4_1, dots_q4_1, 20, 8; 7 6 5 4 3 2);
    band!("avx512f,f16c,fma", band_q8_0, dots_q8_0, 34, 8; 7 6 5 4 3 2);
}

pub mod avx2 {
    use super::*;

    /// `R` dot products of one Q4_1 weight row with `R` activation rows (four 8-wide
    /// accumulators per row: lane `l` of accumulator `a` is position `8a + l`).
    #[inline(always)]
    unsafe fn dots_q4_1<const R: usize>(row: &[u8], x: &[f32], k: usize) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mask = _mm_set1_epi8(0x0f);
        for (blk, b) in row.chunks_exact(20).enumerate() {
            // SAFETY: b is one 20-byte block; x holds R rows of k = 32 · blocks floats.
            unsafe {
                let (d, m) = q4_1_scale_min(b.as_ptr());
                let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let q = _mm_loadu_si128(b.as_ptr().add(4).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                let mut w = [_mm256_setzero_ps(); 4];
                for (w, part) in w.iter_mut().zip(parts) {
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                    *w = _mm256_add_ps(_mm256_mul_ps(d, f), m);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(r * k + 32 * blk);
                    for (a, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(8 * a)), w, *acc);
                    }
                }
            }
        }
        let mut out = [0.0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = lanes(a);
        }
        out
    }

    /// `R` dot products of one Q8_0 weight row with `R` activation rows.
    #[inline(always)]
    unsafe fn dots_q8_0<const R: usize>(row: &[u8], x: &[f32], k: usize) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for (blk, b) in row.chunks_exact(34).enumerate() {
            // SAFETY: b is one 34-byte block; x as above.
            unsafe {
                let d = _mm256_set1_ps(f16_scale(b.as_ptr()));
                let mut w = [_mm256_setzero_ps(); 4];
                for (a, w) in w.iter_mut().enumerate() {
                    let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * a).cast());
                    *w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(r * k + 32 * blk);
                    for (a, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(8 * a)), w, *acc);
                    }
                }
            }
        }
        let mut out = [0.0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = lanes(a);
        }
        out
    }

    #[inline(always)]
    fn lanes(acc: [__m256; 4]) -> f32 {
        // SAFETY: four 8-float registers are 32 floats, in lane order.
        reduce32(&unsafe { std::mem::transmute::<[__m256; 4], [f32; 32]>(acc) })
    }

    band!("avx2,f16c,fma", band_q4_1, dots_q4_1, 20, 2;);
    band!("avx2,f16c,fma", band_q8_0, dots_q8_0, 34, 2;);

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len() / 20 * 32, out.len());
        for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let m = _mm256_set1_ps(f16_at(b, 2));
            let mask = _mm_set1_epi8(0x0f);
            // SAFETY: b holds 20 bytes, so 16 from offset 4; o holds 32 floats.
            unsafe {
                let q = _mm_loadu_si128(b.as_ptr().add(4).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                for (k, v) in parts.into_iter().enumerate() {
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    let w = _mm256_add_ps(_mm256_mul_ps(d, f), m);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), w);
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len() / 34 * 32, out.len());
        for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
            let d = _mm256_set1_ps(f16_at(b, 0));
            // SAFETY: b holds 34 bytes, so 32 from offset 2; o holds 32 floats.
            unsafe {
                for k in 0..4 {
                    let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * k).cast());
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), _mm256_mul_ps(d, f));
                }
            }
        }
    }
}
