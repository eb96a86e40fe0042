// A 3x3 stride-1 NHWC convolution as Winograd F(2x2, 3x3) or F(4x4, 3x3),
// fused, as an XLA:CPU FFI custom call (fpdm_jax/models/native_conv.py and
// models/convolution.py say when each is used, and why; models/winograd.py
// has the algorithm and the same computation written in XLA ops).
//
//   y = A^T [ sum_c U[:, :, c, :] * (B^T d_c B) ] A    per T x T output tile
//
// with d_c the tile's (T + 2) x (T + 2) input window. U = G W G^T is the
// transformed kernel, [(T + 2)^2, C_in, C_out], computed by XLA:
// it does not depend on the activations, so XLA can run it alongside other
// work (computed here, on the convolution's critical path, the medium
// batch-8 step gained 1.06x instead of 1.12x, one run each; as a custom call
// of its own, 3x faster than XLA's alone, the step ran 0.95x: finding 25).
// What XLA cannot do is keep the transformed input and the matmul's result
// out of memory:
// written in XLA ops, both are 4x (F(2x2)) or 2.25x (F(4x4)) the size of the
// image they come from, and at 16x16 and larger images moving them costs
// more than the fewer multiplies save (benchmarks/README.md, finding 24).
// Here a chunk of tiles (any consecutive tiles of the batch, so small images
// still give long chunks) is transformed into a scratch buffer that stays in
// L2, the (T + 2)^2 [tiles, C_in] x [C_in, C_out] products run from it with a
// block of tiles x output channels in vector registers (common.h's
// TileProduct, attention.cc's matmul tile too), and the output transform
// writes the chunk's pixels. F(2x2, 3x3) does 16 multiplies per 4 outputs
// (2.25x fewer than direct), F(4x4, 3x3) 36 per 16 (4x fewer), with larger
// transform coefficients and so a few more float32 roundings.
//
// Chunks are independent and sum nothing across threads, so the bits do not
// depend on the thread count.
//
// The kernel gradient (below the forward) is F(2x2, 3x3) transposed.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "accumulate.h"
#include "common.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

using Image = ffi::Buffer<ffi::F32, 4>;
using Kernel = ffi::Buffer<ffi::F32, 3>;  // U [(T + 2)^2, cin, cout]

// x [batch, height, width, cin] and y or dy [batch, out_h, out_w, cout];
// the forward's U [(T + 2)^2, cin, cout] and y, the kernel gradient's dy.
struct Problem {
  const float* x;
  const float* u;
  float* y;
  const float* dy;
  int64_t height, width, cin;
  int64_t out_h, out_w, cout;
  int64_t pt, pl;
  int64_t tiles_h, tiles_w;  // T x T output tiles per image, down and across
};

// Lavin & Gray's one-dimensional transforms of F(T, 3), applied along rows
// and then columns: Input is B^T (N = T + 2 window values to N), Output A^T
// (N products to T outputs); for the kernel gradient, Gradient is A (an
// output-gradient block's T values to N) and Kernel G^T (N accumulated
// products to 3 taps). The forward's kernel transform G is
// models/winograd.py's.
template <int T>
struct Transforms;

template <>
struct Transforms<2> {
  static constexpr int N = 4;
  template <typename V>
  static void Input(const V d[4], V t[4]) {
    t[0] = d[0] - d[2];
    t[1] = d[1] + d[2];
    t[2] = d[2] - d[1];
    t[3] = d[1] - d[3];
  }
  template <typename V>
  static void Output(const V m[4], V y[2]) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  template <typename V>
  static void Gradient(const V g[2], V z[4]) {
    z[0] = g[0];
    z[1] = g[0] + g[1];
    z[2] = g[0] - g[1];
    z[3] = -g[1];
  }
  template <typename V>
  static void Kernel(const V m[4], V w[3]) {
    const V half = V{} + 0.5f;
    const V sum = half * (m[1] + m[2]);
    w[0] = m[0] + sum;
    w[1] = half * (m[1] - m[2]);
    w[2] = sum + m[3];
  }
};

