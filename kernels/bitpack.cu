// Quantize + bit-pack in one kernel for the S2A saved tensors, and the matching unpack.
// Packing layout (same as surgeon/layers/bitpack.py): byte j holds codes j*P .. j*P+P-1, P = 8/bits,
// code k of the byte at bit offset k*bits. One thread per output byte.
#include "common.cuh"

// Pack code_of(i) for i in [0, n) (each < 2^bits) into out.
template <typename CodeOf>
__device__ __forceinline__ void pack_codes_of(CodeOf code_of, unsigned char* out, long long n, int bits) {
    const int per_byte = 8 / bits;
    const long long bytes = (n + per_byte - 1) / per_byte;
    SURGEON_GRID_STRIDE_LOOP(j, bytes) {
        unsigned int packed = 0;
        for (int k = 0; k < per_byte; ++k) {
            const long long i = j * per_byte + k;
            if (i < n) packed |= code_of(i) << (k * bits);
        }
        out[j] = (unsigned char)packed;
    }
}

__device__ __forceinline__ unsigned int codebook_code(float v, float low, float inv_step,
                                                      const unsigned char* cell_codes, int cells) {
    // nearest grid point low + k*step, clamped; same float operations as derivative_codebook.grid_cells: one
    // fp32 multiply by the reciprocal the caller rounded, kept apart from the add (no FMA contraction)
    float t = floorf(__fadd_rn(__fmul_rn(v - low, inv_step), 0.5f));
    t = fminf(fmaxf(t, 0.0f), (float)(cells - 1));
    const int k = (t == t) ? (int)t : 0;  // NaN -> cell 0
    return (unsigned int)cell_codes[k];
}

extern "C" __global__ void pack_codes(const unsigned char* codes, unsigned char* out, long long n, int bits) {
    const unsigned int mask = (1u << bits) - 1u;
    pack_codes_of([=](long long i) { return (unsigned int)codes[i] & mask; }, out, n, bits);
}

extern "C" __global__ void unpack_codes(const unsigned char* packed, unsigned char* out, long long n, int bits) {
    const int per_byte = 8 / bits;
    SURGEON_GRID_STRIDE_LOOP(i, n) {
        out[i] = (unsigned char)((packed[i / per_byte] >> ((i % per_byte) * bits)) & ((1u << bits) - 1u));
    }
}

template <typename T>
__device__ __forceinline__ void mask_pack(const T* x, float low, float high, unsigned char* out, long long n) {
    pack_codes_of([=](long long i) {
        // low < v < high, where a high above every finite float is no bound (+inf passes); NaN gives 0
        const float v = load_f(x, i);
        return (unsigned int)(v > low && (v < high || high > SURGEON_FLT_MAX));
    }, out, n, 1);
}

template <typename T>
__device__ __forceinline__ void codebook_pack(const T* x, float low, float inv_step,
                                              const unsigned char* cell_codes, int cells, unsigned char* out,
                                              long long n, int bits) {
    pack_codes_of([=](long long i) { return codebook_code(load_f(x, i), low, inv_step, cell_codes, cells); }, out,
                  n, bits);
}

template <typename T>
__device__ __forceinline__ void rows_pack(const T* x, const float* low, const float* step, long long width,
                                          unsigned char* out, long long n, int bits) {
    // per-row affine codes: round((x - low[row]) / step[row]) clamped to [0, 2^bits - 1]; low may be null (0).
    // +inf saturates at the top code; -inf and NaN give code 0 (fmaxf returns its non-NaN operand)
    const float levels = (float)((1 << bits) - 1);
    pack_codes_of([=](long long i) {
        const long long row = i / width;
        const float base = low ? low[row] : 0.0f;
        const float q = fminf(fmaxf(rintf((load_f(x, i) - base) / step[row]), 0.0f), levels);
        return (unsigned int)q;
    }, out, n, bits);
}

template <typename T>
__device__ __forceinline__ void rows_range_partial(const T* x, long long rows, long long width, int segments,
                                                   float* partial) {
    // thread (row, segment s) takes the row's elements s, s + segments, ...: neighbouring threads read
    // neighbouring elements. Only finite values count; a segment without any leaves (-inf, +inf).
    SURGEON_GRID_STRIDE_LOOP(t, rows * segments) {
        const long long row = t / segments;
        const T* values = x + row * width;
        float high = -SURGEON_INFINITY, low = SURGEON_INFINITY;
        for (long long i = t - row * segments; i < width; i += segments) {
            const float v = load_f(values, i);
            if (fabsf(v) <= SURGEON_FLT_MAX) {
                high = fmaxf(high, v);
                low = fminf(low, v);
            }
        }
        partial[2 * t] = high;
        partial[2 * t + 1] = low;
    }
}

