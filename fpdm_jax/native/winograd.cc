// A 3x3 stride-1 NHWC convolution as Winograd F(2x2, 3x3), fused, as an
// XLA:CPU FFI custom call (fpdm_jax/models/native_conv.py and
// models/convolution.py say when it is used, and why; models/winograd.py
// has the algorithm and the same computation written in XLA ops).
//
//   y = A^T [ sum_c U[:, :, c, :] * (B^T d_c B) ] A    per 2x2 output tile
//
// U = G W G^T is the transformed kernel, [16, C_in, C_out], computed by XLA:
// it does not depend on the activations, so XLA can run it alongside other
// work (computed here, on the convolution's critical path, the medium
// batch-8 step gained 1.06x instead of 1.12x, one run each; as a custom call
// of its own, 3x faster than XLA's alone, the step ran 0.95x: finding 25).
// What XLA cannot do is keep the transformed input and the matmul's result
// out of memory:
// written in XLA ops, both are 4x the size of the image they come from, and
// at 16x16 and larger images moving them costs more than the 2.25x fewer
// multiplies save (benchmarks/README.md, finding 24). Here a chunk of tiles
// (any consecutive tiles of the batch, so small images still give long
// chunks) is transformed into a scratch buffer that stays in L2, the 16
// [tiles, C_in] x [C_in, C_out] products run from it with a block of tiles x
// output channels in vector registers (common.h's TileProduct, attention.cc's
// matmul tile too), and the output transform writes the chunk's pixels.
//
// Chunks are independent and sum nothing across threads, so the bits do not
// depend on the thread count.
//
// The kernel gradient (below the forward) is the same algorithm transposed.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "accumulate.h"
#include "common.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

using Image = ffi::Buffer<ffi::F32, 4>;
using Kernel = ffi::Buffer<ffi::F32, 3>;  // U [16, cin, cout]

// x [batch, height, width, cin] and y or dy [batch, out_h, out_w, cout];
// the forward's U [16, cin, cout] and y, the kernel gradient's dy.
struct Problem {
  const float* x;
  const float* u;
  float* y;
  const float* dy;
  int64_t height, width, cin;
  int64_t out_h, out_w, cout;
  int64_t pt, pl;
  int64_t tiles_h, tiles_w;  // 2x2 output tiles per image, down and across
};

// The distance between consecutive window positions' rows in the scratch: a
// whole, odd number of cache lines, so the 16 positions of a tile fall in 16
// different L1 sets. At the power-of-two distances that chunks of 64 tiles x
// 64 channels and the like give, all 16 fell in one: single-threaded, the
// transforms took 3.5x as long at 8x32x32x64 (the whole call 1.2x), 1.05-1.4x
// at 16-128 channels.
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
// the transforms compute all 16 positions and keep the ones asked for.
template <typename V>
inline void StorePosition(float* out, int k, int k0, int k1, int64_t stride, int64_t offset,
                          V value) {
  if (k >= k0 && k < k1) Store(out + (k - k0) * stride + offset, value);
}

