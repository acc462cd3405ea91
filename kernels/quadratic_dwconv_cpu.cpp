// Training kernels of the quadratic depthwise conv for the CPU (fp32).
//
//   y = conv(x, W_c) + b + sum_r conv_a_r(x) * conv_b_r(x)
//
// Work is split by channel plane: each (image, channel) plane of x is copied once into a zero-padded buffer that
// stays in cache, and every branch, product and gradient of that plane is formed from it row by row. So a step
// reads x (or its 8-bit codes) and the output gradient once and writes the input gradient once, where separate
// conv calls would make and re-read several full-size tensors (two branches, two products, three input-gradient
// parts). Channels are spread over torch's intra-op threads; a thread owns a channel's weight gradients, so no
// reduction crosses threads.
//
// The forward adds the quadratic term into the output of the primary conv, which torch computes with exactly the
// original layer's call (so a converted layer with W_a = 0 still matches the original bit for bit).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Per-thread scratch kept across calls: every task of every call reuses its thread's buffers, instead of each
// task allocating and freeing them in whichever OpenMP thread runs it (with freed memory kept for reuse, as
// surgeon's training asks glibc to do, that churn in the worker threads' arenas kept growing the process).
// A slot is one buffer; the buffers used together must take different slots.
constexpr int kSlots = 9;

template <typename T>
class Scratch {
 public:
  Scratch(int slot, size_t n) : data_(buffer(slot, n)), size_(n) {}
  T* data() const { return data_; }
  T* begin() const { return data_; }
  T* end() const { return data_ + size_; }
  T& operator[](size_t i) const { return data_[i]; }

 private:
  static T* buffer(int slot, size_t n) {
    thread_local std::vector<T> buffers[kSlots];
    std::vector<T>& b = buffers[slot];
    if (b.size() < n) b.resize(n);
    return b.data();
  }
  T* data_;
  size_t size_;
};

// A kernel's taps inside the primary window: kh x kw taps at (top + i*dh, left + j*dw).
struct Taps {
  int64_t kh, kw, top, left, dh, dw;
  int64_t count() const { return kh * kw; }
};

Taps taps_from(const std::vector<int64_t>& v) {
  TORCH_CHECK(v.size() == 6, "taps need 6 numbers: kh, kw, top, left, dh, dw");
  return Taps{v[0], v[1], v[2], v[3], v[4], v[5]};
}

// Output plane (Ho x Wo) over an input plane (H x W) padded by pad_top/pad_left; the padded buffer holds the
// rows and columns the windows reach: Hp = (Ho-1)*sh + span_h, Wp = (Wo-1)*sw + span_w.
struct Geometry {
  int64_t H, W, Ho, Wo, sh, sw, pad_top, pad_left, Hp, Wp;
};

Geometry geometry_from(int64_t H, int64_t W, int64_t Ho, int64_t Wo, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& pads, const std::vector<int64_t>& span) {
  TORCH_CHECK(stride.size() == 2 && pads.size() == 2 && span.size() == 2, "stride, pads and span are pairs");
  Geometry g{H, W, Ho, Wo, stride[0], stride[1], pads[0], pads[1], 0, 0};
  g.Hp = (Ho - 1) * g.sh + span[0];
  g.Wp = (Wo - 1) * g.sw + span[1];
  return g;
}

// Where a plane's values come from: fp32 in any strides, or 8-bit codes with one offset/step per channel plane
// (value = code * step + offset, as surgeon.ops.row_quantizer codes an NCHW image).
// row() writes columns [w0, w1) of row h of plane (n, c) to dst[w0 .. w1).
struct FloatSource {
  const float* data;
  int64_t sn, sc, sh, sw;
  void row(int64_t n, int64_t c, int64_t h, float* dst, int64_t w0, int64_t w1) const {
    const float* src = data + n * sn + c * sc + h * sh;
    if (sw == 1) {
      std::copy(src + w0, src + w1, dst + w0);
    } else {
      for (int64_t w = w0; w < w1; ++w) dst[w] = src[w * sw];
    }
  }
  // channels c0 .. c0+V of pixel (n, h, w) to dst[0 .. V) (the channels-last tiles' unit)
  void pixel(int64_t n, int64_t h, int64_t w, int64_t c0, int64_t V, float* dst) const {
    const float* src = data + n * sn + h * sh + w * sw + c0 * sc;
    if (sc == 1) {
      std::copy(src, src + V, dst);
    } else {
      for (int64_t v = 0; v < V; ++v) dst[v] = src[v * sc];
    }
  }
};

