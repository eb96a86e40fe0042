// AdamW's whole update, every parameter array in one XLA:CPU FFI custom call
// (fpdm_jax/trainers/adamw.py says when it is used, and why).
//
//   loss, grad_norm, step_size, bias_correction1, bias_correction2 (float32
//   scalars), then params[L], grads[L], mu[L], nu[L]
//   -> params[L], mu[L], nu[L]
//
// The outputs alias the inputs of the same name (adamw.py passes
// input_output_aliases), so with the train state donated the update runs in
// place: one pass reading four floats and writing three per parameter. The
// global norm comes from XLA, whose per-array sums run as the gradients
// appear. If the loss and the norm are finite, each element in optax's
// order of operations (elements are independent: the chunks, fixed pieces
// of the arrays laid end to end, go to any thread):
//
//   g  = norm < max_norm ? g : (g / norm) * max_norm       (clip_by_global_norm)
//   mu = (1 - b1) g + b1 mu,  nu = (1 - b2) g^2 + b2 nu    (scale_by_adam)
//   u  = (mu / bc1) / (sqrt(nu / bc2) + eps)
//   u  = u + weight_decay p                                (add_decayed_weights)
//   p  = p + step_size u                                   (scale_by_learning_rate,
//                                                           apply_updates)
//
// Otherwise nothing is written: the outputs keep the inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

using Scalar = ffi::BufferR0<ffi::F32>;

// Floats per chunk of the arrays laid end to end: 128 KiB of each of the
// four arrays a chunk reads, ~600 chunks for a 20M-parameter UNet.
constexpr int64_t kChunk = int64_t{1} << 15;

struct Arrays {
  std::vector<float*> p, m, v;     // updated in place (the outputs)
  std::vector<const float*> g;
  std::vector<int64_t> start;      // start[i]: array i's first element end to end
  int64_t total = 0;
};

// Calls piece(array, first, last) for each part of an array that chunk
// [begin, end) of the end-to-end index covers.
template <typename Fn>
void ForEachPiece(const Arrays& a, int64_t begin, int64_t end, Fn piece) {
  const int64_t count = static_cast<int64_t>(a.start.size());
  // The last array that starts at or before begin.
  int64_t i = std::upper_bound(a.start.begin(), a.start.end(), begin) - a.start.begin() - 1;
  for (; i < count && a.start[i] < end; ++i) {
    const int64_t stop = i + 1 < count ? a.start[i + 1] : a.total;
    const int64_t first = std::max(begin, a.start[i]), last = std::min(end, stop);
    if (first < last) piece(i, first - a.start[i], last - a.start[i]);
  }
}

struct Numbers {
  float step_size, bc1, bc2, one_minus_b1, b1, one_minus_b2, b2, eps, weight_decay;
  float norm, max_norm;
};

// One array's elements [0, n), in place. The pointers are distinct buffers
// (g is no output), so the loop vectorises.
template <bool kClip, bool kDecay>
void Update(const Numbers& c, float* __restrict p, const float* __restrict g,
            float* __restrict m, float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    if (kClip) gi = (gi / c.norm) * c.max_norm;
    const float mi = c.one_minus_b1 * gi + c.b1 * m[i];
    const float vi = c.one_minus_b2 * (gi * gi) + c.b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    float u = (mi / c.bc1) / (std::sqrt(vi / c.bc2) + c.eps);
    if (kDecay) u = u + c.weight_decay * p[i];
    p[i] = p[i] + c.step_size * u;
  }
}

using UpdateFn = void (*)(const Numbers&, float*, const float*, float*, float*, int64_t);

