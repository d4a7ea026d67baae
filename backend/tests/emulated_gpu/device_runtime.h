// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): what
// NVRTC gives the kernels of backend/kernels/ (the CUDA keywords, thread indices, barriers,
// warp shuffles and intrinsics), so that those very sources compile as host C++ and run on
// the CPU, and the interface of the block scheduler in fibers.cpp that makes it work.
//
// Every thread of a block is a fiber (its own stack, cooperatively switched): a thread runs
// until it reaches a barrier or returns, then the next one runs. So threads really
// interleave at __syncthreads/__syncwarp/__shfl_xor_sync as a GPU's do, and a kernel that
// reads another thread's write without a barrier between them gets a stale value here too.
// Blocks run one after another, and one kernel at a time in the process, which is why
// `__shared__` can simply be `static` and the current thread a plain global.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>

// The macro quant.cu tests to replace its inline PTX by portable C++.
#define SLUICE_EMULATED_GPU 1

// Internal to the fake libcuda.so: only the driver API is exported.
#pragma GCC visibility push(hidden)
namespace emu {

struct Dim3 {
    unsigned x, y, z;
};

enum class State : unsigned char {
    Ready,         // runnable: not started, running, or released from a barrier
    AtBlockSync,   // waiting in __syncthreads
    AtWarpSync,    // waiting in __syncwarp
    AtShuffle,     // waiting in a __shfl_*_sync
    Done,          // returned from the kernel
};

// One GPU thread.
struct Fiber {
    Dim3 thread_idx;
    unsigned lane, warp;
    State state;
    unsigned mask;              // the member mask of the warp barrier it waits at
    unsigned shuffles;          // shuffles done so far: picks the exchange buffer
    void* context;              // its ucontext_t, owned by fibers.cpp
};

// One warp's shuffle exchange: lanes write their value, meet at the warp barrier, then read
// their partner's. Two buffers, alternating, so that a lane already at the next shuffle
// cannot overwrite a value another lane has yet to read.
struct Warp {
    std::uint64_t exchange[2][32];
};

// The launch in progress (fibers.cpp).
extern Fiber* current;
extern Warp* warps;
extern Dim3 block_idx, block_dim, grid_dim;

// Waits at a barrier of kind `state` (one of the At* states), letting the other threads
// run; returns once every thread the barrier is for has arrived.
void wait_at(State state, unsigned mask);

}  // namespace emu
#pragma GCC visibility pop

// ---- CUDA C keywords, as NVRTC defines them for device code --------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Shared by the block's threads, as blocks never run at the same time. Unlike a GPU's, it
// starts zeroed and keeps its values from one block to the next (template statics cannot be
// gathered into one section to be poisoned before each block).
#define __shared__ static

// ---- Built-in variables --------------------------------------------------------------------

#define threadIdx (::emu::current->thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define warpSize 32

// ---- Synchronisation ----------------------------------------------------------------------

inline void __syncthreads() {
    emu::wait_at(emu::State::AtBlockSync, 0);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::wait_at(emu::State::AtWarpSync, mask);
}

// The value of `var` in lane (this lane ^ lane_mask), over whole warps only (width 32).
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "a shuffle moves at most 64 bits");
    emu::Fiber* self = emu::current;
    std::uint64_t (&buffer)[32] = emu::warps[self->warp].exchange[self->shuffles++ % 2];
    std::memcpy(&buffer[self->lane], &var, sizeof(T));
    emu::wait_at(emu::State::AtShuffle, mask);
    const unsigned source = self->lane ^ (unsigned)lane_mask;
    T out = var;  // a lane outside the warp gives back the caller's own value
    if (source < 32) std::memcpy(&out, &buffer[source], sizeof(T));
    return out;
}

// ---- Intrinsics ----------------------------------------------------------------------------

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}

// Round-to-nearest f32 operations that are never fused: the sources are built with
// -ffp-contract=off, so a plain `a * b` followed by `+ c` is two roundings, as on the GPU.
inline float __fadd_rn(float a, float b) {
    return a + b;
}
inline float __fsub_rn(float a, float b) {
    return a - b;
}
inline float __fmul_rn(float a, float b) {
    return a * b;
}

// CUDA's integer min and max (the maths functions fmaf, expf, erf, sqrt, pow, sincos and
// fmaxf come from <math.h>, with the same meaning; only their last bit may differ).
inline unsigned min(unsigned a, unsigned b) {
    return a < b ? a : b;
}
inline int min(int a, int b) {
    return a < b ? a : b;
}
inline unsigned max(unsigned a, unsigned b) {
    return a > b ? a : b;
}
inline int max(int a, int b) {
    return a > b ? a : b;
}
