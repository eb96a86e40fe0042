"""The 2-D convolution of the UNet, VAE and pose embedding layers.

It is ``lax.conv_general_dilated``, with its gradients and forward written
another way on XLA:CPU where XLA's own convolution kernels run them far below
the machine's matmul rate (benchmarks/README.md, findings 11, 12, 16, 21 and
22):

- **Kernel gradient of thin convolutions** (3-96 channels on one side: the
  pose embedding, a small UNet). XLA computes d(loss)/d(kernel) as a
  convolution that contracts over batch and pixels, 2-3x slower than torch's
  oneDNN at batch 8 (finding 20) and worse at batch 1, where the contracted
  batch dimension has length 1. In a one-device CPU process with the native
  custom calls built (``models.native_conv``), one computes it, 2-4x
  faster (``python -m benchmarks.kernel_gradient``). Without it, at batch 1
  only, the same sum for a 3x3 kernel,

    dW[i, j] = sum_{h, w} x_pad[s*h + i, s*w + j, :]^T dy[h, w, :]

  is nine [C_in, H*W] x [H*W, C_out] matmuls that contract over the pixels
  (64 -> 64: 1.7 ms against XLA's 4.4); from batch 2 on XLA's own is as fast.
- **Input gradient of a stride-2 convolution with few input channels** (the
  pose embedding's downsampling convs at 256x256 and 128x128). XLA writes it
  as a convolution of the zero-dilated output gradient, which its kernels run
  at 1-3 GFLOP/s. Written space-to-depth, a stride-2 kxk convolution is a
  stride-1 ceil(k/2) x ceil(k/2) convolution over 4*C_in channels; its input
  gradient is then a plain stride-1 convolution and a reshape (batch 8,
  256x256, 16 -> 32: 124 -> 46 ms). From 64 input channels XLA's is faster.
- **Input gradient of a thin stride-1 convolution** (8-64 channels on one
  side, C_in a multiple of 8), in a one-device CPU process with the native
  custom calls built: the native forward of the output gradient with the
  flipped, transposed kernel, 1.1-2x faster than XLA's.

And three forwards:

- **Thin convolutions** (8-64 channels on one side, C_in at least 8), in a
  one-device CPU process with the native custom calls built: the native
  forward, 1.1-1.8x faster than XLA's at batch 8.

- **Few input and output channels at a large image size** (the pose
  embedding's first conv, RGB -> 8 or 16 channels at 256x256). XLA's kernel
  runs batch 8, 256x256, 3 -> 8 in 38 ms, torch in 9. Written as the sum of
  kh * kw * C_in shifted input channels, each times a row of the kernel,

    y[h, w, :] = sum_{i, j, c} x_pad[s*h + i, s*w + j, c] * W[i, j, c, :]

  it is one elementwise loop that XLA fuses with the bias and SiLU after it:
  6 ms (3 -> 16: 35 -> 10 ms). Its gradients stay the convolution's.

- **3x3 stride-1 convolutions with 16+ channels on both sides** (the UNet's
  and the pose embedding's same-width convs), in a one-device CPU process
  with the native custom calls built: forward and input gradient as the
  native Winograd F(2x2, 3x3) (``native_conv.winograd_forward``), 2.25x
  fewer multiplies with the transforms fused into the matmuls. XLA's and
  torch's direct convolutions already run at about the machine's matmul
  rate at these shapes, so fewer multiplies is what is left to win. Only
  from 512 2x2 output tiles per call (batch x tiles per image): below that
  the transformed kernel, 16/9 of the kernel, is read for too few tiles,
  and at batch 1 the medium UNet's step lost 0.85x with it at every size.
  Of these, the ones with 64 and more 4x4 output tiles and at most 256 x 256
  channels are F(4x4, 3x3) (4x fewer multiplies than direct; one call
  1.3-1.45x faster than F(2x2)): the UNet steps 1.03-1.04x but small b1
  (0.99x, few such convs; finding 31); and with F(4x4) the 512-tile floor
  does not apply (the 32x32 level at batch 1: medium b1 1.035x again).
  The kernel gradient of the same convs is native Winograd at any number of
  tiles (F(3x3, 2x2), ``native_conv.winograd_kernel_gradient``): it reads
  no transformed kernel, and one call at a time it beat the direct native
  one, the per-tap matmuls and XLA's by 1.2-3.3x at every UNet and pose
  embedding shape measured, batch 1 and 8, but one (batch 1, 256x256,
  16 -> 16: 1.05 against 0.95 ms). With 64 and more 4x4 tiles and at most
  96 x 96 channels it is F(3x3, 4x4), 1.1-1.8x faster again. Stride-2 and
  thinner convs keep the rules above.
- **Wide 3x3 stride-1 convolutions at a small image size** (a UNet's
  256-channel 8x8 level at batch 8): Winograd F(2x2, 3x3) written in XLA
  ops (``models.winograd``), forward and, through autodiff of the same
  expression, both gradients. Where the native calls are there, all three
  parts are theirs. At larger images or fewer channels its transforms'
  memory traffic costs more than they save.

Every other forward is XLA's, and on GPU/TPU nothing changes: these rules
are used only when JAX's default backend is the CPU. Like any
``jax.custom_vjp`` it has no forward-mode rule, so ``jax.jvp`` through these
convolutions fails on the CPU (nothing in fpdm_jax uses forward mode);
``FPDM_CONV_CPU_GRADIENTS=0`` in the environment turns all these rules off (and
``models.dense``'s kernel-gradient rule with them), for that or to measure
what they change; ``FPDM_CONV_NATIVE_KERNEL_GRADIENT=0`` and
``FPDM_CONV_NATIVE_FORWARD=0`` (forward and input gradient) the native calls
alone, ``FPDM_CONV_NATIVE_WINOGRAD=0`` the native Winograd alone,
``FPDM_CONV_NATIVE_WINOGRAD_KERNEL_GRADIENT=0`` its kernel gradient alone,
``FPDM_CONV_NATIVE_WINOGRAD_4X4=0`` its 4x4 tiles (F(2x2) everywhere),
``FPDM_CONV_WINOGRAD=0`` the XLA-op Winograd alone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fpdm_jax import xla_cpu_flags
from fpdm_jax.models import native_conv as native
from fpdm_jax.models import winograd

ENV_OPT_OUT = "FPDM_CONV_CPU_GRADIENTS"
WINOGRAD_OPT_OUT = "FPDM_CONV_WINOGRAD"

_NHWC = ("NHWC", "HWIO", "NHWC")
# Per-tap and native kernel gradients for 3x3 kernels and smaller. A 16x16
# patchify conv would be 256 thin matmuls.
_MAX_TAPS = 9
# Native kernel gradients where the narrower side has at most this many
# channels: at batch 8 it is about as fast as XLA's at 64x64, 96 -> 96, and
# slower at 16x16, 128 -> 128 (python -m benchmarks.kernel_gradient).
_MAX_NATIVE_CHANNELS = 96
# Native forwards (and stride-1 input gradients) up to 64 channels on the
# narrower side: batch 8, 64x64, 96 -> 96 was 14.0 -> 15.4 ms, 32x32,
# 64 -> 64 1.8 -> 1.3 ms (benchmarks/README.md, finding 22).
_MAX_NATIVE_FORWARD_CHANNELS = 64
_MIN_NATIVE_FORWARD_IN_CHANNELS = 8
# Space-to-depth input gradients up to 32 input channels: batch 8, 128x128,
# 32 -> 96 is 60 -> 37 ms that way, but 64x64, 96 -> 256 is 35 -> 47 ms.
_MAX_S2D_IN_CHANNELS = 32
# Tap-sum forwards (benchmarks/README.md, finding 16). Batch 8: 256x256, 3 -> 32
# is 42 -> 23 ms, 3 -> 64 is 57 -> 41 ms, but 8 -> 8 is 22 -> 27 ms and
# 32x32, 4 -> 32 (a small UNet's conv_in) 0.5 -> 0.7 ms; 64x64, 3 -> 16 is
# 2.2 -> 0.6 ms.
_MAX_TAP_SUM_IN_CHANNELS = 4
_MAX_TAP_SUM_OUT_CHANNELS = 32
_MIN_TAP_SUM_PIXELS = 64 * 64
# Winograd F(2x2, 3x3) convolutions where both sides have at least this many
# channels and the batch at least this many pixels: batch 8, 8x8, 256 -> 256
# is 1.3-1.5x faster forward and backward, and the medium UNet's batch-8
# step 1.031x (1.035x in a first run; python -m benchmarks.switch_ab
# --switch FPDM_CONV_WINOGRAD); 16x16, 128 -> 128 is 0.8x, and adding 16x16, 384 -> 128 and 256 -> 128
# changed the step by 0.99x (benchmarks/README.md, finding 24).
_MIN_WINOGRAD_CHANNELS = 256
_MIN_WINOGRAD_PIXELS = 512
# Native Winograd forwards and input gradients (fpdm_jax/native/winograd.cc)
# from this many channels on both sides and this many 2x2 output tiles per
# call, or where XLA-op Winograd applies. Forward alone, batch 8, against
# what the rules before gave: 256x256, 16 -> 16 10.1 -> 8.0 ms, 64x64,
# 96 -> 96 15.5 -> 8.7 ms, 16x16, 128 -> 128 1.6 -> 0.9 ms. In the step
# (benchmarks/README.md, finding 25) medium batch 8 1.05-1.12x; without the
# tile limit medium batch 1 lost (0.85-0.88x: 8x8 and 16x16 images at batch
# 1 are 16 and 64 tiles). 8 -> 8 channels stay with the direct native forward.
_MIN_NATIVE_WINOGRAD_CHANNELS = 16
_MIN_NATIVE_WINOGRAD_TILES = 512
# Of those, F(4x4, 3x3) (36 multiplies per 16 outputs instead of 16 per 4)
# where C_in x C_out is at most this and there are at least this many 4x4
# output tiles. Forward alone against F(2x2, 3x3) (benchmarks/README.md,
# finding 31): batch 8, 256x256, 16 -> 16 1.34-1.40x faster, 64x64, 96 -> 96
# 1.32-1.44x, 16x16, 256 -> 256 1.42x, but 8x8, 256 -> 256 (32 tiles) 0.88-1.03x
# and 512 -> 256 0.67-0.84x: too few tiles for the 36 transformed kernel
# positions each chunk reads. Where F(4x4) applies, the native Winograd does
# below _MIN_NATIVE_WINOGRAD_TILES 2x2 tiles too (batch 1, 32x32, 64 4x4
# tiles): the medium batch-1 step 1.035x and 1.034x, small b1 1.009x,
# sampling 0.997-1.000x (finding 31).
_MAX_WINOGRAD_4X4_CHANNEL_PRODUCT = 256 * 256
_MIN_WINOGRAD_4X4_TILES = 64
# The kernel gradient as F(3x3, 4x4) where C_in x C_out is at most this: with
# more, fewer of its 36 accumulators fit L2 at once, each group of them
# transforms the input again, and batch 8, 16x16, 384 -> 128 was 0.83x,
# 8x8, 256 -> 256 0.80x; 32x32, 64 -> 64 1.77x, 64x64, 96 -> 96 1.11x. And
# from _MIN_WINOGRAD_4X4_TILES tiles: batch 1, 16x16, 64 -> 64 (16 tiles) was
# 0.98x, 8x8 0.65x; 32x32, 32 -> 32 (64) 1.22x.
_MAX_WINOGRAD_4X4_KERNEL_GRADIENT_CHANNEL_PRODUCT = 96 * 96
WINOGRAD_4X4_OPT_OUT = "FPDM_CONV_NATIVE_WINOGRAD_4X4"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls), with the
  CPU gradients of the module docstring where they apply."""
  if _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count, kwargs):
    strides = tuple(window_strides)
    padding = tuple(tuple(p) for p in padding)
    if _winograd(lhs, rhs, strides) and not _native_winograd(lhs, rhs, strides, padding):
      return winograd.conv3x3(lhs, rhs, padding, precision)
    if (_native_winograd(lhs, rhs, strides, padding)
        or _native_winograd_kernel_gradient(lhs, rhs, strides, padding)
        or _native_kernel_gradient(lhs, rhs) or _native_forward(lhs, rhs)
        or _per_tap_kernel_gradient(lhs.shape, rhs.shape)
        or _s2d_input_gradient(rhs.shape, strides)
        or _tap_sum_forward(lhs.shape, rhs.shape, strides, padding)):
      return _conv(lhs, rhs, strides, padding, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision=precision, **kwargs)