struct CodeSource {  // codes of channel planes: ((n*C + c)*H + h)*W + w, one offset/step per (n, c)
  const uint8_t* codes;
  const float* offset;
  const float* step;
  int64_t C, H, W;
  void row(int64_t n, int64_t c, int64_t h, float* dst, int64_t w0, int64_t w1) const {
    const uint8_t* src = codes + ((n * C + c) * H + h) * W;
    const float s = step[n * C + c], o = offset[n * C + c];
    for (int64_t w = w0; w < w1; ++w) dst[w] = static_cast<float>(src[w]) * s + o;
  }
};

// The rows [h0, h1) and columns [w0, w1) of a plane that land inside the padded buffer.
struct Interior {
  int64_t h0, h1, w0, w1;
};

Interior interior(const Geometry& g) {
  return Interior{std::max<int64_t>(0, -g.pad_top), std::min(g.H, g.Hp - g.pad_top),
                  std::max<int64_t>(0, -g.pad_left), std::min(g.W, g.Wp - g.pad_left)};
}

// Copy one plane into the zero-padded buffer.
template <typename Source>
void fill_padded(const Source& src, int64_t n, int64_t c, const Geometry& g, float* xpad) {
  std::fill(xpad, xpad + g.Hp * g.Wp, 0.f);
  const Interior in = interior(g);
  for (int64_t h = in.h0; h < in.h1; ++h)
    src.row(n, c, h, xpad + (h + g.pad_top) * g.Wp + g.pad_left, in.w0, in.w1);
}

// One output row of a branch: out[ow] = sum_t w[t] * xpad[oh*sh + tap row][ow*sw + tap col].
// SW is the column stride when it is known at compile time (1 or 2), 0 otherwise.
template <int SW>
inline void branch_row(const float* xpad, const Geometry& g, const Taps& t, const float* w, int64_t oh,
                       float* out) {
  const int64_t sw = SW > 0 ? SW : g.sw;
  std::fill(out, out + g.Wo, 0.f);
  for (int64_t i = 0; i < t.kh; ++i) {
    const float* row = xpad + (oh * g.sh + t.top + i * t.dh) * g.Wp + t.left;
    for (int64_t j = 0; j < t.kw; ++j) {
      const float wv = w[i * t.kw + j];
      const float* xs = row + j * t.dw;
      for (int64_t ow = 0; ow < g.Wo; ++ow) out[ow] += wv * xs[ow * sw];
    }
  }
}

// The transposed step of a branch (or the primary) for one output row: scatter w[t] * grad_row into the padded
// input-gradient buffer, and, if asked, add each tap's weight gradient: sum over the row of x * grad_row.
template <int SW>
inline void scatter_row(const float* xpad, float* gxpad, const Geometry& g, const Taps& t, const float* w,
                        int64_t oh, const float* grad_row, double* grad_w) {
  const int64_t sw = SW > 0 ? SW : g.sw;
  for (int64_t i = 0; i < t.kh; ++i) {
    const int64_t offset = (oh * g.sh + t.top + i * t.dh) * g.Wp + t.left;
    for (int64_t j = 0; j < t.kw; ++j) {
      const int64_t k = i * t.kw + j;
      if (gxpad != nullptr) {
        const float wv = w[k];
        float* gs = gxpad + offset + j * t.dw;
        for (int64_t ow = 0; ow < g.Wo; ++ow) gs[ow * sw] += wv * grad_row[ow];
      }
      if (grad_w != nullptr) {
        const float* xs = xpad + offset + j * t.dw;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t ow = 0; ow < g.Wo; ++ow) sum += xs[ow * sw] * grad_row[ow];
        grad_w[k] += sum;
      }
    }
  }
}