// v[k - k0][t][c] (k = 4 r + s the transformed window position, the rows
// PositionStride(count * cin) apart) = (B^T d B)[r][s] for the chunk's tiles
// t and the positions k0 <= k < k1, with d the tile's 4x4 input window (zero
// outside the image). The forward takes all 16 positions, the kernel
// gradient as many as its accumulators leave room for.
template <typename V>
void InputTransform(const Problem& q, int64_t first, int64_t count, int k0, int k1, float* v) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  const int64_t cin = q.cin;
  const int64_t stride = PositionStride(count * cin);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const int64_t y0 = 2 * ty - q.pt, x0 = 2 * tx - q.pl;
    const float* rows[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t yy = y0 + r;
      rows[r] = yy >= 0 && yy < q.height ? q.x + (b * q.height + yy) * q.width * cin : nullptr;
    }
    bool inside[4];
    for (int s = 0; s < 4; ++s) inside[s] = x0 + s >= 0 && x0 + s < q.width;
    float* out = v + t * cin;
    for (int64_t c = 0; c < cin; c += kLanes) {
      V d[4][4];
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s)
          d[r][s] = rows[r] && inside[s] ? Load<V>(rows[r] + (x0 + s) * cin + c) : V{};
      V e[4][4];  // d B: columns
      for (int r = 0; r < 4; ++r) {
        e[r][0] = d[r][0] - d[r][2];
        e[r][1] = d[r][1] + d[r][2];
        e[r][2] = d[r][2] - d[r][1];
        e[r][3] = d[r][1] - d[r][3];
      }
      for (int s = 0; s < 4; ++s) {  // B^T (d B): rows
        StorePosition(out, 0 * 4 + s, k0, k1, stride, c, e[0][s] - e[2][s]);
        StorePosition(out, 1 * 4 + s, k0, k1, stride, c, e[1][s] + e[2][s]);
        StorePosition(out, 2 * 4 + s, k0, k1, stride, c, e[2][s] - e[1][s]);
        StorePosition(out, 3 * 4 + s, k0, k1, stride, c, e[1][s] - e[3][s]);
      }
    }
  }
}

// Tiles per register block: as many P x NV accumulators as fit in the
// registers left after NV kernel vectors and one broadcast input value.
template <typename V, int NV>
constexpr int kTiles = std::min(16, (kRegisters - 1 - NV) / NV);

// y for the chunk's tiles and output channels [o, o + OB), from
// m[k][t][0 .. OB): A^T M A per tile, written where it lies inside the output.
template <typename V, int NV>
void OutputTransform(const Problem& q, int64_t first, int64_t count, const float* m, int64_t o) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int OB = NV * kLanes;
  const int64_t stride = PositionStride(count * OB);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const int64_t rows = std::min<int64_t>(2, q.out_h - 2 * ty);
    const int64_t cols = std::min<int64_t>(2, q.out_w - 2 * tx);
    for (int n = 0; n < NV; ++n) {
      const float* mt = m + t * OB + n * kLanes;
      V g[2][4];  // A^T M: rows
      for (int s = 0; s < 4; ++s) {
        const V m0 = Load<V>(mt + (0 * 4 + s) * stride), m1 = Load<V>(mt + (1 * 4 + s) * stride);
        const V m2 = Load<V>(mt + (2 * 4 + s) * stride), m3 = Load<V>(mt + (3 * 4 + s) * stride);
        g[0][s] = m0 + m1 + m2;
        g[1][s] = m1 - m2 - m3;
      }
      for (int64_t a = 0; a < rows; ++a) {  // (A^T M) A: columns
        float* out = q.y + ((b * q.out_h + 2 * ty + a) * q.out_w + 2 * tx) * q.cout + o + n * kLanes;
        Store(out, g[a][0] + g[a][1] + g[a][2]);
        if (cols > 1) Store(out + q.cout, g[a][1] - g[a][2] - g[a][3]);
      }
    }
  }
}

// Most tiles per chunk, and the scratch they may take: the transformed
// input and one output-channel block's products, 16 x tiles x (C_in + OB)
// floats, kept within about half of a 1 MiB L2.
constexpr int64_t kMaxChunkTiles = 120;
constexpr int64_t kScratchFloats = 128 * 1024;

template <typename V, typename VI, int NV>
void Chunk(const Problem& q, int64_t first, int64_t count) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int OB = NV * kLanes;
  constexpr int P = kTiles<V, NV>;
  const int64_t vs = PositionStride(count * q.cin), ms = PositionStride(count * OB);
  thread_local std::vector<float> scratch;
  scratch.resize(16 * (vs + ms) + 15);
  const uintptr_t past_line = reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) % 16;
  float* v = scratch.data() + (16 - past_line) % 16;  // v and m, and all their rows,
  float* m = v + 16 * vs;                             // start at cache lines
  InputTransform<VI>(q, first, count, 0, 16, v);
  for (int64_t o = 0; o < q.cout; o += OB) {
    for (int k = 0; k < 16; ++k) {
      const float* vk = v + k * vs;
      const float* uk = q.u + k * q.cin * q.cout + o;
      float* mk = m + k * ms;
      int64_t t = 0;
      for (; t + P <= count; t += P)
        TileProduct<V, P, NV>(vk + t * q.cin, q.cin, 1, uk, q.cout, q.cin, mk + t * OB, OB);
      for (; t < count; ++t)
        TileProduct<V, 1, NV>(vk + t * q.cin, q.cin, 1, uk, q.cout, q.cin, mk + t * OB, OB);
    }
    OutputTransform<V, NV>(q, first, count, m, o);
  }
}