def _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, kwargs) -> bool:
  """A CPU, NHWC x HWIO, ungrouped, undilated conv with explicit padding."""
  return (jax.default_backend() == "cpu"
          and not xla_cpu_flags.opted_out(ENV_OPT_OUT)
          and lhs.ndim == 4
          and feature_group_count == 1 and batch_group_count == 1
          and not isinstance(padding, str)
          and all(lo >= 0 and hi >= 0 for lo, hi in padding)
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
          and kwargs.get("preferred_element_type") is None
          and kwargs.get("out_sharding") is None)


def _native(x, w, max_channels) -> bool:
  """What both native calls need: float32, 3x3 or smaller, C_out a multiple of
  8, a thin side, one CPU device (a custom call is not partitioned: sharded,
  XLA would gather its operands)."""
  from fpdm_jax.models import dense  # dense imports this module
  kh, kw, cin, cout = w.shape
  return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and kh * kw <= _MAX_TAPS
          and cout % 8 == 0 and min(cin, cout) <= max_channels
          and dense.single_cpu_device())


def _native_winograd_shape(x, w, strides, padding) -> bool:
  """What the native Winograd calls compute: a 3x3 stride-1 conv with top and
  left padding at most 2 (so the input gradient's is too), both channel
  counts multiples of 8 and at least _MIN_NATIVE_WINOGRAD_CHANNELS."""
  (top, _), (left, _) = padding
  cin, cout = w.shape[2:]
  return (w.shape[:2] == (3, 3) and strides == (1, 1) and top <= 2 and left <= 2
          and cin % 8 == 0 and min(cin, cout) >= _MIN_NATIVE_WINOGRAD_CHANNELS
          # No thin side needed: max_channels = the wider side.
          and _native(x, w, max(cin, cout)) and native.winograd_available())