void check_weights(const at::Tensor& w, int64_t rows, const Taps& t, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), name, " must be contiguous fp32");
  TORCH_CHECK(w.numel() == rows * t.count(), name, " has ", w.numel(), " values, expected ", rows * t.count());
}

template <int SW>
void forward_add_impl(const FloatSource& src, at::Tensor& out, const Geometry& g, int64_t C, int64_t rank,
                      const float* wa, const Taps& ta, const float* wb, const Taps& tb) {
  const int64_t N = out.size(0);
  float* o = out.data_ptr<float>();
  const int64_t on = out.stride(0), oc = out.stride(1), oh_s = out.stride(2), ow_s = out.stride(3);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> xpad(0, g.Hp * g.Wp), a(1, g.Wo), b(2, g.Wo);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        fill_padded(src, n, c, g, xpad.data());
        float* plane = o + n * on + c * oc;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          float* row = plane + oh * oh_s;
          for (int64_t r = 0; r < rank; ++r) {
            branch_row<SW>(xpad.data(), g, ta, wa + (c * rank + r) * ta.count(), oh, a.data());
            branch_row<SW>(xpad.data(), g, tb, wb + (c * rank + r) * tb.count(), oh, b.data());
            for (int64_t ow = 0; ow < g.Wo; ++ow) row[ow * ow_s] += a[ow] * b[ow];
          }
        }
      }
    }
  });
}

template <int SW, typename Source>
void backward_impl(const Source& src, const at::Tensor& grad, at::Tensor* grad_x, float* ga, float* gb, const Geometry& g, int64_t C, int64_t rank, const float* wc, const Taps& tc,
                   const float* wa, const Taps& ta, const float* wb, const Taps& tb) {
  const int64_t N = grad.size(0);
  const float* gy = grad.data_ptr<float>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  float* gx = grad_x != nullptr ? grad_x->data_ptr<float>() : nullptr;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> xpad(0, g.Hp * g.Wp), gxpad(3, gx != nullptr ? g.Hp * g.Wp : 0);
    Scratch<float> grow(4, g.Wo), a(1, g.Wo), b(2, g.Wo), ga_row(5, g.Wo), gb_row(6, g.Wo);
    Scratch<double> acc_a(0, rank * ta.count()), acc_b(1, rank * tb.count());
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc_a.begin(), acc_a.end(), 0.0);
      std::fill(acc_b.begin(), acc_b.end(), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        fill_padded(src, n, c, g, xpad.data());
        float* gxp = gx != nullptr ? gxpad.data() : nullptr;
        if (gxp != nullptr) std::fill(gxpad.begin(), gxpad.end(), 0.f);
        const float* gplane = gy + n * gn + c * gc;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t ow = 0; ow < g.Wo; ++ow) grow[ow] = gplane[oh * gh + ow * gw];
          if (gxp != nullptr) scatter_row<SW>(xpad.data(), gxp, g, tc, wc + c * tc.count(), oh, grow.data(), nullptr);
          for (int64_t r = 0; r < rank; ++r) {
            const float* wa_r = wa + (c * rank + r) * ta.count();
            const float* wb_r = wb + (c * rank + r) * tb.count();
            branch_row<SW>(xpad.data(), g, ta, wa_r, oh, a.data());
            branch_row<SW>(xpad.data(), g, tb, wb_r, oh, b.data());
            for (int64_t ow = 0; ow < g.Wo; ++ow) {
              ga_row[ow] = grow[ow] * b[ow];  // d y / d a = b
              gb_row[ow] = grow[ow] * a[ow];
            }
            scatter_row<SW>(xpad.data(), gxp, g, ta, wa_r, oh, ga_row.data(),
                            ga != nullptr ? acc_a.data() + r * ta.count() : nullptr);
            scatter_row<SW>(xpad.data(), gxp, g, tb, wb_r, oh, gb_row.data(),
                            gb != nullptr ? acc_b.data() + r * tb.count() : nullptr);
          }
        }
        if (gx != nullptr) {  // the plane's input gradient: the padded buffer's interior (zero where no window reaches)
          float* out = gx + n * grad_x->stride(0) + c * grad_x->stride(1);
          const int64_t xh = grad_x->stride(2), xw = grad_x->stride(3);
          const Interior in = interior(g);
          for (int64_t h = 0; h < g.H; ++h) {
            float* row = out + h * xh;
            const bool reached = h >= in.h0 && h < in.h1;
            const float* src = reached ? gxpad.data() + (h + g.pad_top) * g.Wp + g.pad_left : nullptr;
            for (int64_t w = 0; w < g.W; ++w)
              row[w * xw] = reached && w >= in.w0 && w < in.w1 ? src[w] : 0.f;
          }
        }
      }
      if (ga != nullptr)
        for (int64_t k = 0; k < rank * ta.count(); ++k) ga[c * rank * ta.count() + k] = static_cast<float>(acc_a[k]);
      if (gb != nullptr)
        for (int64_t k = 0; k < rank * tb.count(); ++k) gb[c * rank * tb.count() + k] = static_cast<float>(acc_b[k]);
    }
  });
}

