// Element-wise and row-wise operations of the `Device` trait on f32 tensors: dense,
// row-major, packed `[tokens, features]` exactly as backend/src/device/mod.rs describes.
//
// Each kernel reproduces the CPU device (backend/src/device/cpu.rs): where the CPU works in
// f64 (norms, GELU, rotary angles, pooling) so does the kernel, and where the CPU multiplies
// then adds in f32, the kernel uses the `_rn` intrinsics, which the compiler never fuses
// into one multiply-add, so such results round as the CPU's do.
//
// Compiled at start-up by NVRTC without any header: only its built-in declarations.

// Static shared memory is sized for the largest block the reductions accept.
#define MAX_THREADS 1024

// The sum of every thread's `v`, returned to all threads of the block. The block must be a
// power of two no larger than MAX_THREADS, and every thread must call it. `scratch` is free
// again once it returns, so one call can follow another.
__device__ double block_sum(double v, double* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    const double total = scratch[0];
    __syncthreads();
    return total;
}

// As block_sum, for the maximum; fmaxf skips NaNs as the CPU's f32::max does.
__device__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// x[i] += y[i]: residual connections.
// Launch: any 1-D grid and block (grid-stride loop), e.g. block 256, grid ceil(n / 256).
extern "C" __global__ void add_assign(float* x, const float* y, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// x[r·d + j] += bias[j] for every row r of `[rows, d]`: a linear layer's bias, added after
// its product (cuBLAS computes x·wᵀ alone).
// Launch: any 1-D grid and block (grid-stride loop).
extern "C" __global__ void add_bias_rows(float* x, const float* bias, unsigned rows, unsigned d) {
    const size_t n = (size_t)rows * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        x[i] += bias[i % d];
    }
}

// gate[i] = silu(gate[i]) · up[i], silu(g) = g / (1 + e^−g): the SwiGLU gating, in f32.
// Launch: any 1-D grid and block (grid-stride loop).
extern "C" __global__ void silu_mul(float* gate, const float* up, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x = x/2 · (1 + erf(x/√2)), the exact GELU, in place. In f64 as on the CPU, whose result it
// then matches to the last bit but for erf's own rounding.
// Launch: any 1-D grid and block (grid-stride loop).
extern "C" __global__ void gelu_erf(float* x, unsigned n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const double v = x[i];
        x[i] = (float)(0.5 * v * (1.0 + erf(v * 0.70710678118654752440)));
    }
}

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, for each row r of `[rows, d]`; `w` is `[d]`.
// The mean square in f64 (as on the CPU: hundreds of f32 squares lose the last digits), the
// scaling in f32. `out` may be `x`.
// Launch: grid (rows), block a power of two ≤ 1024 (e.g. 256).
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, unsigned rows, unsigned d, float eps) {
    __shared__ double scratch[MAX_THREADS];
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * d;
    float* o = out + (size_t)r * d;
    double squares = 0.0;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const double v = xr[j];
        squares += v * v;
    }
    const double ms = block_sum(squares, scratch) / d;
    const float inv = (float)(1.0 / sqrt(ms + (double)eps));
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) o[j] = xr[j] * inv * w[j];
}

// out[r] = (x[r] − mean) / sqrt(var + eps) · w + b per row, with the biased variance. Mean
// and variance in two f64 passes, as on the CPU (one f32 pass loses digits when the mean is
// large). `out` may be `x`.
// Launch: grid (rows), block a power of two ≤ 1024 (e.g. 256).
extern "C" __global__ void layer_norm(float* out, const float* x, const float* w, const float* b, unsigned rows, unsigned d, float eps) {
    __shared__ double scratch[MAX_THREADS];
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * d;
    float* o = out + (size_t)r * d;
    double sum = 0.0;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) sum += (double)xr[j];
    const double mean = block_sum(sum, scratch) / d;
    double squares = 0.0;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const double c = (double)xr[j] - mean;
        squares += c * c;
    }
    const double var = block_sum(squares, scratch) / d;
    const double inv = 1.0 / sqrt(var + (double)eps);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float n = (float)(((double)xr[j] - mean) * inv);
        o[j] = __fadd_rn(__fmul_rn(n, w[j]), b[j]);
    }
}

