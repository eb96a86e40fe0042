"""diffusers AutoencoderKL folders <-> ``fpdm_jax.models.vae``.

Same parameter names as diffusers except ``downsamplers.0`` -> ``downsampler``,
``upsamplers.0`` -> ``upsampler`` and ``to_out.0`` -> ``to_out``
(see ``fpdm_jax/importers/unet.py``). The legacy mid-block attention names
of the SD 1.x / 2.x VAE checkpoints on the Hub (``query``/``key``/``value``/
``proj_attn``) are read too; the exporter writes the current names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from fpdm_jax.importers import hf_folder
from fpdm_jax.importers.unet import (
    WEIGHTS_NAME, _check_class, flax_to_torch, model_folder, torch_to_flax)
from fpdm_jax.models.vae import AutoencoderKL, VAEConfig

_VAE_RENAMES = [  # on our side, beyond the UNet ones
    (r"^(encoder\.down_blocks\.\d+)\.downsamplers\.0\.", r"\1.downsampler."),
    (r"^(decoder\.up_blocks\.\d+)\.upsamplers\.0\.", r"\1.upsampler."),
]


def _to_ours(state):
  out = {}
  for k, v in torch_to_flax(state).items():
    for pattern, repl in _VAE_RENAMES:
      k = re.sub(pattern, repl, k)
    out[k] = v
  return out


def _to_torch(params):
  out = {}
  for k, v in flax_to_torch(params).items():
    k = re.sub(r"^(encoder\.down_blocks\.\d+)\.downsampler\.", r"\1.downsamplers.0.", k)
    k = re.sub(r"^(decoder\.up_blocks\.\d+)\.upsampler\.", r"\1.upsamplers.0.", k)
    out[k] = v
  return out


def load_vae(folder: str | os.PathLike, *, dtype=jnp.float32, **config_overrides) -> AutoencoderKL:
  """Builds the VAE from a diffusers folder (pipeline folder or its ``vae/``)."""
  path = model_folder(folder, "vae")
  raw = hf_folder.read_config(path)
  _check_class(raw, "AutoencoderKL", path)
  config = VAEConfig.from_diffusers_dict(raw, **config_overrides)
  model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  hf_folder.assign_params(model, _to_ours(hf_folder.load_state_dict(path)), source=str(path))
  return model


def export_vae(model: AutoencoderKL, folder: str | os.PathLike) -> Path:
  """Writes a folder diffusers' ``AutoencoderKL.from_pretrained`` loads."""
  tensors = _to_torch(hf_folder.export_params(model))
  return hf_folder.save_safetensors(tensors, folder, WEIGHTS_NAME,
                                    config=model.config.to_diffusers_dict())
