// LayerNorm over the last axis, forward and backward, as XLA:CPU FFI custom
// calls (fpdm_jax/models/normalization.py says when they are used, and why).
//
//   forward:  x [R, C], scale [C], bias [C] -> y [R, C], mean [R], rstd [R]
//   backward: dy [R, C], x [R, C], mean [R], rstd [R], scale [C]
//             -> dx [R, C], d_scale [C], d_bias [C]
//
// Per row, in the order of operations of normalization._layer_norm_fwd/_bwd
// (two-pass float32 statistics, as torch's nn.LayerNorm):
//
//   mean = sum(x) / C, var = sum((x - mean)^2) / C, rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) rstd,  y = xhat scale + bias
//   g = dy scale,  dx = rstd (g - sum(g) / C - xhat sum(g xhat) / C)
//   d_scale = sum over rows of dy xhat,  d_bias = sum over rows of dy
//
// A chunk is a fixed run of rows (RowsPerChunk: it depends on C only), so
// the backward's per-chunk partial sums of d_scale and d_bias, added in
// chunk order at the end, give the same bits whichever thread ran a chunk.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

using Rows = ffi::Buffer<ffi::F32, 2>;    // [R, C]
using Vector = ffi::Buffer<ffi::F32, 1>;  // [C] or [R]

// About 16 K floats of x per chunk (a few microseconds of work).
int64_t RowsPerChunk(int64_t c) { return std::max<int64_t>(1, (int64_t{1} << 14) / c); }

inline float Lanes(V8 v) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

ffi::Error Forward(ffi::ThreadPool pool, Rows x, Vector scale, Vector bias, ffi::Result<Rows> y,
                   ffi::Result<Vector> mean, ffi::Result<Vector> rstd, float eps) {
  const auto xd = x.dimensions();
  const int64_t r = xd[0], c = xd[1];
  if (scale.dimensions()[0] != c || bias.dimensions()[0] != c || y->dimensions()[0] != r ||
      y->dimensions()[1] != c || mean->dimensions()[0] != r || rstd->dimensions()[0] != r)
    return ffi::Error::InvalidArgument("fpdm_layer_norm_forward: inconsistent shapes");
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  const int64_t per = RowsPerChunk(c), chunks = (r + per - 1) / per;
  const int64_t vectors = c / 8 * 8;  // the rest of a row is the scalar tail
  RunChunks(pool, chunks, r * c * 4, [&](int64_t chunk) {
    for (int64_t row = chunk * per, end = std::min(r, row + per); row < end; ++row) {
      const float* __restrict xr = xp + row * c;
      float* __restrict yr = yp + row * c;
      V8 sum{};
      for (int64_t i = 0; i < vectors; i += 8) sum += Load<V8>(xr + i);
      float total = Lanes(sum);
      for (int64_t i = vectors; i < c; ++i) total += xr[i];
      const float m = total / static_cast<float>(c);
      V8 squares{};
      for (int64_t i = 0; i < vectors; i += 8) {
        const V8 d = Load<V8>(xr + i) - m;
        squares += d * d;
      }
      float var = Lanes(squares);
      for (int64_t i = vectors; i < c; ++i) var += (xr[i] - m) * (xr[i] - m);
      const float s = 1.0f / std::sqrt(var / static_cast<float>(c) + eps);
      mp[row] = m;
      rp[row] = s;
      for (int64_t i = 0; i < c; ++i) yr[i] = ((xr[i] - m) * s) * sp[i] + bp[i];
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Rows dy, Rows x, Vector mean, Vector rstd,
                    Vector scale, ffi::Result<Rows> dx, ffi::Result<Vector> d_scale,
                    ffi::Result<Vector> d_bias) {
  const auto xd = x.dimensions();
  const int64_t r = xd[0], c = xd[1];
  if (dy.dimensions()[0] != r || dy.dimensions()[1] != c || mean.dimensions()[0] != r ||
      rstd.dimensions()[0] != r || scale.dimensions()[0] != c || dx->dimensions()[0] != r ||
      dx->dimensions()[1] != c || d_scale->dimensions()[0] != c || d_bias->dimensions()[0] != c)
    return ffi::Error::InvalidArgument("fpdm_layer_norm_backward: inconsistent shapes");
  const float *dyp = dy.typed_data(), *xp = x.typed_data(), *mp = mean.typed_data(),
              *rp = rstd.typed_data(), *sp = scale.typed_data();
  float* dxp = dx->typed_data();
  const int64_t per = RowsPerChunk(c), chunks = (r + per - 1) / per;
  // partial[chunk] = (d_scale, d_bias) over that chunk's rows.
  std::vector<float> partial(chunks * 2 * c);
  const int64_t vectors = c / 8 * 8;  // the rest of a row is the scalar tail
  RunChunks(pool, chunks, r * c * 8, [&](int64_t chunk) {
    float* __restrict ps = partial.data() + chunk * 2 * c;
    float* __restrict pb = ps + c;
    std::fill(ps, ps + 2 * c, 0.0f);
    for (int64_t row = chunk * per, end = std::min(r, row + per); row < end; ++row) {
      const float* __restrict dyr = dyp + row * c;
      const float* __restrict xr = xp + row * c;
      float* __restrict dxr = dxp + row * c;
      const float m = mp[row], s = rp[row];
      // One pass for the row's two sums and the chunk's d_scale, d_bias...
      V8 sum_g{}, sum_gx{};
      for (int64_t i = 0; i < vectors; i += 8) {
        const V8 dyv = Load<V8>(dyr + i), xh = (Load<V8>(xr + i) - m) * s;
        const V8 g = dyv * Load<V8>(sp + i);
        sum_g += g;
        sum_gx += g * xh;
        Store(ps + i, Load<V8>(ps + i) + dyv * xh);
        Store(pb + i, Load<V8>(pb + i) + dyv);
      }
      float sg = Lanes(sum_g), sgx = Lanes(sum_gx);
      for (int64_t i = vectors; i < c; ++i) {
        const float xh = (xr[i] - m) * s, g = dyr[i] * sp[i];
        sg += g;
        sgx += g * xh;
        ps[i] += dyr[i] * xh;
        pb[i] += dyr[i];
      }
      const float a = sg / static_cast<float>(c), b = sgx / static_cast<float>(c);
      // ...and one for dx, recomputing xhat and g (cheaper than storing them).
      for (int64_t i = 0; i < vectors; i += 8) {
        const V8 xh = (Load<V8>(xr + i) - m) * s, g = Load<V8>(dyr + i) * Load<V8>(sp + i);
        Store(dxr + i, s * ((g - a) - xh * b));
      }
      for (int64_t i = vectors; i < c; ++i) {
        const float xh = (xr[i] - m) * s, g = dyr[i] * sp[i];
        dxr[i] = s * ((g - a) - xh * b);
      }
    }
  });
  float *dsp = d_scale->typed_data(), *dbp = d_bias->typed_data();
  std::copy(partial.begin(), partial.begin() + c, dsp);
  std::copy(partial.begin() + c, partial.begin() + 2 * c, dbp);
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* ps = partial.data() + chunk * 2 * c;
    for (int64_t i = 0; i < c; ++i) {
      dsp[i] += ps[i];
      dbp[i] += ps[c + i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// The exported symbols (the rest is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmLayerNormForward(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmLayerNormBackward(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmLayerNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rows>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Ret<Rows>()
                                  .Ret<Vector>()
                                  .Ret<Vector>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmLayerNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rows>()
                                  .Arg<Rows>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Ret<Rows>()
                                  .Ret<Vector>()
                                  .Ret<Vector>());