using ChunkFn = void (*)(const Problem&, int64_t, int64_t);

struct Blocking {
  ChunkFn chunk = nullptr;  // nullptr: a channel count is not a multiple of 8
  int ob = 0;               // output channels per block
};

template <typename V, typename VI, int NV>
Blocking Use() {
  return {Chunk<V, VI, NV>, NV * static_cast<int>(sizeof(V) / sizeof(float))};
}

// The widest output block that divides C_out.
template <typename VI>
Blocking PickFor(int64_t cout) {
#if defined(__AVX512F__)
  if (cout % 64 == 0) return Use<V16, VI, 4>();
  if (cout % 32 == 0) return Use<V16, VI, 2>();
  if (cout % 16 == 0) return Use<V16, VI, 1>();
#else
  if (cout % 32 == 0) return Use<V8, VI, 4>();
  if (cout % 16 == 0) return Use<V8, VI, 2>();
#endif
  if (cout % 8 == 0) return Use<V8, VI, 1>();
  return {};
}

// And the widest input vectors that divide C_in (for the input transform).
Blocking Pick(int64_t cin, int64_t cout) {
  if (cin % 8) return {};
#if defined(__AVX512F__)
  if (cin % 16 == 0) return PickFor<V16>(cout);
#endif
  return PickFor<V8>(cout);
}

