// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): a fake
// libcuda.so, the part of the CUDA driver API that cudarc calls for the CUDA device
// (backend/src/device/cuda/mod.rs), on the host. One device, compute capability 9.0.
// Everything runs synchronously on the calling thread: a stream is only a handle, and a
// kernel launch runs the real kernel sources (kernels.cpp) to completion before it returns.
//
// It is as strict as the real driver where that catches mistakes, and stricter where the
// real one would fail later or not at all:
// - a call that needs a context fails without a current one, as the real driver's do;
// - device memory is poisoned with 0xff bytes (NaN as f32) when allocated, so a result
//   read from a buffer nothing wrote is visible; each buffer ends just below an unmapped
//   page, and is unmapped when freed, so a kernel reading out of bounds or after the free
//   faults, with a message saying which kernel, block and thread;
// - copies, and every pointer argument of a launch, must lie within one live allocation;
// - a module is an NVRTC CUBIN for this device's architecture; only the kernels in its
//   symbol table can be loaded from it;
// - a launch is checked against the real limits (1024 threads per block, ...).
// Calls the device does not make answer CUDA_ERROR_NOT_SUPPORTED, saying so on stderr.
#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emulator.h"

// Only the API functions (marked API below) are exported.
#pragma GCC visibility push(hidden)

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUmemPoolHandle_st* CUmemoryPool;

}  // extern "C"

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

struct CUctx_st {
    int retained = 0;  // primary context references; it is usable while > 0
};
struct CUstream_st {};
struct CUevent_st {};
struct CUfunc_st {
    const emu::Kernel* kernel;
};
struct CUmod_st {
    std::map<std::string, CUfunc_st> functions;  // the emulated kernels in its image
};
struct CUmemPoolHandle_st {
    std::uint64_t release_threshold = 0;
};