extern "C" __global__ void rows_range_finish(const float* partial, long long rows, int segments, float inv_levels,
                                             int nonnegative, float* low_out, float* step_out) {
    // per row: ends over its segments; a row without a finite value gets (0, 0); nonnegative rows start at 0.
    // step = max((high - low) * inv_levels, FLT_MIN), unfused, as the torch route computes it
    SURGEON_GRID_STRIDE_LOOP(row, rows) {
        float high = -SURGEON_INFINITY, low = SURGEON_INFINITY;
        for (int s = 0; s < segments; ++s) {
            high = fmaxf(high, partial[2 * (row * segments + s)]);
            low = fminf(low, partial[2 * (row * segments + s) + 1]);
        }
        if (high < low) high = low = 0.0f;
        if (nonnegative) low = 0.0f;
        low_out[row] = low;
        step_out[row] = fmaxf(__fmul_rn(high - low, inv_levels), SURGEON_FLT_MIN);
    }
}

// the most rows a rows_quantize block packs together (width * bits odd: 8 rows end on a byte)
#define SURGEON_ROWS_GROUP 8

template <typename T>
__device__ __forceinline__ void rows_quantize(const T* x, long long rows, long long width, int bits, int group,
                                              float inv_levels, int nonnegative, const float* shift,
                                              float* offset_out, float* step_out, unsigned char* out) {
    // range and codes of whole rows in one kernel, a block per `group` consecutive rows (blockDim.x a power of two):
    // the block reduces each row's finite ends in shared memory, then packs the group's codes. `group` is the
    // fewest rows whose codes end on a byte (group * width * bits a multiple of 8), so no byte holds codes of two
    // blocks, whatever the width. Same floats as rows_range_partial + rows_range_finish + rows_pack; the offset
    // kept is low - shift[row] where a shift is given (a layer norm keeps rows centred on their mean).
    __shared__ float high_s[SURGEON_ROWS_BLOCK], low_s[SURGEON_ROWS_BLOCK];
    __shared__ float group_low[SURGEON_ROWS_GROUP], group_step[SURGEON_ROWS_GROUP];
    const int t = threadIdx.x;
    const int per_byte = 8 / bits;
    const float levels = (float)((1 << bits) - 1);
    for (long long first = (long long)blockIdx.x * group; first < rows; first += (long long)gridDim.x * group) {
        const int count = (int)(rows - first < group ? rows - first : group);
        for (int r = 0; r < count; ++r) {
            const T* values = x + (first + r) * width;
            float high = -SURGEON_INFINITY, low = SURGEON_INFINITY;
            for (long long i = t; i < width; i += blockDim.x) {
                const float v = load_f(values, i);
                if (fabsf(v) <= SURGEON_FLT_MAX) {
                    high = fmaxf(high, v);
                    low = fminf(low, v);
                }
            }
            high_s[t] = high;
            low_s[t] = low;
            __syncthreads();
            for (int half = blockDim.x / 2; half > 0; half /= 2) {
                if (t < half) {
                    high_s[t] = fmaxf(high_s[t], high_s[t + half]);
                    low_s[t] = fminf(low_s[t], low_s[t + half]);
                }
                __syncthreads();
            }
            high = high_s[0];
            low = low_s[0];
            __syncthreads();  // every thread has read the ends before the next row overwrites them
            if (t == 0) {
                if (high < low) high = low = 0.0f;
                if (nonnegative) low = 0.0f;
                const float step = fmaxf(__fmul_rn(high - low, inv_levels), SURGEON_FLT_MIN);
                group_low[r] = low;
                group_step[r] = step;
                step_out[first + r] = step;
                if (!nonnegative) offset_out[first + r] = shift ? low - shift[first + r] : low;
            }
        }
        __syncthreads();  // the group's ends are in shared memory
        const long long begin = first * width, end = (first + count) * width;  // begin * bits: a multiple of 8
        for (long long j = begin / per_byte + t; j < (end + per_byte - 1) / per_byte; j += blockDim.x) {
            unsigned int packed = 0;
            for (int k = 0; k < per_byte; ++k) {
                const long long i = j * per_byte + k;
                if (i >= end) break;
                const int r = (int)(i / width - first);
                const float q = fminf(fmaxf(rintf((load_f(x, i) - group_low[r]) / group_step[r]), 0.0f), levels);
                packed |= (unsigned int)q << (k * bits);
            }
            out[j] = (unsigned char)packed;
        }
        __syncthreads();  // every thread has packed before the next group overwrites the ends
    }
}

