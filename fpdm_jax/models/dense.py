"""The dense layer's matmul, with its kernel gradient pinned to a fast form on XLA:CPU.

d(loss)/d(kernel) of ``y = x W`` is ``x^T dy``: a dot that contracts the token
dimension of both operands. Left to itself, XLA:CPU's layout assignment in a
whole UNet train step rewrites most of these dots so that the output gradient
is first copied transposed ([out, tokens]) and the dot then contracts
dimension 0 of one operand and dimension 1 of the other, a form its Eigen
kernels run 3-5x slower than the plain one (8192 tokens, 32 -> 256: 11.1 vs
2.6 ms; benchmarks/README.md, finding 15). An optimisation barrier around the
operands keeps that rewrite from reaching them, so the dot XLA compiles is the
plain one.

The forward and the input gradient are XLA's own; on GPU/TPU nothing changes
(the custom gradient is used only in a one-device CPU process,
``single_cpu_device``).
``FPDM_CONV_CPU_GRADIENTS=0`` turns this off together with the convolution
rules of ``models.convolution``, to measure what they change.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fpdm_jax import xla_cpu_flags
from fpdm_jax.models import convolution


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
  """``lax.dot_general`` (the signature ``nnx.Linear`` calls), with the CPU
  kernel gradient of the module docstring for a plain ``x[..., K] @ W[K, M]``."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (single_cpu_device()
      and not xla_cpu_flags.opted_out(convolution.ENV_OPT_OUT)
      and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
      and not lb and not rb and preferred_element_type is None and out_sharding is None):
    return _dense(lhs, rhs, precision)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def single_cpu_device() -> bool:
  """Where the CPU dot-form rules (this module's, and the attention's
  transposed dK/dV) apply: a one-device CPU process.

  Why not several CPU devices (only test set-ups simulate them): a sharded
  8-device stage-1 step with the barrier, compiled into JAX's persistent
  compilation cache by one process, aborted the next process that loaded it
  (jaxlib 0.10.2; not root-caused). One device is what CPU users run, and
  the benchmarks measure.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, precision):
  return jnp.matmul(x, w, precision=precision)


def _dense_fwd(x, w, precision):
  return _dense(x, w, precision), (x, w)


def _dense_bwd(precision, residuals, dy):
  x, w = residuals
  dx = jnp.matmul(dy, w.T, precision=precision).astype(x.dtype)
  x2, dy2 = lax.optimization_barrier((x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])))
  dw = jnp.einsum("nk,nm->km", x2, dy2, precision=precision,
                  preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def linear(in_features: int, out_features: int, **kwargs) -> nnx.Linear:
  """``nnx.Linear`` with this module's ``dot_general``: what every model's dense
  layers are built with."""
  return nnx.Linear(in_features, out_features, dot_general=dot_general, **kwargs)
