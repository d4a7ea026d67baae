// Weight matrices in their stored encodings (backend/src/model/quant.rs): `rows × cols`,
// row-major, each row `cols` values (F32, F16, BF16: plain little-endian arrays) or
// `cols / 32` blocks (Q4_0, Q4_1, Q8_0), passed as the raw bytes, which must be 4-byte
// aligned (as cudaMalloc's are). NVIDIA GPUs are little-endian, so the bytes load as they lie.
//
// Every weight decodes exactly as quant.rs decodes it, bit for bit (the half-precision
// conversions are exact; Q4_1's `d·q + m` is a multiply then an add, never fused, as on the
// CPU). matvec also sums in the CPU's order, so a decode row's logits are the CPU's.
//
// Compiled at start-up by NVRTC without any header: only its built-in declarations.

// f16 bits to f32: exact (every f16 is an f32), subnormals included.
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
#ifdef SLUICE_EMULATED_GPU
    // The emulated GPU of the tests (backend/tests/emulated_gpu/) compiles this file as host
    // C++, which has no PTX: the same conversion on the bits. NVRTC never defines the macro.
    const unsigned sign = (unsigned)(h & 0x8000) << 16;
    const unsigned exponent = (h >> 10) & 0x1f;
    unsigned mantissa = h & 0x3ff;
    // ±∞, or a NaN, made quiet, its payload kept.
    if (exponent == 0x1f) return __uint_as_float(sign | 0x7f800000 | (mantissa ? 0x400000 | mantissa << 13 : 0));
    // Normal: the exponent rebiased from 15 to 127.
    if (exponent != 0) return __uint_as_float(sign | (exponent + 112) << 23 | mantissa << 13);
    if (mantissa == 0) return __uint_as_float(sign);
    // Subnormal, mantissa · 2^−24: shifted until its leading 1 is the implicit bit.
    unsigned biased = 113;
    while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --biased;
    }
    return __uint_as_float(sign | biased << 23 | (mantissa & 0x3ff) << 13);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float((unsigned)h << 16);
}

__device__ __forceinline__ unsigned short u16_at(const unsigned char* p) {
    return *(const unsigned short*)p;
}

// One struct per encoding: the bytes of a row of `cols` values, and value `j` of a row.
// Blocks are 18, 20 and 34 bytes, so their f16 fields are 2-byte aligned and load as such.

struct F32 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)cols * 4; }
    static __device__ float at(const unsigned char* row, unsigned j) { return ((const float*)row)[j]; }
};

struct F16 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)cols * 2; }
    static __device__ float at(const unsigned char* row, unsigned j) { return f16_to_f32(((const unsigned short*)row)[j]); }
};

struct BF16 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)cols * 2; }
    static __device__ float at(const unsigned char* row, unsigned j) { return bf16_to_f32(((const unsigned short*)row)[j]); }
};

// f16 d, 16 bytes of nibbles: byte i holds weight i low, weight i + 16 high; w = d·(q − 8).
struct Q4_0 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)(cols / 32) * 18; }
    static __device__ float at(const unsigned char* row, unsigned j) {
        const unsigned char* block = row + (j / 32) * 18;
        const unsigned char q = block[2 + j % 16];
        const unsigned nibble = j % 32 < 16 ? q & 0x0f : q >> 4;
        return f16_to_f32(u16_at(block)) * ((float)nibble - 8.0f);
    }
};

// f16 d, f16 m, 16 bytes of nibbles laid out as Q4_0's; w = d·q + m.
struct Q4_1 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)(cols / 32) * 20; }
    static __device__ float at(const unsigned char* row, unsigned j) {
        const unsigned char* block = row + (j / 32) * 20;
        const unsigned char q = block[4 + j % 16];
        const unsigned nibble = j % 32 < 16 ? q & 0x0f : q >> 4;
        return __fadd_rn(__fmul_rn(f16_to_f32(u16_at(block)), (float)nibble), f16_to_f32(u16_at(block + 2)));
    }
};

