// Shared helpers for surgeon's kernels: typed loads/stores through float.
// Compiled by NVRTC/nvcc on GPU machines, and by g++ with cpu_emulation.h for the CPU numerics tests.
#pragma once

// 16-bit storage types of their own, so that no CUDA header is needed at run time: a CuPy built for one CUDA
// release compiles these sources whatever toolkit headers are (or are not) installed. Same layout as torch's
// float16 / bfloat16 elements: the raw bits.
struct alignas(2) surgeon_half {
    unsigned short bits;
};
struct alignas(2) surgeon_bfloat16 {
    unsigned short bits;
};

#ifndef SURGEON_CPU_EMULATION
__device__ __forceinline__ float half_to_float(surgeon_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
__device__ __forceinline__ surgeon_half float_to_half(float f) {
    surgeon_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned int float_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float bits_float(unsigned int u) { return __uint_as_float(u); }
// whether p holds on every active lane of the warp: a path chosen by it is the same for the whole warp
__device__ __forceinline__ bool surgeon_warp_all(bool p) { return __all_sync(__activemask(), p); }
#else
SURGEON_HALF_CONVERSIONS
#endif

__device__ __forceinline__ float bfloat16_to_float(surgeon_bfloat16 h) { return bits_float((unsigned int)h.bits << 16); }
__device__ __forceinline__ surgeon_bfloat16 float_to_bfloat16(float f) {
    surgeon_bfloat16 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // one conversion instruction where the hardware has one: no branch for NaN, no integer rounding sequence
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
    // round to nearest even, a NaN stays a quiet NaN (what cvt.rn.bf16.f32 and __float2bfloat16_rn do)
    unsigned int word = float_bits(f);
    if (f != f) {
        h.bits = (unsigned short)0x7FC0u;
        return h;
    }
    word += 0x7FFFu + ((word >> 16) & 1u);
    h.bits = (unsigned short)(word >> 16);
#endif
    return h;
}

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const surgeon_half* p, long long i) { return half_to_float(p[i]); }
__device__ __forceinline__ float load_f(const surgeon_bfloat16* p, long long i) { return bfloat16_to_float(p[i]); }

__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(surgeon_half* p, long long i, float v) { p[i] = float_to_half(v); }
__device__ __forceinline__ void store_f(surgeon_bfloat16* p, long long i, float v) { p[i] = float_to_bfloat16(v); }

// The largest finite float: an upper bound above it means "no upper bound" (ReLU's mask passes +inf).
#define SURGEON_FLT_MAX 3.402823466e+38f
// The smallest normal float (a step never below it), and infinity, without a CUDA header.
#define SURGEON_FLT_MIN 1.175494351e-38f
#define SURGEON_INFINITY bits_float(0x7F800000u)

// the largest block of a block-per-row kernel (a power of two): rows_quantize, layer_norm_backward
#define SURGEON_ROWS_BLOCK 256

// Division by a number known only at launch, without a divide: for every n < 2^31 and divisor d >= 1,
// n / d == (umulhi(n, multiplier) + n) >> shift, with shift = ceil(log2 d) and multiplier =
// floor(2^32 (2^shift - d) / d) + 1 (Granlund and Montgomery), both made by the launcher
// (surgeon.ops.kernels.fast_divisor). A multiply-high, an add and a shift, with no branch: a runtime divide
// is a sequence of some twenty instructions, and a 64-bit one a call with a slow path.
struct SurgeonDivisor {
    unsigned int divisor, multiplier, shift;
    __device__ __forceinline__ unsigned int quotient(unsigned int n) const {
        return ((unsigned int)(((unsigned long long)n * multiplier) >> 32) + n) >> shift;
    }
    // the remainder of n / divisor, n becoming the quotient: peels the fastest index off a flat one
    __device__ __forceinline__ unsigned int peel(unsigned int& n) const {
        const unsigned int q = quotient(n), r = n - q * divisor;
        n = q;
        return r;
    }
};

#define SURGEON_GRID_STRIDE_LOOP(index, total)                                                        \
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < (total);          \
         index += (long long)blockDim.x * gridDim.x)
