// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): a fake
// libcublas.so with what cudarc's CudaBlas and the CUDA device's SGEMM call, on the host and
// synchronously, against the device memory of the fake libcuda.so (driver.cpp).
//
// cublasSgemm_v2 is a plain column-major SGEMM with cuBLAS's argument checks (the leading
// dimensions against the shapes) and BLAS's rule that with beta = 0 the output is written,
// never read. Each output sums its k products in order, in f32, without fused multiply-adds
// (built with -ffp-contract=off): a real cuBLAS sums in another order, so a caller may only
// expect agreement to rounding, as with the GPU. Every matrix must lie within one device
// allocation, which catches a wrong leading dimension that a GPU would not always notice.
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

// Only the API functions (marked API below) are exported.
#pragma GCC visibility push(hidden)

extern "C" {
typedef struct cublasContext* cublasHandle_t;
typedef struct CUstream_st* cudaStream_t;
}

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasPointerMode_t { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 };

struct cublasContext {
    cudaStream_t stream = nullptr;
    cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

namespace {

std::mutex lock;
std::set<cublasHandle_t> handles;

// The fake driver's check that memory is device memory, found in the libcuda.so this
// process has loaded (cuBLAS itself always loads the driver).
bool device_memory(const void* address, std::size_t bytes) {
    using Owns = int (*)(unsigned long long, std::size_t);
    static Owns owns = [] {
        void* driver = dlopen("libcuda.so.1", RTLD_NOW);
        void* symbol = driver ? dlsym(driver, "sluice_emulated_gpu_owns") : nullptr;
        if (!symbol) {
            std::fprintf(stderr, "emulated cuBLAS: the emulated libcuda.so.1 is not loadable\n");
        }
        return reinterpret_cast<Owns>(symbol);
    }();
    return owns && owns(reinterpret_cast<unsigned long long>(address), bytes);
}

bool live(cublasHandle_t handle) {
    std::lock_guard<std::mutex> g(lock);
    return handles.count(handle) > 0;
}

// The floats a column-major `rows × cols` matrix with leading dimension `ld` spans.
std::size_t span(int rows, int cols, int ld) {
    return rows == 0 || cols == 0 ? 0 : (std::size_t)(cols - 1) * ld + rows;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    std::lock_guard<std::mutex> g(lock);
    *handle = new cublasContext;
    handles.insert(*handle);
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    std::lock_guard<std::mutex> g(lock);
    if (!handles.erase(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
    handle->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}

// C = alpha · op(A) · op(B) + beta · C; op(A) is m × k, op(B) k × n, C m × n, all
// column-major with leading dimensions lda, ldb, ldc.
API cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                  int n, int k, const float* alpha, const float* A, int lda, const float* B,
                                  int ldb, const float* beta, float* C, int ldc) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;  // C is T for real numbers
    // cuBLAS's own checks, in its order.
    if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T && transa != CUBLAS_OP_C) ||
        (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T && transb != CUBLAS_OP_C) || m < 0 || n < 0 || k < 0 ||
        lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m) || !alpha ||
        !beta) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (handle->pointer_mode != CUBLAS_POINTER_MODE_HOST) {
        std::fprintf(stderr, "emulated cuBLAS: device pointer mode is not emulated\n");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    const float a_scale = *alpha, c_scale = *beta;
    if (m == 0 || n == 0 || ((a_scale == 0.0f || k == 0) && c_scale == 1.0f)) return CUBLAS_STATUS_SUCCESS;
    // A is stored m × k (or k × m transposed), B k × n (or n × k).
    const std::size_t a_floats = ta ? span(k, m, lda) : span(m, k, lda);
    const std::size_t b_floats = tb ? span(n, k, ldb) : span(k, n, ldb);
    const std::size_t c_floats = span(m, n, ldc);
    const struct {
        const char* name;
        const void* at;
        std::size_t floats;
    } operands[] = {{"A", A, a_floats}, {"B", B, b_floats}, {"C", C, c_floats}};
    for (const auto& o : operands) {
        if (o.floats && !device_memory(o.at, o.floats * sizeof(float))) {
            std::fprintf(stderr,
                         "emulated cuBLAS: SGEMM m=%d n=%d k=%d lda=%d ldb=%d ldc=%d: %s (%p, %zu floats) is "
                         "not within one device allocation\n",
                         m, n, k, lda, ldb, ldc, o.name, o.at, o.floats);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }
    auto a = [&](int i, int p) { return ta ? A[(std::size_t)i * lda + p] : A[(std::size_t)p * lda + i]; };
    auto b = [&](int p, int j) { return tb ? B[(std::size_t)p * ldb + j] : B[(std::size_t)j * ldb + p]; };

    // Rows of op(A) a band at a time, the band copied p-major so that the innermost loop
    // runs over independent outputs (and vectorises: a fixed trip count, a band short of
    // rows padded with zeros) while each output sums in p order.
    constexpr int kBand = 64;
    std::vector<float> band((std::size_t)k * kBand);
    for (int i0 = 0; i0 < m; i0 += kBand) {
        const int rows = std::min(kBand, m - i0);
        for (int p = 0; p < k; ++p) {
            for (int i = 0; i < kBand; ++i) band[(std::size_t)p * kBand + i] = i < rows ? a(i0 + i, p) : 0.0f;
        }
        for (int j = 0; j < n; ++j) {
            float sums[kBand] = {};
            for (int p = 0; p < k; ++p) {
                const float bp = b(p, j);
                const float* ap = &band[(std::size_t)p * kBand];
                for (int i = 0; i < kBand; ++i) sums[i] += ap[i] * bp;
            }
            float* c = C + (std::size_t)j * ldc + i0;
            for (int i = 0; i < rows; ++i) {
                // beta = 0 overwrites C without reading it (it may hold NaNs), as BLAS says.
                c[i] = c_scale == 0.0f ? a_scale * sums[i] : a_scale * sums[i] + c_scale * c[i];
            }
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
