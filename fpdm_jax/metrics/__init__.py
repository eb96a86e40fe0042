"""Evaluation metrics of the pose-transfer protocol (see DESIGN.md, "Evaluation protocol").

* ``ssim(x, y, variant="uniform51" | "gaussian")`` and ``psnr(x, y)``: per-image
  values of ``[B, H, W, 3]`` images in ``[0, 1]``, equal to scikit-image's.
* ``InceptionV3`` / ``load_inception(path)``: torchvision's Inception-v3 pool
  features for FID; ``FeatureStats`` accumulates them, ``frechet_distance``
  compares two sets (float64, pytorch-fid's way).
* ``LPIPS`` / ``load_lpips(alexnet_path, lin_path)``: LPIPS v0.1, AlexNet trunk.

The loaders import ``fpdm_jax.importers`` on call: those modules import the
models from here, and an eager import would be circular.
"""
from fpdm_jax.metrics.fid import FeatureStats, frechet_distance
from fpdm_jax.metrics.inception import InceptionV3
from fpdm_jax.metrics.lpips import LPIPS
from fpdm_jax.metrics.ssim import psnr, ssim


def load_inception(path, **kwargs):
  """torchvision Inception-v3 state_dict file -> ``InceptionV3`` (see the importer)."""
  from fpdm_jax.importers.inception import load_inception as _load
  return _load(path, **kwargs)


def load_lpips(alexnet_path, lin_path, **kwargs):
  """torchvision AlexNet file + lpips ``alex.pth`` -> ``LPIPS`` (see the importer)."""
  from fpdm_jax.importers.lpips import load_lpips as _load
  return _load(alexnet_path, lin_path, **kwargs)


__all__ = ["FeatureStats", "InceptionV3", "LPIPS", "frechet_distance", "load_inception",
           "load_lpips", "psnr", "ssim"]
