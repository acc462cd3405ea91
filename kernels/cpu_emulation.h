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

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::fmaxf;
using std::fminf;
using std::rintf;

struct __half {
    _Float16 value;
};
inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t word = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &word, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t word;
    std::memcpy(&word, &f, sizeof word);
    if (std::isnan(f)) return __nv_bfloat16{(uint16_t)0x7FC0};
    word += 0x7FFFu + ((word >> 16) & 1u);  // round to nearest even
    return __nv_bfloat16{(uint16_t)(word >> 16)};
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
