"""CLIP vision tower: Hugging Face folder <-> ``CLIPVisionModelWithProjection``.

Accepts the two folder kinds FPDM meets:

* a full ``CLIPModel`` folder (openai/clip-vit-large-patch14): ``vision_model.*``
  and ``visual_projection.weight`` are imported; the text tower,
  ``text_projection`` and ``logit_scale`` are dropped BY NAME, so anything else
  the module does not take is still reported as an error;
* a ``CLIPVisionModelWithProjection`` folder (what ``export_clip_vision``
  writes, and what fine-tuned stage-1 encoders are saved as).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax.importers.hf_folder import (
    CheckpointFolderError, assign_params, conv_kernel_to_flax, conv_kernel_to_torch,
    export_params, linear_kernel_to_flax, linear_kernel_to_torch, load_state_dict,
    read_config, resolve_folder, save_safetensors)
from fpdm_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

# Tensors of a full CLIPModel that the vision encoder deliberately does not use.
# ``position_ids`` are non-persistent buffers that older checkpoints still saved.
IGNORED_KEYS = re.compile(
    r"^(text_model\..*|text_projection\.weight|logit_scale|.*embeddings\.position_ids)$")

_NORMS = re.compile(r"(layer_norm1|layer_norm2|pre_layrnorm|post_layernorm)$")


def config_from_folder(folder, subfolder: str | None = None, **overrides) -> CLIPVisionConfig:
  cfg = read_config(folder, subfolder)
  model_type = cfg.get("model_type")
  if model_type not in ("clip", "clip_vision_model"):
    raise CheckpointFolderError(
        f"{resolve_folder(folder, subfolder)} holds a {model_type!r} model "
        f"(architectures {cfg.get('architectures')}), not CLIP: the CLIP importer needs a "
        "CLIPModel or CLIPVisionModelWithProjection folder (config model_type 'clip' or "
        "'clip_vision_model')")
  return CLIPVisionConfig.from_hf_dict(cfg, **overrides)


def clip_vision_params_from_torch(state_dict: Mapping[str, np.ndarray]
                                  ) -> tuple[dict[str, np.ndarray], list[str]]:
  """PyTorch state dict -> (our flat params, keys deliberately ignored)."""
  out, ignored = {}, []
  for key, value in state_dict.items():
    if IGNORED_KEYS.match(key):
      ignored.append(key)
      continue
    value = np.asarray(value)
    module, _, leaf = key.rpartition(".")
    if key == "vision_model.embeddings.position_embedding.weight":
      out["vision_model.embeddings.position_embedding"] = value
      continue
    if key == "vision_model.embeddings.patch_embedding.weight":
      out["vision_model.embeddings.patch_embedding.kernel"] = conv_kernel_to_flax(value)
      continue
    if leaf == "weight" and _NORMS.search(module):
      leaf = "scale"
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", linear_kernel_to_flax(value)
    module = module.replace("pre_layrnorm", "pre_layernorm")
    out[f"{module}.{leaf}" if module else leaf] = value
  return out, ignored


def clip_vision_params_to_torch(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of ``clip_vision_params_from_torch`` (CLIPVisionModelWithProjection keys)."""
  out = {}
  for key, value in params.items():
    value = np.asarray(value)
    if key == "vision_model.embeddings.position_embedding":
      out[key + ".weight"] = value
      continue
    module, _, leaf = key.rpartition(".")
    module = module.replace("pre_layernorm", "pre_layrnorm")
    if leaf == "kernel":
      leaf = "weight"
      value = conv_kernel_to_torch(value) if value.ndim == 4 else linear_kernel_to_torch(value)
    elif leaf == "scale":
      leaf = "weight"
    out[f"{module}.{leaf}" if module else leaf] = value
  return out


def build_without_init(make):
  """Builds the module without allocating random weights when that is safe
  (only Params, which the checkpoint overwrites); otherwise for real."""
  abstract = nnx.eval_shape(make)
  if nnx.to_flat_state(nnx.state(abstract, nnx.Not(nnx.Param))):
    return make()
  return abstract


def load_clip_vision(folder: str | os.PathLike, *, subfolder: str | None = None,
                     dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                     **config_overrides) -> CLIPVisionModelWithProjection:
  """Reads a local CLIP folder into ``CLIPVisionModelWithProjection``.

  Args:
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    config_overrides: ours-only switches such as ``remat=True``.
  """
  cfg = config_from_folder(folder, subfolder, **config_overrides)
  state_dict = load_state_dict(folder, subfolder)
  params, _ = clip_vision_params_from_torch(state_dict)
  model = build_without_init(lambda: CLIPVisionModelWithProjection(
      cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype))
  assign_params(model, params, source=str(resolve_folder(folder, subfolder)), dtype=param_dtype)
  return model


def export_clip_vision(model: CLIPVisionModelWithProjection, folder: str | os.PathLike) -> Path:
  """Writes a ``CLIPVisionModelWithProjection`` folder (config.json +
  model.safetensors, float32) that transformers' ``from_pretrained`` opens."""
  tensors = clip_vision_params_to_torch(export_params(model))
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  return save_safetensors(tensors, folder, "model.safetensors", model.config.to_hf_dict())
