// The forward of a thin NHWC x HWIO convolution, as an XLA:CPU FFI custom
// call; with a flipped, transposed kernel it is also a stride-1 convolution's
// input gradient (fpdm_jax/models/native_conv.py and models/convolution.py
// say when each is used, and why).
//
//   y[b][oy][ox][o] = sum_{i, j, c} x[b][sh*oy + i - pt][sw*ox + j - pl][c] * W[i][j][c][o]
//
// The direct convolution oneDNN runs for few channels: per output row, a
// block of P neighbouring output pixels x up to 64 output channels
// accumulates in vector registers over every tap and input channel (one
// kernel vector load serves P pixels), so nothing is materialised and the
// row's input stays in L1. Pixels whose taps reach over the left or right
// edge take a one-pixel path with bounds checks; taps above or below the
// image are skipped. Output rows are independent, so rows are split into
// chunks run on XLA's intra-op pool with no reduction: the bits do not
// depend on the thread count.
#include <algorithm>
#include <cstdint>

#include "thin_conv.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

struct Problem {  // x [batch, height, width, cin], W [kh, kw, cin, cout], y [batch, out_h, out_w, cout]
  const float* x;
  const float* w;
  float* y;
  int64_t height, width, cin;
  int64_t out_h, out_w, cout;
  int64_t kh, kw, sh, sw, pt, pl;
};