// f16 d, 32 signed bytes q; w = d·q.
struct Q8_0 {
    static __device__ size_t row_bytes(unsigned cols) { return (size_t)(cols / 32) * 34; }
    static __device__ float at(const unsigned char* row, unsigned j) {
        const unsigned char* block = row + (j / 32) * 34;
        return f16_to_f32(u16_at(block)) * (float)(signed char)block[2 + j % 32];
    }
};

template <class E>
__device__ void gather(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) {
    const unsigned i = blockIdx.x;
    if (i >= n) return;
    const unsigned char* row = w + (size_t)ids[i] * E::row_bytes(cols);
    float* o = out + (size_t)i * cols;
    for (unsigned j = threadIdx.x; j < cols; j += blockDim.x) o[j] = E::at(row, j);
}

template <class E>
__device__ void dequantize(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) {
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    const unsigned char* row = w + (size_t)(first_row + r) * E::row_bytes(cols);
    float* o = out + (size_t)r * cols;
    for (unsigned j = threadIdx.x; j < cols; j += blockDim.x) o[j] = E::at(row, j);
}

// Activation rows a warp carries at once: one accumulator register each.
#define MATVEC_ROWS 8
// The largest block matvec takes, in warps: its shared memory is sized for it.
#define MATVEC_WARPS 8

// out[i·rows + r] = x[i] · w[r]. One warp per weight row; lane l takes the row's values
// l, l + 32, ..., each decoded once and multiplied (fused) into one accumulator per activation
// row. That is the CPU's dot product (quant.rs `dot`, FMA path) step for step: its 32
// accumulators are the 32 lanes, summed as a tree of halves (`reduce32`), then the unfused
// products of the last cols % 32 values, summed in order, are added; so each result is the
// CPU's to the bit and depends on nothing but its own row. Lane k sums activation row k's 32
// partials from shared memory, all rows at once, rather than the warp shuffling them one row
// after another.
template <class E>
__device__ void matvec(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) {
    // 33 columns, not 32: lane k reading row k's partials then hits bank k + l, not one bank.
    __shared__ float partials[MATVEC_WARPS][MATVEC_ROWS][33];
    const unsigned lane = threadIdx.x % 32;
    const unsigned r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    // Uniform across the warp, so a warp leaves whole and __syncwarp's full mask holds.
    if (r >= rows) return;
    float(*mine)[33] = partials[threadIdx.x / 32];
    const unsigned char* row = w + (size_t)r * E::row_bytes(cols);
    const unsigned whole = cols / 32 * 32;
    const unsigned tail = cols - whole;
    for (unsigned i0 = 0; i0 < m; i0 += MATVEC_ROWS) {
        const unsigned count = min(m - i0, (unsigned)MATVEC_ROWS);
        const float* xs = x + (size_t)i0 * cols;
        float acc[MATVEC_ROWS];
#pragma unroll
        for (unsigned k = 0; k < MATVEC_ROWS; ++k) acc[k] = 0.0f;
        for (unsigned j = lane; j < whole; j += 32) {
            const float wj = E::at(row, j);
#pragma unroll
            for (unsigned k = 0; k < MATVEC_ROWS; ++k) {
                if (k < count) acc[k] = fmaf(xs[(size_t)k * cols + j], wj, acc[k]);
            }
        }
#pragma unroll
        for (unsigned k = 0; k < MATVEC_ROWS; ++k) mine[k][lane] = acc[k];
        __syncwarp();
        float sum = 0.0f;
        if (lane < count) {
            // The CPU's tree of halves (quant.rs `reduce32`): partial l plus partial l + 16,
            // then l + 8, ... Each lane folds only its own row's partials, in place.
            float* p = mine[lane];
            for (unsigned width = 16; width > 0; width /= 2) {
                for (unsigned l = 0; l < width; ++l) p[l] += p[l + width];
            }
            sum = p[0];
        }
        __syncwarp();
        if (tail > 0) {
            const float wt = lane < tail ? E::at(row, whole + lane) : 0.0f;
#pragma unroll
            for (unsigned k = 0; k < MATVEC_ROWS; ++k) {
                mine[k][lane] = k < count && lane < tail ? __fmul_rn(xs[(size_t)k * cols + whole + lane], wt) : 0.0f;
            }
            __syncwarp();
            if (lane < count) {
                float t = mine[lane][0];
                for (unsigned l = 1; l < tail; ++l) t += mine[lane][l];
                sum += t;
            }
            __syncwarp();
        }
        if (lane < count) out[(size_t)(i0 + lane) * rows + r] = sum;
    }
}

