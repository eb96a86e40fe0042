"""Attention and the precision policy shared by every model family.

All attention goes through ``jax.nn.dot_product_attention`` so XLA can pick a
fused kernel (cuDNN flash attention on GPU, the TPU kernel on TPU) while the
CPU path stays the plain einsum. Parameters are float32; ``dtype`` is the
compute dtype (bfloat16 on accelerators), which is how mixed precision is
spelled in Flax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
  """The same maths with heads before tokens ([B, N, T, D] batched matmuls).

  XLA:CPU has no fused attention kernel and runs ``jax.nn.dot_product_attention``'s
  [B, T, N, D] einsums 3-4x slower than these layouts (benchmarks/README.md,
  "attention"); on GPU/TPU the fused kernels win, so this path is CPU-only.
  """
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  logits = jnp.matmul(qh * jnp.asarray(scale, q.dtype), jnp.swapaxes(kh, -1, -2))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(vh.dtype)
  return jnp.swapaxes(jnp.matmul(weights, vh), 1, 2)