template <typename Source>
void dispatch_backward(const Source& src, const at::Tensor& grad, at::Tensor* gx, float* ga, float* gb,
                       const Geometry& g, int64_t C, int64_t rank, const float* wc, const Taps& tc, const float* wa,
                       const Taps& ta, const float* wb, const Taps& tb) {
  if (g.sw == 1)
    backward_impl<1>(src, grad, gx, ga, gb, g, C, rank, wc, tc, wa, ta, wb, tb);
  else if (g.sw == 2)
    backward_impl<2>(src, grad, gx, ga, gb, g, C, rank, wc, tc, wa, ta, wb, tb);
  else
    backward_impl<0>(src, grad, gx, ga, gb, g, C, rank, wc, tc, wa, ta, wb, tb);
}

FloatSource float_source(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4, "x must be a 4-D fp32 tensor");
  return FloatSource{x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// ----------------------------------------------------------------------------------------- channels-last tiles
// In NHWC storage a pixel's channels are contiguous, so the work unit is a tile: one image and a block of up to
// kBlock channels, copied into a zero-padded [Hp][Wp][V] buffer; every tap is then a contiguous V-vector
// multiply-add, which the compiler vectorizes. Weights arrive transposed to [rank][taps][C] (one contiguous
// vector per tap), and branch-weight gradients leave in that layout.

constexpr int64_t kBlock = 64;

struct NhwcCodeSource {  // codes of image rows: ((n*H + h)*W + w)*C + c, one offset/step per (n, h)
  const uint8_t* codes;
  const float* offset;
  const float* step;
  int64_t C, H, W;
  void pixel(int64_t n, int64_t h, int64_t w, int64_t c0, int64_t V, float* dst) const {
    const uint8_t* src = codes + ((n * H + h) * W + w) * C + c0;
    const float s = step[n * H + h], o = offset[n * H + h];
    for (int64_t v = 0; v < V; ++v) dst[v] = static_cast<float>(src[v]) * s + o;
  }
};

template <typename Source>
void fill_tile(const Source& src, int64_t n, int64_t c0, int64_t V, const Geometry& g, float* xpad) {
  std::fill(xpad, xpad + g.Hp * g.Wp * V, 0.f);
  const Interior in = interior(g);
  for (int64_t h = in.h0; h < in.h1; ++h)
    for (int64_t w = in.w0; w < in.w1; ++w)
      src.pixel(n, h, w, c0, V, xpad + ((h + g.pad_top) * g.Wp + w + g.pad_left) * V);
}

// One output pixel of a branch, channels c0 .. c0+V: out[v] = sum_t w[t][c0+v] * xpad[tap pixel][v].
// VT: the vector length when known at compile time (a full block), 0 otherwise.
template <int VT>
inline void branch_pixel_v(const float* xpad, const Geometry& g, const Taps& t, const float* w, int64_t C,
                           int64_t c0, int64_t V_, int64_t oh, int64_t ow, float* out) {
  const int64_t V = VT > 0 ? VT : V_;
  std::fill(out, out + V, 0.f);
  for (int64_t i = 0; i < t.kh; ++i)
    for (int64_t j = 0; j < t.kw; ++j) {
      const float* wv = w + (i * t.kw + j) * C + c0;
      const float* xs = xpad + ((oh * g.sh + t.top + i * t.dh) * g.Wp + ow * g.sw + t.left + j * t.dw) * V;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] += wv[v] * xs[v];
    }
}