// Interpolation points 0, 1, -1, 2, -2 and infinity.
template <>
struct Transforms<4> {
  static constexpr int N = 6;
  template <typename V>
  static void Input(const V d[6], V t[6]) {
    const V four = V{} + 4.0f, five = V{} + 5.0f, two = V{} + 2.0f;
    const V a = d[4] - d[2], b = d[3] - d[1];
    t[0] = four * d[0] - five * d[2] + d[4];
    t[1] = (d[3] + d[4]) - four * (d[1] + d[2]);
    t[2] = (d[4] - d[3]) + four * (d[1] - d[2]);
    t[3] = a + two * b;
    t[4] = a - two * b;
    t[5] = four * d[1] - five * d[3] + d[5];
  }
  template <typename V>
  static void Output(const V m[6], V y[4]) {
    const V two = V{} + 2.0f, four = V{} + 4.0f, eight = V{} + 8.0f;
    const V a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
    y[0] = m[0] + a + c;
    y[1] = b + two * d;
    y[2] = a + four * c;
    y[3] = b + eight * d + m[5];
  }
  template <typename V>
  static void Gradient(const V g[4], V z[6]) {
    const V two = V{} + 2.0f, four = V{} + 4.0f, eight = V{} + 8.0f;
    const V even = g[0] + g[2], odd = g[1] + g[3];
    const V even2 = g[0] + four * g[2], odd2 = two * g[1] + eight * g[3];
    z[0] = g[0];
    z[1] = even + odd;
    z[2] = even - odd;
    z[3] = even2 + odd2;
    z[4] = even2 - odd2;
    z[5] = g[3];
  }
  template <typename V>
  static void Kernel(const V m[6], V w[3]) {
    const V sixth = V{} + 1.0f / 6, twelfth = V{} + 1.0f / 12, quarter = V{} + 0.25f;
    const V a = m[1] + m[2], b = m[3] + m[4];
    w[0] = quarter * m[0] - sixth * a + (twelfth * 0.5f) * b;
    w[1] = sixth * (m[2] - m[1]) + twelfth * (m[3] - m[4]);
    w[2] = sixth * (b - a) + m[5];
  }
};

// The distance between consecutive window positions' rows in the scratch: a
// whole, odd number of cache lines, so the positions of a tile fall in
// different L1 sets. At the power-of-two distances that chunks of 64 tiles x
// 64 channels and the like give, all 16 of F(2x2)'s fell in one:
// single-threaded, the transforms took 3.5x as long at 8x32x32x64 (the whole
// call 1.2x), 1.05-1.4x at 16-128 channels.
inline int64_t PositionStride(int64_t floats) { return 16 * ((floats + 15) / 16 | 1); }

// Where tile `tile` of the batch (tiles numbered across rows, then images) lies.
struct TilePlace {
  int64_t b, ty, tx;  // image, tile row, tile column
};
inline TilePlace PlaceOf(const Problem& q, int64_t tile) {
  const int64_t per_image = q.tiles_h * q.tiles_w;
  return {tile / per_image, tile % per_image / q.tiles_w, tile % q.tiles_w};
}

// Stores position k's vector at out + (k - k0) * stride + offset if k0 <= k < k1:
// the transforms compute all positions and keep the ones asked for.
template <typename V>
inline void StorePosition(float* out, int k, int k0, int k1, int64_t stride, int64_t offset,
                          V value) {
  if (k >= k0 && k < k1) Store(out + (k - k0) * stride + offset, value);
}