namespace {

constexpr int kMajor = 9, kMinor = 0;
constexpr std::size_t kTotalMemory = std::size_t(16) << 30;
constexpr std::size_t kAlignment = 256;  // what cuMemAlloc guarantees

// Every piece of state below, under one lock: kernels run one at a time (their shared
// memory is static) and the maps are shared by all threads.
std::recursive_mutex lock;
bool initialised = false;
CUctx_st primary;
thread_local CUcontext current_context = nullptr;
CUmemPoolHandle_st default_pool;
std::set<CUstream> streams;
std::set<CUevent> events;
std::set<CUmodule> modules;
std::set<CUfunction> functions;

struct Allocation {
    std::size_t bytes;    // asked for
    void* mapping;        // the pages it lies in, and the unmapped one after them
    std::size_t mapped;
};
std::map<CUdeviceptr, Allocation> allocations;  // by address
std::size_t allocated = 0;

using Guard = std::lock_guard<std::recursive_mutex>;

CUresult unsupported(const char* what) {
    std::fprintf(stderr, "emulated GPU: %s is not emulated\n", what);
    return CUDA_ERROR_NOT_SUPPORTED;
}

// Whether a context is current on this thread and alive: what most calls require.
CUresult need_context() {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (current_context != &primary || primary.retained == 0) return CUDA_ERROR_INVALID_CONTEXT;
    return CUDA_SUCCESS;
}

bool valid_stream(CUstream s) {
    // The legacy default stream (0 or CU_STREAM_LEGACY) and the per-thread one are handles too.
    const auto raw = reinterpret_cast<std::uintptr_t>(s);
    return raw <= 2 || streams.count(s) > 0;
}

// Whether [address, address + bytes) lies within one live allocation.
bool owned(CUdeviceptr address, std::size_t bytes) {
    auto it = allocations.upper_bound(address);
    if (it == allocations.begin()) return false;
    --it;
    return address - it->first <= it->second.bytes && bytes <= it->second.bytes - (address - it->first);
}

CUresult check_range(const char* call, CUdeviceptr address, std::size_t bytes) {
    if (owned(address, bytes)) return CUDA_SUCCESS;
    std::fprintf(stderr, "emulated GPU: %s: [0x%llx, +%zu) is not within one device allocation\n", call,
                 address, bytes);
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult allocate(CUdeviceptr* out, std::size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;  // as cuMemAlloc answers
    if (bytes > kTotalMemory - allocated) return CUDA_ERROR_OUT_OF_MEMORY;
    const std::size_t page = (std::size_t)sysconf(_SC_PAGESIZE);
    const std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    const std::size_t pages = (rounded + page - 1) / page * page;
    void* map = mmap(nullptr, pages + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* base = static_cast<char*>(map);
    mprotect(base + pages, page, PROT_NONE);
    // Aligned, and as close to the unmapped page as alignment allows.
    char* start = base + pages - rounded;
    std::memset(base, 0xff, pages);
    *out = reinterpret_cast<CUdeviceptr>(start);
    allocations[*out] = Allocation{bytes, map, pages + page};
    allocated += rounded;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr address) {
    if (address == 0) return CUDA_SUCCESS;
    auto it = allocations.find(address);
    if (it == allocations.end()) {
        std::fprintf(stderr, "emulated GPU: freeing 0x%llx, which is no live allocation\n", address);
        return CUDA_ERROR_INVALID_VALUE;
    }
    allocated -= (it->second.bytes + kAlignment - 1) / kAlignment * kAlignment;
    munmap(it->second.mapping, it->second.mapped);
    allocations.erase(it);
    return CUDA_SUCCESS;
}

// The names of the kernels (entry functions) in a CUBIN's symbol table, after checking it
// is machine code for this device.
CUresult read_cubin(const void* image, std::vector<std::string>* kernels) {
    const auto* bytes = static_cast<const unsigned char*>(image);
    if (std::memcmp(bytes, ELFMAG, SELFMAG) != 0) {
        // PTX text: the real driver would compile it; this one cannot.
        std::fprintf(stderr, "emulated GPU: the module is not a CUBIN (PTX is not emulated)\n");
        return CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
    }
    Elf64_Ehdr header;
    std::memcpy(&header, bytes, sizeof header);
    constexpr int kEmCuda = 190;
    if (header.e_ident[EI_CLASS] != ELFCLASS64 || header.e_machine != kEmCuda) return CUDA_ERROR_INVALID_IMAGE;
    // CUBIN ABI version 7 (CUDA 12) keeps the SM version in the flags' low byte: machine
    // code runs on its own major version, at the same or a higher minor one.
    if (header.e_ident[EI_ABIVERSION] == 7) {
        const unsigned sm = header.e_flags & 0xff;
        if (sm / 10 != kMajor || sm % 10 > kMinor) {
            std::fprintf(stderr, "emulated GPU: the CUBIN is for sm_%u, the device is sm_%d%d\n", sm, kMajor,
                         kMinor);
            return CUDA_ERROR_NO_BINARY_FOR_GPU;
        }
    }
    std::vector<Elf64_Shdr> sections(header.e_shnum);
    for (unsigned i = 0; i < header.e_shnum; ++i) {
        std::memcpy(&sections[i], bytes + header.e_shoff + (std::size_t)i * header.e_shentsize, sizeof(Elf64_Shdr));
    }
    constexpr unsigned char kCudaEntry = 0x10;  // st_other of a kernel's symbol
    for (const Elf64_Shdr& s : sections) {
        if (s.sh_type != SHT_SYMTAB || s.sh_link >= sections.size()) continue;
        const char* names = reinterpret_cast<const char*>(bytes + sections[s.sh_link].sh_offset);
        for (std::size_t at = 0; at + sizeof(Elf64_Sym) <= s.sh_size; at += sizeof(Elf64_Sym)) {
            Elf64_Sym symbol;
            std::memcpy(&symbol, bytes + s.sh_offset + at, sizeof symbol);
            if (ELF64_ST_TYPE(symbol.st_info) == STT_FUNC && (symbol.st_other & kCudaEntry)) {
                kernels->push_back(names + symbol.st_name);
            }
        }
    }
    return CUDA_SUCCESS;
}

const char* error_name(CUresult e) {
    switch (e) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
        case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: return "CUDA_ERROR_UNSUPPORTED_PTX_VERSION";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    }
    return nullptr;
}

const char* error_string(CUresult e) {
    switch (e) {
        case CUDA_SUCCESS: return "no error";
        case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
        case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
        case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
        case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
        case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
        case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "no kernel image is available for execution on the device";
        case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: return "the provided PTX was compiled with an unsupported toolchain.";
        case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
        case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case CUDA_ERROR_LAUNCH_FAILED: return "unspecified launch failure";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
    }
    return nullptr;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- Initialisation, devices, contexts -----------------------------------------------------

API CUresult cuInit(unsigned flags) {
    Guard g(lock);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    initialised = true;
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 12080;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* count) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int length, CUdevice device) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || length <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, (std::size_t)length, "Emulated GPU (sm_%d%d, on the CPU)", kMajor, kMinor);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case 1: *value = 1024; break;        // MAX_THREADS_PER_BLOCK
        case 2: *value = 1024; break;        // MAX_BLOCK_DIM_X
        case 3: *value = 1024; break;        // MAX_BLOCK_DIM_Y
        case 4: *value = 64; break;          // MAX_BLOCK_DIM_Z
        case 5: *value = 2147483647; break;  // MAX_GRID_DIM_X
        case 6: *value = 65535; break;       // MAX_GRID_DIM_Y
        case 7: *value = 65535; break;       // MAX_GRID_DIM_Z
        case 8: *value = 48 * 1024; break;   // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *value = 32; break;         // WARP_SIZE
        case 16: *value = 132; break;        // MULTIPROCESSOR_COUNT
        case 75: *value = kMajor; break;     // COMPUTE_CAPABILITY_MAJOR
        case 76: *value = kMinor; break;     // COMPUTE_CAPABILITY_MINOR
        case 115: *value = 1; break;         // MEMORY_POOLS_SUPPORTED
        default: {
            const std::string what = "device attribute " + std::to_string(attribute);
            return unsupported(what.c_str());
        }
    }
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice device) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = kTotalMemory;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
    Guard g(lock);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!context) return CUDA_ERROR_INVALID_VALUE;
    ++primary.retained;
    *context = &primary;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    Guard g(lock);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (primary.retained == 0) return CUDA_ERROR_INVALID_CONTEXT;
    --primary.retained;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* context) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!context) return CUDA_ERROR_INVALID_VALUE;
    *context = current_context;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext context) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (context && context != &primary) return CUDA_ERROR_INVALID_CONTEXT;
    current_context = context;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize() {
    return need_context();  // all work is done by the time a call returns
}

