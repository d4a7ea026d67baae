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
//!
//! The kernels read rows laid out scales first ([`super::RowLayout::ScalesFirst`]): a row's
//! f16 scales are widened to f32 eight at a time into a small buffer ([`widen_scales`]),
//! and each block's are then read from it by the multiply and add that build its weights,
//! as broadcasts from memory. Widened one block at a time in place, a block's scale and
//! minimum took four shuffles on the port that the weight lookups also need: 6-7 cycles a
//! block instead of 4-5 (docs/benchmarks.md). Weight rows go two at a time: a lone
//! activation row then has four chains of fused multiply-adds waiting on their latency, not
//! two, and a batch's activations are read from cache once per pair of weight rows.

use std::arch::x86_64::*;

use super::{f16_at, reduce32};

/// Widens the `count` f16 scales at `src` to f32 at `dst`: eight at a time, then four,
/// then one (F16C's exact conversion: the values of [`f16_at`]).
#[inline(always)]
unsafe fn widen_scales(src: *const u8, count: usize, dst: *mut f32) {
    let mut i = 0;
    // SAFETY (caller): src holds `count` f16s, dst room for `count` f32s.
    unsafe {
        while i + 8 <= count {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(2 * i).cast()));
            _mm256_storeu_ps(dst.add(i), v);
            i += 8;
        }
        while i + 4 <= count {
            let v = _mm_cvtph_ps(_mm_loadl_epi64(src.add(2 * i).cast()));
            _mm_storeu_ps(dst.add(i), v);
            i += 4;
        }
        while i < count {
            let h = i32::from(src.add(2 * i).cast::<u16>().read_unaligned());
            *dst.add(i) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
            i += 1;
        }
    }
}

/// How many weight rows ahead of the one being multiplied its cache lines are asked for.
const PREFETCH_ROWS: usize = 4;

/// Asks for the cache lines of `data[at..at + len]` (as far as `data` goes). Decoding a
/// lone row is quick enough that it waits on memory; asking a few rows ahead took SmolLM2's
/// one-sequence decode from 51 to 120 tokens/s (docs/benchmarks.md). Two to eight rows
/// ahead measured the same; one row is a few hundred bytes. Paged attention asks for cached
/// keys and values the same way.
#[inline(always)]
pub(crate) fn prefetch<T>(data: &[T], at: usize, len: usize) {
    let end = (at + len).min(data.len());
    let step = (64 / std::mem::size_of::<T>()).max(1);
    let mut line = at;
    while line < end {
        // SAFETY: the address is inside `data`; a prefetch never faults anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(line).cast()) };
        line += step;
    }
}

/// A band kernel: weight rows `first..` of the matrix in `bytes` (rows of `k` weights in
/// blocks of `$block_bytes`, laid out scales first, `$scales` f16s a block) against the `m`
/// rows of `x`, into `part` (`[weight rows, m]`), by `$dots` over groups of up to `$largest`
/// activation rows; `scratch` holds at least `k / 8` floats (two rows' widened scales). Every
/// group size listed, and one, has its own kernel: a group decodes the weights once, so
/// five rows go in one pass, not four and one.
macro_rules! band {
    ($features:literal, $name:ident, $dots:ident, $block_bytes:expr, $scales:expr,
     [$largest:literal; $($size:literal)*], [$pair_largest:literal; $($pair_size:literal)*]) => {
        #[doc = concat!("The band kernel (see `band!`) for `", $features, "`.")]
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            bytes: &[u8],
            k: usize,
            x: &[f32],
            first: usize,
            part: &mut [f32],
            scratch: &mut [f32],
        ) {
            let m = x.len() / k;
            let (blocks, rows) = (k / 32, part.len() / m);
            let n = blocks * $block_bytes;
            let (scales, values_at) = (blocks * $scales, blocks * $scales * 2);
            assert!(x.len() == m * k && k % 32 == 0, "{m} rows of {k}");
            assert!(bytes.len() >= (first + rows) * n, "rows {first}+{rows}");
            assert!(scratch.len() >= 2 * scales, "scratch of {}", scratch.len());
            prefetch(bytes, first * n, PREFETCH_ROWS * n);
            let at = |j: usize| bytes.as_ptr().add((first + j) * n);
            let mut j = 0;
            // Two weight rows at a time: each activation block loaded feeds both (a batch's
            // activations are read from cache once per pair of rows, not per row), and a
            // lone activation row has four chains of multiply-adds, not two.
            while j + 2 <= rows {
                prefetch(bytes, (first + j + PREFETCH_ROWS) * n, 2 * n);
                let (a, b) = (at(j), at(j + 1));
                widen_scales(a, scales, scratch.as_mut_ptr());
                widen_scales(b, scales, scratch.as_mut_ptr().add(scales));
                // Opaque, so that the compiler reads the scales back from memory as
                // broadcasts instead of shuffling them out of the registers it stored.
                let s = std::hint::black_box(scratch.as_ptr());
                let (v, s) = ([a.add(values_at), b.add(values_at)], [s, s.add(scales)]);
                let (first_row, second_row) = part[j * m..(j + 2) * m].split_at_mut(m);
                let mut i = 0;
                while i < m {
                    let xs = x.as_ptr().add(i * k);
                    let out = (&mut *first_row, &mut *second_row);
                    i += match m - i {
                        $pair_largest.. => put2(out, i, $dots::<2, $pair_largest>(v, s, xs, k)),
                        $($pair_size => put2(out, i, $dots::<2, $pair_size>(v, s, xs, k)),)*
                        _ => put2(out, i, $dots::<2, 1>(v, s, xs, k)),
                    };
                }
                j += 2;
            }
            while j < rows {
                prefetch(bytes, (first + j + PREFETCH_ROWS) * n, n);
                let a = at(j);
                widen_scales(a, scales, scratch.as_mut_ptr());
                let s = std::hint::black_box(scratch.as_ptr());
                let v = [a.add(values_at)];
                let out = &mut part[j * m..(j + 1) * m];
                let mut i = 0;
                while i < m {
                    let xs = x.as_ptr().add(i * k);
                    i += match m - i {
                        $largest.. => put(out, i, $dots::<1, $largest>(v, [s], xs, k)[0]),
                        $($size => put(out, i, $dots::<1, $size>(v, [s], xs, k)[0]),)*
                        _ => put(out, i, $dots::<1, 1>(v, [s], xs, k)[0]),
                    };
                }
                j += 1;
            }
        }
    };
}