ffi::Error Forward(ffi::ThreadPool pool, Image x, Kernel u, ffi::Result<Image> y, int64_t pad_top,
                   int64_t pad_left) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd[0] != yd[0] || ud[0] != 16 || ud[1] != xd[3] || ud[2] != yd[3] || pad_top < 0 ||
      pad_left < 0 || pad_top > 2 || pad_left > 2)
    return ffi::Error::InvalidArgument("fpdm_winograd_forward: inconsistent shapes or padding");
  const Blocking k = Pick(xd[3], yd[3]);
  if (k.chunk == nullptr)
    return ffi::Error::InvalidArgument("fpdm_winograd_forward: channels % 8 != 0");
  const Problem p{x.typed_data(), u.typed_data(), y->typed_data(), nullptr,
                  xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], pad_top, pad_left,
                  (yd[1] + 1) / 2, (yd[2] + 1) / 2};
  const int64_t tiles = xd[0] * p.tiles_h * p.tiles_w;
  const int64_t per_chunk = std::max<int64_t>(
      1, std::min(kMaxChunkTiles, kScratchFloats / (16 * (p.cin + k.ob))));
  const int64_t count = (tiles + per_chunk - 1) / per_chunk;
  RunChunks(pool, count, tiles * 16 * p.cin * p.cout, [&](int64_t c) {
    const int64_t first = tiles * c / count, last = tiles * (c + 1) / count;
    k.chunk(p, first, last - first);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The kernel gradient, by the same algorithm transposed (Lavin & Gray's
// F(3x3, 2x2)):
//
//   dW = G^T [ sum_tiles (B^T d B) * (A g A^T) ] G    per input and output channel
//
// with d a tile's 4x4 input window, as the forward's, and g the tile's 2x2
// block of the output gradient. The sum over tiles is 16 [C_in, tiles] x
// [tiles, C_out] matmuls, 2.25x fewer multiply-adds than the direct kernel
// gradient's nine taps x four pixels. The 16 accumulators M[k] (C_in x C_out
// each) are split into groups of positions small enough to stay in L2 while
// chunks of tiles stream past them: one task is a group of positions over a
// range of tiles. The number of tile ranges, and so of partial sums (summed
// in range order at the end), follows from the shapes alone: the bits do not
// depend on the thread count.

// z[k - k0][t][o] (rows PositionStride(count * cout) apart) = (A g A^T)[r][s]
// for the chunk's tiles and positions k0 <= k < k1, g the tile's 2x2 block of
// dy, zero where it lies past the output's edge.
template <typename V>
void GradientTransform(const Problem& q, int64_t first, int64_t count, int k0, int k1, float* z) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  const int64_t cout = q.cout;
  const int64_t stride = PositionStride(count * cout);
  for (int64_t t = 0; t < count; ++t) {
    const auto [b, ty, tx] = PlaceOf(q, first + t);
    const bool second_row = 2 * ty + 1 < q.out_h, second_col = 2 * tx + 1 < q.out_w;
    const float* g0 = q.dy + ((b * q.out_h + 2 * ty) * q.out_w + 2 * tx) * cout;
    const float* g1 = g0 + q.out_w * cout;
    float* out = z + t * cout;
    for (int64_t o = 0; o < cout; o += kLanes) {
      const V g00 = Load<V>(g0 + o), g01 = second_col ? Load<V>(g0 + cout + o) : V{};
      const V g10 = second_row ? Load<V>(g1 + o) : V{};
      const V g11 = second_row && second_col ? Load<V>(g1 + cout + o) : V{};
      const V h[4][2] = {{g00, g01}, {g00 + g10, g01 + g11}, {g00 - g10, g01 - g11}, {-g10, -g11}};
      for (int r = 0; r < 4; ++r) {  // (A g) A^T: columns
        StorePosition(out, r * 4 + 0, k0, k1, stride, o, h[r][0]);
        StorePosition(out, r * 4 + 1, k0, k1, stride, o, h[r][0] + h[r][1]);
        StorePosition(out, r * 4 + 2, k0, k1, stride, o, h[r][0] - h[r][1]);
        StorePosition(out, r * 4 + 3, k0, k1, stride, o, -h[r][1]);
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
  int positions;           // per group: 16, 8, 4, 2 or 1
  int64_t ranges;          // tile ranges, each with its own partial sums
  int64_t chunk;           // tiles per chunk
  AccumulateBlocking acc;  // the [C_in, tiles] x [tiles, C_out] matmul
};

GradientPlan Plan(int64_t tiles, int64_t cin, int64_t cout) {
  GradientPlan g{16, 1, 1, PickAccumulateBlocking(cout)};
  while (g.positions > 1 && g.positions * cin * cout > kGradientAccumulatorFloats)
    g.positions /= 2;
  const int64_t groups = 16 / g.positions;
  g.ranges = std::clamp<int64_t>(tiles / kMinRangeTiles, 1,
                                 std::max<int64_t>(1, kGradientTasks / groups));
  g.chunk = std::max<int64_t>(1, kGradientScratchFloats / (g.positions * (cin + cout)));
  return g;
}

// Adds positions [k0, k0 + plan.positions) of tiles [first, last) into
// acc[k - k0] (C_in x C_out each).
template <typename VI, typename VO>
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
    InputTransform<VI>(q, t, count, k0, k1, v);
    GradientTransform<VO>(q, t, count, k0, k1, z);
    for (int j = 0; j < plan.positions; ++j)
      plan.acc.Run(v + j * vs, q.cin, z + j * zs, q.cin, q.cout, count,
                   acc + j * q.cin * q.cout);
  }
}

// dw[i][j][c][o] = (G^T M G)[i][j] for channels [c0, c1), M the sum of the
// ranges' partial accumulators m[range][k][c][o].
template <typename V>
void KernelFromTransform(const float* m, int64_t ranges, int64_t cin, int64_t cout, int64_t c0,
                         int64_t c1, float* dw) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  const int64_t size = cin * cout;
  const V half = V{} + 0.5f;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t o = 0; o < cout; o += kLanes) {
      V mk[16];
      for (int k = 0; k < 16; ++k) {
        mk[k] = Load<V>(m + k * size + c * cout + o);
        for (int64_t r = 1; r < ranges; ++r) mk[k] += Load<V>(m + (r * 16 + k) * size + c * cout + o);
      }
      V e[3][4];  // G^T M: rows
      for (int s = 0; s < 4; ++s) {
        const V sum = half * (mk[4 + s] + mk[8 + s]);
        e[0][s] = mk[s] + sum;
        e[1][s] = half * (mk[4 + s] - mk[8 + s]);
        e[2][s] = sum + mk[12 + s];
      }
      for (int i = 0; i < 3; ++i) {  // (G^T M) G: columns
        const V sum = half * (e[i][1] + e[i][2]);
        float* out = dw + i * 3 * size + c * cout + o;
        Store(out, e[i][0] + sum);
        Store(out + size, half * (e[i][1] - e[i][2]));
        Store(out + 2 * size, sum + e[i][3]);
      }
    }
}

using AccumulateTilesFn = void (*)(const Problem&, const GradientPlan&, int, int64_t, int64_t,
                                   float*);

// The widest vectors that divide C_in (input transform) and C_out (output
// gradient transform).
AccumulateTilesFn PickGradient(int64_t cin, int64_t cout) {
  if (cin % 8 || cout % 8) return nullptr;
#if defined(__AVX512F__)
  if (cin % 16 == 0)
    return cout % 16 == 0 ? AccumulateTiles<V16, V16> : AccumulateTiles<V16, V8>;
  if (cout % 16 == 0) return AccumulateTiles<V8, V16>;
#endif
  return AccumulateTiles<V8, V8>;
}

ffi::Error KernelGradient(ffi::ThreadPool pool, Image x, Image dy, ffi::Result<Image> dw,
                          int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd[0] != dd[0] || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || wd[3] != dd[3] ||
      pad_top < 0 || pad_left < 0 || pad_top > 2 || pad_left > 2)
    return ffi::Error::InvalidArgument(
        "fpdm_winograd_kernel_gradient: inconsistent shapes or padding");
  const AccumulateTilesFn accumulate = PickGradient(xd[3], dd[3]);
  if (accumulate == nullptr)
    return ffi::Error::InvalidArgument("fpdm_winograd_kernel_gradient: channels % 8 != 0");
  const Problem p{x.typed_data(), nullptr, nullptr, dy.typed_data(),
                  xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], pad_top, pad_left,
                  (dd[1] + 1) / 2, (dd[2] + 1) / 2};
  const int64_t tiles = xd[0] * p.tiles_h * p.tiles_w, size = p.cin * p.cout;
  const GradientPlan plan = Plan(tiles, p.cin, p.cout);
  const int64_t groups = 16 / plan.positions;
  std::vector<float> partial(plan.ranges * 16 * size);  // zeros
  RunChunks(pool, groups * plan.ranges, tiles * 16 * size, [&](int64_t task) {
    const int64_t group = task % groups, range = task / groups;
    const int k0 = static_cast<int>(group) * plan.positions;
    accumulate(p, plan, k0, tiles * range / plan.ranges, tiles * (range + 1) / plan.ranges,
               partial.data() + (range * 16 + k0) * size);
  });
  const int64_t blocks = std::min<int64_t>(p.cin, kGradientTasks);
  RunChunks(pool, blocks, 16 * size * plan.ranges, [&](int64_t block) {
    const int64_t c0 = p.cin * block / blocks, c1 = p.cin * (block + 1) / blocks;
#if defined(__AVX512F__)
    if (p.cout % 16 == 0) {
      KernelFromTransform<V16>(partial.data(), plan.ranges, p.cin, p.cout, c0, c1,
                               dw->typed_data());
      return;
    }
#endif
    KernelFromTransform<V8>(partial.data(), plan.ranges, p.cin, p.cout, c0, c1, dw->typed_data());
  });
  return ffi::Error::Success();
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
                                  .Attr<int64_t>("pad_left"));
