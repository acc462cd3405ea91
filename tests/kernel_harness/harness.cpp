// CPU build of surgeon's CUDA kernels: the same .cu sources, compiled with g++ and cpu_emulation.h, exposed
// through extern "C" launchers so the tests can call them with ctypes on torch tensors.
#include "cpu_emulation.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#include "bitpack.cu"
#include "quadratic_dwconv.cu"

#define QUADCONV_ARGS                                                                                     \
    unsigned grid, unsigned block, const void *x, const void *w3, const void *b3, const void *w1,           \
        const void *w2, void *y, int N, int C, int H, int W, int HO, int WO, int KH, int KW, int DH, int DW,   \
        int SH, int SW, int sh, int sw, int pt, int pl, int rank, int has_bias

#define QUADCONV_LAUNCHER(NAME, T)                                                                        \
    extern "C" void launch_##NAME(QUADCONV_ARGS) {                                                          \
        SURGEON_LAUNCH(NAME, grid, block, (const T *)x, (const T *)w3, (const T *)b3, (const T *)w1,         \
                       (const T *)w2, (T *)y, N, C, H, W, HO, WO, KH, KW, DH, DW, SH, SW, sh, sw, pt, pl, rank,  \
                       has_bias);                                                                            \
    }

QUADCONV_LAUNCHER(quadconv_fwd_f32_nchw, float)
QUADCONV_LAUNCHER(quadconv_fwd_f32_nhwc, float)
QUADCONV_LAUNCHER(quadconv_fwd_f16_nchw, surgeon_half)
QUADCONV_LAUNCHER(quadconv_fwd_f16_nhwc, surgeon_half)
QUADCONV_LAUNCHER(quadconv_fwd_bf16_nchw, surgeon_bfloat16)
QUADCONV_LAUNCHER(quadconv_fwd_bf16_nhwc, surgeon_bfloat16)

extern "C" void launch_pack_codes(unsigned grid, unsigned block, const unsigned char *codes, unsigned char *out,
                                  long long n, int bits) {
    SURGEON_LAUNCH(pack_codes, grid, block, codes, out, n, bits);
}
extern "C" void launch_unpack_codes(unsigned grid, unsigned block, const unsigned char *packed, unsigned char *out,
                                    long long n, int bits) {
    SURGEON_LAUNCH(unpack_codes, grid, block, packed, out, n, bits);
}
extern "C" void launch_mask_pack_f32(unsigned grid, unsigned block, const float *x, float low, float high,
                                     unsigned char *out, long long n) {
    SURGEON_LAUNCH(mask_pack_f32, grid, block, x, low, high, out, n);
}
extern "C" void launch_codebook_pack_f32(unsigned grid, unsigned block, const float *x, float low, float step,
                                         const unsigned char *cell_codes, int cells, unsigned char *out, long long n,
                                         int bits) {
    SURGEON_LAUNCH(codebook_pack_f32, grid, block, x, low, step, cell_codes, cells, out, n, bits);
}
extern "C" void launch_rows_pack_f32(unsigned grid, unsigned block, const float *x, const float *low,
                                     const float *step, long long width, unsigned char *out, long long n, int bits) {
    SURGEON_LAUNCH(rows_pack_f32, grid, block, x, low, step, width, out, n, bits);
}
