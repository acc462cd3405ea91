// Compile surgeon's .cu kernels with g++ for the CPU, so their numerics can be checked without a GPU.
// Provides the CUDA built-ins the kernels use; a launch is a loop over every block and thread of the grid
// (the kernels use grid-stride loops and no shared memory or __syncthreads, so sequential order is valid).
#pragma once
#define SURGEON_CPU_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
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
