// Fused quadratic depthwise convolution forward, specialised at compile time for one layer:
//   y[n,c] = b[c] + sum_taps w3 * x + sum_r (sum_a-taps wa_r * x) * (sum_b-taps wb_r * x)
// The primary kernel (KH x KW at dilation DH x DW), the two atrous branch kernels (taps, dilation and place inside
// the primary's span), the rank, the stride, the outputs per thread and, for NHWC, the channel count are template
// parameters (instantiated through NVRTC name expressions for the geometries a model has), so every loop
// unrolls, every tap and column offset is a constant and no division or modulo is left in the tap loop. Only the
// non-zero taps are computed: 49 + 16 + 4 = 69 multiply-adds per output for a 7x7 rank-1 layer.
// Each thread computes OUT_W neighbouring outputs of one row: a span row's inputs are loaded once into
// registers and reused by every output and every tap that reads them; each weight is loaded once per thread
// and reused by its OUT_W outputs. Weights are tap-major ([tap][C]) in NHWC, where the lanes of a warp are
// neighbouring channels and so read neighbouring addresses for inputs and weights alike, and channel-major
// ([C][tap]) in NCHW, where the lanes walk along W and share each weight (one broadcast load). A window wholly
// inside the image, as most are, loads without bounds tests. Accumulation in fp32; fp32 / fp16 / bf16 storage.
#include "common.cuh"

// Tap k of one axis of a kernel sits at span position TOP + k * DILATION.
template <int TAPS, int DILATION, int TOP>
struct AtrousAxis {
    // the tap at span position p, or -1 (evaluated at compile time: p is an unrolled loop index)
    __host__ __device__ static constexpr int tap(int p) {
        return (p >= TOP && (p - TOP) % DILATION == 0 && (p - TOP) / DILATION < TAPS) ? (p - TOP) / DILATION : -1;
    }
};

template <typename T, bool NHWC, int CH, int KH, int KW, int DH, int DW, int AH, int AW, int ADH, int ADW, int AT,
          int AL, int BH, int BW, int BDH, int BDW, int BT, int BL, int RANK, int SY, int SX, int OUT_W>
struct AtrousLayer {
    static constexpr int SH = DH * (KH - 1) + 1;  // the primary's span: every branch lies inside it
    static constexpr int SW = DW * (KW - 1) + 1;
    static constexpr int COLS = (OUT_W - 1) * SX + SW;  // input columns one thread's outputs read in a span row
    static constexpr int NONE = -1;
    using RowP = AtrousAxis<KH, DH, 0>;
    using ColP = AtrousAxis<KW, DW, 0>;
    using RowA = AtrousAxis<AH, ADH, AT>;
    using ColA = AtrousAxis<AW, ADW, AL>;
    using RowB = AtrousAxis<BH, BDH, BT>;
    using ColB = AtrousAxis<BW, BDW, BL>;

    struct Sums {
        float primary[OUT_W], a[RANK][OUT_W], b[RANK][OUT_W];
    };

    __device__ __forceinline__ static void clear(Sums& s) {
#pragma unroll
        for (int j = 0; j < OUT_W; ++j) {
            s.primary[j] = 0.0f;
#pragma unroll
            for (int r = 0; r < RANK; ++r) s.a[r][j] = s.b[r][j] = 0.0f;
        }
    }

    // output j: bias + primary + sum_r a_r * b_r (in that order, in fp32)
    __device__ __forceinline__ static float output(const Sums& s, int j, float bias) {
        float value = bias + s.primary[j];
#pragma unroll
        for (int r = 0; r < RANK; ++r) value += s.a[r][j] * s.b[r][j];
        return value;
    }

    // Accumulate every span row into s. CHECKED: the window may reach outside the image (zeros there).
    // col_step: elements between horizontal neighbours (CH in NHWC, 1 in NCHW); row_step: between rows.
    template <bool CHECKED>
    __device__ __forceinline__ static void rows(Sums& s, const T* row, long long row_step, int ih0, int iw0, int H,
                                                int W, const T* w3, const T* wa, const T* wb) {
        constexpr long long col_step = NHWC ? CH : 1;
        // weight offsets of tap t: t * CH (tap-major) in NHWC, t (channel-major, pointers already at the channel)
        constexpr long long tap_step = NHWC ? CH : 1;
        // the interior path unrolls every row; the border path (checked, one output) keeps a row loop, so
        // that the kernel's registers are those of the interior path
#pragma unroll(CHECKED ? 1 : SH)
        for (int sr = 0; sr < SH; ++sr, row += row_step) {
            const int kh = RowP::tap(sr), ah = RowA::tap(sr), bh = RowB::tap(sr);
            if (kh == NONE && ah == NONE && bh == NONE) continue;  // no tap in this row (resolved at compile time)
            float v[COLS];
            const bool row_inside = !CHECKED || (ih0 + sr >= 0 && ih0 + sr < H);
#pragma unroll
            for (int col = 0; col < COLS; ++col) {
                const bool inside = !CHECKED || (row_inside && iw0 + col >= 0 && iw0 + col < W);
                v[col] = inside ? load_f(row, col * col_step) : 0.0f;
            }
#pragma unroll
            for (int sc = 0; sc < SW; ++sc) {
                const int kw = ColP::tap(sc), aw = ColA::tap(sc), bw = ColB::tap(sc);
                if (kh != NONE && kw != NONE) {
                    const float w = load_f(w3, (long long)(kh * KW + kw) * tap_step);
#pragma unroll
                    for (int j = 0; j < OUT_W; ++j) s.primary[j] += w * v[j * SX + sc];
                }
#pragma unroll
                for (int r = 0; r < RANK; ++r) {
                    if (ah != NONE && aw != NONE) {
                        const float w = load_f(wa, (long long)(r * AH * AW + ah * AW + aw) * tap_step);
#pragma unroll
                        for (int j = 0; j < OUT_W; ++j) s.a[r][j] += w * v[j * SX + sc];
                    }
                    if (bh != NONE && bw != NONE) {
                        const float w = load_f(wb, (long long)(r * BH * BW + bh * BW + bw) * tap_step);
#pragma unroll
                        for (int j = 0; j < OUT_W; ++j) s.b[r][j] += w * v[j * SX + sc];
                    }
                }
            }
        }
    }
};

