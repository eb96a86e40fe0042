"""torchvision's Inception-v3 as a Flax NNX module, for FID pool features.

The pose-transfer papers compute FID with torchvision's ImageNet Inception-v3
(``inception_v3_google-0cc3c7bd.pth``), not pytorch-fid's TF-ported network,
so this is torchvision's ``Inception3`` layer for layer (NHWC instead of NCHW),
with the same module names so the importer is a rename of leaf names only:
``Conv2d_1a_3x3 ... Mixed_7c``, each ``BasicConv2d`` being a bias-free conv,
``BatchNorm(eps=0.001)`` and ReLU. The auxiliary classifier is left out (it
only runs in training); the final ``fc`` is optional (``with_logits``).

Input handling follows the protocol, on ``[B, H, W, 3]`` images in ``[0, 1]``:

1. Resize to 299x299 exactly as ``torch.nn.functional.interpolate(mode=
   "bilinear", align_corners=False)``. ``jax.image.resize`` agrees when
   upsampling but antialiases when shrinking (512x352 -> 299 shrinks the
   height), so the resize is two small interpolation matrices built on the host
   with torch's formulas; ``antialias=True`` reproduces torch's
   ``antialias=True`` (PIL-style triangle filter), which torchvision's
   ``transforms.Resize`` uses on tensors since 0.17 -- set it if the reference
   script resizes with ``transforms.Resize`` rather than ``F.interpolate``.
2. ImageNet mean/std normalisation.
3. ``transform_input``: torchvision's ``inception_v3(weights=...)`` forces
   ``transform_input=True``, which maps ImageNet-normalised input back to
   ``(x - 0.5) / 0.5`` -- the range the Google weights were trained on. So
   "ImageNet mean/std" with the pretrained constructor really feeds the net
   ``2x - 1``. Keep the default ``True`` to match ``inception_v3(weights=
   DEFAULT)``; ``False`` matches an ``Inception3(transform_input=False)`` that
   was loaded by hand.

BatchNorm always uses its running statistics (``nnx.BatchStat`` variables),
whatever ``train()``/``eval()`` was called: this network is a fixed feature
extractor. Convolutions default to ``Precision.HIGHEST`` so TPU results are
not computed with bf16 passes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 299


# ----------------------------------------------------------------------------
# torch-equivalent bilinear resize.

@functools.lru_cache(maxsize=32)
def torch_bilinear_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """``(out_size, in_size)`` matrix of torch's 1-D bilinear resize
  (``align_corners=False``), so that ``M @ v`` resizes ``v``.

  Without antialias (``upsample_bilinear2d``): source coordinate
  ``(i + 0.5) * in / out - 0.5`` clamped at 0, two taps, the upper one clamped
  to the last pixel. With antialias (``_upsample_bilinear2d_aa``, PIL's
  algorithm): a triangle filter stretched by the downscale factor, taps
  ``[int(center - support + 0.5), int(center + support + 0.5))`` clipped to the
  image, weights normalised to sum 1.
  """
  # torch evaluates coordinates and weights in the input's dtype (float32),
  # and its compiled kernel contracts ``scale * (i + 0.5) - 0.5`` into one
  # fused multiply-add. Emulating exactly that (the float64 product of a
  # float32 scale and i + 0.5 is exact, so one rounding at the end is an FMA)
  # reproduces torch's weights bit for bit; plain float32 or float64
  # coordinates are up to 1e-5 off when shrinking 512 -> 299.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  m = np.zeros((out_size, in_size), np.float32)
  if not antialias:
    for i in range(out_size):
      src = max(f32(np.float64(scale) * (i + 0.5) - 0.5), f32(0))
      x0 = min(int(np.floor(src)), in_size - 1)
      x1 = min(x0 + 1, in_size - 1)
      lam = min(max(src - f32(x0), f32(0)), f32(1))
      m[i, x0] += f32(1) - lam
      m[i, x1] += lam
    return m
  support = scale if scale >= 1.0 else f32(1)
  invscale = f32(1) / scale if scale >= 1.0 else f32(1)
  for i in range(out_size):
    center = scale * (f32(i) + f32(0.5))
    xmin = max(int(center - support + f32(0.5)), 0)
    xmax = min(int(center + support + f32(0.5)), in_size)
    j = np.arange(xmin, xmax).astype(f32)
    w = np.maximum(f32(0), f32(1) - np.abs((j - center + f32(0.5)) * invscale)).astype(f32)
    total = w.sum(dtype=f32)
    m[i, xmin:xmax] = w / total if total != 0 else w
  return m


def resize_bilinear_like_torch(images: jax.Array, size: Sequence[int], antialias: bool = False,
                               precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Resizes ``[B, H, W, C]`` to ``size = (h, w)`` as torch's bilinear interpolate."""
  _, h, w, _ = images.shape
  if (h, w) == tuple(size):
    return images  # torch's resize to the same size is the identity too
  mh = jnp.asarray(torch_bilinear_matrix(h, size[0], antialias), images.dtype)
  mw = jnp.asarray(torch_bilinear_matrix(w, size[1], antialias), images.dtype)
  out = jnp.einsum("oh,bhwc->bowc", mh, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", mw, out, precision=precision)


def preprocess(images: jax.Array, *, transform_input: bool = True,
               resize_to: int | None = INPUT_SIZE, antialias: bool = False,
               precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """``[B, H, W, 3]`` images in ``[0, 1]`` -> Inception input: resize,
  ImageNet normalisation, then torchvision's ``_transform_input`` when
  enabled (the same op order as torch, so rounding matches too)."""
  x = images.astype(jnp.float32)
  if resize_to is not None:
    x = resize_bilinear_like_torch(x, (resize_to, resize_to), antialias, precision)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  if transform_input:
    scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], jnp.float32)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], jnp.float32)
    x = x * scale + shift
  return x