// The transposed step at one output pixel: gxpad[tap pixel][v] += w[t][c0+v] * grad[v], and, if asked, each
// tap's weight-gradient partial sums: acc[t][v] += xpad[tap pixel][v] * grad[v].
template <int VT>
inline void scatter_pixel_v(const float* xpad, float* gxpad, const Geometry& g, const Taps& t, const float* w,
                            int64_t C, int64_t c0, int64_t V_, int64_t oh, int64_t ow, const float* grad,
                            float* acc) {
  const int64_t V = VT > 0 ? VT : V_;
  for (int64_t i = 0; i < t.kh; ++i)
    for (int64_t j = 0; j < t.kw; ++j) {
      const int64_t k = i * t.kw + j;
      const int64_t at = ((oh * g.sh + t.top + i * t.dh) * g.Wp + ow * g.sw + t.left + j * t.dw) * V;
      if (gxpad != nullptr) {
        const float* wv = w + k * C + c0;
        float* gs = gxpad + at;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) gs[v] += wv[v] * grad[v];
      }
      if (acc != nullptr) {
        const float* xs = xpad + at;
        float* as = acc + k * V;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) as[v] += xs[v] * grad[v];
      }
    }
}

inline void branch_pixel(const float* xpad, const Geometry& g, const Taps& t, const float* w, int64_t C,
                         int64_t c0, int64_t V, int64_t oh, int64_t ow, float* out) {
  if (V == kBlock)
    branch_pixel_v<kBlock>(xpad, g, t, w, C, c0, V, oh, ow, out);
  else
    branch_pixel_v<0>(xpad, g, t, w, C, c0, V, oh, ow, out);
}

inline void scatter_pixel(const float* xpad, float* gxpad, const Geometry& g, const Taps& t, const float* w,
                          int64_t C, int64_t c0, int64_t V, int64_t oh, int64_t ow, const float* grad, float* acc) {
  if (V == kBlock)
    scatter_pixel_v<kBlock>(xpad, gxpad, g, t, w, C, c0, V, oh, ow, grad, acc);
  else
    scatter_pixel_v<0>(xpad, gxpad, g, t, w, C, c0, V, oh, ow, grad, acc);
}

int64_t channel_blocks(int64_t C) { return (C + kBlock - 1) / kBlock; }

void nhwc_forward_add(const FloatSource& src, at::Tensor& out, const Geometry& g, int64_t C, int64_t rank,
                      const float* wa, const Taps& ta, const float* wb, const Taps& tb) {
  const int64_t N = out.size(0), blocks = channel_blocks(C);
  float* o = out.data_ptr<float>();
  const int64_t on = out.stride(0), oc = out.stride(1), ohs = out.stride(2), ows = out.stride(3);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> xpad(0, g.Hp * g.Wp * kBlock), a(1, kBlock), b(2, kBlock), sum(3, kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kBlock, V = std::min(kBlock, C - c0);
      fill_tile(src, n, c0, V, g, xpad.data());
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          std::fill(sum.begin(), sum.begin() + V, 0.f);
          for (int64_t r = 0; r < rank; ++r) {
            branch_pixel(xpad.data(), g, ta, wa + r * ta.count() * C, C, c0, V, oh, ow, a.data());
            branch_pixel(xpad.data(), g, tb, wb + r * tb.count() * C, C, c0, V, oh, ow, b.data());
#pragma omp simd
            for (int64_t v = 0; v < V; ++v) sum[v] += a[v] * b[v];
          }
          float* px = o + n * on + oh * ohs + ow * ows + c0 * oc;
          for (int64_t v = 0; v < V; ++v) px[v * oc] += sum[v];
        }
    }
  });
}

