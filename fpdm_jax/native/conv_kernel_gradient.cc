// The kernel gradient of a thin NHWC x HWIO convolution, as an XLA:CPU FFI
// custom call (fpdm_jax/models/native_conv.py and models/convolution.py say
// when it is used, and why).
//
//   dW[i][j][c][o] = sum_{b, y, x} x[b][sh*y + i - pt][sw*x + j - pl][c] * dy[b][y][x][o]
//
// XLA computes this as a convolution that contracts over batch and pixels,
// with a huge contraction and an 8..64-wide result on each side, which its
// CPU kernels run 2-3x slower than oneDNN (benchmarks/README.md, finding 20).
// This is the loop nest oneDNN uses instead:
//
// - One output row at a time, so the input rows and the output-gradient row
//   it reads (a few KiB each) stay in L1 across the kh * kw taps.
// - Per tap, a CB x OB block of dW accumulates in registers over the row; CB
//   and OB are template parameters so the compiler unrolls and vectorises the
//   inner loops for whatever ISA this file is built for (setup.py).
// - Rows are split into a fixed number of chunks, each with its own
//   accumulator, summed in chunk order at the end: the result does not depend
//   on the thread count or on which thread ran which chunk, so training stays
//   bit-for-bit reproducible. Chunks run on XLA's own intra-op thread pool;
//   the calling thread takes chunks too and never waits for a task that has
//   not started, so a busy pool cannot deadlock it.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "accumulate.h"
#include "thin_conv.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

// At most this many row chunks (and partial sums): enough to keep 16 threads
// busy, few enough that summing the partial kernels costs little.
constexpr int64_t kMaxChunks = 16;
// And at most this many floats of partial kernels (4 MiB), for wide kernels:
// at batch 1, 64x64, 96 -> 256 stride 2 (0.9 MB a kernel), 16 partials took
// 12.8 ms of the medium UNet's step in a trace (python -m
// benchmarks.profile_step), against 1.8 ms for the same call alone: 14 MB
// allocated, faulted in and summed on one thread per call.
constexpr int64_t kMaxPartialFloats = int64_t{1} << 20;

struct Problem {
  const float* x;
  const float* dy;
  int64_t height, width, cin;  // x is [batch, height, width, cin]
  int64_t out_h, out_w, cout;  // dy is [batch, out_h, out_w, cout]
  int64_t kh, kw, sh, sw, pt, pl;
  AccumulateBlocking blocking;
};

// Adds rows [r0, r1) of the batch's output rows into acc ([kh, kw, cin, cout]).
void AccumulateRows(const Problem& p, int64_t r0, int64_t r1, float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.out_h, y = r % p.out_h;
    const float* dy_row = p.dy + r * p.out_w * p.cout;
    for (int64_t i = 0; i < p.kh; ++i) {
      const int64_t yy = p.sh * y + i - p.pt;
      if (yy < 0 || yy >= p.height) continue;  // a zero-padding row
      const float* x_row = p.x + (b * p.height + yy) * p.width * p.cin;
      for (int64_t j = 0; j < p.kw; ++j) {
        // Output columns whose input column lies inside the image.
        int64_t x0 = 0, x1 = p.out_w;
        while (x0 < x1 && p.sw * x0 + j - p.pl < 0) ++x0;
        while (x1 > x0 && p.sw * (x1 - 1) + j - p.pl >= p.width) --x1;
        if (x0 == x1) continue;
        const float* xs = x_row + (p.sw * x0 + j - p.pl) * p.cin;
        const float* d = dy_row + x0 * p.cout;
        float* tap = acc + (i * p.kw + j) * p.cin * p.cout;
        p.blocking.Run(xs, p.sw * p.cin, d, p.cin, p.cout, x1 - x0, tap);
      }
    }
  }
}

ffi::Error KernelGradient(ffi::ThreadPool pool, Image x, Image dy, ffi::Result<Image> dw,
                          int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd[0] != dd[0] || wd[2] != xd[3] || wd[3] != dd[3] || stride_h < 1 || stride_w < 1)
    return ffi::Error::InvalidArgument("fpdm_conv_kernel_gradient: inconsistent shapes");
  const Problem p{x.typed_data(), dy.typed_data(), xd[1],    xd[2],    xd[3],
                  dd[1],         dd[2],          dd[3],    wd[0],    wd[1],
                  stride_h,      stride_w,       pad_top,  pad_left, PickAccumulateBlocking(dd[3])};
  if (p.blocking.blocks == nullptr)
    return ffi::Error::InvalidArgument("fpdm_conv_kernel_gradient: output channels % 8 != 0");
  const int64_t size = p.kh * p.kw * p.cin * p.cout;  // floats of one partial kernel
  const int64_t rows = xd[0] * p.out_h;
  const int64_t count =
      std::max<int64_t>(1, std::min({rows, kMaxChunks, kMaxPartialFloats / size}));
  // Kept by the calling thread from call to call, so its pages are faulted in
  // once; each chunk zeroes its own part. (The chunks run on other threads
  // too: they get the pointer, not the thread_local.)
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(count * size)) buffer.resize(count * size);
  float* const partial = buffer.data();
  RunChunks(pool, count, rows * p.out_w * size, [&p, partial, size, rows, count](int64_t c) {
    float* acc = partial + c * size;
    std::fill(acc, acc + size, 0.f);
    AccumulateRows(p, rows * c / count, rows * (c + 1) / count, acc);
  });
  float* out = dw->typed_data();
  std::copy(partial, partial + size, out);
  for (int64_t c = 1; c < count; ++c) {
    const float* s = partial + c * size;
    for (int64_t k = 0; k < size; ++k) out[k] += s[k];
  }
  return ffi::Error::Success();
}

}  // namespace

// The one exported symbol (the rest is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmConvKernelGradient(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmConvKernelGradient, KernelGradient, ConvBinding());
