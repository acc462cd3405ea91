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
// ([C][tap]) in NCHW, where the lanes walk along W and share each weight (one broadcast load). A warp whose windows
// all lie inside the image loads without bounds tests; any other warp runs the same unrolled code with a predicate
// per load (chosen by a warp vote, so no warp runs both). A thread finds its place without a divide (the
// launcher's multiply-high constants, SurgeonDivisor) and with 32-bit offsets (the launcher hands over no tensor of
// 2^31 elements). Accumulation in fp32; fp32 / fp16 / bf16 storage.
#include "common.cuh"

// Tap k of one axis of a kernel sits at span position TOP + k * DILATION.
template <int TAPS, int DILATION, int TOP>
struct AtrousAxis {
    // the tap at span position p, or -1 (evaluated at compile time: p is an unrolled loop index)
    __host__ __device__ static constexpr int tap(int p) {
        return (p >= TOP && (p - TOP) % DILATION == 0 && (p - TOP) / DILATION < TAPS) ? (p - TOP) / DILATION : -1;
    }
};

// TERMS: which sums the layer accumulates (1: the primary, 2: branch a, 4: branch b).
template <typename T, bool NHWC, int CH, int KH, int KW, int DH, int DW, int AH, int AW, int ADH, int ADW, int AT,
          int AL, int BH, int BW, int BDH, int BDW, int BT, int BL, int RANK, int SY, int SX, int OUT_W, int TERMS = 7>
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

    // Where one thread works: output row oh, columns ow0.. of channel c of image n; x + row is the first input its
    // span reads (ih0, iw0: that input's row and column, negative in the padding); out, its first output's offset
    // in a C-channel output of x's layout. 32-bit offsets: the launcher hands over no tensor of 2^31 elements or
    // more.
    struct Tile {
        int n, c, oh, ow0, ih0, iw0;
        int col_step, row_step, row, out;
    };

    // What a thread's placement divides by: the launch's tiles per output row, HO and C, each with the launcher's
    // multiply-high constant and shift (surgeon.ops.kernels.cuda.placement_divisors).
    struct Divisors {
        SurgeonDivisor tiles, rows, channels;
        __device__ __forceinline__ Divisors(int C, int HO, int WO, unsigned int tiles_multiplier,
                                            unsigned int tiles_shift, unsigned int rows_multiplier,
                                            unsigned int rows_shift, unsigned int channels_multiplier,
                                            unsigned int channels_shift)
            : tiles{(unsigned int)((WO + OUT_W - 1) / OUT_W), tiles_multiplier, tiles_shift},
              rows{(unsigned int)HO, rows_multiplier, rows_shift},
              channels{(unsigned int)C, channels_multiplier, channels_shift} {}
    };

    // thread -> (n, oh, tile, c) with c fastest in NHWC, (n, c, oh, tile) with the tile fastest in NCHW (a thread
    // index is below 2^31)
    __device__ __forceinline__ static Tile place(unsigned int index, int C, int H, int W, int HO, int WO,
                                                 int pad_top, int pad_left, const Divisors& by) {
        constexpr unsigned int CHANNELS = CH > 0 ? CH : 1;  // NCHW instantiations have CH 0
        Tile t;
        unsigned int rest = index;
        int tile;
        if (NHWC) {
            t.c = (int)(rest % CHANNELS); rest /= CHANNELS;  // a constant divisor: a multiply and a shift
            tile = (int)by.tiles.peel(rest);
            t.oh = (int)by.rows.peel(rest);
            t.n = (int)rest;
        } else {
            tile = (int)by.tiles.peel(rest);
            t.oh = (int)by.rows.peel(rest);
            t.c = (int)by.channels.peel(rest);
            t.n = (int)rest;
        }
        t.ow0 = tile * OUT_W;
        t.ih0 = t.oh * SY - pad_top;
        t.iw0 = t.ow0 * SX - pad_left;
        t.col_step = NHWC ? CH : 1;
        t.row_step = W * t.col_step;
        const int plane = NHWC ? t.n * H * W * CH + t.c : (t.n * C + t.c) * H * W;
        t.row = plane + t.ih0 * t.row_step + t.iw0 * t.col_step;
        t.out = NHWC ? ((t.n * HO + t.oh) * WO + t.ow0) * CH + t.c : ((t.n * C + t.c) * HO + t.oh) * WO + t.ow0;
        return t;
    }

    // whether the tile's whole span lies inside the image (the interior path: no bounds tests)
    __device__ __forceinline__ static bool interior(const Tile& t, int H, int W) {
        return t.ih0 >= 0 && t.ih0 + SH <= H && t.iw0 >= 0 && t.iw0 + COLS <= W;
    }

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

    // Accumulate every span row into s. CHECKED: the window may reach outside the image, where inputs are zeros: an
    // input outside is not loaded (each column's test made once per thread, as a bit of a mask, each row's once per
    // row). col_step: elements between horizontal neighbours (CH in NHWC, 1 in NCHW); row_step: between rows.
    // Weights of type WT: fp32 (the merged kernel: no conversion per weight load) or T.
    template <bool CHECKED, typename WT>
    __device__ __forceinline__ static void rows(Sums& s, const T* row, int row_step, int ih0, int iw0, int H, int W,
                                                const WT* w3, const WT* wa, const WT* wb) {
        static_assert(COLS <= 32, "a span row's columns must fit the 32-bit column mask");
        constexpr long long col_step = NHWC ? CH : 1;
        // weight offsets of tap t: t * CH (tap-major) in NHWC, t (channel-major, pointers already at the channel)
        constexpr long long tap_step = NHWC ? CH : 1;
        unsigned cols_inside = 0;  // bit col: input column iw0 + col lies inside the image
        if (CHECKED) {  // columns first..last-1 of the span row lie inside: a run of bits, made by two shifts
            const int first = iw0 < 0 ? -iw0 : 0, last = W - iw0 < COLS ? W - iw0 : COLS;
            cols_inside = first < last ? (0xFFFFFFFFu >> (32 - last)) & (0xFFFFFFFFu << first) : 0u;
        }
#pragma unroll
        for (int sr = 0; sr < SH; ++sr, row += row_step) {
            const int kh = (TERMS & 1) ? RowP::tap(sr) : NONE, ah = (TERMS & 2) ? RowA::tap(sr) : NONE,
                      bh = (TERMS & 4) ? RowB::tap(sr) : NONE;
            if (kh == NONE && ah == NONE && bh == NONE) continue;  // no tap in this row (resolved at compile time)
            // a predicate per load, no branch: a padding row loads nothing
            const unsigned inside = (unsigned)(ih0 + sr) < (unsigned)H ? cols_inside : 0u;
            float v[COLS];
#pragma unroll
            for (int col = 0; col < COLS; ++col)
                v[col] = (!CHECKED || ((inside >> col) & 1u)) ? load_f(row, col * col_step) : 0.0f;
#pragma unroll
            for (int sc = 0; sc < SW; ++sc) {
                const int kw = (TERMS & 1) ? ColP::tap(sc) : NONE, aw = (TERMS & 2) ? ColA::tap(sc) : NONE,
                          bw = (TERMS & 4) ? ColB::tap(sc) : NONE;
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

    // Every output of a tile, OUT_W of them from one register window. A warp whose tiles all lie inside the image,
    // as most do, loads without bounds tests; any other warp takes the checked path, whose sums are the same
    // operations in the same order (a padding input is a zero), so a tile's outputs do not depend on its
    // neighbours and no warp runs both paths. emit(j, sums, k): output j of the tile from column k of sums.
    template <typename WT, typename Emit>
    __device__ __forceinline__ static void each_output(const Tile& t, const T* row, int H, int W, int WO, const WT* w3,
                                                       const WT* wa, const WT* wb, Emit emit) {
        Sums s;
        clear(s);
#ifndef SURGEON_CHECKED_ONLY  // defined only to measure the checked path's static cost (benchmarks/kernel_cost.py)
        if (surgeon_warp_all(interior(t, H, W))) {
            rows<false, WT>(s, row, t.row_step, t.ih0, t.iw0, H, W, w3, wa, wb);
        } else
#endif
        {
#ifndef SURGEON_INTERIOR_ONLY  // defined only to measure the interior path's static cost (benchmarks/kernel_cost.py)
            rows<true, WT>(s, row, t.row_step, t.ih0, t.iw0, H, W, w3, wa, wb);
#endif
        }
#pragma unroll
        for (int j = 0; j < OUT_W; ++j) {
            if (t.ow0 + j < WO) emit(j, s, j);
        }
    }
};

// The merged layer's forward. Weights and bias in fp32 whatever the storage type: converted once by the launcher
// (which keeps the copies), not at each of a thread's weight loads.
template <typename T, bool NHWC, int CH, int KH, int KW, int DH, int DW, int AH, int AW, int ADH, int ADW, int AT,
          int AL, int BH, int BW, int BDH, int BDW, int BT, int BL, int RANK, int SY, int SX, int OUT_W>
__global__ void quadconv_atrous(const T* __restrict__ x, const float* __restrict__ w3, const float* __restrict__ b3,
                                const float* __restrict__ wa, const float* __restrict__ wb, T* __restrict__ y, int N,
                                int C, int H, int W, int HO, int WO, int pad_top, int pad_left,
                                unsigned int tiles_multiplier,
                                unsigned int tiles_shift, unsigned int rows_multiplier, unsigned int rows_shift,
                                unsigned int channels_multiplier, unsigned int channels_shift) {
    using Layer = AtrousLayer<T, NHWC, CH, KH, KW, DH, DW, AH, AW, ADH, ADW, AT, AL, BH, BW, BDH, BDW, BT, BL, RANK,
                              SY, SX, OUT_W>;
    if (NHWC && C != CH) return;  // compiled for another channel count (the launcher never does this)
    const typename Layer::Divisors by(C, HO, WO, tiles_multiplier, tiles_shift, rows_multiplier, rows_shift,
                                      channels_multiplier, channels_shift);
    const long long total = (long long)N * C * HO * by.tiles.divisor;  // a thread per tile
    SURGEON_GRID_STRIDE_LOOP(index, total) {
        const typename Layer::Tile t = Layer::place((unsigned int)index, C, H, W, HO, WO, pad_top, pad_left, by);
        // each weight pointer at this channel's first tap
        const float* w3c = w3 + (NHWC ? t.c : t.c * KH * KW);
        const float* wac = wa + (NHWC ? t.c : t.c * RANK * AH * AW);
        const float* wbc = wb + (NHWC ? t.c : t.c * RANK * BH * BW);
        // output j: bias + primary + sum_r a_r * b_r (in that order, in fp32); the bias is read once the sums are
        // made, so that it holds no register while they are
        Layer::each_output(t, x + t.row, H, W, WO, w3c, wac, wbc, [&](int j, const auto& s, int k) {
            float value = (b3 ? load_f(b3, t.c) : 0.0f) + s.primary[k];
#pragma unroll
            for (int r = 0; r < RANK; ++r) value += s.a[r][k] * s.b[r][k];
            store_f(y, t.out + j * t.col_step, value);
        });
    }
}

// The quadratic term alone, for training (the primary conv runs as the original layer did, so a converted layer
// stays exact at init). MODE 0: y = given + sum_r a_r * b_r, given being the primary conv's output. MODE 1:
// y = a_r * given, MODE 2: y = b_r * given, given being the output gradient (C channels) and y of C * RANK channels
// (channel c * RANK + r): the factor a branch's weight and input gradients need, one kernel instead of a recomputed
// conv and a multiply. MODE 3: both, a_r * given in y[0] and b_r * given in y[1] (y: two such tensors). Same
// tiling, taps and layouts as quadconv_atrous (x, grad and y share a memory format; weights channel-major in NCHW,
// tap-major in NHWC).
template <typename T, bool NHWC, int CH, int KH, int KW, int DH, int DW, int AH, int AW, int ADH, int ADW, int AT,
          int AL, int BH, int BW, int BDH, int BDW, int BT, int BL, int RANK, int SY, int SX, int OUT_W, int MODE>
__global__ void quadratic_term(const T* __restrict__ x, const T* __restrict__ wa, const T* __restrict__ wb,
                               const T* __restrict__ given, T* __restrict__ y, int N, int C, int H, int W, int HO,
                               int WO, int pad_top, int pad_left, unsigned int tiles_multiplier,
                               unsigned int tiles_shift, unsigned int rows_multiplier, unsigned int rows_shift,
                               unsigned int channels_multiplier, unsigned int channels_shift) {
    constexpr int TERMS = MODE == 1 ? 2 : MODE == 2 ? 4 : 6;
    using Layer = AtrousLayer<T, NHWC, CH, KH, KW, DH, DW, AH, AW, ADH, ADW, AT, AL, BH, BW, BDH, BDW, BT, BL, RANK,
                              SY, SX, OUT_W, TERMS>;
    if (NHWC && C != CH) return;  // compiled for another channel count (the launcher never does this)
    const typename Layer::Divisors by(C, HO, WO, tiles_multiplier, tiles_shift, rows_multiplier, rows_shift,
                                      channels_multiplier, channels_shift);
    const long long total = (long long)N * C * HO * by.tiles.divisor;  // a thread per tile
    SURGEON_GRID_STRIDE_LOOP(index, total) {
        const typename Layer::Tile t = Layer::place((unsigned int)index, C, H, W, HO, WO, pad_top, pad_left, by);
        const int c = t.c, n = t.n, oh = t.oh, ow0 = t.ow0;
        const T* wac = wa + (NHWC ? c : c * RANK * AH * AW);
        const T* wbc = wb + (NHWC ? c : c * RANK * BH * BW);
        // output j of this thread: at t.out + j * col_step of a C-channel tensor (given, and y in MODE 0), and of
        // rank r at (n, c * RANK + r, oh, ow0 + j) of the C * RANK-channel factor (y, both factors in MODE 3,
        // below 2^31 elements)
        const int factor_at = NHWC ? ((n * HO + oh) * WO + ow0) * CH * RANK + c * RANK
                                   : ((n * C + c) * RANK * HO + oh) * WO + ow0;
        const int factor_col = NHWC ? CH * RANK : 1;
        const int factor_rank = NHWC ? 1 : HO * WO;
        const int factor_total = N * C * RANK * HO * WO;  // MODE 3: where y[1] starts
        // output j from its branch sums: added to the primary's (MODE 0) or each rank's factor times the gradient
        Layer::each_output(t, x + t.row, H, W, WO, wac, wac, wbc, [&](int j, const auto& s, int k) {
            const int at = t.out + j * t.col_step;
            if (MODE == 0) {
                float value = load_f(given, at);
#pragma unroll
                for (int r = 0; r < RANK; ++r) value += s.a[r][k] * s.b[r][k];
                store_f(y, at, value);
            } else {
                const float g = load_f(given, at);
#pragma unroll
                for (int r = 0; r < RANK; ++r) {
                    const int f = factor_at + j * factor_col + r * factor_rank;
                    store_f(y, f, (MODE == 2 ? s.b[r][k] : s.a[r][k]) * g);
                    if (MODE == 3) store_f(y, factor_total + f, s.b[r][k] * g);
                }
            }
        });
    }
}
