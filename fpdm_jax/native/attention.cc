// Softmax attention per head, o = softmax(q k^T) v, forward and backward, as
// XLA:CPU FFI custom calls (fpdm_jax/models/native_attention.py says when
// they are used, and why).
//
//   Forward          q [G, T, D] (already scaled by 1/sqrt(D)), k, v [G, S, D]
//                    -> o [G, T, D], and for a backward pass the
//                    probabilities P [G, T, KeysStride(S)], zero past S.
//   BackwardQueries  k, v, o, P, dO -> dQ = dS K and dS = P * (dO V^T - delta),
//                    delta_t = sum_d dO[t, d] O[t, d], in P's layout.
//   BackwardKeys     q, dO, P, dS -> dK = dS^T Q, dV = P^T dO.
//
// XLA:CPU runs the forward as a matmul writing the [T, S] logits to memory,
// a softmax of three passes over them and a second matmul reading them back.
// Here each block of query rows goes through all three while its logits are
// in cache (L2): logits = q_block k^T, exp(logits - row max), row sums,
// o_block = p v; the backward's query side likewise per block. Every matmul
// is a register-blocked tile (kRows rows x NV vectors of output accumulated
// over the whole contraction); k and v are transposed once per call so that
// q k^T and dO v^T, too, read their right operand along rows. The chunks
// (blocks of query rows, or of keys for BackwardKeys) write disjoint outputs
// and sum nothing across threads, so the bits do not depend on the thread
// count.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using namespace fpdm_native;  // NOLINT: this file's own helpers

using Heads = ffi::Buffer<ffi::F32, 3>;  // [G, tokens, D]

// Whether two operands' dimensions are equal.
template <typename A, typename B>
bool SameShape(const A& a, const B& b) {
  return a[0] == b[0] && a[1] == b[1] && a[2] == b[2];
}

// The widest tile: kRows x kWideVectors accumulators, plus the b vectors
// and a broadcast, fit the vector registers (32 with AVX-512, 16 without).
#if defined(__AVX512F__)
using Vec = V16;
constexpr int kWideVectors = 4;  // 64 columns per tile
#else
using Vec = V8;
constexpr int kWideVectors = 2;  // 16 columns per tile
#endif
constexpr int kLanes = sizeof(Vec) / sizeof(float);
// Rows per tile, in both matmuls (query blocks are padded to a multiple).
constexpr int kRows = 6;
// Logits kept per query block: its rows x S floats stay well inside L2.
constexpr int64_t kBlockFloats = 48 * 1024;
constexpr int64_t kMaxBlockRows = 96;

// common.h's register tile at this file's vector width and rows.
template <int NV>
inline void Tile(const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                 int64_t depth, float* c, int64_t ldc) {
  TileProduct<Vec, kRows, NV>(a, am, ak, b, ldb, depth, c, ldc);
}

// The widths of the column panels, widest first: kWideVectors, 2 and 1
// vectors (the last ones padded with zero keys).
template <typename Fn>
void ForEachPanel(int64_t n, Fn fn) {
  int64_t col = 0;
  for (; col + kWideVectors * kLanes <= n; col += kWideVectors * kLanes)
    fn(col, kWideVectors);
  for (; col + 2 * kLanes <= n; col += 2 * kLanes) fn(col, 2);
  for (; col < n; col += kLanes) fn(col, 1);
}

// c [rows, n] = a [rows, depth] b, with b [depth, n] stored in column
// panels: the panel of columns [col, col + w) at b + col * depth, rows w
// apart, so that a tile reads one contiguous block (rows `ldb` apart would
// alias in L1 when ldb is a multiple of 4 KiB). rows is a multiple of kRows.
void PanelMatMul(const float* a, int64_t lda, const float* b, int64_t depth, float* c,
                 int64_t ldc, int64_t rows, int64_t n) {
  ForEachPanel(n, [&](int64_t col, int nv) {
    const float* panel = b + col * depth;
    const int64_t w = nv * kLanes;
    for (int64_t r = 0; r < rows; r += kRows) {
      if (nv == kWideVectors)
        Tile<kWideVectors>(a + r * lda, lda, 1, panel, w, depth, c + r * ldc + col, ldc);
      else if (nv == 2)
        Tile<2>(a + r * lda, lda, 1, panel, w, depth, c + r * ldc + col, ldc);
      else
        Tile<1>(a + r * lda, lda, 1, panel, w, depth, c + r * ldc + col, ldc);
    }
  });
}

