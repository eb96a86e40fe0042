"""Fréchet distance between Gaussian fits of feature sets (FID), in float64.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)). The trace of the
matrix square root is where implementations differ, and differences of a few
hundredths matter when papers are compared at FID ~7, so this runs on the host
in float64 and by default the way pytorch-fid does it (the code behind the
published numbers): ``scipy.linalg.sqrtm`` of ``S1 @ S2``; if that is not
finite, retry with ``eps`` added to both diagonals; drop an imaginary part
only when the diagonal's imaginary part is negligible (``atol=1e-3``), else
raise. ``method="eigh"`` is a numpy-only alternative (the eigenvalues of
``sqrt(S1) S2 sqrt(S1)``, which are those of ``S1 S2``) that agrees to ~1e-8
on well-conditioned statistics.

``FeatureStats`` accumulates the mean and covariance batch by batch (Chan et
al.'s pairwise update in float64, so 8,570 test or ~48k train images never have
to sit in memory), merges across hosts, and saves/loads ``.npz`` so reference
statistics are computed once. The covariance is the unbiased one (``N - 1``),
as ``np.cov(..., rowvar=False)`` in pytorch-fid.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
  try:
    from scipy import linalg
  except ImportError as e:  # scipy is in the test extra; eval needs it too
    raise ImportError("frechet_distance(method='sqrtm') needs scipy (pip install scipy); "
                      "or pass method='eigh' for the numpy-only computation") from e

  def sqrtm(a):
    with warnings.catch_warnings():
      # scipy >= 1.16 may warn about a singular input; non-finite output is
      # handled below the way pytorch-fid does.
      warnings.simplefilter("ignore")
      out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out

  covmean = sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals",
                  RuntimeWarning, stacklevel=3)
    offset = np.eye(s1.shape[0]) * eps
    covmean = sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError(f"FID: sqrtm has a significant imaginary component {m}")
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
  r = _psd_sqrt(s1)
  m = r @ s2 @ r
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Args:
    mu1, mu2: ``[D]`` feature means. sigma1, sigma2: ``[D, D]`` covariances.
    eps: diagonal offset used only if ``sqrtm(sigma1 @ sigma2)`` is not finite.
    method: "sqrtm" (pytorch-fid, needs scipy) or "eigh" (numpy only).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit means {mu1.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"unknown method {method!r}; use 'sqrtm' or 'eigh'")
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


class FeatureStats:
  """Running mean / covariance of ``[N, D]`` feature batches in float64."""

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._frozen = False  # loaded from mu/sigma only: no sample count to update
    self._mean = None if dim is None else np.zeros(dim, np.float64)
    self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)

  def update(self, features) -> "FeatureStats":
    """Adds a batch (``[N, D]``, or ``[N, 1, 1, D]`` pool features)."""
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(f.shape[0], -1) if f.ndim != 2 else f
    if f.shape[0] == 0:
      return self
    if self.dim is None:
      self.__init__(f.shape[1])
    if f.shape[1] != self.dim:
      raise ValueError(f"feature dim {f.shape[1]} != {self.dim} of earlier batches")
    mean_b = f.mean(axis=0)
    c = f - mean_b
    self._combine(f.shape[0], mean_b, c.T @ c)
    return self

  def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray):
    if self._frozen:
      raise ValueError("these statistics were loaded from mu/sigma only (a pytorch-fid "
                       ".npz); they have no sample count and cannot be updated")
    n_a = self.count
    n = n_a + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
    self.count = n

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Folds in statistics gathered elsewhere (another host or shard)."""
    if other.count == 0:
      return self
    if self.dim is None:
      self.__init__(other.dim)
    if other.dim != self.dim:
      raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
    self._combine(other.count, other._mean, other._m2)
    return self

  @property
  def mean(self) -> np.ndarray:
    if not self.count:
      raise ValueError("FeatureStats is empty")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
    return self._m2 / (self.count - 1)

  def frechet_distance(self, other: "FeatureStats", **kwargs) -> float:
    return frechet_distance(self.mean, self.cov, other.mean, other.cov, **kwargs)

  def save(self, path: str | os.PathLike) -> Path:
    """``.npz`` with ``mu``/``sigma`` (pytorch-fid's names) plus what resuming needs."""
    path = Path(path)
    np.savez(path, mu=self.mean, sigma=self.cov, count=self.count, m2=self._m2)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FeatureStats":
    """Reads our ``.npz``; a pytorch-fid ``.npz`` (mu, sigma only) also works
    for distances but cannot be updated further."""
    with np.load(path) as data:
      mu, sigma = data["mu"], data["sigma"]
      stats = cls(mu.shape[0])
      stats._mean = mu.astype(np.float64)
      if "m2" in data:
        stats.count = int(data["count"])
        stats._m2 = data["m2"].astype(np.float64)
      else:  # Only mean/cov known: pretend N = 2 so cov is reproduced exactly.
        stats.count = 2
        stats._m2 = sigma.astype(np.float64)
        stats._frozen = True
    return stats