template <typename Source>
void nhwc_backward(const Source& src, const at::Tensor& grad, at::Tensor* grad_x, float* grad_a, float* grad_b,
                   const Geometry& g, int64_t C, int64_t rank, const float* wc, const Taps& tc, const float* wa,
                   const Taps& ta, const float* wb, const Taps& tb) {
  const int64_t N = grad.size(0), blocks = channel_blocks(C);
  const float* gy = grad.data_ptr<float>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  float* gx = grad_x != nullptr ? grad_x->data_ptr<float>() : nullptr;
  const int64_t size_a = rank * ta.count() * C, size_b = rank * tb.count() * C;
  // weight gradients: per-thread sums in double, reduced after the parallel loop
  const int64_t threads = at::get_num_threads();
  std::vector<double> sums_a(grad_a != nullptr ? threads * size_a : 0), sums_b(grad_b != nullptr ? threads * size_b : 0);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    Scratch<float> xpad(0, g.Hp * g.Wp * kBlock), gxpad(3, gx != nullptr ? g.Hp * g.Wp * kBlock : 0);
    Scratch<float> gv(4, kBlock), a(1, kBlock), b(2, kBlock), ga(5, kBlock), gb(6, kBlock);
    Scratch<float> acc_a(7, rank * ta.count() * kBlock), acc_b(8, rank * tb.count() * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kBlock, V = std::min(kBlock, C - c0);
      fill_tile(src, n, c0, V, g, xpad.data());
      float* gxp = gx != nullptr ? gxpad.data() : nullptr;
      if (gxp != nullptr) std::fill(gxpad.begin(), gxpad.begin() + g.Hp * g.Wp * V, 0.f);
      std::fill(acc_a.begin(), acc_a.end(), 0.f);
      std::fill(acc_b.begin(), acc_b.end(), 0.f);
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const float* gp = gy + n * gn + oh * gh + ow * gw + c0 * gc;
          for (int64_t v = 0; v < V; ++v) gv[v] = gp[v * gc];
          if (gxp != nullptr) scatter_pixel(xpad.data(), gxp, g, tc, wc, C, c0, V, oh, ow, gv.data(), nullptr);
          for (int64_t r = 0; r < rank; ++r) {
            const float* wa_r = wa + r * ta.count() * C;
            const float* wb_r = wb + r * tb.count() * C;
            branch_pixel(xpad.data(), g, ta, wa_r, C, c0, V, oh, ow, a.data());
            branch_pixel(xpad.data(), g, tb, wb_r, C, c0, V, oh, ow, b.data());
#pragma omp simd
            for (int64_t v = 0; v < V; ++v) {
              ga[v] = gv[v] * b[v];  // d y / d a = b
              gb[v] = gv[v] * a[v];
            }
            scatter_pixel(xpad.data(), gxp, g, ta, wa_r, C, c0, V, oh, ow, ga.data(),
                          grad_a != nullptr ? acc_a.data() + r * ta.count() * V : nullptr);
            scatter_pixel(xpad.data(), gxp, g, tb, wb_r, C, c0, V, oh, ow, gb.data(),
                          grad_b != nullptr ? acc_b.data() + r * tb.count() * V : nullptr);
          }
        }
      if (gx != nullptr) {
        const Interior in = interior(g);
        const int64_t xn = grad_x->stride(0), xc = grad_x->stride(1), xh = grad_x->stride(2), xw = grad_x->stride(3);
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) {
            float* px = gx + n * xn + h * xh + w * xw + c0 * xc;
            const bool inside = h >= in.h0 && h < in.h1 && w >= in.w0 && w < in.w1;
            const float* from = inside ? gxpad.data() + ((h + g.pad_top) * g.Wp + w + g.pad_left) * V : nullptr;
            for (int64_t v = 0; v < V; ++v) px[v * xc] = inside ? from[v] : 0.f;
          }
      }
      // the tile's partial sums, [rank][taps][V], into this thread's [rank][taps][C] sums
      for (int64_t k = 0; grad_a != nullptr && k < rank * ta.count(); ++k)
        for (int64_t v = 0; v < V; ++v) sums_a[thread * size_a + k * C + c0 + v] += acc_a[k * V + v];
      for (int64_t k = 0; grad_b != nullptr && k < rank * tb.count(); ++k)
        for (int64_t v = 0; v < V; ++v) sums_b[thread * size_b + k * C + c0 + v] += acc_b[k * V + v];
    }
  });
  for (int64_t i = 0; grad_a != nullptr && i < size_a; ++i) {
    double total = 0.0;
    for (int64_t t = 0; t < threads; ++t) total += sums_a[t * size_a + i];
    grad_a[i] = static_cast<float>(total);
  }
  for (int64_t i = 0; grad_b != nullptr && i < size_b; ++i) {
    double total = 0.0;
    for (int64_t t = 0; t < threads; ++t) total += sums_b[t * size_b + i];
    grad_b[i] = static_cast<float>(total);
  }
}

