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