def _native_winograd(x, w, strides, padding) -> bool:
  """The forward and input gradient as native Winograd: its shapes, with
  enough 2x2 tiles, or F(4x4, 3x3)'s 4x4 tiles (or XLA-op Winograd's shape,
  which it then replaces)."""
  return (_native_winograd_shape(x, w, strides, padding)
          and (x.shape[0] * -(-x.shape[1] // 2) * -(-x.shape[2] // 2) >= _MIN_NATIVE_WINOGRAD_TILES
               or _winograd(x, w, strides) or _winograd_tile(x, w) == 4))


def _winograd_tile(x, w, max_channel_product=_MAX_WINOGRAD_4X4_CHANNEL_PRODUCT) -> int:
  """The output tile of a native Winograd forward and input gradient (or,
  with _MAX_WINOGRAD_4X4_KERNEL_GRADIENT_CHANNEL_PRODUCT, the output-gradient
  block of its kernel gradient): 4 (F(4x4, 3x3)) where C_in x C_out is at
  most ``max_channel_product`` and there are enough 4x4 tiles; else 2."""
  b, h, wd, _ = x.shape
  cin, cout = w.shape[2:]
  return (4 if cin * cout <= max_channel_product
          and b * -(-h // 4) * -(-wd // 4) >= _MIN_WINOGRAD_4X4_TILES
          and not xla_cpu_flags.opted_out(WINOGRAD_4X4_OPT_OUT) else 2)


def _native_winograd_kernel_gradient(x, w, strides, padding) -> bool:
  return (_native_winograd_shape(x, w, strides, padding)
          and native.winograd_kernel_gradient_available())


def _native_kernel_gradient(x, w) -> bool:
  return _native(x, w, _MAX_NATIVE_CHANNELS) and native.kernel_gradient_available()


def _native_forward(x, w) -> bool:
  return (_native(x, w, _MAX_NATIVE_FORWARD_CHANNELS)
          and w.shape[2] >= _MIN_NATIVE_FORWARD_IN_CHANNELS and native.forward_available())


def _native_input_gradient(x, w, strides, padding) -> bool:
  """The input gradient as a native forward: stride 1, padding at most the
  kernel size - 1 on the top and left, and C_in (the output of that forward)
  a multiple of 8."""
  kh, kw, cin, _ = w.shape
  (top, _), (left, _) = padding
  return (strides == (1, 1) and top <= kh - 1 and left <= kw - 1 and cin % 8 == 0
          and _native_forward(x, w))


def _per_tap_kernel_gradient(x_shape, w_shape) -> bool:
  return x_shape[0] == 1 and w_shape[0] * w_shape[1] <= _MAX_TAPS


def _s2d_input_gradient(w_shape, strides) -> bool:
  kh, kw, cin, _ = w_shape
  return strides == (2, 2) and kh <= 4 and kw <= 4 and cin <= _MAX_S2D_IN_CHANNELS


def _winograd(x, w, strides) -> bool:
  b, h, wd, _ = x.shape
  return (w.shape[:2] == (3, 3) and strides == (1, 1)
          and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and min(w.shape[2:]) >= _MIN_WINOGRAD_CHANNELS and b * h * wd >= _MIN_WINOGRAD_PIXELS
          and not xla_cpu_flags.opted_out(WINOGRAD_OPT_OUT))


def _tap_sum_forward(x_shape, w_shape, strides, padding) -> bool:
  kh, kw, cin, cout = w_shape
  ho, wo = _output_size(x_shape, w_shape, strides, padding)
  return (cin <= _MAX_TAP_SUM_IN_CHANNELS and cout <= _MAX_TAP_SUM_OUT_CHANNELS
          and kh * kw <= _MAX_TAPS and ho * wo >= _MIN_TAP_SUM_PIXELS)


def _output_size(x_shape, w_shape, strides, padding) -> tuple[int, int]:
  (top, bottom), (left, right) = padding
  return ((x_shape[1] + top + bottom - w_shape[0]) // strides[0] + 1,
          (x_shape[2] + left + right - w_shape[1]) // strides[1] + 1)


def _plain_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _forward(x, w, strides, padding, precision):
  if _native_winograd(x, w, strides, padding):
    return native.winograd_forward(x, winograd.kernel_transform(w, _winograd_tile(x, w)),
                                   _output_size(x.shape, w.shape, strides, padding), padding)
  if _tap_sum_forward(x.shape, w.shape, strides, padding):
    return tap_sum_conv(x, w, strides, padding)
  if _native_forward(x, w):
    return native.forward(x, w, _output_size(x.shape, w.shape, strides, padding), strides,
                          padding)
  return _plain_conv(x, w, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _forward(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _forward(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  if _native_winograd(x, w, strides, padding) and dy.dtype == jnp.float32:
    dx = native.winograd_input_gradient(dy, w, x.shape, padding, _winograd_tile(x, w))
  elif _native_input_gradient(x, w, strides, padding) and dy.dtype == jnp.float32:
    dx = native.input_gradient(dy, w, x.shape, padding)
  else:
    if _s2d_input_gradient(w.shape, strides):
      _, input_vjp = jax.vjp(lambda x: space_to_depth_conv(x, w, padding, precision), x)
    else:
      _, input_vjp = jax.vjp(lambda x: _plain_conv(x, w, strides, padding, precision), x)
    (dx,) = input_vjp(dy)
  if _native_winograd_kernel_gradient(x, w, strides, padding) and dy.dtype == jnp.float32:
    dw = native.winograd_kernel_gradient(x, dy, padding, _winograd_tile(
        x, w, _MAX_WINOGRAD_4X4_KERNEL_GRADIENT_CHANNEL_PRODUCT))
  elif _native_kernel_gradient(x, w) and dy.dtype == jnp.float32:
    dw = native.kernel_gradient(x, dy, w.shape, strides, padding)
  elif _winograd(x, w, strides):
    _, kernel_vjp = jax.vjp(lambda w: winograd.conv3x3(x, w, padding, precision), w)
    (dw,) = kernel_vjp(dy)
  elif _per_tap_kernel_gradient(x.shape, w.shape):
    dw = kernel_gradient(x, dy, w.shape, strides, padding, precision).astype(w.dtype)
  else:
    _, kernel_vjp = jax.vjp(lambda w: _plain_conv(x, w, strides, padding, precision), w)
    (dw,) = kernel_vjp(dy)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def tap_sum_conv(x, w, strides, padding):
  """An NHWC x HWIO convolution as a sum of kh * kw * C_in broadcast products.

  Each term is one channel of a strided window of the padded input, [B, Ho,
  Wo, 1], times one row W[i, j, c, :] of the kernel. XLA fuses the whole sum
  into one elementwise loop, which beats its convolution kernel only when
  C_in and C_out are small (module docstring). Accumulates in float32, and
  returns the input's dtype as ``lax.conv_general_dilated`` does.
  """
  kh, kw, cin, _ = w.shape
  (top, bottom), (left, right) = padding
  b = x.shape[0]
  ho, wo = _output_size(x.shape, w.shape, strides, padding)
  sh, sw = strides
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (top, bottom), (left, right), (0, 0)))
  w = w.astype(jnp.float32)
  y = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(x_pad, (0, i, j, 0),
                         (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
      for c in range(cin):
        term = window[..., c:c + 1] * w[i, j, c]
        y = term if y is None else y + term
  return y.astype(x.dtype)


def space_to_depth_conv(x, w, padding, precision=None):
  """A stride-2 NHWC x HWIO convolution as a stride-1 one over 4x the channels.

  With x_pad the padded input, y[h, w] = sum_{i, j} x_pad[2h + i, 2w + j] W[i, j].
  Writing i = 2 * di + a (a in {0, 1}) and folding (a, b) into the channels,
  z[h, w, (a, b, c)] = x_pad[2h + a, 2w + b, c], gives
  y[h, w] = sum_{di, dj} z[h + di, w + dj] W'[di, dj]: a VALID stride-1
  convolution with the kernel zero-padded to even size and rearranged. Rows
  and columns of the input that no tap reaches are cropped.
  """
  kh, kw, cin, cout = w.shape
  (top, bottom), (left, right) = padding
  b, h, wd, _ = x.shape
  ho, wo = _output_size(x.shape, w.shape, (2, 2), padding)
  th, tw = -(-kh // 2), -(-kw // 2)  # taps of the stride-1 kernel
  hp, wp = 2 * (ho + th - 1), 2 * (wo + tw - 1)
  # lax.pad: a negative high padding crops what no tap reaches.
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (top, hp - h - top, 0), (left, wp - wd - left, 0), (0, 0, 0)))
  z = x_pad.reshape(b, hp // 2, 2, wp // 2, 2, cin).transpose(0, 1, 3, 2, 4, 5)
  z = z.reshape(b, hp // 2, wp // 2, 4 * cin)
  w2 = jnp.pad(w, ((0, 2 * th - kh), (0, 2 * tw - kw), (0, 0), (0, 0)))
  w2 = w2.reshape(th, 2, tw, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  w2 = w2.reshape(th, tw, 4 * cin, cout)
  return lax.conv_general_dilated(z, w2, (1, 1), "VALID", dimension_numbers=_NHWC,
                                  precision=precision)


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