template <typename T>
__device__ __forceinline__ void rows_unpack(const unsigned char* packed, const float* low, const float* step,
                                            long long width, T* out, long long n, int bits) {
    // inverse of rows_pack: code * step[row] + low[row] (low may be null: 0), unfused, rounded once to T
    const int per_byte = 8 / bits;
    const unsigned int mask = (1u << bits) - 1u;
    SURGEON_GRID_STRIDE_LOOP(i, n) {
        const long long row = i / width;
        const unsigned int code = (packed[i / per_byte] >> ((i % per_byte) * bits)) & mask;
        const float scaled = __fmul_rn((float)code, step[row]);
        store_f(out, i, low ? __fadd_rn(scaled, low[row]) : scaled);
    }
}

template <typename T>
__device__ __forceinline__ void coded_product(const T* grad, const unsigned char* packed, const float* values,
                                              T* out, long long n, int bits) {
    // the backward of a coded activation: grad * values[code], codes packed in the same element order; one fp32
    // multiply rounded once to T (the torch route multiplies by fp32 factors too)
    const int per_byte = 8 / bits;
    const unsigned int mask = (1u << bits) - 1u;
    SURGEON_GRID_STRIDE_LOOP(i, n) {
        const unsigned int code = (packed[i / per_byte] >> ((i % per_byte) * bits)) & mask;
        store_f(out, i, __fmul_rn(load_f(grad, i), values[code]));
    }
}

#define SURGEON_PACK_ENTRIES(SUFFIX, T)                                                                    \
    extern "C" __global__ void mask_pack_##SUFFIX(const T* x, float low, float high, unsigned char* out,      \
                                                  long long n) {                                             \
        mask_pack<T>(x, low, high, out, n);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void codebook_pack_##SUFFIX(const T* x, float low, float inv_step,                  \
                                                      const unsigned char* cell_codes, int cells,            \
                                                      unsigned char* out, long long n, int bits) {          \
        codebook_pack<T>(x, low, inv_step, cell_codes, cells, out, n, bits);                                 \
    }                                                                                                        \
    extern "C" __global__ void rows_pack_##SUFFIX(const T* x, const float* low, const float* step,            \
                                                  long long width, unsigned char* out, long long n, int bits) { \
        rows_pack<T>(x, low, step, width, out, n, bits);                                                     \
    }                                                                                                        \
    extern "C" __global__ void rows_range_partial_##SUFFIX(const T* x, long long rows, long long width,       \
                                                           int segments, float* partial) {                   \
        rows_range_partial<T>(x, rows, width, segments, partial);                                            \
    }                                                                                                        \
    extern "C" __global__ void coded_product_##SUFFIX(const T* grad, const unsigned char* packed,              \
                                                      const float* values, T* out, long long n, int bits) {   \
        coded_product<T>(grad, packed, values, out, n, bits);                                                \
    }                                                                                                        \
    extern "C" __global__ void rows_quantize_##SUFFIX(const T* x, long long rows, long long width, int bits,   \
                                                      int group, float inv_levels, int nonnegative,            \
                                                      const float* shift, float* offset_out, float* step_out,  \
                                                      unsigned char* out) {                                    \
        rows_quantize<T>(x, rows, width, bits, group, inv_levels, nonnegative, shift, offset_out, step_out, out); \
    }                                                                                                        \
    extern "C" __global__ void rows_unpack_##SUFFIX(const unsigned char* packed, const float* low,            \
                                                    const float* step, long long width, T* out, long long n, \
                                                    int bits) {                                              \
        rows_unpack<T>(packed, low, step, width, out, n, bits);                                              \
    }

SURGEON_PACK_ENTRIES(f32, float)
SURGEON_PACK_ENTRIES(f16, surgeon_half)
SURGEON_PACK_ENTRIES(bf16, surgeon_bfloat16)
