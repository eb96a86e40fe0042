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
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out.astype(dtype)