// gather_rows_*: out[i] = row ids[i] of w (`[rows, cols]`), decoded: the embedding look-up
// of a table kept encoded. The host checks every id against the rows.
// Launch: grid (n), any block (e.g. 256).
extern "C" __global__ void gather_rows_f32(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<F32>(out, w, ids, n, cols); }
extern "C" __global__ void gather_rows_f16(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<F16>(out, w, ids, n, cols); }
extern "C" __global__ void gather_rows_bf16(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<BF16>(out, w, ids, n, cols); }
extern "C" __global__ void gather_rows_q4_0(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<Q4_0>(out, w, ids, n, cols); }
extern "C" __global__ void gather_rows_q4_1(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<Q4_1>(out, w, ids, n, cols); }
extern "C" __global__ void gather_rows_q8_0(float* out, const unsigned char* w, const unsigned* ids, unsigned n, unsigned cols) { gather<Q8_0>(out, w, ids, n, cols); }

// matvec_*: out `[m, rows]` = x `[m, cols]` · wᵀ, w `[rows, cols]` encoded: the product for
// generated (decode) rows, f32 throughout. Made for small m (it streams the weights once per
// MATVEC_ROWS activation rows); prompt rows go through dequantize_* and a GEMM instead.
// Launch: block 32·W threads, W ≤ 8 warps (256 threads, W = 8, is a good size), grid
// ceil(rows / W); warp w of block b computes weight row b·W + w.
extern "C" __global__ void matvec_f32(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<F32>(out, w, x, m, rows, cols); }
extern "C" __global__ void matvec_f16(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<F16>(out, w, x, m, rows, cols); }
extern "C" __global__ void matvec_bf16(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<BF16>(out, w, x, m, rows, cols); }
extern "C" __global__ void matvec_q4_0(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<Q4_0>(out, w, x, m, rows, cols); }
extern "C" __global__ void matvec_q4_1(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<Q4_1>(out, w, x, m, rows, cols); }
extern "C" __global__ void matvec_q8_0(float* out, const unsigned char* w, const float* x, unsigned m, unsigned rows, unsigned cols) { matvec<Q8_0>(out, w, x, m, rows, cols); }

// dequantize_*_to_f32: out `[rows, cols]` = weight rows first_row .. first_row + rows,
// decoded: a tile for a GEMM with the prompt rows. (F32 weights need no tile.)
// Launch: grid (rows), any block (e.g. 256).
extern "C" __global__ void dequantize_f16_to_f32(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) { dequantize<F16>(out, w, first_row, rows, cols); }
extern "C" __global__ void dequantize_bf16_to_f32(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) { dequantize<BF16>(out, w, first_row, rows, cols); }
extern "C" __global__ void dequantize_q4_0_to_f32(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) { dequantize<Q4_0>(out, w, first_row, rows, cols); }
extern "C" __global__ void dequantize_q4_1_to_f32(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) { dequantize<Q4_1>(out, w, first_row, rows, cols); }
extern "C" __global__ void dequantize_q8_0_to_f32(float* out, const unsigned char* w, unsigned first_row, unsigned rows, unsigned cols) { dequantize<Q8_0>(out, w, first_row, rows, cols); }
