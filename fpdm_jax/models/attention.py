"""Attention and the precision policy shared by every model family.

On GPU/TPU all attention goes through ``jax.nn.dot_product_attention`` so XLA
can pick a fused kernel (cuDNN flash attention on GPU, the TPU kernel on TPU);
on CPU it takes heads-major batched matmuls with a hand-written backward
(``_heads_major_attention``), or, in a one-device CPU process with the native
custom calls built, native forward and backward kernels
(``models.native_attention``). Parameters are float32; ``dtype`` is the
compute dtype (bfloat16 on accelerators), which is how mixed precision is
spelled in Flax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fpdm_jax.models import dense, native_attention


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          upcast: bool = False, mask: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """Multi-head attention on ``[batch, length, heads, head_dim]`` arrays.

  Args:
    upcast: compute softmax(QK^T) in float32 even for bfloat16 inputs (what
      diffusers' ``upcast_attention`` does for SD 2.1, whose attention logits
      overflow in half precision).
    implementation: passed to ``jax.nn.dot_product_attention`` (None lets JAX
      choose; "cudnn" forces the fused GPU kernel).
  """
  dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if implementation is None and jax.default_backend() == "cpu":
    out = _heads_major_attention(q, k, v, mask)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out.astype(dtype)


def _heads_major_attention(q, k, v, mask):
  """The same maths with heads before tokens ([B*N, T, D] batched matmuls).

  XLA:CPU has no fused attention kernel and runs ``jax.nn.dot_product_attention``'s
  [B, T, N, D] einsums 3-4x slower than these layouts (benchmarks/README.md,
  "attention"); its autodiff of the softmax is slow too, hence the hand-written
  backward (``_attention``). On GPU/TPU the fused kernels win, so this path is
  CPU-only.
  """
  b, t, n, d = q.shape
  s = k.shape[1]
  groups = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * n, x.shape[1], d)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b * n, t, s)
  out = _attention(groups(q) * jnp.asarray(d ** -0.5, q.dtype), groups(k), groups(v), mask)
  return jnp.swapaxes(out.reshape(b, n, t, d), 1, 2)


def _probabilities(q, k, mask):
  logits = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)  # float32


def _native(q, k, v, mask) -> bool:
  """Whether the native calls compute this attention: they support the
  operands, and the process has one CPU device (a custom call is not
  partitioned: sharded, XLA would gather its operands)."""
  return (native_attention.supports(q, k, v, mask) and dense.single_cpu_device()
          and native_attention.available())


@jax.custom_vjp
def _attention(q, k, v, mask):
  """softmax(q k^T) v on [G, T, D] (q already scaled), softmax in float32."""
  if _native(q, k, v, mask):
    return native_attention.forward(q, k, v)
  return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  if _native(q, k, v, mask):  # p in the native calls' layout (native_attention)
    o, p = native_attention.forward_with_probabilities(q, k, v)
  else:
    p = _probabilities(q, k, mask)
    o = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v)
  return o, (q, k, v, mask, p, o)


def _attention_bwd(res, do):
  """The softmax-attention backward written out (as flash attention's):
  dS = P * (dO V^T - rowsum(dO * O)). XLA's autodiff of the forward took
  twice as long for one head of 1024 tokens on CPU (100 vs 55 ms at batch 8)."""
  q, k, v, mask, p, o = res
  if _native(q, k, v, mask):
    do = do.astype(jnp.float32)
    dq, ds = native_attention.backward_queries(k, v, o, p, do)
    dk, dv = native_attention.backward_keys(q, do, p, ds, k.shape[1])
    return dq, dk, dv, None
  dv = _sum_over_queries(p.astype(do.dtype), do)
  dp = jnp.einsum("gqd,gkd->gqk", do, v, preferred_element_type=jnp.float32)
  rows = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p * (dp - rows)).astype(q.dtype)  # zero where masked, since p is
  dq = jnp.einsum("gqk,gkd->gqd", ds, k)
  dk = _sum_over_queries(ds, q)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)

# From this many queries on, _sum_over_queries takes the transposed form.
# Below it the two forms were within noise of each other (benchmarks/README.md,
# finding 15).
TRANSPOSED_FORM_MIN_QUERIES = 256


def _sum_over_queries(w, x):
  """sum_q w[g, q, k] x[g, q, d] -> [g, k, d]: dV = P^T dO and dK = dS^T Q.

  Written plainly, this dot contracts dimension 1 of both operands, and
  XLA:CPU hands it to its Eigen kernels, not to YNNPACK: at 1024 queries,
  batch 8, it took 29-37 ms where the same FLOPs as a plain batched matmul
  take 6 ms. The transposed result x^T w -> [g, d, k] is still Eigen's, but
  in a form it runs in 11.5 ms; the optimisation barrier is what stops XLA's
  simplifier from folding the final swap back into the dot (which would give
  the slow form again), and the swap moves only the small [g, d, k] array.
  One 1024-token head at batch 8, forward and backward: 114.9 -> 75.0 ms
  (torch's SDPA: 93.9 ms; ``python -m benchmarks.attention``).

  ``TRANSPOSED_FORM_MIN_QUERIES`` is read when the backward is traced, and JAX
  caches that trace: to compare the two forms in one process, change it and
  call ``jax.clear_caches()`` before compiling again.
  """
  if x.shape[1] < TRANSPOSED_FORM_MIN_QUERIES or not dense.single_cpu_device():
    return jnp.einsum("gqk,gqd->gkd", w, x)
  return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum("gqd,gqk->gdk", x, w)), 1, 2)