// v[k - k0][t][c] (k = N r + s the transformed window position, the rows
// PositionStride(count * cin) apart) = (B^T d B)[r][s] for the chunk's tiles
// t and the positions k0 <= k < k1, with d the tile's N x N input window
// (zero outside the image). The forward takes all positions, the kernel
// gradient as many as its accumulators leave room for.
template <typename V, int T>
void InputTransform(const Problem& q, int64_t first, int64_t count, int k0, int k1, float* v) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int N = Transforms<T>::N;
  const int64_t cin = q.cin;
  const int64_t stride = PositionStride(count * cin);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const int64_t y0 = T * ty - q.pt, x0 = T * tx - q.pl;
    const float* rows[N];
    for (int r = 0; r < N; ++r) {
      const int64_t yy = y0 + r;
      rows[r] = yy >= 0 && yy < q.height ? q.x + (b * q.height + yy) * q.width * cin : nullptr;
    }
    bool inside[N];
    for (int s = 0; s < N; ++s) inside[s] = x0 + s >= 0 && x0 + s < q.width;
    float* out = v + t * cin;
    for (int64_t c = 0; c < cin; c += kLanes) {
      V e[N][N];  // d B: each row transformed
      for (int r = 0; r < N; ++r) {
        V d[N];
        for (int s = 0; s < N; ++s)
          d[s] = rows[r] && inside[s] ? Load<V>(rows[r] + (x0 + s) * cin + c) : V{};
        Transforms<T>::Input(d, e[r]);
      }
      for (int s = 0; s < N; ++s) {  // B^T (d B): each column
        V column[N], f[N];
        for (int r = 0; r < N; ++r) column[r] = e[r][s];
        Transforms<T>::Input(column, f);
        for (int r = 0; r < N; ++r) StorePosition(out, r * N + s, k0, k1, stride, c, f[r]);
      }
    }
  }
}

// Tiles per register block: as many P x NV accumulators as fit in the
// registers left after NV kernel vectors and one broadcast input value.
template <typename V, int NV>
constexpr int kTiles = std::min(16, (kRegisters - 1 - NV) / NV);

// TileProduct for the last `rows` (at most R) tiles of a chunk, with as many
// accumulator rows as there are tiles: one row at a time, each kernel vector
// load served a single tile, and 5 of the 11 tiles of a chunk of F(4x4)
// tiles at 256 input channels ran that way.
template <typename V, int NV, int R>
inline void RemainderProduct(int64_t rows, const float* a, int64_t lda, const float* b,
                             int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      TileProduct<V, R, NV>(a, lda, 1, b, ldb, depth, c, ldc);
    else
      RemainderProduct<V, NV, R - 1>(rows, a, lda, b, ldb, depth, c, ldc);
  }
}

// y for the chunk's tiles and output channels [o, o + OB), from
// m[k][t][0 .. OB): A^T M A per tile, written where it lies inside the output.
template <typename V, int NV, int T>
void OutputTransform(const Problem& q, int64_t first, int64_t count, const float* m, int64_t o) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int OB = NV * kLanes;
  constexpr int N = Transforms<T>::N;
  const int64_t stride = PositionStride(count * OB);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const int64_t rows = std::min<int64_t>(T, q.out_h - T * ty);
    const int64_t cols = std::min<int64_t>(T, q.out_w - T * tx);
    for (int n = 0; n < NV; ++n) {
      const float* mt = m + t * OB + n * kLanes;
      V g[T][N];  // A^T M: each column
      for (int s = 0; s < N; ++s) {
        V column[N], h[T];
        for (int r = 0; r < N; ++r) column[r] = Load<V>(mt + (r * N + s) * stride);
        Transforms<T>::Output(column, h);
        for (int a = 0; a < T; ++a) g[a][s] = h[a];
      }
      for (int64_t a = 0; a < rows; ++a) {  // (A^T M) A: each row
        V h[T];
        Transforms<T>::Output(g[a], h);
        float* out =
            q.y + ((b * q.out_h + T * ty + a) * q.out_w + T * tx) * q.cout + o + n * kLanes;
        for (int64_t c = 0; c < cols; ++c) Store(out + c * q.cout, h[c]);
      }
    }
  }
}