template <typename T, bool NHWC, int CH, int KH, int KW, int DH, int DW, int AH, int AW, int ADH, int ADW, int AT,
          int AL, int BH, int BW, int BDH, int BDW, int BT, int BL, int RANK, int SY, int SX, int OUT_W>
__global__ void quadconv_atrous(const T* __restrict__ x, const T* __restrict__ w3, const T* __restrict__ b3,
                                const T* __restrict__ wa, const T* __restrict__ wb, T* __restrict__ y, int N, int C,
                                int H, int W, int HO, int WO, int pad_top, int pad_left) {
    using Layer = AtrousLayer<T, NHWC, CH, KH, KW, DH, DW, AH, AW, ADH, ADW, AT, AL, BH, BW, BDH, BDW, BT, BL, RANK,
                              SY, SX, OUT_W>;
    if (NHWC && C != CH) return;  // compiled for another channel count (the launcher never does this)
    constexpr int CHANNELS = CH > 0 ? CH : 1;
    const int tiles = (WO + OUT_W - 1) / OUT_W;
    const long long total = (long long)N * C * HO * tiles;
    SURGEON_GRID_STRIDE_LOOP(index, total) {
        // thread -> (n, oh, tile, c) with c fastest in NHWC, (n, c, oh, tile) with the tile fastest in NCHW
        int c, tile, oh, n;
        long long rest = index;
        if (NHWC) {
            c = (int)(rest % CHANNELS); rest /= CHANNELS;  // a constant divisor: a multiply and a shift
            tile = (int)(rest % tiles); rest /= tiles;
            oh = (int)(rest % HO); n = (int)(rest / HO);
        } else {
            tile = (int)(rest % tiles); rest /= tiles;
            oh = (int)(rest % HO); rest /= HO;
            c = (int)(rest % C); n = (int)(rest / C);
        }
        const int ow0 = tile * OUT_W;
        const int ih0 = oh * SY - pad_top;
        const int iw0 = ow0 * SX - pad_left;
        const long long col_step = NHWC ? CH : 1;
        const long long row_step = (long long)W * col_step;
        const long long plane = NHWC ? (long long)n * H * W * CH + c : ((long long)n * C + c) * H * W;
        const T* row = x + plane + (long long)ih0 * row_step + (long long)iw0 * col_step;
        // each weight pointer at this channel's first tap
        const T* w3c = w3 + (NHWC ? c : (long long)c * KH * KW);
        const T* wac = wa + (NHWC ? c : (long long)c * RANK * AH * AW);
        const T* wbc = wb + (NHWC ? c : (long long)c * RANK * BH * BW);
        const float bias = b3 ? load_f(b3, c) : 0.0f;
        const long long out = NHWC ? (((long long)n * HO + oh) * WO + ow0) * CH + c
                                   : (((long long)n * C + c) * HO + oh) * WO + ow0;
        if (ih0 >= 0 && ih0 + Layer::SH <= H && iw0 >= 0 && iw0 + Layer::COLS <= W) {
            // inside the image: OUT_W outputs from one register window, no bounds tests
            typename Layer::Sums s;
            Layer::clear(s);
            Layer::template rows<false>(s, row, row_step, ih0, iw0, H, W, w3c, wac, wbc);
#pragma unroll
            for (int j = 0; j < OUT_W; ++j) {
                if (ow0 + j < WO) store_f(y, out + (long long)j * col_step, Layer::output(s, j, bias));
            }
        } else {
#ifndef SURGEON_INTERIOR_ONLY  // defined only to measure the interior path's static cost (benchmarks/kernel_cost.py)
            // at a border: one output at a time with bounds tests, so this rare path needs few registers
            using Single = AtrousLayer<T, NHWC, CH, KH, KW, DH, DW, AH, AW, ADH, ADW, AT, AL, BH, BW, BDH, BDW, BT, BL,
                                       RANK, SY, SX, 1>;
#pragma unroll 1
            for (int j = 0; j < OUT_W && ow0 + j < WO; ++j) {
                typename Single::Sums s;
                Single::clear(s);
                Single::template rows<true>(s, row + (long long)j * SX * col_step, row_step, ih0, iw0 + j * SX, H,
                                            W, w3c, wac, wbc);
                store_f(y, out + (long long)j * col_step, Single::output(s, 0, bias));
            }
#endif
        }
    }
}