// c [rows, n] = a [rows, depth] b [depth, n], a's element (m, k) at
// a[m * am + k * ak], b's rows ldb apart; n a multiple of kLanes, rows of kRows.
void MatMul(const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, int64_t depth,
            float* c, int64_t ldc, int64_t rows, int64_t n) {
  int64_t col = 0;
  for (; col + kWideVectors * kLanes <= n; col += kWideVectors * kLanes)
    for (int64_t r = 0; r < rows; r += kRows)
      Tile<kWideVectors>(a + r * am, am, ak, b + col, ldb, depth, c + r * ldc + col, ldc);
  for (; col + 2 * kLanes <= n; col += 2 * kLanes)
    for (int64_t r = 0; r < rows; r += kRows)
      Tile<2>(a + r * am, am, ak, b + col, ldb, depth, c + r * ldc + col, ldc);
  for (; col < n; col += kLanes)
    for (int64_t r = 0; r < rows; r += kRows)
      Tile<1>(a + r * am, am, ak, b + col, ldb, depth, c + r * ldc + col, ldc);
}

// e^x for x <= 0 (logits minus their row maximum), to about 2 ulp: x =
// n ln2 + f with |f| <= ln2 / 2, e^f by its degree-6 Taylor polynomial
// (error below 2e-7 there), 2^n built in the exponent bits. Below -87 the
// result is flushed to 0 (e^-87 is 1.6e-38, the smallest normal float).
inline Vec Exp(Vec x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(Vec))));
  const Vec lo = Vec{} - 87.0f;
  const VI live = x > lo;  // all ones where x is in range
  x = live ? x : lo;
  const Vec shifter = Vec{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + shifter) - shifter;
  const Vec f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
  Vec p = Vec{} + (1.0f / 720);
  p = p * f + (1.0f / 120);
  p = p * f + (1.0f / 24);
  p = p * f + (1.0f / 6);
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return live ? p * two_n : Vec{};
}

// Per head, x [G, S, D] transposed to [D, sp] (sp = KeysStride(S), zero past
// S) and stored in PanelMatMul's column panels.
std::vector<float> TransposedPanels(ffi::ThreadPool& pool, const float* x, int64_t heads,
                                    int64_t s, int64_t d, int64_t sp) {
  std::vector<float> out(heads * d * sp, 0.0f);
  RunChunks(pool, heads, heads * s * d * 64, [&](int64_t g) {
    float* head = out.data() + g * d * sp;
    ForEachPanel(sp, [&](int64_t col, int nv) {
      const int64_t w = nv * kLanes;
      for (int64_t j = col; j < std::min(col + w, s); ++j)
        for (int64_t c = 0; c < d; ++c) head[col * d + c * w + (j - col)] = x[(g * s + j) * d + c];
    });
  });
  return out;
}

// The row stride of the logits, and of the P and dS the backward reads and
// writes, for S keys: at least S + kRows (so that a tile of kRows keys
// starting before S stays in the row: BackwardKeys), whole 16-float cache
// lines (whole vectors in every build), and an odd number of them, so that
// the rows of a block fall in different L1 sets (a stride of a multiple of
// 4 KiB would put them all in one). models/native_attention.py computes
// the same, to give P and dS this shape.
int64_t KeysStride(int64_t s) {
  constexpr int64_t kLine = 64 / sizeof(float);
  int64_t sp = (s + kRows + kLine - 1) / kLine * kLine;
  if ((sp / kLine) % 2 == 0) sp += kLine;
  return sp;
}

// Query rows per chunk: a multiple of kRows whose [rows, sp] logits fit
// kBlockFloats.
int64_t BlockRows(int64_t sp) {
  return std::clamp<int64_t>(kBlockFloats / sp / kRows * kRows, kRows, kMaxBlockRows);
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* o;
  float* p;  // [G, T, keys_padded]: the probabilities, zero past S, or nullptr
  int64_t queries, keys, dim;
  int64_t keys_padded;  // KeysStride(S): the logits' (and P's) row stride
  int64_t block_rows;   // query rows per chunk, a multiple of kRows
  const float* kt;      // per head, k^T [D, keys_padded] in column panels (PanelMatMul)
};

