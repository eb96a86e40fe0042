"""Softmax attention, forward and backward, as native XLA:CPU custom calls.

XLA:CPU has no fused attention: ``models.attention``'s CPU path is a batched
matmul that writes the [T, S] logits to memory, a softmax that reads and
writes them three times, and a second matmul that reads them back; its
backward makes as many passes over [T, S] arrays. At the UNet's 32x32
latents (1024 tokens) those passes cost about as much as the matmuls.
fpdm_jax/native/attention.cc runs each block of query rows through the
matmuls and the softmax while its logits are in cache, and the backward the
same way: 1.3-1.7x faster than XLA's forward, and a whole small-UNet sampling
loop 1.25-1.33x faster (benchmarks/README.md, finding 23).

Four calls: ``forward`` (o only, for sampling), ``forward_with_probabilities``
(o and P for a backward pass, P in a layout of the calls' own:
``probability_stride``), and the backward as ``backward_queries`` (dQ, dS)
then ``backward_keys`` (dK, dV). ``models.attention`` decides where they are
used (float32, no mask, a head size that is a multiple of 16, one CPU
device); ``FPDM_NATIVE_ATTENTION=0`` turns them off, to measure them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fpdm_jax import xla_cpu_flags
from fpdm_jax.models import native

OPT_OUT = "FPDM_NATIVE_ATTENTION"
# Every build's vector width divides this (16 floats with AVX-512, 8 without).
HEAD_SIZE_MULTIPLE = 16


def available() -> bool:
  """Whether the native attention is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(OPT_OUT) and native.target_prefix() is not None


def supports(q, k, v, mask) -> bool:
  """Whether ``forward`` computes this call: [G, T, D] float32 operands, no
  mask, D a multiple of ``HEAD_SIZE_MULTIPLE``."""
  return (mask is None and q.ndim == k.ndim == v.ndim == 3
          and all(a.dtype == jnp.float32 for a in (q, k, v))
          and q.shape[-1] % HEAD_SIZE_MULTIPLE == 0)


def _check(q, k, v):
  if not supports(q, k, v, None):
    raise ValueError("native attention: float32 [G, T, D] operands with D a multiple of "
                     f"{HEAD_SIZE_MULTIPLE} only, got {q.shape} {q.dtype}, {k.shape} {k.dtype}, "
                     f"{v.shape} {v.dtype}")


def forward(q, k, v):
  """softmax(q k^T) v for q [G, T, D] (already scaled), k and v [G, S, D].
  Call only where ``available()``."""
  _check(q, k, v)
  call = jax.ffi.ffi_call(native.target_prefix() + "_attention_forward",
                          jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
  return call(q, k, v)


def probability_stride(keys: int) -> int:
  """The row stride of the P and dS the native calls pass between them
  (``KeysStride`` in attention.cc): at least keys + 6, whole 16-float cache
  lines, an odd number of them (rows 4 KiB apart would alias in L1)."""
  lines = -(-(keys + 6) // 16)
  return 16 * (lines + 1 - lines % 2)


def forward_with_probabilities(q, k, v):
  """``forward`` and the probabilities softmax(q k^T), [G, T, probability_stride(S)]
  (zero past S), in the layout ``backward_queries`` and ``backward_keys`` read."""
  _check(q, k, v)
  g, t, _ = q.shape
  call = jax.ffi.ffi_call(native.target_prefix() + "_attention_forward_p",
                          (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           jax.ShapeDtypeStruct((g, t, probability_stride(k.shape[1])),
                                                jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v)


def backward_queries(k, v, o, p, do):
  """(dQ, dS) of the attention whose forward gave ``o`` and ``p``
  (``forward_with_probabilities``), for the output cotangent ``do``:
  dQ = dS K [G, T, D] and dS = P * (dO V^T - rowsum(dO * O)) in P's layout."""
  _check(o, k, v)
  if do.dtype != jnp.float32 or p.dtype != jnp.float32:
    raise ValueError(f"native attention backward: float32 only, got {do.dtype}, {p.dtype}")
  call = jax.ffi.ffi_call(native.target_prefix() + "_attention_backward_queries",
                          (jax.ShapeDtypeStruct(o.shape, jnp.float32),
                           jax.ShapeDtypeStruct(p.shape, jnp.float32)),
                          vmap_method="sequential")
  return call(k, v, o, p, do)


def backward_keys(q, do, p, ds, keys: int):
  """(dK, dV) = (dS^T Q, P^T dO), [G, keys, D] each: the sums over the queries
  that complete ``backward_queries``."""
  _check(q, q, do)
  if p.dtype != jnp.float32 or ds.dtype != jnp.float32:
    raise ValueError(f"native attention backward: float32 only, got {p.dtype}, {ds.dtype}")
  g, _, d = q.shape
  out = jax.ShapeDtypeStruct((g, keys, d), jnp.float32)
  call = jax.ffi.ffi_call(native.target_prefix() + "_attention_backward_keys", (out, out),
                          vmap_method="sequential")
  return call(q, do, p, ds)
