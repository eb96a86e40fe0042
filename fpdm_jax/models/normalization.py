"""Group and layer normalisation for channel-last activations, as torch's
``GroupNorm`` and ``LayerNorm``.

Why not ``nnx.GroupNorm``: it reshapes ``[B, H, W, C]`` to ``[B, H, W, G,
C/G]`` and reduces over the pixels and the group's few channels at once, with
those channels as the minor axis. XLA:CPU runs that reduction, and the
reductions autodiff makes of its reshapes and repeats, far below torch's
kernel: forward + backward of GroupNorm + SiLU at batch 8, 32x32, 64 channels
in 32 groups took 12.3 ms against torch's 2.4 ms, and 3.0 ms this way
(``python -m benchmarks.group_norm``; benchmarks/README.md, finding 19). Here:

- the statistics are per-channel sums over the pixels (a reduction over the
  major axis, the channels in the vector lanes), then summed over each group's
  channels on a ``[B, C]`` array;
- the backward pass is written out, the textbook
  ``dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat))`` with
  ``g = dy * scale``, from two per-channel sums over the pixels (of ``dy`` and
  ``dy * xhat``, which also give the scale and bias gradients), instead of
  the gradients of the reshapes.

The formulation is the same on every backend (a column reduction is what
accelerators like too). Numerics are nnx's with ``use_fast_variance=False``:
statistics in float32 whatever the compute dtype, two-pass variance (the
one-pass ``E[x^2] - E[x]^2`` loses digits on activations with a large mean,
which shows in parity tests against PyTorch). Parameters are ``scale`` and
``bias`` as nnx's, so checkpoints and importers do not change. Like any
``jax.custom_vjp`` it has no forward-mode rule (nothing in fpdm_jax uses
forward mode).

Why not ``nnx.LayerNorm``: its gradient has four multiply-reduces per call
(``sum(dy * xhat)`` over the tokens for the scale, and the two per-token sums
over the channels of the input gradient), and XLA:CPU's YNNPACK fusions of a
multiply-reduce over ``[1, 1024, 64]`` took 0.3-0.7 ms each in the medium
UNet's batch-1 step, where a plain reduce of the same array takes 15 us:
~20 ms of a ~260 ms step for the 15 LayerNorms of its 32x32 and 16x16
transformers. ``LayerNorm`` below writes the same backward out and computes
every one of those sums as a matrix-vector product (with a vector of ones),
which XLA's dot emitters run at memory speed: forward + backward at [1,
1024, 64] 1.72 -> 0.62 ms, up to 3.7x at the UNet's shapes (``python -m
benchmarks.layer_norm``; benchmarks/README.md, finding 28). Its
dots ask for ``Precision.HIGHEST``, so an accelerator does not round their
operands to bfloat16 (float32 statistics, as nnx's); the CPU ignores it.
In a one-device CPU process with the native calls built, the same formulas
run as two custom calls that visit each row once
(``models.native_layer_norm``; forward + backward at [1, 1024, 64] 0.27 ->
0.13 ms, torch's 0.25; about 1.02x on whole steps, finding 29).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax.models import dense, native_layer_norm

_HIGHEST = jax.lax.Precision.HIGHEST


class GroupNorm(nnx.Module):
  """GroupNorm over the last axis; statistics per sample over all other axes."""

  def __init__(self, num_features: int, *, num_groups: int, epsilon: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if rngs is not None:
      # nnx.GroupNorm draws a key for each of its (constant) initialisers; so
      # do we, so that every layer built after this one gets the same random
      # weights as before fpdm_jax had its own GroupNorm.
      rngs.params(), rngs.params()
    if num_features % num_groups:
      raise ValueError(f"GroupNorm: {num_features} channels do not split into "
                       f"{num_groups} groups")
    self.num_features, self.num_groups, self.epsilon = num_features, num_groups, epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.num_features:
      raise ValueError(f"GroupNorm expects {self.num_features} channels on the last axis, "
                       f"got shape {x.shape}")
    y = group_norm(x, self.scale.get_value(), self.bias.get_value(), self.num_groups,
                   self.epsilon)
    return y.astype(self.dtype)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """``[B, ..., C]`` normalised per (sample, group of C/num_groups channels),
  then ``* scale + bias``; float32 out. The casts stay outside the custom
  gradient, so autodiff returns each gradient in its input's dtype."""
  f32 = lambda a: a.astype(jnp.float32)
  return _group_norm(f32(x), f32(scale), f32(bias), num_groups, epsilon)


