// What every native custom call shares: the vector types, and the way work
// is split over XLA's thread pool.
#ifndef FPDM_JAX_NATIVE_COMMON_H_
#define FPDM_JAX_NATIVE_COMMON_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace fpdm_native {

namespace ffi = xla::ffi;

// GCC/Clang vector types: V8 is one ymm (AVX2) register, V16 one zmm. The
// compiler lowers them to whatever the ISA the library is built for has
// (setup.py builds it for x86-64-v3 and -v4, and plainly elsewhere).
typedef float V8 __attribute__((vector_size(32)));
typedef float V16 __attribute__((vector_size(64)));

#if defined(__AVX512F__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// c[m][n] = sum_k a[m * am + k * ak] * b[k * ldb + n] for ROWS rows and NV
// vectors of columns, the ROWS x NV accumulators in registers over k; each
// b vector load serves ROWS rows. (am, ak) = (lda, 1) reads a row-major a,
// (1, lda) its transpose. The matmul inside attention.cc and winograd.cc.
template <typename V, int ROWS, int NV>
inline void TileProduct(const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                        int64_t depth, float* c, int64_t ldc) {
  constexpr int kVecLanes = sizeof(V) / sizeof(float);
  V acc[ROWS][NV];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t k = 0; k < depth; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load<V>(b + k * ldb + v * kVecLanes);
    for (int m = 0; m < ROWS; ++m) {
      const float av = a[m * am + k * ak];
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) Store(c + m * ldc + v * kVecLanes, acc[m][v]);
}

// Below this many multiply-adds (tens of microseconds on one core) waking
// pool threads costs more than they save: the calling thread runs every
// chunk itself. The chunks, and so the result, are the same either way.
constexpr int64_t kMinParallelMacs = int64_t{1} << 21;

// Runs chunk(0) .. chunk(count - 1), each once, on the calling thread and,
// if macs is large enough, on XLA's intra-op pool, and returns when all
// are done. Chunks go to whichever thread asks next, and the calling thread
// takes them too, so it never waits for a pool task that has not started: a
// busy pool cannot deadlock it. A pool task that starts after the last
// chunk was taken finds nothing to do; the shared state outlives the call
// for it.
inline void RunChunks(ffi::ThreadPool& pool, int64_t count, int64_t macs,
                      std::function<void(int64_t)> chunk) {
  struct State {
    std::function<void(int64_t)> chunk;
    int64_t count;
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable all_done;
    int64_t done = 0;

    void Work() {
      for (int64_t c; (c = next.fetch_add(1)) < count;) {
        chunk(c);
        std::lock_guard<std::mutex> lock(mu);
        if (++done == count) all_done.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>();
  state->chunk = std::move(chunk);
  state->count = count;
  const int64_t helpers =
      macs < kMinParallelMacs ? 0 : std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done == state->count; });
}

}  // namespace fpdm_native

#endif  // FPDM_JAX_NATIVE_COMMON_H_