ffi::Error AdamW(ffi::ThreadPool pool, Scalar loss, Scalar grad_norm, Scalar step_size,
                 Scalar bc1, Scalar bc2, ffi::RemainingArgs arrays, ffi::RemainingRets updated,
                 float one_minus_b1, float b1, float one_minus_b2, float b2, float eps,
                 float weight_decay, float max_norm) {
  if (arrays.size() % 4 || updated.size() * 4 != arrays.size() * 3)
    return ffi::Error::InvalidArgument(
        "fpdm_adamw: expected params, grads, mu, nu in and params, mu, nu out");
  const size_t count = arrays.size() / 4;
  for (size_t i = 0; i < arrays.size(); ++i)
    if (!arrays.get<ffi::AnyBuffer>(i).has_value())
      return ffi::Error::InvalidArgument("fpdm_adamw: an operand is not a buffer");
  for (size_t i = 0; i < updated.size(); ++i)
    if (!updated.get<ffi::AnyBuffer>(i).has_value())
      return ffi::Error::InvalidArgument("fpdm_adamw: a result is not a buffer");
  Arrays a;
  struct Copy {
    const float* from;
    float* to;
    size_t n;
  };
  std::vector<Copy> copies;  // outputs XLA did not alias to their inputs
  for (size_t i = 0; i < count; ++i) {
    ffi::AnyBuffer in[4] = {*arrays.get<ffi::AnyBuffer>(i),
                            *arrays.get<ffi::AnyBuffer>(count + i),
                            *arrays.get<ffi::AnyBuffer>(2 * count + i),
                            *arrays.get<ffi::AnyBuffer>(3 * count + i)};
    ffi::AnyBuffer out[3] = {**updated.get<ffi::AnyBuffer>(i),
                             **updated.get<ffi::AnyBuffer>(count + i),
                             **updated.get<ffi::AnyBuffer>(2 * count + i)};
    const size_t n = in[0].element_count();
    for (const auto& b : in)
      if (b.element_type() != ffi::F32 || b.element_count() != n)
        return ffi::Error::InvalidArgument(
            "fpdm_adamw: params, grads, mu and nu must be float32 arrays of equal sizes");
    for (const auto& b : out)
      if (b.element_type() != ffi::F32 || b.element_count() != n)
        return ffi::Error::InvalidArgument("fpdm_adamw: outputs unlike their inputs");
    const int kept[3] = {0, 2, 3};  // params, mu, nu
    for (int k = 0; k < 3; ++k)
      if (out[k].untyped_data() != in[kept[k]].untyped_data())
        copies.push_back({static_cast<const float*>(in[kept[k]].untyped_data()),
                          static_cast<float*>(out[k].untyped_data()), n});
    a.p.push_back(static_cast<float*>(out[0].untyped_data()));
    a.g.push_back(static_cast<const float*>(in[1].untyped_data()));
    a.m.push_back(static_cast<float*>(out[1].untyped_data()));
    a.v.push_back(static_cast<float*>(out[2].untyped_data()));
    a.start.push_back(a.total);
    a.total += static_cast<int64_t>(n);
  }
  // An unaliased output starts as its input; then all is in place. (With
  // the train state donated XLA aliases every one.)
  for (const Copy& c : copies)
    if (c.n) std::memcpy(c.to, c.from, c.n * sizeof(float));

  const float norm = *grad_norm.typed_data();
  if (!std::isfinite(*loss.typed_data()) || !std::isfinite(norm)) return ffi::Error::Success();

  const int64_t chunks = (a.total + kChunk - 1) / kChunk;
  const Numbers c{*step_size.typed_data(), *bc1.typed_data(), *bc2.typed_data(),
                  one_minus_b1, b1, one_minus_b2, b2, eps, weight_decay, norm, max_norm};
  const bool clip = max_norm > 0 && !(norm < max_norm), decay = weight_decay != 0;
  const UpdateFn update = clip ? (decay ? Update<true, true> : Update<true, false>)
                               : (decay ? Update<false, true> : Update<false, false>);
  RunChunks(pool, chunks, a.total, [&](int64_t chunk) {
    ForEachPiece(a, chunk * kChunk, (chunk + 1) * kChunk, [&](int64_t i, int64_t lo, int64_t hi) {
      update(c, a.p[i] + lo, a.g[i] + lo, a.m[i] + lo, a.v[i] + lo, hi - lo);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

// The exported symbol (the rest is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmAdamW(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Scalar>()
                                  .Arg<Scalar>()
                                  .Arg<Scalar>()
                                  .Arg<Scalar>()
                                  .Arg<Scalar>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<float>("max_norm"));