// Most tiles per chunk, and the scratch they may take: the transformed
// input and one output-channel block's products, N^2 x tiles x (C_in + OB)
// floats, kept within about half of a 1 MiB L2.
constexpr int64_t kMaxChunkTiles = 120;
constexpr int64_t kScratchFloats = 128 * 1024;

template <typename V, typename VI, int NV, int T>
void Chunk(const Problem& q, int64_t first, int64_t count) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int OB = NV * kLanes;
  constexpr int P = kTiles<V, NV>;
  constexpr int K = Transforms<T>::N * Transforms<T>::N;
  const int64_t vs = PositionStride(count * q.cin), ms = PositionStride(count * OB);
  thread_local std::vector<float> scratch;
  scratch.resize(K * (vs + ms) + 15);
  const uintptr_t past_line = reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) % 16;
  float* v = scratch.data() + (16 - past_line) % 16;  // v and m, and all their rows,
  float* m = v + K * vs;                              // start at cache lines
  InputTransform<VI, T>(q, first, count, 0, K, v);
  for (int64_t o = 0; o < q.cout; o += OB) {
    for (int k = 0; k < K; ++k) {
      const float* vk = v + k * vs;
      const float* uk = q.u + k * q.cin * q.cout + o;
      float* mk = m + k * ms;
      int64_t t = 0;
      for (; t + P <= count; t += P)
        TileProduct<V, P, NV>(vk + t * q.cin, q.cin, 1, uk, q.cout, q.cin, mk + t * OB, OB);
      RemainderProduct<V, NV, P - 1>(count - t, vk + t * q.cin, q.cin, uk, q.cout, q.cin,
                                     mk + t * OB, OB);
    }
    OutputTransform<V, NV, T>(q, first, count, m, o);
  }
}

using ChunkFn = void (*)(const Problem&, int64_t, int64_t);

struct Blocking {
  ChunkFn chunk = nullptr;  // nullptr: a channel count is not a multiple of 8
  int ob = 0;               // output channels per block
};

template <typename V, typename VI, int NV, int T>
Blocking Use() {
  return {Chunk<V, VI, NV, T>, NV * static_cast<int>(sizeof(V) / sizeof(float))};
}

// The widest output block that divides C_out.
template <typename VI, int T>
Blocking PickFor(int64_t cout) {
#if defined(__AVX512F__)
  if (cout % 64 == 0) return Use<V16, VI, 4, T>();
  if (cout % 32 == 0) return Use<V16, VI, 2, T>();
  if (cout % 16 == 0) return Use<V16, VI, 1, T>();
#else
  if (cout % 32 == 0) return Use<V8, VI, 4, T>();
  if (cout % 16 == 0) return Use<V8, VI, 2, T>();
#endif
  if (cout % 8 == 0) return Use<V8, VI, 1, T>();
  return {};
}

// And the widest input vectors that divide C_in (for the input transform).
template <int T>
Blocking Pick(int64_t cin, int64_t cout) {
  if (cin % 8) return {};
#if defined(__AVX512F__)
  if (cin % 16 == 0) return PickFor<V16, T>(cout);
#endif
  return PickFor<V8, T>(cout);
}