// An OB-channel block of y for P consecutive output pixels from ox0 in row
// (b, oy), all of whose taps lie inside the image along x (the caller
// checks), over kernel rows i0 .. i1 - 1 (those inside the image).
template <typename V, int P, int NV>
void Block(const Problem& q, const float* x_img, int64_t oy, int64_t ox0, int64_t ob, int64_t i0,
           int64_t i1, float* y_row) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V a[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) a[p][v] = V{};
  const int64_t xstep = q.sw * q.cin;
  for (int64_t i = i0; i < i1; ++i) {
    const float* x_row = x_img + (q.sh * oy + i - q.pt) * q.width * q.cin;
    for (int64_t j = 0; j < q.kw; ++j) {
      const float* xs = x_row + (q.sw * ox0 + j - q.pl) * q.cin;
      const float* ws = q.w + ((i * q.kw + j) * q.cin) * q.cout + ob;
      for (int64_t c = 0; c < q.cin; ++c) {
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = Load<V>(ws + c * q.cout + v * kLanes);
        for (int p = 0; p < P; ++p) {
          const float xv = xs[p * xstep + c];
          for (int v = 0; v < NV; ++v) a[p][v] += xv * wv[v];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) Store(y_row + (ox0 + p) * q.cout + ob + v * kLanes, a[p][v]);
}

// One output pixel, with bounds checks on the input column.
template <typename V, int NV>
void EdgePixel(const Problem& q, const float* x_img, int64_t oy, int64_t ox, int64_t ob,
               int64_t i0, int64_t i1, float* y_row) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V a[NV];
  for (int v = 0; v < NV; ++v) a[v] = V{};
  for (int64_t i = i0; i < i1; ++i) {
    const float* x_row = x_img + (q.sh * oy + i - q.pt) * q.width * q.cin;
    for (int64_t j = 0; j < q.kw; ++j) {
      const int64_t xx = q.sw * ox + j - q.pl;
      if (xx < 0 || xx >= q.width) continue;
      const float* xs = x_row + xx * q.cin;
      const float* ws = q.w + ((i * q.kw + j) * q.cin) * q.cout + ob;
      for (int64_t c = 0; c < q.cin; ++c) {
        const float xv = xs[c];
        for (int v = 0; v < NV; ++v) a[v] += xv * Load<V>(ws + c * q.cout + v * kLanes);
      }
    }
  }
  for (int v = 0; v < NV; ++v) Store(y_row + ox * q.cout + ob + v * kLanes, a[v]);
}

// Pixels per block: as many P x NV accumulators as fit in the registers
// left after NV kernel vectors and one broadcast input value.
template <typename V, int NV>
constexpr int kPixels = std::min(16, (kRegisters - 1 - NV) / NV);

// Row chunks handed out to threads; more than conv_kernel_gradient.cc's, as
// a chunk here needs no partial sum.
constexpr int64_t kMaxChunks = 64;

template <typename V, int NV>
void Row(const Problem& q, int64_t r) {
  constexpr int P = kPixels<V, NV>;
  constexpr int OB = NV * static_cast<int>(sizeof(V) / sizeof(float));
  const int64_t b = r / q.out_h, oy = r % q.out_h;
  const float* x_img = q.x + b * q.height * q.width * q.cin;
  float* y_row = q.y + r * q.out_w * q.cout;
  int64_t i0 = 0, i1 = q.kh;
  while (i0 < i1 && q.sh * oy + i0 - q.pt < 0) ++i0;
  while (i1 > i0 && q.sh * oy + i1 - 1 - q.pt >= q.height) --i1;
  // [x0, x1): output columns none of whose taps leaves the image.
  int64_t x0 = 0, x1 = q.out_w;
  while (x0 < x1 && q.sw * x0 - q.pl < 0) ++x0;
  while (x1 > x0 && q.sw * (x1 - 1) + q.kw - 1 - q.pl >= q.width) --x1;
  for (int64_t ob = 0; ob < q.cout; ob += OB) {
    for (int64_t ox = 0; ox < x0; ++ox) EdgePixel<V, NV>(q, x_img, oy, ox, ob, i0, i1, y_row);
    int64_t ox = x0;
    for (; ox + P <= x1; ox += P) Block<V, P, NV>(q, x_img, oy, ox, ob, i0, i1, y_row);
    for (; ox < x1; ++ox) Block<V, 1, NV>(q, x_img, oy, ox, ob, i0, i1, y_row);
    for (ox = std::max(x1, x0); ox < q.out_w; ++ox)
      EdgePixel<V, NV>(q, x_img, oy, ox, ob, i0, i1, y_row);
  }
}

using RowFn = void (*)(const Problem&, int64_t);

RowFn PickRow(int64_t cout) {
#if defined(__AVX512F__)
  if (cout % 64 == 0) return Row<V16, 4>;
  if (cout % 32 == 0) return Row<V16, 2>;
  if (cout % 16 == 0) return Row<V16, 1>;
#else
  if (cout % 32 == 0) return Row<V8, 4>;
  if (cout % 16 == 0) return Row<V8, 2>;
#endif
  if (cout % 8 == 0) return Row<V8, 1>;
  return nullptr;
}

ffi::Error Forward(ffi::ThreadPool pool, Image x, Image w, ffi::Result<Image> y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd[0] != yd[0] || wd[2] != xd[3] || wd[3] != yd[3] || stride_h < 1 || stride_w < 1)
    return ffi::Error::InvalidArgument("fpdm_conv_forward: inconsistent shapes");
  const Problem p{x.typed_data(), w.typed_data(), y->typed_data(), xd[1], xd[2], xd[3],
                  yd[1], yd[2], yd[3], wd[0], wd[1], stride_h, stride_w, pad_top, pad_left};
  const RowFn row = PickRow(yd[3]);
  if (row == nullptr)
    return ffi::Error::InvalidArgument("fpdm_conv_forward: output channels % 8 != 0");
  const int64_t rows = xd[0] * yd[1];
  const int64_t count = std::max<int64_t>(1, std::min(rows, kMaxChunks));
  RunChunks(pool, count, rows * yd[2] * yd[3] * wd[0] * wd[1] * wd[2], [&](int64_t c) {
    for (int64_t r = rows * c / count; r < rows * (c + 1) / count; ++r) row(p, r);
  });
  return ffi::Error::Success();
}

}  // namespace

// The one exported symbol (the rest is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmConvForward(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmConvForward, Forward, ConvBinding());