// ---- Streams and events: handles only ------------------------------------------------------

API CUresult cuStreamCreate(CUstream* stream, unsigned flags) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!stream || flags > 1) return CUDA_ERROR_INVALID_VALUE;
    *stream = new CUstream_st;
    streams.insert(*stream);
    return CUDA_SUCCESS;
}

API CUresult cuStreamDestroy_v2(CUstream stream) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!streams.erase(stream)) return CUDA_ERROR_INVALID_HANDLE;
    delete stream;
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(CUstream stream) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    return valid_stream(stream) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    return valid_stream(stream) && events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuEventCreate(CUevent* event, unsigned) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    *event = new CUevent_st;
    events.insert(*event);
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(CUevent event) {
    Guard g(lock);
    if (!events.erase(event)) return CUDA_ERROR_INVALID_HANDLE;
    delete event;
    return CUDA_SUCCESS;
}

API CUresult cuEventRecord(CUevent event, CUstream stream) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    return valid_stream(stream) && events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuEventSynchronize(CUevent event) {
    Guard g(lock);
    return events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuEventQuery(CUevent event) {
    Guard g(lock);
    return events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

// ---- Memory --------------------------------------------------------------------------------

API CUresult cuMemAlloc_v2(CUdeviceptr* address, std::size_t bytes) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    return allocate(address, bytes);
}

API CUresult cuMemAllocAsync(CUdeviceptr* address, std::size_t bytes, CUstream stream) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return allocate(address, bytes);
}

API CUresult cuMemFree_v2(CUdeviceptr address) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    return release(address);
}

API CUresult cuMemFreeAsync(CUdeviceptr address, CUstream stream) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return release(address);
}

API CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!free || !total) return CUDA_ERROR_INVALID_VALUE;
    *free = kTotalMemory - allocated;
    *total = kTotalMemory;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice device) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    *pool = &default_pool;
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int attribute, void* value) {
    Guard g(lock);
    if (pool != &default_pool || !value) return CUDA_ERROR_INVALID_VALUE;
    constexpr int kReleaseThreshold = 4;  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, a u64
    if (attribute != kReleaseThreshold) return unsupported("that memory pool attribute");
    std::memcpy(&pool->release_threshold, value, sizeof pool->release_threshold);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8_v2(CUdeviceptr to, unsigned char value, std::size_t bytes) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (CUresult e = check_range("cuMemsetD8", to, bytes)) return e;
    std::memset(reinterpret_cast<void*>(to), value, bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8Async(CUdeviceptr to, unsigned char value, std::size_t bytes, CUstream stream) {
    Guard g(lock);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemsetD8_v2(to, value, bytes);
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void* from, std::size_t bytes) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (CUresult e = check_range("cuMemcpyHtoD", to, bytes)) return e;
    if (bytes) std::memcpy(reinterpret_cast<void*>(to), from, bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void* from, std::size_t bytes, CUstream stream) {
    Guard g(lock);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyHtoD_v2(to, from, bytes);
}

API CUresult cuMemcpyDtoH_v2(void* to, CUdeviceptr from, std::size_t bytes) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (CUresult e = check_range("cuMemcpyDtoH", from, bytes)) return e;
    if (bytes) std::memcpy(to, reinterpret_cast<const void*>(from), bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoHAsync_v2(void* to, CUdeviceptr from, std::size_t bytes, CUstream stream) {
    Guard g(lock);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyDtoH_v2(to, from, bytes);
}

API CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, std::size_t bytes) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (CUresult e = check_range("cuMemcpyDtoD (to)", to, bytes)) return e;
    if (CUresult e = check_range("cuMemcpyDtoD (from)", from, bytes)) return e;
    if (bytes) std::memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, std::size_t bytes, CUstream stream) {
    Guard g(lock);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyDtoD_v2(to, from, bytes);
}

// For the fake cuBLAS: whether [address, address + bytes) is device memory.
API int sluice_emulated_gpu_owns(CUdeviceptr address, std::size_t bytes) {
    Guard g(lock);
    return owned(address, bytes);
}

// ---- Modules and launches ------------------------------------------------------------------

API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    std::vector<std::string> names;
    if (CUresult e = read_cubin(image, &names)) return e;
    auto* m = new CUmod_st;
    for (const std::string& name : names) {
        if (const emu::Kernel* k = emu::find_kernel(name.c_str())) {
            m->functions[name] = CUfunc_st{k};
        } else {
            std::fprintf(stderr, "emulated GPU: the module's kernel %s is not emulated (add it to kernels.cpp)\n",
                         name.c_str());
        }
    }
    for (auto& entry : m->functions) functions.insert(&entry.second);
    modules.insert(m);
    *module = m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(CUmodule module) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!modules.erase(module)) return CUDA_ERROR_INVALID_HANDLE;
    for (auto& entry : module->functions) functions.erase(&entry.second);
    delete module;
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!function || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!modules.count(module)) return CUDA_ERROR_INVALID_HANDLE;
    auto it = module->functions.find(name);
    if (it == module->functions.end()) return CUDA_ERROR_NOT_FOUND;
    *function = &it->second;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(CUfunction function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                            unsigned block_x, unsigned block_y, unsigned block_z, unsigned shared_bytes,
                            CUstream stream, void** params, void** extra) {
    Guard g(lock);
    if (CUresult e = need_context()) return e;
    if (!functions.count(function) || !valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    const emu::Kernel& kernel = *function->kernel;
    // The device's limits, as the real driver checks them.
    if (!grid_x || !grid_y || !grid_z || !block_x || !block_y || !block_z) return CUDA_ERROR_INVALID_VALUE;
    if (grid_x > 2147483647u || grid_y > 65535 || grid_z > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (block_x > 1024 || block_y > 1024 || block_z > 64 ||
        (unsigned long long)block_x * block_y * block_z > 1024) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (shared_bytes != 0) return unsupported("dynamic shared memory");
    if (extra) return unsupported("cuLaunchKernel's `extra` arguments");
    if (!params && kernel.arity > 0) return CUDA_ERROR_INVALID_VALUE;
    // Every pointer argument must be device memory: a misplaced size or a host pointer
    // would be an illegal address on the GPU.
    for (unsigned i = 0; i < kernel.arity; ++i) {
        if (!kernel.pointer[i]) continue;
        CUdeviceptr address;
        std::memcpy(&address, params[i], sizeof address);
        if (!owned(address, 0)) {
            std::fprintf(stderr, "emulated GPU: %s: argument %u (0x%llx) is not device memory\n", kernel.name,
                         i, address);
            return CUDA_ERROR_ILLEGAL_ADDRESS;
        }
    }
    const std::string error =
        emu::run_grid(kernel.name, {grid_x, grid_y, grid_z}, {block_x, block_y, block_z}, kernel.bind(params));
    if (!error.empty()) {
        std::fprintf(stderr, "emulated GPU: %s, grid (%u, %u, %u), block (%u, %u, %u): %s\n", kernel.name, grid_x,
                     grid_y, grid_z, block_x, block_y, block_z, error.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

// NVRTC itself opens libcuda.so.1 while compiling, calls cuInit, and looks this internal
// entry point up (calling it without a null check). Having no tables to give it is what it
// copes with, and it compiles as without a driver.
API CUresult cuGetExportTable(const void** table, const void* /*table_id*/) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

// ---- Errors --------------------------------------------------------------------------------

API CUresult cuGetErrorName(CUresult error, const char** name) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    *name = error_name(error);
    return *name ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuGetErrorString(CUresult error, const char** text) {
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    *text = error_string(error);
    return *text ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
