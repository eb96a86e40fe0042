// A direct 3x3, stride-1, pad-1 NHWC convolution kernel gradient, for
// benchmarks/kernel_gradient.py only (not used by fpdm_jax): does a plain
// loop nest, blocked the way oneDNN blocks it, close the gap that every lax
// form of the same sum leaves (benchmarks/README.md, finding 20)?
//
//   dW[kh][kw][ci][co] = sum_{b, y, x} x_pad[b][y + kh][x + kw][ci] * dy[b][y][x][co]
//
// Blocking: one output row at a time, so the three input rows and the
// output-gradient row it reads stay in L1/L2 across the nine taps; per tap,
// a block of CB input channels times all CO output channels accumulates in
// registers over the row (CB * CO floats: 64-256). Rows are split between
// std::threads, each with its own accumulator, summed at the end. The
// channel counts are template parameters so the compiler unrolls and
// vectorises the inner loops (built with -O3 -march=native).
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

template <int CI, int CO, int CB>
void row_tap(const float* x_row, const float* dy_row, int width, int kw, float* acc) {
  // acc[ci][co] += sum_x x_row[x + kw - 1][ci] * dy_row[x][co]; columns the
  // zero padding covers are skipped.
  const int x0 = kw == 0 ? 1 : 0, x1 = kw == 2 ? width - 1 : width;
  for (int cb = 0; cb < CI; cb += CB) {
    float a[CB][CO];
    std::memcpy(a, acc + cb * CO, sizeof(a));
    for (int x = x0; x < x1; ++x) {
      const float* d = dy_row + static_cast<int64_t>(x) * CO;
      const float* xs = x_row + static_cast<int64_t>(x + kw - 1) * CI + cb;
#pragma GCC unroll 32
      for (int c = 0; c < CB; ++c) {
        const float v = xs[c];
#pragma GCC unroll 64
        for (int o = 0; o < CO; ++o) a[c][o] += v * d[o];
      }
    }
    std::memcpy(acc + cb * CO, a, sizeof(a));
  }
}

template <int CI, int CO, int CB>
void rows(const float* x, const float* dy, int height, int width, int64_t r0, int64_t r1,
          float* acc) {
  for (int64_t r = r0; r < r1; ++r) {  // r = b * height + y
    const int64_t b = r / height, y = r % height;
    const float* dy_row = dy + r * width * CO;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t yy = y + kh - 1;
      if (yy < 0 || yy >= height) continue;
      const float* x_row = x + (b * height + yy) * width * CI;
      for (int kw = 0; kw < 3; ++kw)
        row_tap<CI, CO, CB>(x_row, dy_row, width, kw, acc + (kh * 3 + kw) * CI * CO);
    }
  }
}

template <int CI, int CO, int CB>
void run(const float* x, const float* dy, int batch, int height, int width, float* out,
         int threads) {
  const int64_t n_rows = static_cast<int64_t>(batch) * height;
  std::vector<std::vector<float>> accs(threads, std::vector<float>(9 * CI * CO, 0.f));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&, t] {
      rows<CI, CO, CB>(x, dy, height, width, n_rows * t / threads, n_rows * (t + 1) / threads,
                       accs[t].data());
    });
  rows<CI, CO, CB>(x, dy, height, width, 0, n_rows / threads, accs[0].data());
  for (auto& th : pool) th.join();
  for (int i = 0; i < 9 * CI * CO; ++i) {
    float s = 0.f;
    for (int t = 0; t < threads; ++t) s += accs[t][i];
    out[i] = s;
  }
}

}  // namespace

// Returns 0, or 1 for a channel count this prototype was not built for.
extern "C" int direct_kernel_gradient(const float* x, const float* dy, int batch, int height,
                                      int width, int cin, int cout, float* out, int threads) {
  if (threads < 1) threads = 1;
  if (cin == 8 && cout == 8) run<8, 8, 8>(x, dy, batch, height, width, out, threads);
  else if (cin == 16 && cout == 16) run<16, 16, 16>(x, dy, batch, height, width, out, threads);
  else if (cin == 32 && cout == 32) run<32, 32, 8>(x, dy, batch, height, width, out, threads);
  else if (cin == 64 && cout == 64) run<64, 64, 4>(x, dy, batch, height, width, out, threads);
  else return 1;
  return 0;
}