# ----------------------------------------------------------------------------
# Layers.

def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def max_pool_3x3_s2(x):
  """``nn.MaxPool2d(kernel_size=3, stride=2)``: no padding, floor mode."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def avg_pool_3x3_s1_p1(x):
  """``F.avg_pool2d(x, 3, stride=1, padding=1)``; torch counts the zero
  padding (``count_include_pad=True``), so every window divides by 9."""
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
  return s / 9.0


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm(eps=0.001, running stats) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0, *,
               precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_ch, out_ch, _pair(kernel_size), strides=_pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False,
                         precision=precision, rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x), use_running_average=True))


class InceptionA(nnx.Module):
  def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(BasicConv2d, rngs=rngs, **kw)
    self.branch1x1 = c(in_ch, 64, 1)
    self.branch5x5_1 = c(in_ch, 48, 1)
    self.branch5x5_2 = c(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = c(in_ch, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
    self.branch_pool = c(in_ch, pool_features, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_3x3_s1_p1(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  def __init__(self, in_ch: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(BasicConv2d, rngs=rngs, **kw)
    self.branch3x3 = c(in_ch, 384, 3, stride=2)
    self.branch3x3dbl_1 = c(in_ch, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
  def __init__(self, in_ch: int, channels_7x7: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(BasicConv2d, rngs=rngs, **kw)
    c7 = channels_7x7
    self.branch1x1 = c(in_ch, 192, 1)
    self.branch7x7_1 = c(in_ch, c7, 1)
    self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = c(in_ch, c7, 1)
    self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = c(in_ch, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_3x3_s1_p1(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  def __init__(self, in_ch: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(BasicConv2d, rngs=rngs, **kw)
    self.branch3x3_1 = c(in_ch, 192, 1)
    self.branch3x3_2 = c(192, 320, 3, stride=2)
    self.branch7x7x3_1 = c(in_ch, 192, 1)
    self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = c(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
  def __init__(self, in_ch: int, *, rngs: nnx.Rngs, **kw):
    c = functools.partial(BasicConv2d, rngs=rngs, **kw)
    self.branch1x1 = c(in_ch, 320, 1)
    self.branch3x3_1 = c(in_ch, 384, 1)
    self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = c(in_ch, 448, 1)
    self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = c(in_ch, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    bp = self.branch_pool(avg_pool_3x3_s1_p1(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
  """torchvision ``Inception3`` (eval, no aux head) with the FID input pipeline.

  ``model(images)`` takes ``[B, H, W, 3]`` in ``[0, 1]`` and returns the
  2048-d pool features ``[B, 2048]``. ``preprocess`` and ``forward_features``
  are the two halves, for callers that resize elsewhere.
  """

  def __init__(self, *, transform_input: bool = True, resize_to: int | None = INPUT_SIZE,
               antialias: bool = False, with_logits: bool = False, num_classes: int = 1000,
               precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.transform_input = transform_input
    self.resize_to = resize_to
    self.antialias = antialias
    self.with_logits = with_logits
    self.precision = precision
    kw = dict(rngs=rngs, precision=precision)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, pool_features=32, **kw)
    self.Mixed_5c = InceptionA(256, pool_features=64, **kw)
    self.Mixed_5d = InceptionA(288, pool_features=64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, **kw)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, **kw)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, **kw)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, **kw)
    self.Mixed_7c = InceptionE(2048, **kw)
    self.fc = (nnx.Linear(2048, num_classes, precision=precision, rngs=rngs)
               if with_logits else None)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """``[0, 1]`` images -> network input (see ``preprocess``)."""
    return preprocess(images, transform_input=self.transform_input, resize_to=self.resize_to,
                      antialias=self.antialias, precision=self.precision)

  def forward_features(self, x: jax.Array) -> jax.Array:
    """Network input (already preprocessed, NHWC) -> pool features ``[B, 2048]``."""
    x = self.Conv2d_1a_3x3(x)
    x = self.Conv2d_2a_3x3(x)
    x = self.Conv2d_2b_3x3(x)
    x = max_pool_3x3_s2(x)
    x = self.Conv2d_3b_1x1(x)
    x = self.Conv2d_4a_3x3(x)
    x = max_pool_3x3_s2(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten

  def logits(self, images: jax.Array) -> jax.Array:
    """Class logits (``with_logits=True`` only); dropout is the identity in eval."""
    if self.fc is None:
      raise ValueError("this InceptionV3 was built without the fc layer (with_logits=False)")
    return self.fc(self(images))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.forward_features(self.preprocess(images))
