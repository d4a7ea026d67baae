// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): how
// the fake driver (driver.cpp), the kernels (kernels.cpp) and the block scheduler
// (fibers.cpp) of the fake libcuda.so meet.
#pragma once

#include <functional>
#include <string>

#include "device_runtime.h"

// Internal to the fake libcuda.so: only the driver API is exported.
#pragma GCC visibility push(hidden)
namespace emu {

// An entry point of backend/kernels/, as cuModuleGetFunction finds it by name.
struct Kernel {
    const char* name;
    unsigned arity;
    // Which arguments are device pointers, for the driver to check before a launch.
    bool pointer[16];
    // Reads the arguments from cuLaunchKernel's kernelParams (kernelParams[i] points at
    // argument i); returns the call every thread of the launch makes.
    std::function<void()> (*bind)(void** params);
};

// The kernel of that name, or null.
const Kernel* find_kernel(const char* name);

// Runs `kernel` as every thread of every block of the grid, blocks one after another.
// Returns an empty string, or why a block could not finish (a deadlock at a barrier).
std::string run_grid(const char* name, Dim3 grid, Dim3 block, const std::function<void()>& kernel);

}  // namespace emu
#pragma GCC visibility pop