// Each row of logits [rows, ld] becomes exp(logit - row max) over its first
// `keys` entries, in place; inv_sum gets 1 / each row's sum.
void Softmax(float* logits, int64_t ld, int64_t rows, int64_t keys, float* inv_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * ld;
    Vec mv = Vec{} - 3.0e38f;
    int64_t s = 0;
    for (; s + kLanes <= keys; s += kLanes) {
      const Vec x = Load<Vec>(row + s);
      mv = x > mv ? x : mv;
    }
    float m = mv[0];
    for (int i = 1; i < kLanes; ++i) m = std::max(m, mv[i]);
    for (; s < keys; ++s) m = std::max(m, row[s]);
    Vec sv = Vec{};
    s = 0;
    for (; s + kLanes <= keys; s += kLanes) {
      const Vec e = Exp(Load<Vec>(row + s) - m);
      Store(row + s, e);
      sv += e;
    }
    float sum = 0;
    for (int i = 0; i < kLanes; ++i) sum += sv[i];
    if (s < keys) {  // the tail, through one padded vector
      float tail[kLanes] = {};
      for (int64_t i = s; i < keys; ++i) tail[i - s] = row[i] - m;
      for (int64_t i = keys - s; i < kLanes; ++i) tail[i] = -1.0e30f;
      const Vec e = Exp(Load<Vec>(tail));
      for (int64_t i = s; i < keys; ++i) {
        row[i] = e[i - s];
        sum += e[i - s];
      }
    }
    inv_sum[r] = 1.0f / sum;
  }
}

void Block(const Problem& q, int64_t g, int64_t q0, std::vector<float>& scratch) {
  const int64_t d = q.dim, sp = q.keys_padded;
  const int64_t valid = std::min(q.block_rows, q.queries - q0);
  const int64_t rows = (valid + kRows - 1) / kRows * kRows;
  scratch.resize(rows * d + rows * sp + rows * d + rows);
  float* qs = scratch.data();      // [rows, D], zero rows past `valid`
  float* logits = qs + rows * d;   // [rows, keys_padded]
  float* os = logits + rows * sp;  // [rows, D]
  float* inv_sum = os + rows * d;
  const float* q_rows = q.q + (g * q.queries + q0) * d;
  std::copy(q_rows, q_rows + valid * d, qs);
  std::fill(qs + valid * d, qs + rows * d, 0.0f);
  PanelMatMul(qs, d, q.kt + g * d * sp, d, logits, sp, rows, sp);
  Softmax(logits, sp, valid, q.keys, inv_sum);
  std::fill(logits + valid * sp, logits + rows * sp, 0.0f);
  if (q.p != nullptr) {  // normalise in place, so that o = p v directly
    for (int64_t r = 0; r < valid; ++r) {
      float* row = logits + r * sp;
      for (int64_t s = 0; s < q.keys; ++s) row[s] *= inv_sum[r];
      inv_sum[r] = 1.0f;
    }
    std::copy(logits, logits + valid * sp, q.p + (g * q.queries + q0) * sp);
  }
  MatMul(logits, sp, 1, q.v + g * q.keys * d, d, q.keys, os, d, rows, d);
  float* o_rows = q.o + (g * q.queries + q0) * d;
  for (int64_t r = 0; r < valid; ++r)
    for (int64_t c = 0; c < d; ++c) o_rows[r * d + c] = os[r * d + c] * inv_sum[r];
}

