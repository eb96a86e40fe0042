"""AlexNet + lpips linear-head weights -> ``fpdm_jax.metrics.lpips.LPIPS``.

LPIPS ships in two pieces and we read both as released rather than a
re-packaged copy:

* the trunk: torchvision's ImageNet AlexNet, ``alexnet-owt-7be5be79.pth``
  (``features.{0,3,6,8,10}.weight/bias``; the ``classifier.*`` layers are not
  used and are dropped);
* the perceptual heads: the lpips package's ``lpips/weights/v0.1/alex.pth``
  (``lin{k}.model.1.weight``, shape ``[1, C, 1, 1]``; it was saved from a GPU,
  which ``load_weight_file`` handles by loading to CPU).

A full ``LPIPS`` module state_dict (``net.slice{n}.{i}.*``, ``lin{k}.model.*``,
``scaling_layer.*``) is also accepted as ``lin_path``; then ``alexnet_path``
may be None.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from fpdm_jax.importers import hf_folder
from fpdm_jax.metrics.lpips import LPIPS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LIN_FILE = "alex.pth"
_HINTS = {
    ALEXNET_FILE: ("torchvision's ImageNet AlexNet "
                   f"(https://download.pytorch.org/models/{ALEXNET_FILE})"),
    LIN_FILE: "the lpips package's v0.1 AlexNet heads (lpips/weights/v0.1/alex.pth in the "
              "lpips wheel, or github.com/richzhang/PerceptualSimilarity)",
}


def _read(path, expected: str) -> dict[str, np.ndarray]:
  if path is None or not Path(path).is_file():
    raise hf_folder.CheckpointFolderError(
        f"LPIPS weight file {path} does not exist: expected {expected}, {_HINTS[expected]}")
  return hf_folder.load_weight_file(path)


def torch_to_flax(alexnet: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
  """Flat ``{our path: array}`` from the two state_dicts."""
  out = {}
  trunk = dict(alexnet)
  for key, value in lin.items():
    m = re.fullmatch(r"net\.slice\d+\.(\d+)\.(weight|bias)", key)
    if m:  # a whole LPIPS state_dict: the trunk lives under net.slice*
      trunk[f"features.{m.group(1)}.{m.group(2)}"] = value
      continue
    m = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
    if m:
      out[f"lin{m.group(1)}.kernel"] = hf_folder.conv_kernel_to_flax(np.asarray(value))
    elif not key.startswith("scaling_layer."):
      out[key] = np.asarray(value)  # assign_params reports it as unexpected
  for key, value in trunk.items():
    if key.startswith("classifier."):
      continue
    m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
    if not m:
      out[key] = np.asarray(value)
      continue
    idx, leaf = m.groups()
    value = np.asarray(value)
    out[f"features_{idx}." + ("kernel" if leaf == "weight" else "bias")] = (
        hf_folder.conv_kernel_to_flax(value) if leaf == "weight" else value)
  return out


def load_lpips(alexnet_path: str | os.PathLike | None, lin_path: str | os.PathLike,
               **kwargs) -> LPIPS:
  """Builds ``LPIPS(**kwargs)`` from torchvision's AlexNet file and lpips' ``alex.pth``."""
  lin = _read(lin_path, LIN_FILE)
  has_trunk = any(k.startswith("net.slice") for k in lin)
  alexnet = {} if (alexnet_path is None and has_trunk) else _read(alexnet_path, ALEXNET_FILE)
  if alexnet and "features.0.weight" not in alexnet:
    raise hf_folder.ImportMismatchError(
        f"{alexnet_path} is not a torchvision AlexNet state_dict (no 'features.0.weight'); "
        f"expected {ALEXNET_FILE}. Were the two LPIPS files swapped?")
  if not any(re.fullmatch(r"lin\d+\.model\.\d+\.weight", k) for k in lin):
    raise hf_folder.ImportMismatchError(
        f"{lin_path} has no 'lin0.model.1.weight'-style keys; expected {LIN_FILE}, "
        f"{_HINTS[LIN_FILE]}")
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), **kwargs))
  hf_folder.assign_params(model, torch_to_flax(alexnet, lin),
                          source=f"{alexnet_path} + {lin_path}")
  return model