// Softmax of each row of `[rows, d]`, in place: e^(x − max) / Σ e^(x − max). The sum in
// f64, which is at least as close to the exact one as the CPU's f32 sum.
// Launch: grid (rows), block a power of two ≤ 1024 (e.g. 256).
extern "C" __global__ void softmax_rows(float* x, unsigned rows, unsigned d) {
    __shared__ float max_scratch[MAX_THREADS];
    __shared__ double sum_scratch[MAX_THREADS];
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    float* xr = x + (size_t)r * d;
    float m = __int_as_float(0xff800000);  // −∞
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) m = fmaxf(m, xr[j]);
    const float row_max = block_max(m, max_scratch);
    double sum = 0.0;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float e = expf(xr[j] - row_max);
        xr[j] = e;
        sum += e;
    }
    const float inv = 1.0f / (float)block_sum(sum, sum_scratch);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) xr[j] *= inv;
}

// Rotary position embedding in place on x `[rows, heads · head_dim]`, row r at position
// positions[r]: the adjacent pair (2i, 2i + 1) of every head is turned by the angle
// position · base^(−2i / head_dim). The angle and its sine and cosine in f64, rounded to f32,
// as on the CPU (in f32 the angle is off by ~1e-3 rad at positions in the thousands); the
// turn itself in unfused f32, as on the CPU. head_dim must be even.
// Launch: grid (rows), any block (e.g. 64); each thread computes one angle and applies it
// to that pair of every head.
extern "C" __global__ void rope(float* x, const unsigned* positions, unsigned rows, unsigned heads, unsigned head_dim, float base, const float* divisors) {
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    float* xr = x + (size_t)r * heads * head_dim;
    const double pos = (double)positions[r];
    for (unsigned i = threadIdx.x; i < head_dim / 2; i += blockDim.x) {
        const double inv_freq = pow((double)base, -2.0 * (double)i / (double)head_dim) / (double)divisors[i];
        double s, c;
        sincos(pos * inv_freq, &s, &c);
        const float sin_f = (float)s, cos_f = (float)c;
        for (unsigned h = 0; h < heads; ++h) {
            float* pair = xr + (size_t)h * head_dim + 2 * i;
            const float a = pair[0], b = pair[1];
            pair[0] = __fsub_rn(__fmul_rn(a, cos_f), __fmul_rn(b, sin_f));
            pair[1] = __fadd_rn(__fmul_rn(a, sin_f), __fmul_rn(b, cos_f));
        }
    }
}

// out[i] = table[ids[i]] for rows of width d: embedding look-up. The host checks every id
// against the table's rows (the kernel cannot know them).
// Launch: grid (n), any block (e.g. 256).
extern "C" __global__ void gather_rows(float* out, const float* table, const unsigned* ids, unsigned n, unsigned d) {
    const unsigned i = blockIdx.x;
    if (i >= n) return;
    const float* src = table + (size_t)ids[i] * d;
    float* dst = out + (size_t)i * d;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
}

// dest[rows[i]] = x[i] for rows of width d: new keys and values into their cache slots. The
// host checks every index against dest's rows; indices must be distinct.
// Launch: grid (n), any block (e.g. 256).
extern "C" __global__ void scatter_rows(float* dest, const float* x, const unsigned* rows, unsigned n, unsigned d) {
    const unsigned i = blockIdx.x;
    if (i >= n) return;
    const float* src = x + (size_t)i * d;
    float* dst = dest + (size_t)rows[i] * d;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
}

// out[s] = the mean of rows seq_starts[s] .. seq_starts[s] + seq_lens[s] of x `[tokens, d]`;
// an empty sequence gives zeros, as on the CPU. Each column is summed in f64 in row order,
// the CPU's very sum, so the result is the CPU's bit for bit.
// Launch: grid (seqs), any block (e.g. 128); threads take columns.
extern "C" __global__ void mean_pool(float* out, const float* x, const unsigned* seq_starts, const unsigned* seq_lens, unsigned seqs, unsigned d) {
    const unsigned s = blockIdx.x;
    if (s >= seqs) return;
    const unsigned start = seq_starts[s], len = seq_lens[s];
    const double count = len > 0 ? (double)len : 1.0;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        double sum = 0.0;
        for (unsigned i = 0; i < len; ++i) sum += (double)x[(size_t)(start + i) * d + j];
        out[(size_t)s * d + j] = (float)(sum / count);
    }
}