ffi::Error Run(ffi::ThreadPool& pool, const Heads& q, const Heads& k, const Heads& v, float* o,
               float* p) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (kd[0] != qd[0] || vd[0] != qd[0] || kd[1] != vd[1] || kd[2] != qd[2] || vd[2] != qd[2])
    return ffi::Error::InvalidArgument("fpdm_attention: inconsistent shapes");
  const int64_t g_count = qd[0], t = qd[1], s = kd[1], d = qd[2];
  if (d % kLanes != 0)
    return ffi::Error::InvalidArgument("fpdm_attention: head size not a multiple of the vector");
  const int64_t sp = KeysStride(s);
  const std::vector<float> kt = TransposedPanels(pool, k.typed_data(), g_count, s, d, sp);
  const int64_t block_rows = BlockRows(sp);
  const int64_t blocks = (t + block_rows - 1) / block_rows;
  const Problem prob{q.typed_data(), k.typed_data(), v.typed_data(), o, p, t, s, d, sp,
                     block_rows, kt.data()};
  RunChunks(pool, g_count * blocks, g_count * t * s * d * 2, [&](int64_t c) {
    thread_local std::vector<float> scratch;
    Block(prob, c / blocks, (c % blocks) * block_rows, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Heads q, Heads k, Heads v, ffi::Result<Heads> o) {
  return Run(pool, q, k, v, o->typed_data(), nullptr);
}

ffi::Error ForwardWithProbabilities(ffi::ThreadPool pool, Heads q, Heads k, Heads v,
                                    ffi::Result<Heads> o, ffi::Result<Heads> p) {
  const auto pd = p->dimensions();
  if (pd[0] != q.dimensions()[0] || pd[1] != q.dimensions()[1] ||
      pd[2] != KeysStride(k.dimensions()[1]))
    return ffi::Error::InvalidArgument("fpdm_attention: probabilities of the wrong shape");
  return Run(pool, q, k, v, o->typed_data(), p->typed_data());
}


// The backward's query side: with delta_t = sum_d dO[t, d] O[t, d],
//   dS = P * (dO V^T - delta),  dQ = dS K,
// per block of query rows as in the forward (dO V^T and dS stay in cache).
// dS is written out, in P's layout, for BackwardKeys.
ffi::Error BackwardQueries(ffi::ThreadPool pool, Heads k, Heads v, Heads o, Heads p, Heads d_o,
                           ffi::Result<Heads> dq, ffi::Result<Heads> ds) {
  const auto kd = k.dimensions(), od = o.dimensions(), pd = p.dimensions();
  const int64_t g_count = od[0], t = od[1], d = od[2], s = kd[1];
  const int64_t sp = KeysStride(s);
  if (kd[0] != g_count || kd[2] != d || !SameShape(v.dimensions(), kd) ||
      !SameShape(d_o.dimensions(), od) || pd[0] != g_count || pd[1] != t || pd[2] != sp)
    return ffi::Error::InvalidArgument("fpdm_attention_backward: inconsistent shapes");
  if (d % kLanes != 0)
    return ffi::Error::InvalidArgument(
        "fpdm_attention_backward: head size not a multiple of the vector");
  const std::vector<float> vt = TransposedPanels(pool, v.typed_data(), g_count, s, d, sp);
  const int64_t block_rows = BlockRows(sp);
  const int64_t blocks = (t + block_rows - 1) / block_rows;
  const float *k_data = k.typed_data(), *o_data = o.typed_data(), *p_data = p.typed_data(),
              *do_data = d_o.typed_data();
  float *dq_data = dq->typed_data(), *ds_data = ds->typed_data();
  RunChunks(pool, g_count * blocks, g_count * t * s * d * 2, [&](int64_t c) {
    thread_local std::vector<float> scratch;
    const int64_t g = c / blocks, q0 = (c % blocks) * block_rows;
    const int64_t valid = std::min(block_rows, t - q0);
    const int64_t rows = (valid + kRows - 1) / kRows * kRows;
    scratch.resize(rows * d + rows * sp + rows * d);
    float* dos = scratch.data();     // [rows, D], zero rows past `valid`
    float* grad = dos + rows * d;    // dO V^T, then dS: [rows, sp]
    float* dqs = grad + rows * sp;   // [rows, D]
    const int64_t first = g * t + q0;  // the block's first row in [G * T]
    std::copy(do_data + first * d, do_data + (first + valid) * d, dos);
    std::fill(dos + valid * d, dos + rows * d, 0.0f);
    PanelMatMul(dos, d, vt.data() + g * d * sp, d, grad, sp, rows, sp);
    for (int64_t r = 0; r < valid; ++r) {
      const float* o_row = o_data + (first + r) * d;
      float delta = 0;
      for (int64_t i = 0; i < d; ++i) delta += dos[r * d + i] * o_row[i];
      const float* p_row = p_data + (first + r) * sp;
      float* ds_row = ds_data + (first + r) * sp;
      float* g_row = grad + r * sp;
      for (int64_t j = 0; j < sp; ++j) ds_row[j] = g_row[j] = p_row[j] * (g_row[j] - delta);
    }
    std::fill(grad + valid * sp, grad + rows * sp, 0.0f);
    MatMul(grad, sp, 1, k_data + g * s * d, d, s, dqs, d, rows, d);
    std::copy(dqs, dqs + valid * d, dq_data + first * d);
  });
  return ffi::Error::Success();
}

// The backward's key side: dK = dS^T Q and dV = P^T dO, sums over every
// query, per block of key rows. Tile reads dS and P transposed: kRows
// neighbouring keys of one query row at a time, rows KeysStride(S) apart (an
// odd number of cache lines, so they do not alias in L1). A tile that
// starts before S reads zeros past it (KeysStride leaves room); its rows
// past S are computed into scratch and dropped.
ffi::Error BackwardKeys(ffi::ThreadPool pool, Heads q, Heads d_o, Heads p, Heads ds,
                        ffi::Result<Heads> dk, ffi::Result<Heads> dv) {
  const auto qd = q.dimensions(), pd = p.dimensions(), kd = dk->dimensions();
  const int64_t g_count = qd[0], t = qd[1], d = qd[2], s = kd[1], sp = pd[2];
  if (!SameShape(d_o.dimensions(), qd) || !SameShape(ds.dimensions(), pd) || pd[0] != g_count ||
      pd[1] != t || sp != KeysStride(s) || kd[0] != g_count || kd[2] != d)
    return ffi::Error::InvalidArgument("fpdm_attention_backward_keys: inconsistent shapes");
  if (d % kLanes != 0)
    return ffi::Error::InvalidArgument(
        "fpdm_attention_backward_keys: head size not a multiple of the vector");
  constexpr int64_t kBlockKeys = 8 * kRows;
  const int64_t blocks = (s + kBlockKeys - 1) / kBlockKeys;
  const float *q_data = q.typed_data(), *do_data = d_o.typed_data(), *p_data = p.typed_data(),
              *ds_data = ds.typed_data();
  float *dk_data = dk->typed_data(), *dv_data = dv->typed_data();
  RunChunks(pool, g_count * blocks, g_count * t * s * d * 2, [&](int64_t c) {
    thread_local std::vector<float> tile;
    const int64_t g = c / blocks, k0 = (c % blocks) * kBlockKeys;
    const int64_t valid = std::min(kBlockKeys, s - k0);
    const int64_t whole = valid / kRows * kRows;
    for (const auto& [a, b, out] : {std::tuple{ds_data, q_data, dk_data},
                                    std::tuple{p_data, do_data, dv_data}}) {
      const float* a_cols = a + g * t * sp + k0;  // element (key m, query k) at m + k * sp
      const float* b_head = b + g * t * d;
      float* out_rows = out + (g * s + k0) * d;
      if (whole > 0) MatMul(a_cols, 1, sp, b_head, d, t, out_rows, d, whole, d);
      if (whole < valid) {
        tile.resize(kRows * d);
        MatMul(a_cols + whole, 1, sp, b_head, d, t, tile.data(), d, kRows, d);
        std::copy(tile.data(), tile.data() + (valid - whole) * d, out_rows + whole * d);
      }
    }
  });
  return ffi::Error::Success();
}
// The FFI signature of every call here: the pool, kArgs [G, tokens, D]
// operands, kRets >= 1 results of the same kind. (The last step is a Ret()
// call: a Binding cannot be copied or moved out of a variable.)
template <int kArgs, int kRets, typename B>
auto WithHeads(B&& binding) {
  static_assert(kRets >= 1);
  if constexpr (kArgs > 0)
    return WithHeads<kArgs - 1, kRets>(std::move(binding).template Arg<Heads>());
  else if constexpr (kRets > 1)
    return WithHeads<0, kRets - 1>(std::move(binding).template Ret<Heads>());
  else
    return std::move(binding).template Ret<Heads>();
}

template <int kArgs, int kRets>
auto HeadsBinding() {
  return WithHeads<kArgs, kRets>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>());
}

}  // namespace

// The exported symbols (the rest is built with -fvisibility=hidden).
#define FPDM_EXPORT extern "C" __attribute__((visibility("default"))) XLA_FFI_Error*
FPDM_EXPORT FpdmAttentionForward(XLA_FFI_CallFrame* call_frame);
FPDM_EXPORT FpdmAttentionForwardWithProbabilities(XLA_FFI_CallFrame* call_frame);
FPDM_EXPORT FpdmAttentionBackwardQueries(XLA_FFI_CallFrame* call_frame);
FPDM_EXPORT FpdmAttentionBackwardKeys(XLA_FFI_CallFrame* call_frame);
#undef FPDM_EXPORT

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmAttentionForward, Forward, (HeadsBinding<3, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmAttentionForwardWithProbabilities, ForwardWithProbabilities,
                              (HeadsBinding<3, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmAttentionBackwardQueries, BackwardQueries,
                              (HeadsBinding<5, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FpdmAttentionBackwardKeys, BackwardKeys, (HeadsBinding<4, 2>()));