// The forward for U's size: 16 positions F(2x2, 3x3), 36 F(4x4, 3x3).
ffi::Error Forward(ffi::ThreadPool pool, Image x, Kernel u, ffi::Result<Image> y, int64_t pad_top,
                   int64_t pad_left) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd[0] != yd[0] || (ud[0] != 16 && ud[0] != 36) || ud[1] != xd[3] || ud[2] != yd[3] ||
      pad_top < 0 || pad_left < 0 || pad_top > 2 || pad_left > 2)
    return ffi::Error::InvalidArgument("fpdm_winograd_forward: inconsistent shapes or padding");
  const int64_t tile = ud[0] == 16 ? 2 : 4;
  const Blocking k = tile == 2 ? Pick<2>(xd[3], yd[3]) : Pick<4>(xd[3], yd[3]);
  if (k.chunk == nullptr)
    return ffi::Error::InvalidArgument("fpdm_winograd_forward: channels % 8 != 0");
  const Problem p{x.typed_data(), u.typed_data(), y->typed_data(), nullptr,
                  xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], pad_top, pad_left,
                  (yd[1] + tile - 1) / tile, (yd[2] + tile - 1) / tile};
  const int64_t tiles = xd[0] * p.tiles_h * p.tiles_w;
  const int64_t per_chunk = std::max<int64_t>(
      1, std::min(kMaxChunkTiles, kScratchFloats / (ud[0] * (p.cin + k.ob))));
  const int64_t count = (tiles + per_chunk - 1) / per_chunk;
  RunChunks(pool, count, tiles * ud[0] * p.cin * p.cout, [&](int64_t c) {
    const int64_t first = tiles * c / count, last = tiles * (c + 1) / count;
    k.chunk(p, first, last - first);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The kernel gradient, by the same algorithm transposed (Lavin & Gray's
// F(3x3, 2x2), or F(3x3, 4x4) with F(4x4, 3x3)'s transforms):
//
//   dW = G^T [ sum_tiles (B^T d B) * (A g A^T) ] G    per input and output channel
//
// with d a tile's N x N input window, as the forward's, and g the tile's
// T x T block of the output gradient. The sum over tiles is N^2 [C_in,
// tiles] x [tiles, C_out] matmuls, 2.25x (T = 2) or 4x (T = 4) fewer
// multiply-adds than the direct kernel gradient's nine taps x T^2 pixels.
// The N^2 accumulators M[k] (C_in x C_out each) are split into groups of
// positions small enough to stay in L2 while chunks of tiles stream past
// them: one task is a group of positions over a range of tiles. Each group
// transforms its tiles' windows again, so where only a few positions fit
// F(3x3, 2x2) is the cheaper (models/convolution.py picks). The number of
// tile ranges, and so of partial sums (summed in range order at the end),
// follows from the shapes alone: the bits do not depend on the thread count.

// z[k - k0][t][o] (rows PositionStride(count * cout) apart) = (A g A^T)[r][s]
// for the chunk's tiles and positions k0 <= k < k1, g the tile's T x T block
// of dy, zero where it lies past the output's edge.
template <typename V, int T>
void GradientTransform(const Problem& q, int64_t first, int64_t count, int k0, int k1, float* z) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int N = Transforms<T>::N;
  const int64_t cout = q.cout;
  const int64_t stride = PositionStride(count * cout);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const int64_t rows = std::min<int64_t>(T, q.out_h - T * ty);
    const int64_t cols = std::min<int64_t>(T, q.out_w - T * tx);
    const float* g0 = q.dy + ((b * q.out_h + T * ty) * q.out_w + T * tx) * cout;
    float* out = z + t * cout;
    for (int64_t o = 0; o < cout; o += kLanes) {
      V h[N][T];  // A g: each column of g transformed
      for (int a = 0; a < T; ++a) {
        V column[T], f[N];
        for (int i = 0; i < T; ++i)
          column[i] = i < rows && a < cols ? Load<V>(g0 + (i * q.out_w + a) * cout + o) : V{};
        Transforms<T>::Gradient(column, f);
        for (int r = 0; r < N; ++r) h[r][a] = f[r];
      }
      for (int r = 0; r < N; ++r) {  // (A g) A^T: each row
        V f[N];
        Transforms<T>::Gradient(h[r], f);
        for (int s = 0; s < N; ++s) StorePosition(out, r * N + s, k0, k1, stride, o, f[s]);
      }
    }
  }
}

// One task's accumulators, positions x C_in x C_out floats, at most this many
// (256 KiB, a quarter of a 1 MiB L2), and its chunk scratch this many.
constexpr int64_t kGradientAccumulatorFloats = 64 * 1024;
constexpr int64_t kGradientScratchFloats = 128 * 1024;
// Tile ranges: at least this many tiles each, and no more ranges than give
// this many tasks.
constexpr int64_t kMinRangeTiles = 256;
constexpr int64_t kGradientTasks = 16;

struct GradientPlan {
  int positions;           // per group: a divisor of N^2
  int64_t ranges;          // tile ranges, each with its own partial sums
  int64_t chunk;           // tiles per chunk
  AccumulateBlocking acc;  // the [C_in, tiles] x [tiles, C_out] matmul
};

// The most positions per group (a divisor of all `window` positions) whose
// accumulators fit kGradientAccumulatorFloats.
GradientPlan Plan(int window, int64_t tiles, int64_t cin, int64_t cout) {
  GradientPlan g{window, 1, 1, PickAccumulateBlocking(cout)};
  while (g.positions > 1 && g.positions * cin * cout > kGradientAccumulatorFloats) {
    int next = g.positions - 1;
    while (window % next) --next;
    g.positions = next;
  }
  const int64_t groups = window / g.positions;
  g.ranges = std::clamp<int64_t>(tiles / kMinRangeTiles, 1,
                                 std::max<int64_t>(1, kGradientTasks / groups));
  g.chunk = std::max<int64_t>(1, kGradientScratchFloats / (g.positions * (cin + cout)));
  return g;
}

// Adds positions [k0, k0 + plan.positions) of tiles [first, last) into
// acc[k - k0] (C_in x C_out each).
template <typename VI, typename VO, int T>
void AccumulateTiles(const Problem& q, const GradientPlan& plan, int k0, int64_t first,
                     int64_t last, float* acc) {
  const int k1 = k0 + plan.positions;
  thread_local std::vector<float> scratch;
  for (int64_t t = first; t < last; t += plan.chunk) {
    const int64_t count = std::min(plan.chunk, last - t);
    const int64_t vs = PositionStride(count * q.cin), zs = PositionStride(count * q.cout);
    scratch.resize(plan.positions * (vs + zs) + 15);
    const uintptr_t past_line = reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) % 16;
    float* v = scratch.data() + (16 - past_line) % 16;
    float* z = v + plan.positions * vs;
    InputTransform<VI, T>(q, t, count, k0, k1, v);
    GradientTransform<VO, T>(q, t, count, k0, k1, z);
    for (int j = 0; j < plan.positions; ++j)
      plan.acc.Run(v + j * vs, q.cin, z + j * zs, q.cin, q.cout, count,
                   acc + j * q.cin * q.cout);
  }
}