// What both backward entries check and hand to their kernels.
struct BackwardCall {
  Geometry g;
  int64_t C;
  Taps tc, ta, tb;
  const float *wc, *wa, *wb;
  at::Tensor* gx;
  float *ga, *gb;
};

float* weight_grad(c10::optional<at::Tensor>& grad, const at::Tensor& weight, const char* name) {
  if (!grad.has_value() || !grad->defined()) return nullptr;
  TORCH_CHECK(grad->scalar_type() == at::kFloat && grad->is_contiguous() && grad->numel() == weight.numel(), name,
              " must be contiguous fp32 with the weight's size");
  return grad->data_ptr<float>();
}

BackwardCall backward_call(const at::Tensor& grad, const std::vector<int64_t>& x_shape, const at::Tensor& weight,
                           const at::Tensor& weight_a, const at::Tensor& weight_b, c10::optional<at::Tensor>& grad_x,
                           c10::optional<at::Tensor>& grad_a, c10::optional<at::Tensor>& grad_b, int64_t rank,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& pads,
                           const std::vector<int64_t>& span, const std::vector<int64_t>& taps_primary,
                           const std::vector<int64_t>& taps_a, const std::vector<int64_t>& taps_b) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 4, "grad must be a 4-D fp32 tensor");
  TORCH_CHECK(x_shape.size() == 4, "x_shape is [N, C, H, W]");
  BackwardCall b{};
  b.C = x_shape[1];
  b.tc = taps_from(taps_primary);
  b.ta = taps_from(taps_a);
  b.tb = taps_from(taps_b);
  check_weights(weight, b.C, b.tc, "weight");
  check_weights(weight_a, b.C * rank, b.ta, "weight_a");
  check_weights(weight_b, b.C * rank, b.tb, "weight_b");
  b.g = geometry_from(x_shape[2], x_shape[3], grad.size(2), grad.size(3), stride, pads, span);
  b.wc = weight.data_ptr<float>();
  b.wa = weight_a.data_ptr<float>();
  b.wb = weight_b.data_ptr<float>();
  b.gx = grad_x.has_value() && grad_x->defined() ? &grad_x.value() : nullptr;
  TORCH_CHECK(b.gx == nullptr || (b.gx->scalar_type() == at::kFloat && b.gx->dim() == 4), "grad_x must be 4-D fp32");
  b.ga = weight_grad(grad_a, weight_a, "grad_a");
  b.gb = weight_grad(grad_b, weight_b, "grad_b");
  return b;
}

void check_codes(const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& offset,
                 const c10::optional<at::Tensor>& step, const std::vector<int64_t>& x_shape) {
  TORCH_CHECK(codes.has_value() && offset.has_value() && step.has_value(), "x must be given as fp32 or as codes");
  TORCH_CHECK(codes->scalar_type() == at::kByte && codes->is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(offset->scalar_type() == at::kFloat && step->scalar_type() == at::kFloat && offset->is_contiguous() &&
              step->is_contiguous(), "offset/step must be contiguous fp32");
  TORCH_CHECK(codes->numel() >= x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3], "codes hold fewer values than x");
}

}  // namespace

