"""DINOv2: Hugging Face folder <-> ``Dinov2Model``.

Two key layouts exist: the Hub checkpoints (facebook/dinov2-large), which
transformers 5 still writes with ``save_pretrained``
(``attention.attention.query``, ``attention.output.dense``, and for SwiGLU
``mlp.weights_in`` = gate and up stacked), and transformers 5's in-memory
names (``attention.q_proj``, ...), which a ``torch.save(model.state_dict())``
produces. Both are read; the exporter writes the Hub layout, which every
transformers version loads.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax.importers.clip import build_without_init
from fpdm_jax.importers.hf_folder import (
    CheckpointFolderError, assign_params, conv_kernel_to_flax, conv_kernel_to_torch,
    export_params, linear_kernel_to_flax, linear_kernel_to_torch, load_state_dict,
    read_config, resolve_folder, save_safetensors)
from fpdm_jax.models.dinov2 import Dinov2Config, Dinov2Model

# Hub layout -> transformers 5 layout (transformers' own conversion_mapping).
_HUB_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("mlp.weights_out", "mlp.down_proj"),
)
_NORMS = re.compile(r"(^|\.)(norm1|norm2|layernorm)$")


def config_from_folder(folder, subfolder: str | None = None, **overrides) -> Dinov2Config:
  cfg = read_config(folder, subfolder)
  if cfg.get("model_type") != "dinov2":
    raise CheckpointFolderError(
        f"{resolve_folder(folder, subfolder)} holds a {cfg.get('model_type')!r} model "
        f"(architectures {cfg.get('architectures')}), not DINOv2: the DINOv2 importer needs "
        "a Dinov2Model folder (config model_type 'dinov2')")
  return Dinov2Config.from_hf_dict(cfg, **overrides)


def dinov2_params_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PyTorch state dict (either layout) -> our flat params."""
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    for old, new in _HUB_RENAMES:
      key = key.replace(old, new)
    module, _, leaf = key.rpartition(".")
    if module.endswith("mlp.weights_in"):  # fused SwiGLU [gate; up]
      gate, up = np.split(value, 2, axis=0)
      base = module[:-len("weights_in")]
      for name, part in (("gate_proj", gate), ("up_proj", up)):
        out[f"{base}{name}.{'kernel' if leaf == 'weight' else leaf}"] = (
            linear_kernel_to_flax(part) if leaf == "weight" else part)
      continue
    if leaf == "weight" and _NORMS.search(module):
      leaf = "scale"
    elif leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", conv_kernel_to_flax(value)
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", linear_kernel_to_flax(value)
    out[f"{module}.{leaf}" if module else leaf] = value
  return out


def dinov2_params_to_torch(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat params -> Hub-layout PyTorch tensors."""
  out = {}
  for key, value in params.items():
    value = np.asarray(value)
    module, _, leaf = key.rpartition(".")
    if leaf == "kernel":
      leaf = "weight"
      value = conv_kernel_to_torch(value) if value.ndim == 4 else linear_kernel_to_torch(value)
    elif leaf == "scale":
      leaf = "weight"
    if module.endswith("mlp.gate_proj") or module.endswith("mlp.up_proj"):
      if module.endswith("gate_proj"):  # emitted once, with its partner
        up = np.asarray(params[key.replace("gate_proj", "up_proj")])
        if leaf == "weight":
          up = linear_kernel_to_torch(up)
        out[f"{module[:-len('gate_proj')]}weights_in.{leaf}"] = np.concatenate([value, up], 0)
      continue
    for old, new in _HUB_RENAMES:
      module = module.replace(new, old)
    out[f"{module}.{leaf}" if module else leaf] = value
  return out


def load_dinov2(folder: str | os.PathLike, *, subfolder: str | None = None,
                dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                **config_overrides) -> Dinov2Model:
  """Reads a local DINOv2 folder (facebook/dinov2-large layout) into ``Dinov2Model``.

  Args:
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    config_overrides: e.g. ``remat=True``.
  """
  cfg = config_from_folder(folder, subfolder, **config_overrides)
  params = dinov2_params_from_torch(load_state_dict(folder, subfolder))
  model = build_without_init(lambda: Dinov2Model(
      cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype))
  assign_params(model, params, source=str(resolve_folder(folder, subfolder)), dtype=param_dtype)
  return model


def export_dinov2(model: Dinov2Model, folder: str | os.PathLike) -> Path:
  """Writes a ``Dinov2Model`` folder (config.json + model.safetensors, float32)."""
  tensors = dinov2_params_to_torch(export_params(model))
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  return save_safetensors(tensors, folder, "model.safetensors", model.config.to_hf_dict())
