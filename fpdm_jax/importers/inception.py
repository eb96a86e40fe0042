"""torchvision Inception-v3 weights -> ``fpdm_jax.metrics.inception.InceptionV3``.

Reads torchvision's ``inception_v3_google-0cc3c7bd.pth`` (what
``inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)`` downloads), or the
same state_dict saved as ``.safetensors``. Module names are shared, so the
conversion is per leaf:

* ``*.conv.weight`` -> ``*.conv.kernel`` (OIHW -> HWIO);
* ``*.bn.weight`` / ``bias`` -> ``*.bn.scale`` / ``bias`` (``nnx.Param``);
* ``*.bn.running_mean`` / ``running_var`` -> ``*.bn.mean`` / ``var``
  (``nnx.BatchStat``; the evaluation always normalises with these);
* ``*.num_batches_tracked`` and ``AuxLogits.*`` are dropped (training only);
  ``fc.*`` too unless the module was built ``with_logits=True``.

Everything else must match one to one, or the import fails listing the
differences. pytorch-fid's ``pt_inception-2015-12-05`` weights use the same key
names but a different network (1008 classes, other pooling in the Mixed
blocks); they are refused by name rather than giving silently wrong features.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax.importers import hf_folder
from fpdm_jax.metrics.inception import InceptionV3

TORCHVISION_FILE = "inception_v3_google-0cc3c7bd.pth"
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def torch_to_flax(state: Mapping[str, np.ndarray], with_logits: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns ``(params, batch_stats)`` flat dicts keyed by our paths."""
  params, stats = {}, {}
  for key, value in state.items():
    value = np.asarray(value)
    if key.endswith("num_batches_tracked") or key.startswith("AuxLogits."):
      continue
    if key.startswith("fc.") and not with_logits:
      continue
    module, _, leaf = key.rpartition(".")
    if leaf in _BN_STATS:
      stats[f"{module}.{_BN_STATS[leaf]}"] = value
    elif leaf == "weight" and value.ndim == 4:
      params[f"{module}.kernel"] = hf_folder.conv_kernel_to_flax(value)
    elif leaf == "weight" and value.ndim == 2:
      params[f"{module}.kernel"] = hf_folder.linear_kernel_to_flax(value)
    elif leaf == "weight" and re.search(r"\.bn$", module):
      params[f"{module}.scale"] = value
    else:
      params[key] = value
  return params, stats


def assign_batch_stats(module: nnx.Module, stats: Mapping[str, np.ndarray], *,
                       source: str) -> None:
  """``hf_folder.assign_params`` for ``nnx.BatchStat``: strict, one to one."""
  ours = {".".join(map(str, k)): v
          for k, v in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))}
  missing = sorted(set(ours) - set(stats))
  unexpected = sorted(set(stats) - set(ours))
  bad = [f"{k}: checkpoint {np.shape(stats[k])} vs module {tuple(ours[k].shape)}"
         for k in sorted(set(ours) & set(stats)) if np.shape(stats[k]) != tuple(ours[k].shape)]
  if missing or unexpected or bad:
    lines = [f"{source}: BatchNorm running statistics do not match {type(module).__name__}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", bad)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12])
                     + (" ..." if len(items) > 12 else ""))
    raise hf_folder.ImportMismatchError("\n".join(lines))
  for k, var in ours.items():
    var.set_value(jnp.asarray(stats[k], jnp.float32))


def _check_torchvision(state: Mapping[str, np.ndarray], source: str) -> None:
  if "Conv2d_1a_3x3.conv.weight" not in state:
    raise hf_folder.ImportMismatchError(
        f"{source} is not a torchvision Inception-v3 state_dict (no "
        f"'Conv2d_1a_3x3.conv.weight'); expected torchvision's {TORCHVISION_FILE}")
  fc = state.get("fc.weight")
  if fc is not None and np.shape(fc)[0] == 1008:
    raise hf_folder.ImportMismatchError(
        f"{source} holds pytorch-fid's TF-ported Inception (1008 classes), whose Mixed "
        "blocks pool differently; the protocol uses torchvision's ImageNet weights "
        f"({TORCHVISION_FILE})")


def load_inception(path: str | os.PathLike, **kwargs) -> InceptionV3:
  """Builds ``InceptionV3(**kwargs)`` and fills it from a torchvision state_dict file.

  ``kwargs`` are InceptionV3's options (``transform_input=True`` by default, as
  torchvision's pretrained constructor; ``antialias``, ``with_logits``, ...).
  """
  if not os.path.isfile(path):
    raise hf_folder.CheckpointFolderError(
        f"Inception weights {path} do not exist; download torchvision's {TORCHVISION_FILE} "
        "(https://download.pytorch.org/models/" + TORCHVISION_FILE + ")")
  state = hf_folder.load_weight_file(path)
  _check_torchvision(state, str(path))
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), **kwargs))
  params, stats = torch_to_flax(state, with_logits=model.with_logits)
  hf_folder.assign_params(model, params, source=str(path))
  assign_batch_stats(model, stats, source=str(path))
  return model
