// Attention of f32 query rows over f32 key and value rows (row-major, head h of a row in
// columns h·head_dim ..): softmax(scale · q·kᵀ) · v per query row and head, as
// backend/src/device/cpu.rs computes it, but with a streaming ("online") softmax, so a row
// may see any number of keys in fixed shared memory. Sums run in another order than the
// CPU's, so results agree to rounding (~1e-6), not to the bit.
//
// Both kernels run one block per (query row, head): grid (rows, heads). The block must be a
// power of two from 32 to 1024 threads (whole warps for the shuffles, a power of two for the
// tree reductions; 128 is a good size), and head_dim at most 256.
//
// Compiled at start-up by NVRTC without any header: only its built-in declarations.

#define MAX_THREADS 1024
#define MAX_HEAD_DIM 256

// The sum of every thread's `v`, returned to all threads of the block; every thread must
// call it. `scratch` is free again once it returns.
__device__ float block_sum(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// As block_sum, for the maximum.
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

// Where key position p of a paged sequence lies: row table[p / block_size] · block_size +
// p % block_size of the cache.
struct PagedKeys {
    const unsigned* table;
    unsigned block_size;
    __device__ size_t row(unsigned p) const { return (size_t)table[p / block_size] * block_size + p % block_size; }
};

// Where key position p of a packed sequence lies: row start + p of the batch.
struct PackedKeys {
    unsigned start;
    __device__ size_t row(unsigned p) const { return (size_t)start + p; }
};

// out[0 .. head_dim) = softmax(scale · q·kₚ for p < len) · v, for the one query row and head
// of this block. `k` and `v` point at the head's first column of row 0; rows are `stride`
// floats apart, and key position p is row keys.row(p).
//
// Keys go in tiles of one per thread. Per tile: each warp dots whole keys (lanes across
// head_dim, so the loads coalesce), then every thread takes one key's score, the running
// maximum and sum are updated, and each thread folds the tile's values into its own output
// columns, after rescaling them to the new maximum.
template <class Keys>
__device__ void attend(float* out, const float* q, const float* k, const float* v, size_t stride, unsigned head_dim, unsigned len, Keys keys, float scale) {
    __shared__ float q_s[MAX_HEAD_DIM];
    __shared__ float acc[MAX_HEAD_DIM];
    __shared__ float weight[MAX_THREADS];
    __shared__ size_t key_row[MAX_THREADS];
    __shared__ float scratch[MAX_THREADS];
    const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32, warps = blockDim.x / 32;
    for (unsigned d = t; d < head_dim; d += blockDim.x) {
        q_s[d] = q[d];
        acc[d] = 0.0f;
    }
    __syncthreads();
    float run_max = __int_as_float(0xff800000);  // −∞: the first tile's correction is e^−∞ = 0
    float run_sum = 0.0f;
    for (unsigned first = 0; first < len; first += blockDim.x) {
        const unsigned n = min(len - first, blockDim.x);
        for (unsigned i = warp; i < n; i += warps) {
            const size_t kr = keys.row(first + i);
            const float* kp = k + kr * stride;
            float dot = 0.0f;
            for (unsigned d = lane; d < head_dim; d += 32) dot += q_s[d] * kp[d];
            for (unsigned offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
            if (lane == 0) {
                weight[i] = dot * scale;
                key_row[i] = kr;
            }
        }
        __syncthreads();
        const float score = t < n ? weight[t] : __int_as_float(0xff800000);
        const float new_max = fmaxf(run_max, block_max(score, scratch));
        const float e = t < n ? expf(score - new_max) : 0.0f;
        weight[t] = e;
        const float correction = expf(run_max - new_max);
        // block_sum's barriers also publish every thread's weight for the loop below.
        run_sum = run_sum * correction + block_sum(e, scratch);
        run_max = new_max;
        for (unsigned d = t; d < head_dim; d += blockDim.x) {
            float a = acc[d] * correction;
            for (unsigned i = 0; i < n; ++i) a += weight[i] * v[key_row[i] * stride + d];
            acc[d] = a;
        }
        // The next tile overwrites weight and key_row.
        __syncthreads();
    }
    const float inv = 1.0f / run_sum;
    for (unsigned d = t; d < head_dim; d += blockDim.x) out[d] = acc[d] * inv;
}

// Causal grouped-query attention over a paged key/value cache. Query row r (q and out are
// `[rows, heads · head_dim]`) of sequence s = row_seq[r] sits at position row_pos[r] and
// sees positions 0 ..= row_pos[r] of s; position p is row
// block_tables[table_offsets[s] + p / block_size] · block_size + p % block_size of the
// caches (`[cache rows, kv_heads · head_dim]`, already holding this step's keys and values).
// Query head h reads key/value head h / (heads / kv_heads). Scores are scale · q·k.
// Launch: grid (rows, heads), block a power of two in [32, 1024] (e.g. 128); head_dim ≤ 256.
extern "C" __global__ void paged_attention(float* out, const float* q, const float* k_cache, const float* v_cache, const unsigned* row_seq, const unsigned* row_pos, const unsigned* block_tables, const unsigned* table_offsets, unsigned rows, unsigned heads, unsigned kv_heads, unsigned head_dim, unsigned block_size, float scale) {
    const unsigned r = blockIdx.x, h = blockIdx.y;
    if (r >= rows || h >= heads) return;
    const size_t width = (size_t)heads * head_dim;
    const size_t column = (size_t)h * head_dim;
    const size_t kv_column = (size_t)(h / (heads / kv_heads)) * head_dim;
    const PagedKeys keys = {block_tables + table_offsets[row_seq[r]], block_size};
    attend(out + r * width + column, q + r * width + column, k_cache + kv_column, v_cache + kv_column, (size_t)kv_heads * head_dim, head_dim, row_pos[r] + 1, keys, scale);
}

// Bidirectional multi-head attention over packed sequences (BERT): query row r sees every
// row of its own sequence, rows row_seq_start[r] .. row_seq_start[r] + row_seq_len[r];
// q, k, v and out are all `[rows, heads · head_dim]`. Scores are scale · q·k.
// Launch: grid (rows, heads), block a power of two in [32, 1024] (e.g. 128); head_dim ≤ 256.
extern "C" __global__ void attention_bidirectional(float* out, const float* q, const float* k, const float* v, const unsigned* row_seq_start, const unsigned* row_seq_len, unsigned rows, unsigned heads, unsigned head_dim, float scale) {
    const unsigned r = blockIdx.x, h = blockIdx.y;
    if (r >= rows || h >= heads) return;
    const size_t width = (size_t)heads * head_dim;
    const size_t column = (size_t)h * head_dim;
    const PackedKeys keys = {row_seq_start[r]};
    attend(out + r * width + column, q + r * width + column, k + column, v + column, width, head_dim, row_seq_len[r], keys, scale);
}
