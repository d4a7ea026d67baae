// Emulated GPU for tests on machines without one (see backend/tests/cuda_emulated.rs): the
// block scheduler. Each thread of a block is a ucontext fiber with a small stack of its own;
// a fiber runs until it waits at a barrier or returns, and then the next runnable one runs.
// When none can run, the barriers every participant has reached are released and the
// threads run again. Each such sweep takes the threads in a new shuffled order (from a fixed
// seed, so runs repeat), so that a missing barrier shows whichever of two threads was meant
// to go first: in a fixed order, a thread that reads too early might always happen to run
// last. Threads waiting at barriers that can never all be reached (a deadlock on a GPU) end
// the launch with an error.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "device_runtime.h"
#include "emulator.h"

namespace emu {

Fiber* current = nullptr;
Warp* warps = nullptr;
Dim3 block_idx, block_dim, grid_dim;

namespace {

constexpr unsigned kMaxThreads = 1024;
// Enough for the kernels and the maths library functions they call; the page below each
// stack is left unmapped, so an overflow faults instead of corrupting the next stack.
constexpr std::size_t kStackBytes = 64 * 1024;

std::vector<Fiber> fibers(kMaxThreads);
std::vector<ucontext_t> contexts(kMaxThreads);
std::vector<Warp> warp_storage(kMaxThreads / 32);
char* stacks = nullptr;
std::size_t page = 0;
ucontext_t launcher;  // the context of the thread that called run_grid
ucontext_t blank;     // a getcontext() result to start fibers from
unsigned count = 0;   // threads in the block
const std::function<void()>* body = nullptr;
std::string failure;  // why the block could not finish

// The sweep in progress: the threads in the order it takes them, and the next to look at.
std::vector<unsigned> order(kMaxThreads);
unsigned next = 0;
std::uint64_t random_state = 0x9e3779b97f4a7c15u;

const char* kernel_name = "";

std::size_t slot_bytes() {
    return page + kStackBytes;
}

char* stack_of(unsigned t) {
    return stacks + t * slot_bytes() + page;
}

const char* describe(State s) {
    switch (s) {
        case State::Ready: return "running";
        case State::AtBlockSync: return "at __syncthreads";
        case State::AtWarpSync: return "at __syncwarp";
        case State::AtShuffle: return "at a __shfl_*_sync";
        case State::Done: return "returned";
    }
    return "?";
}

// Where every thread is, runs of threads in the same state on one line: a deadlock's message.
std::string where_threads_are() {
    std::string out;
    for (unsigned t = 0; t < count;) {
        unsigned end = t + 1;
        while (end < count && fibers[end].state == fibers[t].state) ++end;
        out += "\n  threads " + std::to_string(t) + "-" + std::to_string(end - 1) + ": " +
               describe(fibers[t].state);
        t = end;
    }
    return out;
}

// Releases every barrier whose participants have all arrived. Returns whether any thread
// can run again; false when all have returned, or on a deadlock (with `failure` set).
bool release() {
    unsigned live = 0, at_block = 0;
    for (unsigned t = 0; t < count; ++t) {
        if (fibers[t].state == State::Done) continue;
        ++live;
        if (fibers[t].state == State::AtBlockSync) ++at_block;
    }
    if (live == 0) return false;
    // A thread that has returned does not hold __syncthreads up, as on the GPU.
    if (at_block == live) {
        for (unsigned t = 0; t < count; ++t) {
            if (fibers[t].state != State::Done) fibers[t].state = State::Ready;
        }
        return true;
    }
    bool released = false;
    for (unsigned first = 0; first < count; first += 32) {
        const unsigned lanes = count - first < 32 ? count - first : 32;
        const unsigned members = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        unsigned waiting = 0, done = 0, syncs = 0;
        bool elsewhere = false;
        for (unsigned l = 0; l < lanes; ++l) {
            const Fiber& f = fibers[first + l];
            if (f.state == State::Done) {
                ++done;
            } else if (f.state == State::AtWarpSync || f.state == State::AtShuffle) {
                ++waiting;
                syncs += f.state == State::AtWarpSync;
                // Partial masks (a warp split by a branch) are not needed by the kernels.
                if (f.mask != members) {
                    failure = "lane " + std::to_string(l) + " of warp " + std::to_string(first / 32) +
                              " waits with mask " + std::to_string(f.mask) +
                              "; only whole-warp masks are emulated";
                    return false;
                }
            } else {
                elsewhere = true;
            }
        }
        if (waiting == 0 || elsewhere) continue;
        // The full mask names every lane, so each must arrive: one that has returned never
        // will (undefined behaviour on a GPU, which may hang or not).
        if (done > 0) {
            failure = "warp " + std::to_string(first / 32) + " waits at a warp barrier for " +
                      std::to_string(done) + " lane(s) that have returned";
            return false;
        }
        if (syncs != 0 && syncs != waiting) {
            failure = "the lanes of warp " + std::to_string(first / 32) +
                      " wait at different warp barriers (__syncwarp and a shuffle)";
            return false;
        }
        for (unsigned l = 0; l < lanes; ++l) fibers[first + l].state = State::Ready;
        released = true;
    }
    if (!released) {
        failure = "deadlock: no barrier can be passed" + where_threads_are();
    }
    return released;
}

// Starts a sweep over the block's threads in a new order (a Fisher-Yates shuffle driven by
// xorshift64).
void shuffle_order() {
    for (unsigned t = 0; t < count; ++t) order[t] = t;
    for (unsigned t = count; t > 1; --t) {
        random_state ^= random_state << 13;
        random_state ^= random_state >> 7;
        random_state ^= random_state << 17;
        std::swap(order[t - 1], order[random_state % t]);
    }
    next = 0;
}

// The next thread to run: the next runnable one of this sweep, else, after releasing the
// barriers, of a new sweep. Null when the block has finished or is stuck.
Fiber* pick() {
    for (;;) {
        while (next < count) {
            Fiber* f = &fibers[order[next++]];
            if (f->state == State::Ready) return f;
        }
        if (!release()) return nullptr;
        shuffle_order();
    }
}

// Leaves `self` (waiting, or returned) for the next thread, or for the launcher when none is
// left; comes back when `self` is released.
void switch_from(Fiber* self) {
    Fiber* to = pick();
    if (to == self) return;
    ucontext_t* target = to ? static_cast<ucontext_t*>(to->context) : &launcher;
    if (to) current = to;
    if (self->state == State::Done) {
        setcontext(target);
    } else {
        swapcontext(static_cast<ucontext_t*>(self->context), target);
    }
}

void fiber_main() {
    (*body)();
    current->state = State::Done;
    switch_from(current);
    std::abort();  // a returned thread is never switched back to
}

void prepare() {
    if (stacks) return;
    page = (std::size_t)sysconf(_SC_PAGESIZE);
    void* map = mmap(nullptr, kMaxThreads * slot_bytes(), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) {
        std::perror("emulated GPU: mapping the fiber stacks");
        std::abort();
    }
    stacks = static_cast<char*>(map);
    for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(stacks + t * slot_bytes(), page, PROT_NONE);
    getcontext(&blank);
    warps = warp_storage.data();
}

// A fault inside a kernel: an access outside every allocation (device buffers sit right
// below an unmapped page), to freed memory, or past a fiber's stack. Says where, then lets
// the process die of the signal.
void on_fault(int sig, siginfo_t* info, void*) {
    char message[512];
    const Dim3 t = current ? current->thread_idx : Dim3{0, 0, 0};
    const int n = std::snprintf(message, sizeof message,
                                "emulated GPU: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): "
                                "invalid access to address %p (out of bounds, freed memory, or "
                                "a thread's stack overflowed)\n",
                                kernel_name, block_idx.x, block_idx.y, block_idx.z, t.x, t.y, t.z,
                                info->si_addr);
    if (n > 0) (void)!write(2, message, (std::size_t)n);
    signal(sig, SIG_DFL);
}

// Runs one block; returns false with `failure` set if it could not finish.
bool run_block() {
    for (unsigned t = 0; t < count; ++t) {
        Fiber& f = fibers[t];
        f.thread_idx = {t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
        f.lane = t % 32;
        f.warp = t / 32;
        f.state = State::Ready;
        f.mask = 0;
        f.shuffles = 0;
        ucontext_t& c = contexts[t];
#if defined(__x86_64__) && defined(__GLIBC__)
        // A copy of one getcontext() result (saves a system call per thread); on x86-64
        // glibc the copy's floating-point state pointer must point into the copy.
        c = blank;
        c.uc_mcontext.fpregs = &c.__fpregs_mem;
#else
        getcontext(&c);
#endif
        c.uc_stack.ss_sp = stack_of(t);
        c.uc_stack.ss_size = kStackBytes;
        c.uc_link = &launcher;
        makecontext(&c, fiber_main, 0);
        f.context = &c;
    }
    shuffle_order();
    failure.clear();
    Fiber* first = pick();
    if (first) {
        current = first;
        swapcontext(&launcher, static_cast<ucontext_t*>(first->context));
    }
    current = nullptr;
    return failure.empty();
}

}  // namespace

void wait_at(State state, unsigned mask) {
    Fiber* self = current;
    self->state = state;
    self->mask = mask;
    switch_from(self);
}

std::string run_grid(const char* name, Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
    prepare();
    kernel_name = name;
    grid_dim = grid;
    block_dim = block;
    count = block.x * block.y * block.z;
    body = &kernel;

    // The fault handler runs on an alternate stack (a fiber's may be what overflowed).
    static std::vector<char> signal_stack(64 * 1024);
    stack_t alternate{}, previous_stack{};
    alternate.ss_sp = signal_stack.data();
    alternate.ss_size = signal_stack.size();
    sigaltstack(&alternate, &previous_stack);
    struct sigaction handler {}, previous_segv{}, previous_bus{};
    handler.sa_sigaction = on_fault;
    handler.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&handler.sa_mask);
    sigaction(SIGSEGV, &handler, &previous_segv);
    sigaction(SIGBUS, &handler, &previous_bus);

    std::string error;
    for (unsigned z = 0; z < grid.z && error.empty(); ++z) {
        for (unsigned y = 0; y < grid.y && error.empty(); ++y) {
            for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
                block_idx = {x, y, z};
                if (!run_block()) {
                    error = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                            std::to_string(z) + "): " + failure;
                }
            }
        }
    }

    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    sigaltstack(&previous_stack, nullptr);
    body = nullptr;
    return error;
}

}  // namespace emu