def _group_sums(per_channel: jax.Array, groups: int) -> jax.Array:
  """``[B, C]`` per-channel sums -> each channel's group sum, as ``[B, 1, C]``."""
  b, c = per_channel.shape
  g = per_channel.reshape(b, groups, c // groups).sum(-1, keepdims=True)
  return jnp.broadcast_to(g, (b, groups, c // groups)).reshape(b, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, groups, eps):
  return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  count = flat.shape[1] * (flat.shape[2] // groups)
  mean = _group_sums(flat.sum(1), groups) / count
  centred = flat - mean
  rstd = jax.lax.rsqrt(_group_sums((centred * centred).sum(1), groups) / count + eps)
  xhat = centred * rstd
  return (xhat * scale + bias).reshape(x.shape), (xhat, rstd, scale)


def _group_norm_bwd(groups, eps, res, dy):
  del eps
  xhat, rstd, scale = res
  b, n, c = xhat.shape
  flat_dy = dy.reshape(b, n, c)
  # Two passes over the activations: everything else is [B, C] arithmetic
  # (g = dy * scale, so g's sums are scale times dy's).
  sum_dy = flat_dy.sum(1)
  # As a dot, not (dy * xhat).sum(1): XLA:CPU compiled that multiply-reduce
  # 25-80x slower at batch 1, 256x256, 64 channels (47 vs 1.9 ms).
  sum_dy_xhat = jnp.einsum("bnc,bnc->bc", flat_dy, xhat, precision=_HIGHEST)
  count = n * (c // groups)
  mean_g = _group_sums(sum_dy * scale, groups) / count
  mean_gx = _group_sums(sum_dy_xhat * scale, groups) / count
  dx = rstd * (flat_dy * scale - mean_g - xhat * mean_gx)
  return dx.reshape(dy.shape), sum_dy_xhat.sum(0), sum_dy.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, as torch's ``nn.LayerNorm`` (and nnx's with
  ``use_fast_variance=False``): the same ``scale`` and ``bias`` parameters."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if rngs is not None:
      # One key per initialiser, as nnx.LayerNorm draws: the layers built
      # after this one keep the random weights they had with nnx's.
      rngs.params(), rngs.params()
    self.num_features, self.epsilon, self.dtype = num_features, epsilon, dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.num_features:
      raise ValueError(f"LayerNorm expects {self.num_features} features on the last axis, "
                       f"got shape {x.shape}")
    y = layer_norm(x, self.scale.get_value(), self.bias.get_value(), self.epsilon)
    return y.astype(x.dtype if self.dtype is None else self.dtype)  # None: as nnx's


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, *,
               native: bool | None = None) -> jax.Array:
  """``[..., C]`` normalised over ``C``, then ``* scale + bias``; float32 out.
  In a one-device CPU process with the native calls built, those compute it
  (``models.native_layer_norm``; ``native=False`` asks for the XLA ops, which
  every other backend runs); the same formulas either way."""
  f32 = lambda a: a.astype(jnp.float32)
  x, scale, bias = f32(x), f32(scale), f32(bias)
  if native is None:
    native = _use_native()
  if x.size and native:
    rows = x.reshape(-1, x.shape[-1])
    return _native_layer_norm(rows, scale, bias, epsilon).reshape(x.shape)
  return _layer_norm(x, scale, bias, epsilon)


def _use_native() -> bool:
  return dense.single_cpu_device() and native_layer_norm.available()


def _mean_last(a: jax.Array) -> jax.Array:
  """Mean over the last axis as ``[..., 1]``, by a matrix-vector product."""
  ones = jnp.ones((a.shape[-1], 1), a.dtype)
  return jnp.matmul(a, ones, precision=_HIGHEST) / a.shape[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  centred = x - _mean_last(x)
  rstd = jax.lax.rsqrt(_mean_last(centred * centred) + eps)
  xhat = centred * rstd
  return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  xhat, rstd, scale = res
  c = xhat.shape[-1]
  rows_dy, rows_xhat = dy.reshape(-1, c), xhat.reshape(-1, c)
  ones = jnp.ones((rows_dy.shape[0],), dy.dtype)
  d_scale = jnp.einsum("tc,tc->c", rows_dy, rows_xhat, precision=_HIGHEST)
  d_bias = jnp.matmul(ones, rows_dy, precision=_HIGHEST)
  g = dy * scale
  dx = rstd * (g - _mean_last(g) - xhat * _mean_last(g * xhat))
  return dx, d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_layer_norm(rows, scale, bias, eps):
  return native_layer_norm.forward(rows, scale, bias, eps)[0]


def _native_layer_norm_fwd(rows, scale, bias, eps):
  y, mean, rstd = native_layer_norm.forward(rows, scale, bias, eps)
  return y, (rows, mean, rstd, scale)


def _native_layer_norm_bwd(eps, res, dy):
  del eps
  return native_layer_norm.backward(dy, *res)


_native_layer_norm.defvjp(_native_layer_norm_fwd, _native_layer_norm_bwd)
