// What both kernel gradients (conv_kernel_gradient.cc's direct one and
// winograd.cc's) share: the register-blocked accumulation of a^T b, a sum
// over pixels or tiles of outer products.
#ifndef FPDM_JAX_NATIVE_ACCUMULATE_H_
#define FPDM_JAX_NATIVE_ACCUMULATE_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "common.h"

namespace fpdm_native {

// acc[c][o] (rows cout apart) += sum_k xs[k * xstep + c] * d[k * cout + o]
// for CB input channels and NV vectors of output channels, all held in
// registers over the k loop.
template <typename V, int CB, int NV>
void AccumulateBlock(const float* xs, int64_t xstep, const float* d, int64_t cout, int64_t n,
                     float* acc) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V a[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) a[c][v] = Load<V>(acc + c * cout + v * kLanes);
  for (int64_t k = 0; k < n; ++k) {
    const float* xk = xs + k * xstep;
    V dk[NV];
    for (int v = 0; v < NV; ++v) dk[v] = Load<V>(d + k * cout + v * kLanes);
    for (int c = 0; c < CB; ++c) {
      const float x = xk[c];
      for (int v = 0; v < NV; ++v) a[c][v] += x * dk[v];
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) Store(acc + c * cout + v * kLanes, a[c][v]);
}

using AccumulateFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);

// How many input channels a block of NV output vectors takes: as many
// accumulators as fit in the registers left after NV output-gradient vectors
// and one broadcast input value.
template <int NV>
constexpr int kInputBlock = std::min(16, (kRegisters - 1 - NV) / NV);

// blocks[r - 1] takes r input channels, for r = 1 .. kInputBlock<NV>: the
// full block, and whatever is left over at the end of the input channels.
template <typename V, int NV, int... I>
constexpr std::array<AccumulateFn, sizeof...(I)> AccumulateTable(std::integer_sequence<int, I...>) {
  return {AccumulateBlock<V, I + 1, NV>...};
}

template <typename V, int NV>
constexpr auto kAccumulateBlocks =
    AccumulateTable<V, NV>(std::make_integer_sequence<int, kInputBlock<NV>>());

struct AccumulateBlocking {
  const AccumulateFn* blocks = nullptr;  // nullptr: cout is not a multiple of 8
  int cb = 0, ob = 0;

  // acc[c][o] += sum_k xs[k * xstep + c] * d[k * cout + o] for all cin x cout.
  void Run(const float* xs, int64_t xstep, const float* d, int64_t cin, int64_t cout, int64_t n,
           float* acc) const {
    for (int64_t c = 0; c < cin; c += cb) {
      const AccumulateFn fn = blocks[std::min<int64_t>(cb, cin - c) - 1];
      for (int64_t o = 0; o < cout; o += ob) fn(xs + c, xstep, d + o, cout, n, acc + c * cout + o);
    }
  }
};

template <typename V, int NV>
AccumulateBlocking UseAccumulate() {
  return {kAccumulateBlocks<V, NV>.data(), kInputBlock<NV>,
          NV * static_cast<int>(sizeof(V) / sizeof(float))};
}

// The widest output block that divides cout.
inline AccumulateBlocking PickAccumulateBlocking(int64_t cout) {
#if defined(__AVX512F__)
  if (cout % 64 == 0) return UseAccumulate<V16, 4>();
  if (cout % 32 == 0) return UseAccumulate<V16, 2>();
  if (cout % 16 == 0) return UseAccumulate<V16, 1>();
#else
  if (cout % 32 == 0) return UseAccumulate<V8, 4>();
  if (cout % 16 == 0) return UseAccumulate<V8, 2>();
#endif
  if (cout % 8 == 0) return UseAccumulate<V8, 1>();
  return {};
}

}  // namespace fpdm_native

#endif  // FPDM_JAX_NATIVE_ACCUMULATE_H_
