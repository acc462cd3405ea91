// Compile surgeon's .cu kernels with g++ for the CPU, so their numerics can be checked without a GPU.
// Provides the CUDA built-ins the kernels use. SURGEON_LAUNCH is a loop over every block and thread of the grid, for
// kernels whose threads never wait for each other (grid-stride loops). SURGEON_LAUNCH_COOPERATIVE runs the threads
// of one block as fibers that switch at every __syncthreads, so a block can reduce through __shared__ memory: every
// thread runs up to its next barrier before any goes past it, as on the GPU.
#pragma once
#define SURGEON_CPU_EMULATION 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static  // blocks run one at a time: one copy serves the block that runs
#define __launch_bounds__(...)
// round-to-nearest float operations that the CUDA compiler may not contract into an FMA; plain C++ float
// arithmetic on x86-64 (SSE, no -ffast-math) rounds each operation the same way
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::fabs;
inline float fabsf(float v) { return std::fabs(v); }
using std::fmaxf;
using std::fminf;
using std::rintf;

// A warp vote. The emulation runs one thread at a time, so each thread is a warp of its own and the vote is its own
// predicate; with SURGEON_EMULATED_WARPS=mixed in the environment every warp has a lane that disagrees (the vote is
// false), as on a GPU where a warp's lanes straddle the image border: what a path chosen by the vote must survive.
inline bool surgeon_warp_all(bool p) {
    const char* warps = std::getenv("SURGEON_EMULATED_WARPS");  // read at each vote: a launch may set it
    return p && !(warps != nullptr && std::strcmp(warps, "mixed") == 0);
}

// What common.cuh takes from the GPU (PTX conversions, bit casts), as plain C++; the half conversions are
// expanded by common.cuh once its storage types exist.
inline unsigned int float_bits(float f) {
    unsigned int word;
    std::memcpy(&word, &f, sizeof word);
    return word;
}
inline float bits_float(unsigned int word) {
    float f;
    std::memcpy(&f, &word, sizeof f);
    return f;
}
#define SURGEON_HALF_CONVERSIONS                                                     \
    inline float half_to_float(surgeon_half h) {                                     \
        _Float16 v;                                                                  \
        std::memcpy(&v, &h.bits, sizeof v);                                          \
        return (float)v;                                                             \
    }                                                                                \
    inline surgeon_half float_to_half(float f) {                                     \
        _Float16 v = (_Float16)f;                                                    \
        surgeon_half h;                                                              \
        std::memcpy(&h.bits, &v, sizeof v);                                          \
        return h;                                                                    \
    }

// SURGEON_LAUNCH(kernel, grid_x, block_x, args...) runs kernel<<<grid_x, block_x>>>(args...) on the CPU.
#define SURGEON_LAUNCH(kernel, grid_x, block_x, ...)                                 \
    do {                                                                              \
        gridDim.x = (grid_x);                                                         \
        blockDim.x = (block_x);                                                       \
        for (unsigned int b_ = 0; b_ < gridDim.x; ++b_) {                             \
            for (unsigned int t_ = 0; t_ < blockDim.x; ++t_) {                        \
                blockIdx.x = b_;                                                      \
                threadIdx.x = t_;                                                     \
                kernel(__VA_ARGS__);                                                  \
            }                                                                         \
        }                                                                             \
    } while (0)

// ---------------------------------------------------------------------------------------- cooperative blocks
struct SurgeonBlock {
    std::vector<ucontext_t> fibers;
    std::vector<char> done;
    ucontext_t scheduler;
    unsigned current = 0;
    const std::function<void()>* body = nullptr;
};

inline SurgeonBlock*& surgeon_block() {
    static thread_local SurgeonBlock* block = nullptr;
    return block;
}

// A barrier outside a cooperative launch has no other threads to wait for: the launch is wrong, so fail loudly.
inline void __syncthreads() {
    SurgeonBlock* block = surgeon_block();
    if (block == nullptr) std::abort();
    swapcontext(&block->fibers[block->current], &block->scheduler);
}

inline void surgeon_fiber_entry() {
    SurgeonBlock* block = surgeon_block();
    (*block->body)();
    block->done[block->current] = 1;  // returning resumes the scheduler (uc_link)
}

// Runs body() as `threads` fibers of one block, round by round: a round resumes each live thread up to its next
// barrier or its end. Threads that end while others wait at a barrier are a divergent barrier: abort.
inline void surgeon_run_block(unsigned threads, const std::function<void()>& body) {
    constexpr size_t stack_bytes = 1 << 15;
    static thread_local std::unique_ptr<char[]> stacks;
    static thread_local unsigned stack_count = 0;
    if (stack_count < threads) {
        stacks.reset(new char[stack_bytes * threads]);
        stack_count = threads;
    }
    SurgeonBlock block;
    block.body = &body;
    block.fibers.resize(threads);
    block.done.assign(threads, 0);
    for (unsigned t = 0; t < threads; ++t) {
        getcontext(&block.fibers[t]);
        block.fibers[t].uc_stack.ss_sp = stacks.get() + stack_bytes * t;
        block.fibers[t].uc_stack.ss_size = stack_bytes;
        block.fibers[t].uc_link = &block.scheduler;
        makecontext(&block.fibers[t], surgeon_fiber_entry, 0);
    }
    surgeon_block() = &block;
    unsigned live = threads;
    while (live > 0) {
        unsigned ended = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (block.done[t]) continue;
            block.current = t;
            threadIdx.x = t;
            swapcontext(&block.scheduler, &block.fibers[t]);
            ended += block.done[t];
        }
        if (ended != 0 && ended != live) std::abort();
        live -= ended;
    }
    surgeon_block() = nullptr;
}

#define SURGEON_LAUNCH_COOPERATIVE(kernel, grid_x, block_x, ...)                     \
    do {                                                                              \
        gridDim.x = (grid_x);                                                         \
        blockDim.x = (block_x);                                                       \
        const std::function<void()> body_ = [&] { kernel(__VA_ARGS__); };             \
        for (unsigned int b_ = 0; b_ < gridDim.x; ++b_) {                             \
            blockIdx.x = b_;                                                          \
            surgeon_run_block(blockDim.x, body_);                                     \
        }                                                                             \
    } while (0)
