// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): the
// real kernels of backend/kernels/, compiled as host C++ against device_runtime.h, and the
// table cuModuleGetFunction and cuLaunchKernel use to find and call them.
//
// Each source goes into a namespace of its own: they are separate NVRTC programs on the GPU,
// and two of them define helpers of the same name (block_sum, block_max).
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "device_runtime.h"
#include "emulator.h"

// The kernels' own symbols stay inside this library.
#pragma GCC visibility push(hidden)
namespace elementwise {
#include "../../kernels/elementwise.cu"
}
namespace quant {
#include "../../kernels/quant.cu"
}
namespace attention {
#include "../../kernels/attention.cu"
}
#pragma GCC visibility pop

namespace emu {
namespace {

// Argument `T` from where kernelParams points: a CUdeviceptr (64 bits, whatever T points
// at) for a pointer, else the value itself.
template <class T>
T argument(void* at) {
    if constexpr (std::is_pointer_v<T>) {
        unsigned long long address;
        std::memcpy(&address, at, sizeof address);
        return reinterpret_cast<T>(static_cast<std::uintptr_t>(address));
    } else {
        T value;
        std::memcpy(&value, at, sizeof value);
        return value;
    }
}

// The table entry of kernel F, its argument types read off its signature.
template <auto F>
struct Entry;

template <class... Args, void (*F)(Args...)>
struct Entry<F> {
    static_assert(sizeof...(Args) <= 16, "Kernel::pointer holds 16 arguments");

    template <std::size_t... I>
    static std::function<void()> bind_args(void** params, std::index_sequence<I...>) {
        std::tuple<Args...> args{argument<Args>(params[I])...};
        return [args] { std::apply(F, args); };
    }

    static std::function<void()> bind(void** params) {
        return bind_args(params, std::index_sequence_for<Args...>{});
    }

    static Kernel make(const char* name) {
        return Kernel{name, sizeof...(Args), {std::is_pointer_v<Args>...}, &bind};
    }
};

#define KERNEL(file, name) Entry<&file::name>::make(#name)

// Every entry point, as `ENTRY_POINTS` in backend/src/device/cuda/kernels.rs lists them.
const Kernel kernels[] = {
    KERNEL(elementwise, add_assign),
    KERNEL(elementwise, add_bias_rows),
    KERNEL(elementwise, silu_mul),
    KERNEL(elementwise, gelu_erf),
    KERNEL(elementwise, rms_norm),
    KERNEL(elementwise, layer_norm),
    KERNEL(elementwise, softmax_rows),
    KERNEL(elementwise, rope),
    KERNEL(elementwise, gather_rows),
    KERNEL(elementwise, scatter_rows),
    KERNEL(elementwise, mean_pool),
    KERNEL(quant, gather_rows_f32),
    KERNEL(quant, gather_rows_f16),
    KERNEL(quant, gather_rows_bf16),
    KERNEL(quant, gather_rows_q4_0),
    KERNEL(quant, gather_rows_q4_1),
    KERNEL(quant, gather_rows_q8_0),
    KERNEL(quant, matvec_f32),
    KERNEL(quant, matvec_f16),
    KERNEL(quant, matvec_bf16),
    KERNEL(quant, matvec_q4_0),
    KERNEL(quant, matvec_q4_1),
    KERNEL(quant, matvec_q8_0),
    KERNEL(quant, dequantize_f16_to_f32),
    KERNEL(quant, dequantize_bf16_to_f32),
    KERNEL(quant, dequantize_q4_0_to_f32),
    KERNEL(quant, dequantize_q4_1_to_f32),
    KERNEL(quant, dequantize_q8_0_to_f32),
    KERNEL(attention, paged_attention),
    KERNEL(attention, attention_bidirectional),
};

}  // namespace

const Kernel* find_kernel(const char* name) {
    for (const Kernel& k : kernels) {
        if (std::strcmp(k.name, name) == 0) return &k;
    }
    return nullptr;
}

}  // namespace emu
