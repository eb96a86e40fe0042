"""The 2-D convolution of the UNet, VAE and pose embedding layers.

It is ``lax.conv_general_dilated`` with one exception: on XLA:CPU, at batch 1,
the kernel gradient is written as one matmul per kernel tap.

Why. XLA computes d(loss)/d(kernel) as another convolution whose "batch" is
the input channels and whose contraction runs over the batch dimension. At
batch 1 that contraction has length 1, and XLA:CPU's convolution kernels run
it far below the machine's matmul rate: a 32x32, 64 -> 64 kernel gradient
takes 5.5 ms against torch's 1.7 ms (benchmarks/README.md, findings 11 and
12). The same sum, for a 3x3 kernel,

  dW[i, j] = sum_{h, w} x_pad[s*h + i, s*w + j, :]^T dy[h, w, :]

is nine [C_in, H*W] x [H*W, C_out] matmuls, which contract over the pixels
and run at the matmul rate (1.6 ms for that conv). From batch 2 on XLA's own
kernel gradient is the faster one, so only batch 1 takes this path: training
at per-example batch 1 (the smallest configurations, fine-tuning on one
accelerator-less machine) and ``benchmarks.train_step``'s b1 rows.

The forward and the input gradient are always XLA's, and on GPU/TPU nothing
changes: the branch is taken only when JAX's default backend is the CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# 3x3 and smaller. A 16x16 patchify conv would be 256 thin matmuls.
_MAX_TAPS = 9


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls), with the
  per-tap kernel gradient for plain batch-1 NHWC convolutions on the CPU."""
  if _per_tap(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, batch_group_count, kwargs):
    return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision=precision, **kwargs)


def _per_tap(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count, batch_group_count, kwargs) -> bool:
  return (jax.default_backend() == "cpu"
          and lhs.ndim == 4 and lhs.shape[0] == 1
          and feature_group_count == 1 and batch_group_count == 1
          and not isinstance(padding, str)
          and all(lo >= 0 and hi >= 0 for lo, hi in padding)
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and rhs.shape[0] * rhs.shape[1] <= _MAX_TAPS
          and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
          and kwargs.get("preferred_element_type") is None
          and kwargs.get("out_sharding") is None)


def _plain_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _plain_conv(x, w, strides, padding, precision), x)
  (dx,) = input_vjp(dy)
  dw = kernel_gradient(x, dy, w.shape, strides, padding, precision)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_gradient(x, dy, kernel_shape, strides, padding, precision=None):
  """d(loss)/d(kernel) of an NHWC x HWIO convolution, one matmul per kernel tap.

  ``x`` is the convolution's input, ``dy`` the cotangent of its output,
  ``padding`` the explicit ((top, bottom), (left, right)) padding.
  """
  kh, kw, cin, cout = kernel_shape
  (top, bottom), (left, right) = padding
  b, ho, wo, _ = dy.shape
  sh, sw = strides
  x_pad = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  dy = dy.reshape(b * ho * wo, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(x_pad, (0, i, j, 0),
                         (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
      taps.append(jnp.einsum("nc,nd->cd", window.reshape(b * ho * wo, cin), dy,
                             precision=precision, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)
