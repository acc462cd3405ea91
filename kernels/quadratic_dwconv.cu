// Fused quadratic depthwise convolution forward, QuadraLib dense layout:
//   y[n,c] = conv3(x)[n,c] + b[c] + sum_r conv1(x)[n,c*R+r] * conv2(x)[n,c*R+r]
// conv3: [C,1,KH,KW] at dilation (DH,DW); conv1/conv2: [C*R,1,SH,SW] dense over the span S = D*(K-1)+1.
// One pass over the input: every input element of the S x S window is loaded once and feeds the primary
// accumulator (when it falls on a primary tap) and all 2*R quadratic accumulators. Accumulation in fp32.
// NCHW and NHWC (channels-last) variants; fp32 / fp16 / bf16 storage. R <= SURGEON_MAX_RANK.
#include "common.cuh"

#define SURGEON_MAX_RANK 8

template <typename T, bool NHWC>
__device__ __forceinline__ void quadconv_forward(
    const T* __restrict__ x, const T* __restrict__ w3, const T* __restrict__ b3, const T* __restrict__ w1,
    const T* __restrict__ w2, T* __restrict__ y, int N, int C, int H, int W, int HO, int WO, int KH, int KW,
    int DH, int DW, int SH, int SW, int stride_h, int stride_w, int pad_top, int pad_left, int rank, int has_bias) {
    const long long total = (long long)N * C * HO * WO;
    SURGEON_GRID_STRIDE_LOOP(index, total) {
        int n, c, oh, ow;
        long long rest = index;
        if (NHWC) {
            c = (int)(rest % C); rest /= C;
            ow = (int)(rest % WO); rest /= WO;
            oh = (int)(rest % HO); n = (int)(rest / HO);
        } else {
            ow = (int)(rest % WO); rest /= WO;
            oh = (int)(rest % HO); rest /= HO;
            c = (int)(rest % C); n = (int)(rest / C);
        }
        float primary = has_bias ? load_f(b3, c) : 0.0f;
        float a[SURGEON_MAX_RANK];
        float b[SURGEON_MAX_RANK];
#pragma unroll
        for (int r = 0; r < SURGEON_MAX_RANK; ++r) { a[r] = 0.0f; b[r] = 0.0f; }
        const int ih0 = oh * stride_h - pad_top;
        const int iw0 = ow * stride_w - pad_left;
        const long long span_taps = (long long)SH * SW;
        for (int sh = 0; sh < SH; ++sh) {
            const int ih = ih0 + sh;
            if (ih < 0 || ih >= H) continue;
            const bool primary_row = (sh % DH) == 0;
            for (int sw = 0; sw < SW; ++sw) {
                const int iw = iw0 + sw;
                if (iw < 0 || iw >= W) continue;
                const long long xi = NHWC ? (((long long)n * H + ih) * W + iw) * C + c
                                          : (((long long)n * C + c) * H + ih) * W + iw;
                const float v = load_f(x, xi);
                if (primary_row && (sw % DW) == 0) {
                    primary += v * load_f(w3, ((long long)c * KH + sh / DH) * KW + sw / DW);
                }
                const long long tap = (long long)sh * SW + sw;
                // unrolled to the largest rank, so a[] and b[] stay in registers (a run-time bound would put
                // them in local memory)
#pragma unroll
                for (int r = 0; r < SURGEON_MAX_RANK; ++r) {
                    if (r < rank) {
                        const long long wi = (long long)(c * rank + r) * span_taps + tap;
                        a[r] += v * load_f(w1, wi);
                        b[r] += v * load_f(w2, wi);
                    }
                }
            }
        }
        float out = primary;
#pragma unroll
        for (int r = 0; r < SURGEON_MAX_RANK; ++r) {
            if (r < rank) out += a[r] * b[r];
        }
        store_f(y, index, out);
    }
}

#define SURGEON_QUADCONV_ENTRY(NAME, T, NHWC)                                                          \
    extern "C" __global__ void __launch_bounds__(256, 4) NAME(const T* x, const T* w3, const T* b3, const T* w1, const T* w2, T* y,   \
                                    int N, int C, int H, int W, int HO, int WO, int KH, int KW, int DH,    \
                                    int DW, int SH, int SW, int stride_h, int stride_w, int pad_top,       \
                                    int pad_left, int rank, int has_bias) {                                \
        quadconv_forward<T, NHWC>(x, w3, b3, w1, w2, y, N, C, H, W, HO, WO, KH, KW, DH, DW, SH, SW,        \
                                  stride_h, stride_w, pad_top, pad_left, rank, has_bias);                  \
    }

SURGEON_QUADCONV_ENTRY(quadconv_fwd_f32_nchw, float, false)
SURGEON_QUADCONV_ENTRY(quadconv_fwd_f32_nhwc, float, true)
SURGEON_QUADCONV_ENTRY(quadconv_fwd_f16_nchw, surgeon_half, false)
SURGEON_QUADCONV_ENTRY(quadconv_fwd_f16_nhwc, surgeon_half, true)
SURGEON_QUADCONV_ENTRY(quadconv_fwd_bf16_nchw, surgeon_bfloat16, false)
SURGEON_QUADCONV_ENTRY(quadconv_fwd_bf16_nhwc, surgeon_bfloat16, true)