// out += sum_r conv_a_r(x) * conv_b_r(x), in place. out: [N, C, Ho, Wo] fp32 (any strides). channels_last picks
// the channel-vector tiles, whose weights come transposed to [rank][taps][C]; otherwise the channel planes, with
// weights as stored ([C*rank][taps]).
void quadratic_forward_add(const at::Tensor& x, at::Tensor out, const at::Tensor& weight_a,
                           const at::Tensor& weight_b, int64_t rank, std::vector<int64_t> stride,
                           std::vector<int64_t> pads, std::vector<int64_t> span, std::vector<int64_t> taps_a,
                           std::vector<int64_t> taps_b, bool channels_last) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 4, "out must be a 4-D fp32 tensor");
  const FloatSource src = float_source(x);
  const int64_t C = x.size(1);
  const Taps ta = taps_from(taps_a), tb = taps_from(taps_b);
  check_weights(weight_a, C * rank, ta, "weight_a");
  check_weights(weight_b, C * rank, tb, "weight_b");
  const Geometry g = geometry_from(x.size(2), x.size(3), out.size(2), out.size(3), stride, pads, span);
  const float* wa = weight_a.data_ptr<float>();
  const float* wb = weight_b.data_ptr<float>();
  if (channels_last)
    nhwc_forward_add(src, out, g, C, rank, wa, ta, wb, tb);
  else if (g.sw == 1)
    forward_add_impl<1>(src, out, g, C, rank, wa, ta, wb, tb);
  else if (g.sw == 2)
    forward_add_impl<2>(src, out, g, C, rank, wa, ta, wb, tb);
  else
    forward_add_impl<0>(src, out, g, C, rank, wa, ta, wb, tb);
}

// Gradients of y w.r.t. x (written whole, primary part included) and w.r.t. W_a / W_b, from x given as fp32
// (x_float) or as 8-bit codes with one offset/step per quantization row: a channel plane (NCHW), or an image row
// (channels_last). Weights and branch-weight gradients in the layout quadratic_forward_add takes. An undefined
// output tensor means "not needed".
void quadratic_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& x_float,
                        const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& offset,
                        const c10::optional<at::Tensor>& step, std::vector<int64_t> x_shape,
                        const at::Tensor& weight, const at::Tensor& weight_a, const at::Tensor& weight_b,
                        c10::optional<at::Tensor> grad_x, c10::optional<at::Tensor> grad_a,
                        c10::optional<at::Tensor> grad_b, int64_t rank, std::vector<int64_t> stride,
                        std::vector<int64_t> pads, std::vector<int64_t> span, std::vector<int64_t> taps_primary,
                        std::vector<int64_t> taps_a, std::vector<int64_t> taps_b, bool channels_last) {
  BackwardCall b = backward_call(grad, x_shape, weight, weight_a, weight_b, grad_x, grad_a, grad_b, rank, stride,
                                 pads, span, taps_primary, taps_a, taps_b);
  const bool float_input = x_float.has_value() && x_float->defined();
  if (!float_input) check_codes(codes, offset, step, x_shape);
  const int64_t H = x_shape[2], W = x_shape[3];
  if (channels_last && float_input) {
    nhwc_backward(float_source(*x_float), grad, b.gx, b.ga, b.gb, b.g, b.C, rank, b.wc,
                  b.tc, b.wa, b.ta, b.wb, b.tb);
  } else if (channels_last) {
    const NhwcCodeSource src{codes->data_ptr<uint8_t>(), offset->data_ptr<float>(), step->data_ptr<float>(), b.C,
                             H, W};
    nhwc_backward(src, grad, b.gx, b.ga, b.gb, b.g, b.C, rank, b.wc, b.tc, b.wa, b.ta, b.wb, b.tb);
  } else if (float_input) {
    dispatch_backward(float_source(*x_float), grad, b.gx, b.ga, b.gb, b.g, b.C, rank, b.wc, b.tc, b.wa, b.ta,
                      b.wb, b.tb);
  } else {
    const CodeSource src{codes->data_ptr<uint8_t>(), offset->data_ptr<float>(), step->data_ptr<float>(), b.C, H, W};
    dispatch_backward(src, grad, b.gx, b.ga, b.gb, b.g, b.C, rank, b.wc, b.tc, b.wa, b.ta, b.wb, b.tb);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quadratic_forward_add", &quadratic_forward_add, "out += sum_r conv_a_r(x) * conv_b_r(x) (fp32, CPU)");
  m.def("quadratic_backward", &quadratic_backward, "input and branch-weight gradients (fp32, CPU)");
}