/// Writes a group's results for two weight rows at `at` of each; returns how many
/// activation rows it covered.
#[inline(always)]
fn put2<const R: usize>(out: (&mut [f32], &mut [f32]), at: usize, values: Dots<2, R>) -> usize {
    out.0[at..at + R].copy_from_slice(&values[0]);
    out.1[at..at + R].copy_from_slice(&values[1]);
    R
}

/// Writes a group's results at `at`; returns how many rows it covered.
#[inline(always)]
fn put<const R: usize>(out: &mut [f32], at: usize, values: [f32; R]) -> usize {
    out[at..at + R].copy_from_slice(&values);
    R
}

/// The results of a `dots` kernel: `W` weight rows against `R` activation rows.
type Dots<const W: usize, const R: usize> = [[f32; R]; W];

/// Each accumulator of a `dots` kernel summed by `lanes`. Plain loops: a closure (as
/// `array::map` takes) is compiled without its caller's target features, and passing it
/// vector registers went through memory (a fifth of a 16-sequence decode step).
#[inline(always)]
fn reduced<A: Copy, const W: usize, const R: usize>(
    acc: [[A; R]; W],
    lanes: impl Fn(A) -> f32,
) -> Dots<W, R> {
    let mut out = [[0.0f32; R]; W];
    for (out, acc) in out.iter_mut().zip(acc) {
        for (out, acc) in out.iter_mut().zip(acc) {
            *out = lanes(acc);
        }
    }
    out
}

pub mod avx512 {
    use super::*;

