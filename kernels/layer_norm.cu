// A layer norm's input gradient straight from the codes its forward kept: the rows of the input, centred on their
// mean, as per-row affine codes (code * step + offset, quantize_rows with the mean as shift), and each row's rstd.
// One block per row reads the codes and the output gradient twice (two row sums, then the gradient) and writes the
// input gradient once: no fp32 copy of the centred rows, no cast of the gradient, no second kernel.
#include "common.cuh"

// code j of a row that starts at element `first` of the packed stream (8-bit codes: one byte each)
__device__ __forceinline__ float row_code(const unsigned char* packed, long long first, long long j, int bits) {
    if (bits == 8) return (float)packed[first + j];
    const int per_byte = 8 / bits;
    const long long i = first + j;
    return (float)((packed[i / per_byte] >> ((i % per_byte) * bits)) & ((1u << bits) - 1u));
}

template <typename G, typename O>
__device__ __forceinline__ void layer_norm_backward(const G* grad, const unsigned char* packed, const float* offset,
                                                    const float* step, const float* rstd, const float* weight,
                                                    O* out, long long rows, long long width, int bits) {
    // ATen's layer-norm backward with the mean at zero (the rows are already centred): with gw = grad * weight,
    // dx = rstd * gw - (rstd^3 / width * sum(gw * x)) * x - rstd / width * sum(gw). The centred value is
    // code * step + offset rounded as rows_unpack rounds it, so both routes see the same x. The gradient is read in
    // its own type G and the result written in the input's type O (under autocast a norm's output, so its gradient,
    // is fp32 while its input is 16-bit): no cast kernel either way. blockDim.x: a power of two, at most
    // SURGEON_ROWS_BLOCK.
    __shared__ float sum_s[SURGEON_ROWS_BLOCK], dot_s[SURGEON_ROWS_BLOCK];
    const int t = threadIdx.x;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long first = row * width;
        const float row_step = step[row], row_offset = offset[row], row_rstd = rstd[row];
        float sum = 0.0f, dot = 0.0f;
        for (long long j = t; j < width; j += blockDim.x) {
            const float x = __fadd_rn(__fmul_rn(row_code(packed, first, j, bits), row_step), row_offset);
            const float g = weight ? __fmul_rn(load_f(grad, first + j), weight[j]) : load_f(grad, first + j);
            sum += g;
            dot += g * x;
        }
        sum_s[t] = sum;
        dot_s[t] = dot;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half /= 2) {
            if (t < half) {
                sum_s[t] += sum_s[t + half];
                dot_s[t] += dot_s[t + half];
            }
            __syncthreads();
        }
        const float inv_width = 1.0f / (float)width;
        const float x_scale = -row_rstd * row_rstd * row_rstd * dot_s[0] * inv_width;
        const float shift = -row_rstd * sum_s[0] * inv_width;
        __syncthreads();  // every thread has read the sums before the next row overwrites them
        for (long long j = t; j < width; j += blockDim.x) {
            const float x = __fadd_rn(__fmul_rn(row_code(packed, first, j, bits), row_step), row_offset);
            const float g = weight ? __fmul_rn(load_f(grad, first + j), weight[j]) : load_f(grad, first + j);
            store_f(out, first + j, row_rstd * g + x_scale * x + shift);
        }
    }
}

#define SURGEON_LAYER_NORM_ENTRIES(G_SUFFIX, G, O_SUFFIX, O)                                                        \
    extern "C" __global__ void __launch_bounds__(SURGEON_ROWS_BLOCK, 4)                                             \
        layer_norm_backward_##G_SUFFIX##_to_##O_SUFFIX(const G* grad, const unsigned char* packed,                  \
                                                      const float* offset, const float* step, const float* rstd,    \
                                                      const float* weight, O* out, long long rows, long long width, \
                                                      int bits) {                                                   \
        layer_norm_backward<G, O>(grad, packed, offset, step, rstd, weight, out, rows, width, bits);                \
    }

SURGEON_LAYER_NORM_ENTRIES(f32, float, f32, float)
SURGEON_LAYER_NORM_ENTRIES(f32, float, f16, surgeon_half)
SURGEON_LAYER_NORM_ENTRIES(f32, float, bf16, surgeon_bfloat16)
SURGEON_LAYER_NORM_ENTRIES(f16, surgeon_half, f32, float)
SURGEON_LAYER_NORM_ENTRIES(f16, surgeon_half, f16, surgeon_half)
SURGEON_LAYER_NORM_ENTRIES(f16, surgeon_half, bf16, surgeon_bfloat16)
SURGEON_LAYER_NORM_ENTRIES(bf16, surgeon_bfloat16, f32, float)
SURGEON_LAYER_NORM_ENTRIES(bf16, surgeon_bfloat16, f16, surgeon_half)
SURGEON_LAYER_NORM_ENTRIES(bf16, surgeon_bfloat16, bf16, surgeon_bfloat16)