// dw[i][j][c][o] = (G^T M G)[i][j] for channels [c0, c1), M the sum of the
// ranges' partial accumulators m[range][k][c][o].
template <typename V, int T>
void KernelFromTransform(const float* m, int64_t ranges, int64_t cin, int64_t cout, int64_t c0,
                         int64_t c1, float* dw) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int N = Transforms<T>::N;
  const int64_t size = cin * cout;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t o = 0; o < cout; o += kLanes) {
      V e[3][N];  // G^T M: each column
      for (int s = 0; s < N; ++s) {
        V column[N], f[3];
        for (int r = 0; r < N; ++r) {
          const int k = r * N + s;
          column[r] = Load<V>(m + k * size + c * cout + o);
          for (int64_t g = 1; g < ranges; ++g)
            column[r] += Load<V>(m + (g * N * N + k) * size + c * cout + o);
        }
        Transforms<T>::Kernel(column, f);
        for (int i = 0; i < 3; ++i) e[i][s] = f[i];
      }
      for (int i = 0; i < 3; ++i) {  // (G^T M) G: each row
        V f[3];
        Transforms<T>::Kernel(e[i], f);
        float* out = dw + i * 3 * size + c * cout + o;
        for (int j = 0; j < 3; ++j) Store(out + j * size, f[j]);
      }
    }
}

using AccumulateTilesFn = void (*)(const Problem&, const GradientPlan&, int, int64_t, int64_t,
                                   float*);

