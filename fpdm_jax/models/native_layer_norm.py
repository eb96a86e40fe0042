"""LayerNorm's forward and backward as native XLA:CPU custom calls.

``models.normalization.LayerNorm`` writes its backward with every sum as a
matrix-vector product, which took nnx's forward + backward at [1, 1024, 64]
from 1.72 to 0.62 ms; torch's fused kernel still took 0.43, and 0.44-0.95x
our time at five of the six shapes of ``benchmarks.layer_norm`` (finding
28). With XLA ops each row's statistics, the normalised rows and the
gradient's per-row sums are separate passes over memory, and at batch 1
each is a small op of its own. fpdm_jax/native/layer_norm.cc does a row's
forward (or backward) in one visit while the row is in cache, over XLA's
thread pool, and keeps the mean and 1/std per row for the backward instead
of the normalised activations.

``models.normalization`` decides where the calls are used (float32, one CPU
device, a native build); ``FPDM_NATIVE_LAYER_NORM=0`` turns them off, to
measure them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fpdm_jax import xla_cpu_flags
from fpdm_jax.models import native

OPT_OUT = "FPDM_NATIVE_LAYER_NORM"


def available() -> bool:
  """Whether the native LayerNorm is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(OPT_OUT) and native.target_prefix() is not None


def _check(*arrays):
  if native.target_prefix() is None:
    raise RuntimeError("native LayerNorm asked for, but no native build is loaded for this CPU "
                       "(see setup.py and models/native.py); use native=False")
  for a in arrays:
    if a.dtype != jnp.float32:
      raise ValueError(f"native LayerNorm: float32 only, got {a.dtype} {a.shape}")


def _call(name: str, result_shapes, *args, **attrs):
  results = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in result_shapes)
  call = jax.ffi.ffi_call(native.target_prefix() + name, results, vmap_method="sequential")
  return call(*args, **attrs)


def forward(x, scale, bias, eps: float):
  """``(y, mean, rstd)`` of LayerNorm over the last axis of ``x`` [R, C]:
  ``y = (x - mean) * rstd * scale + bias``, mean and rstd [R]. Call only where
  ``available()``."""
  _check(x, scale, bias)
  r, c = x.shape
  return _call("_layer_norm_forward", ((r, c), (r,), (r,)), x, scale, bias, eps=np.float32(eps))


def backward(dy, x, mean, rstd, scale):
  """``(dx, d_scale, d_bias)`` for the output gradient ``dy`` [R, C] of
  ``forward(x, scale, ...)`` that returned ``mean`` and ``rstd``."""
  _check(dy, x, mean, rstd, scale)
  r, c = x.shape
  return _call("_layer_norm_backward", ((r, c), (c,), (c,)), dy, x, mean, rstd, scale)
