// Shared helpers for surgeon's kernels: typed loads/stores through float.
// Compiled by NVRTC/nvcc on GPU machines, and by g++ with cpu_emulation.h for the CPU numerics tests.
#pragma once

#ifndef SURGEON_CPU_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

// The largest finite float: an upper bound above it means "no upper bound" (ReLU's mask passes +inf).
#define SURGEON_FLT_MAX 3.402823466e+38f

#define SURGEON_GRID_STRIDE_LOOP(index, total)                                                        \
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < (total);          \
         index += (long long)blockDim.x * gridDim.x)