// The widest vectors that divide C_in (input transform) and C_out (output
// gradient transform).
template <int T>
AccumulateTilesFn PickGradient(int64_t cin, int64_t cout) {
  if (cin % 8 || cout % 8) return nullptr;
#if defined(__AVX512F__)
  if (cin % 16 == 0)
    return cout % 16 == 0 ? AccumulateTiles<V16, V16, T> : AccumulateTiles<V16, V8, T>;
  if (cout % 16 == 0) return AccumulateTiles<V8, V16, T>;
#endif
  return AccumulateTiles<V8, V8, T>;
}

template <int T>
ffi::Error KernelGradientOf(ffi::ThreadPool& pool, Image& x, Image& dy, ffi::Result<Image>& dw,
                            int64_t pad_top, int64_t pad_left) {
  constexpr int K = Transforms<T>::N * Transforms<T>::N;
  const auto xd = x.dimensions(), dd = dy.dimensions();
  const AccumulateTilesFn accumulate = PickGradient<T>(xd[3], dd[3]);
  if (accumulate == nullptr)
    return ffi::Error::InvalidArgument("fpdm_winograd_kernel_gradient: channels % 8 != 0");
  const Problem p{x.typed_data(), nullptr, nullptr, dy.typed_data(),
                  xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], pad_top, pad_left,
                  (dd[1] + T - 1) / T, (dd[2] + T - 1) / T};
  const int64_t tiles = xd[0] * p.tiles_h * p.tiles_w, size = p.cin * p.cout;
  const GradientPlan plan = Plan(K, tiles, p.cin, p.cout);
  const int64_t groups = K / plan.positions;
  std::vector<float> partial(plan.ranges * K * size);  // zeros
  RunChunks(pool, groups * plan.ranges, tiles * K * size, [&](int64_t task) {
    const int64_t group = task % groups, range = task / groups;
    const int k0 = static_cast<int>(group) * plan.positions;
    accumulate(p, plan, k0, tiles * range / plan.ranges, tiles * (range + 1) / plan.ranges,
               partial.data() + (range * K + k0) * size);
  });
  const int64_t blocks = std::min<int64_t>(p.cin, kGradientTasks);
  RunChunks(pool, blocks, K * size * plan.ranges, [&](int64_t block) {
    const int64_t c0 = p.cin * block / blocks, c1 = p.cin * (block + 1) / blocks;
#if defined(__AVX512F__)
    if (p.cout % 16 == 0) {
      KernelFromTransform<V16, T>(partial.data(), plan.ranges, p.cin, p.cout, c0, c1,
                                  dw->typed_data());
      return;
    }
#endif
    KernelFromTransform<V8, T>(partial.data(), plan.ranges, p.cin, p.cout, c0, c1,
                               dw->typed_data());
  });
  return ffi::Error::Success();
}

// `tile` 2: F(3x3, 2x2); 4: F(3x3, 4x4).
ffi::Error KernelGradient(ffi::ThreadPool pool, Image x, Image dy, ffi::Result<Image> dw,
                          int64_t pad_top, int64_t pad_left, int64_t tile) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd[0] != dd[0] || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || wd[3] != dd[3] ||
      pad_top < 0 || pad_left < 0 || pad_top > 2 || pad_left > 2 || (tile != 2 && tile != 4))
    return ffi::Error::InvalidArgument(
        "fpdm_winograd_kernel_gradient: inconsistent shapes, padding or tile");
  return tile == 2 ? KernelGradientOf<2>(pool, x, dy, dw, pad_top, pad_left)
                   : KernelGradientOf<4>(pool, x, dy, dw, pad_top, pad_left);
}

}  // namespace

// The exported symbols (the rest is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmWinogradForward(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FpdmWinogradKernelGradient(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmWinogradForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Kernel>()
                                  .Ret<Image>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmWinogradKernelGradient, KernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Image>()
                                  .Ret<Image>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("tile"));