    /// `W × R` dot products: `W` Q4_1 weight rows (their values `v[w]`, their widened
    /// scales and minimums `s[w]`, in pairs) with `R` activation rows `x[r·k..]`.
    #[inline(always)]
    unsafe fn dots_q4_1<const W: usize, const R: usize>(
        v: [*const u8; W],
        s: [*const f32; W],
        x: *const f32,
        k: usize,
    ) -> Dots<W, R> {
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; W];
        let levels = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        for blk in 0..k / 32 {
            for (acc, (v, s)) in acc.iter_mut().zip(v.iter().zip(s)) {
                // SAFETY (caller): v holds k / 2 bytes, s k / 16 floats, x R rows of k.
                unsafe {
                    let d = _mm512_set1_ps(*s.add(2 * blk));
                    let m = _mm512_set1_ps(*s.add(2 * blk + 1));
                    // The block's 16 possible weights, d·q + m for q = 0..15 (a multiply then
                    // an add, as everywhere), looked up by nibble: two permutes in place of
                    // masking and converting each half, and the same values.
                    let table = _mm512_add_ps(_mm512_mul_ps(d, levels), m);
                    let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(v.add(16 * blk).cast()));
                    // A permute reads only an index's low 4 bits: the low nibble as it is,
                    // the high one shifted down.
                    let w = [
                        _mm512_permutexvar_ps(bytes, table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xs = x.add(r * k + 32 * blk);
                        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs), w[0], acc[0]);
                        acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xs.add(16)), w[1], acc[1]);
                    }
                }
            }
        }
        reduce_together(acc)
    }

    /// `W × R` dot products of Q8_0 weight rows (values `v[w]`, widened scales `s[w]`) with
    /// `R` activation rows.
    #[inline(always)]
    unsafe fn dots_q8_0<const W: usize, const R: usize>(
        v: [*const u8; W],
        s: [*const f32; W],
        x: *const f32,
        k: usize,
    ) -> Dots<W, R> {
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; W];
        for blk in 0..k / 32 {
            for (acc, (v, s)) in acc.iter_mut().zip(v.iter().zip(s)) {
                // SAFETY (caller): v holds k bytes, s k / 32 floats, x R rows of k.
                unsafe {
                    let d = _mm512_set1_ps(*s.add(blk));
                    let q0 = _mm_loadu_si128(v.add(32 * blk).cast());
                    let q1 = _mm_loadu_si128(v.add(32 * blk + 16).cast());
                    let w = [
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))),
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xs = x.add(r * k + 32 * blk);
                        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs), w[0], acc[0]);
                        acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xs.add(16)), w[1], acc[1]);
                    }
                }
            }
        }
        reduce_together(acc)
    }

    /// Each output's two accumulators (lanes 0-15 and 16-31) summed as [`reduce32`] sums
    /// them, for up to eight outputs together: the tree's steps are adds of whole registers
    /// whose lanes were shuffled into place, so every output gets the same additions in the
    /// same order as alone, in a few dozen instructions for all eight where reducing each
    /// through memory took a third of a 16-sequence step's kernel time (docs/benchmarks.md).
    #[inline(always)]
    unsafe fn reduce_together<const W: usize, const R: usize>(
        acc: [[[__m512; 2]; R]; W],
    ) -> Dots<W, R> {
        const { assert!(W * R <= 8, "eight outputs at most") };
        // SAFETY (all intrinsics): the caller's CPU has AVX-512F (the kernels' features).
        unsafe {
            // v[i] += v[i + 16]: one register per output.
            let mut v = [_mm512_setzero_ps(); 8];
            for (w, acc) in acc.iter().enumerate() {
                for (r, [low, high]) in acc.iter().enumerate() {
                    v[w * R + r] = _mm512_add_ps(*low, *high);
                }
            }
            // v[i] += v[i + 8]: outputs 2p and 2p + 1 in register p, eight lanes each.
            let mut halves = [_mm512_setzero_ps(); 4];
            for (p, halves) in halves.iter_mut().enumerate() {
                let (a, b) = (v[2 * p], v[2 * p + 1]);
                let low = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
                let high = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
                *halves = _mm512_add_ps(low, high);
            }
            // v[i] += v[i + 4]: outputs 4h..4h + 4 in register h, a quarter each.
            let mut quarters = [_mm512_setzero_ps(); 2];
            for (h, quarters) in quarters.iter_mut().enumerate() {
                let (a, b) = (halves[2 * h], halves[2 * h + 1]);
                let low = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                let high = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
                *quarters = _mm512_add_ps(low, high);
            }
            // v[i] += v[i + 2]: quarter j holds output j's two lanes, then output j + 4's.
            let (a, b) = (quarters[0], quarters[1]);
            let pairs = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            );
            // v[0] += v[1]: quarter j starts with outputs j and j + 4.
            let sums = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(pairs, pairs),
                _mm512_shuffle_ps::<0b11_01_11_01>(pairs, pairs),
            );
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
            let mut all = [0.0f32; 8];
            _mm256_storeu_ps(
                all.as_mut_ptr(),
                _mm512_castps512_ps256(_mm512_permutexvar_ps(order, sums)),
            );
            let mut out = [[0.0f32; R]; W];
            for (w, out) in out.iter_mut().enumerate() {
                out.copy_from_slice(&all[w * R..(w + 1) * R]);
            }
            out
        }
    }

    band!("avx512f,f16c,fma", band_q4_1, dots_q4_1, 20, 2, [8; 7 6 5 4 3 2], [4; 3 2]);
    band!("avx512f,f16c,fma", band_q8_0, dots_q8_0, 34, 1, [8; 7 6 5 4 3 2], [4; 3 2]);
}

pub mod avx2 {
    use super::*;

