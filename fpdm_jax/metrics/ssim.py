"""SSIM and PSNR in JAX, numerically equal to scikit-image.

The published pose-transfer numbers (PATN, CASD, CFLD, PCDMs, FPDM, MCLD) are
computed with ``skimage.metrics.structural_similarity(..., channel_axis=-1,
data_range=1)`` and its "SSIM-256" cousin with a Gaussian window, so the only
useful SSIM is one that reproduces skimage bit for bit up to float rounding,
including its quirks:

* local statistics come from ``scipy.ndimage.uniform_filter`` (51x51 box,
  ``win_size=51``) or ``gaussian_filter`` (sigma 1.5, ``truncate=3.5`` -> an
  11-tap window) in scipy's ``'reflect'`` mode, i.e. half-sample symmetric
  padding ``d c b a | a b c d | d c b a``;
* the uniform variant uses the sample covariance (``NP / (NP - 1)`` with
  ``NP = win**2``), the Gaussian variant the population covariance;
* the SSIM map is averaged after cropping ``(win - 1) // 2`` pixels from every
  border, per channel, then the channels are averaged.

Both separable filters *including their reflect boundary* are linear maps, so
we build them once per image size as dense ``(H, H)`` and ``(W, W)`` matrices
on the host and apply them with two matmuls. That is exact (no padding
arithmetic to get wrong at the corners), jit-friendly (shapes are static) and
runs well on accelerators.

Images are float ``[B, H, W, C]`` in ``[0, 1]``; callers holding uint8 divide by
255 first. Functions return one value per image; the protocol's number is the
mean over all test images.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

UNIFORM_WIN = 51
GAUSSIAN_SIGMA = 1.5
GAUSSIAN_TRUNCATE = 3.5  # skimage passes truncate=3.5 when gaussian_weights=True
K1, K2 = 0.01, 0.03
VARIANTS = ("uniform51", "gaussian")


def _reflect_index(p: np.ndarray, n: int) -> np.ndarray:
  """scipy.ndimage 'reflect' (half-sample symmetric) for any offset, even
  offsets larger than the image (repeated reflection)."""
  p = np.mod(p, 2 * n)
  return np.where(p >= n, 2 * n - 1 - p, p)


def _taps(variant: str) -> np.ndarray:
  if variant == "uniform51":
    return np.full(UNIFORM_WIN, 1.0 / UNIFORM_WIN)
  if variant == "gaussian":
    # scipy.ndimage._gaussian_kernel1d with radius int(truncate * sigma + 0.5).
    radius = int(GAUSSIAN_TRUNCATE * GAUSSIAN_SIGMA + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / GAUSSIAN_SIGMA**2 * x * x)
    return w / w.sum()
  raise ValueError(f"unknown SSIM variant {variant!r}; choose one of {VARIANTS}")


def window_size(variant: str) -> int:
  return len(_taps(variant))


@functools.lru_cache(maxsize=32)
def filter_matrix(n: int, variant: str) -> np.ndarray:
  """``(n, n)`` matrix M with ``M @ v`` = the 1-D scipy filter of ``v`` in
  'reflect' mode (float64; cast by the caller)."""
  taps = _taps(variant)
  r = (len(taps) - 1) // 2
  m = np.zeros((n, n), np.float64)
  rows = np.arange(n)
  for k, w in enumerate(taps):
    np.add.at(m, (rows, _reflect_index(rows + k - r, n)), w)
  return m


_HIGHEST = jax.lax.Precision.HIGHEST
_GRID_BITS = 11


def _split(v, bits: int):
  """``v = hi + lo`` exactly, ``hi`` on the grid ``2**-bits``, ``|lo| <= 2**-(bits+1)``."""
  scale = float(2 ** bits)
  hi = jnp.round(v * scale) / scale
  return hi, v - hi


def _accurate_filter(m: np.ndarray, v: jax.Array, eq: str):
  """``einsum(eq, m, v)`` for values in ``[0, 1]`` as an unevaluated sum
  ``hi + lo`` accurate to ~1e-11, with float32 arithmetic only.

  Why: the local variance ``E[x^2] - E[x]^2`` cancels catastrophically. scipy
  filters in float64, so in a flat region (a white background) both terms are
  the same number and the variance is exactly 0. A plain float32 matmul makes
  each term ~1e-7 off; next to ``C2 = 9e-4`` that moves the SSIM of flat areas
  by ~1e-4, a systematic bias at the precision papers report. So both operands
  are split: ``m = m1 + m2`` with ``m1`` on a ``2**-12`` grid and
  ``v = v1 + v2`` with ``v1`` on a ``2**-11`` grid. Every product in
  ``m1 @ v1`` is a multiple of ``2**-23`` and every partial sum is below 2, so
  that matmul is *exact* in float32 whatever the summation order (and on TPU
  with ``Precision.HIGHEST``, whose bf16 passes represent such operands
  exactly); the two correction matmuls are ~2**-12 smaller, so their rounding
  barely matters. ``hi`` is itself on a grid, so it can be split again for the
  second axis.
  """
  m1 = np.round(m * 2.0 ** 12) / 2.0 ** 12
  m2 = m - m1
  v1, v2 = _split(v, _GRID_BITS)
  hi = jnp.einsum(eq, jnp.asarray(m1, jnp.float32), v1, precision=_HIGHEST)
  lo = (jnp.einsum(eq, jnp.asarray(m1, jnp.float32), v2, precision=_HIGHEST)
        + jnp.einsum(eq, jnp.asarray(m2, jnp.float32), v, precision=_HIGHEST))
  return hi, lo


def _check_images(x, y):
  if x.shape != y.shape:
    raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"expected [B, H, W, C] images, got shape {x.shape}")


@functools.partial(jax.jit, static_argnames=("variant",))
def ssim(x: jax.Array, y: jax.Array, variant: str = "uniform51") -> jax.Array:
  """Per-image SSIM of ``[B, H, W, C]`` images in ``[0, 1]`` -> ``[B]``.

  ``variant="uniform51"`` is the protocol's SSIM (``win_size=51``, sample
  covariance); ``"gaussian"`` is "SSIM-256" (``gaussian_weights=True``,
  sigma 1.5, ``use_sample_covariance=False``). Both use ``data_range=1``,
  ``K1=0.01``, ``K2=0.03`` as skimage does. Computed in float32.
  """
  _check_images(x, y)
  win = window_size(variant)
  _, h, w, _ = x.shape
  if win > min(h, w):
    raise ValueError(f"SSIM window {win} exceeds the image extent {h}x{w} "
                     "(skimage raises the same error)")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  maps = jnp.stack([x, y, x * x, y * y, x * y])  # [5, B, H, W, C], all in [0, 1]
  hi, lo = _accurate_filter(filter_matrix(h, variant), maps, "ih,nbhwc->nbiwc")
  hi2, lo2 = _accurate_filter(filter_matrix(w, variant), hi, "jw,nbiwc->nbijc")
  lo2 = lo2 + jnp.einsum("jw,nbiwc->nbijc", jnp.asarray(filter_matrix(w, variant), jnp.float32),
                         lo, precision=_HIGHEST)
  ux, uy, uxx, uyy, uxy = hi2 + lo2  # one float32 rounding, as scipy's output

  if variant == "uniform51":
    np_ = win * win
    cov_norm = np_ / (np_ - 1.0)
  else:
    cov_norm = 1.0
  # The barrier keeps XLA from contracting ``uxx - ux * ux`` into one FMA: with
  # the product rounded on its own, a flat region gives exactly 0 as in scipy
  # (the FMA would return the rounding error of x*x instead, ~3e-8, which is
  # 3e-5 of C2).
  sq = jax.lax.optimization_barrier(jnp.stack([ux * ux, uy * uy, ux * uy]))
  vx = cov_norm * (uxx - sq[0])
  vy = cov_norm * (uyy - sq[1])
  vxy = cov_norm * (uxy - sq[2])
  c1 = K1**2  # (K * data_range)**2 with data_range = 1
  c2 = K2**2
  a1 = 2 * ux * uy + c1
  a2 = 2 * vxy + c2
  b1 = ux * ux + uy * uy + c1
  b2 = vx + vy + c2
  s = (a1 * a2) / (b1 * b2)
  pad = (win - 1) // 2
  s = s[:, pad:h - pad, pad:w - pad, :]
  # Mean per channel then over channels equals the mean over all cropped
  # values because every channel has the same number of pixels.
  return jnp.mean(s, axis=(1, 2, 3))


@jax.jit
def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of images in ``[0, 1]`` (``data_range=1``) -> ``[B]``.

  As ``skimage.metrics.peak_signal_noise_ratio`` on each image; the protocol
  reports the mean of these per-image values (not the PSNR of the mean MSE).
  Identical images give ``inf``, as in skimage.
  """
  _check_images(x, y)
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(d * d, axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / mse)