    /// `W × R` dot products of Q4_1 weight rows with `R` activation rows (four 8-wide
    /// accumulators per row: lane `l` of accumulator `a` is position `8a + l`).
    #[inline(always)]
    unsafe fn dots_q4_1<const W: usize, const R: usize>(
        v: [*const u8; W],
        s: [*const f32; W],
        x: *const f32,
        k: usize,
    ) -> Dots<W, R> {
        let mut acc = [[[_mm256_setzero_ps(); 4]; R]; W];
        let mask = _mm_set1_epi8(0x0f);
        for blk in 0..k / 32 {
            for (acc, (v, s)) in acc.iter_mut().zip(v.iter().zip(s)) {
                // SAFETY (caller): v holds k / 2 bytes, s k / 16 floats, x R rows of k.
                unsafe {
                    let d = _mm256_set1_ps(*s.add(2 * blk));
                    let m = _mm256_set1_ps(*s.add(2 * blk + 1));
                    let q = _mm_loadu_si128(v.add(16 * blk).cast());
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                    let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                    let mut w = [_mm256_setzero_ps(); 4];
                    for (w, part) in w.iter_mut().zip(parts) {
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                        *w = _mm256_add_ps(_mm256_mul_ps(d, f), m);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xs = x.add(r * k + 32 * blk);
                        for (a, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(8 * a)), w, *acc);
                        }
                    }
                }
            }
        }
        reduced(acc, lanes)
    }

    /// `W × R` dot products of Q8_0 weight rows with `R` activation rows.
    #[inline(always)]
    unsafe fn dots_q8_0<const W: usize, const R: usize>(
        v: [*const u8; W],
        s: [*const f32; W],
        x: *const f32,
        k: usize,
    ) -> Dots<W, R> {
        let mut acc = [[[_mm256_setzero_ps(); 4]; R]; W];
        for blk in 0..k / 32 {
            for (acc, (v, s)) in acc.iter_mut().zip(v.iter().zip(s)) {
                // SAFETY (caller): v holds k bytes, s k / 32 floats, x R rows of k.
                unsafe {
                    let d = _mm256_set1_ps(*s.add(blk));
                    let mut w = [_mm256_setzero_ps(); 4];
                    for (a, w) in w.iter_mut().enumerate() {
                        let q = _mm_loadl_epi64(v.add(32 * blk + 8 * a).cast());
                        *w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xs = x.add(r * k + 32 * blk);
                        for (a, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(8 * a)), w, *acc);
                        }
                    }
                }
            }
        }
        reduced(acc, lanes)
    }

    #[inline(always)]
    fn lanes(acc: [__m256; 4]) -> f32 {
        // SAFETY: four 8-float registers are 32 floats, in lane order.
        reduce32(&unsafe { std::mem::transmute::<[__m256; 4], [f32; 32]>(acc) })
    }

    band!("avx2,f16c,fma", band_q4_1, dots_q4_1, 20, 2, [2;], [1;]);
    band!("avx2,f16c,fma", band_q8_0, dots_q8_0, 34, 1, [2;], [1;]);

    /// Decodes a Q4_1 row laid out scales first (`scales`: its blocks' `d` and `m`, `q`:
    /// their values) into `out`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_q4_1(scales: &[u8], q: &[u8], out: &mut [f32]) {
        assert!(scales.len() / 4 * 32 == out.len() && q.len() / 16 * 32 == out.len());
        let mask = _mm_set1_epi8(0x0f);
        let blocks = out.chunks_exact_mut(32).zip(scales.chunks_exact(4));
        for ((o, s), q) in blocks.zip(q.chunks_exact(16)) {
            let d = _mm256_set1_ps(f16_at(s, 0));
            let m = _mm256_set1_ps(f16_at(s, 2));
            // SAFETY: q holds 16 bytes; o holds 32 floats.
            unsafe {
                let q = _mm_loadu_si128(q.as_ptr().cast());
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

    /// Decodes a Q8_0 row laid out scales first into `out`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_q8_0(scales: &[u8], q: &[u8], out: &mut [f32]) {
        assert!(scales.len() / 2 * 32 == out.len() && q.len() == out.len());
        let blocks = out.chunks_exact_mut(32).zip(scales.chunks_exact(2));
        for ((o, s), q) in blocks.zip(q.chunks_exact(32)) {
            let d = _mm256_set1_ps(f16_at(s, 0));
            // SAFETY: q holds 32 bytes; o holds 32 floats.
            unsafe {
                for k in 0..4 {
                    let q = _mm_loadl_epi64(q.as_ptr().add(8 * k).cast());
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), _mm256_mul_ps(d, f));
                }
            }
        }
    }
}
