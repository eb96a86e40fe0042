"""diffusers UNet2DConditionModel folders <-> ``fpdm_jax.models.unet``.

Our parameter paths are diffusers' with these renames (everything else, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, is the same):

  diffusers                          ours
  ``down_blocks.N.downsamplers.0``   ``down_blocks.N.downsampler``
  ``up_blocks.N.upsamplers.0``       ``up_blocks.N.upsampler``
  ``*.to_out.0``                     ``*.to_out``
  ``*.ff.net.0.proj`` / ``*.ff.net.2``  ``*.ff.proj_in`` / ``*.ff.proj_out``
  ``class_embedding.0`` / ``.3``     ``class_embedding.linear_1`` / ``.linear_2``

and leaves ``weight`` -> ``kernel`` (conv OIHW -> HWIO, linear transposed)
or ``scale`` (norms).

FPDM additions in an exported folder (``export_unet`` of a ``fpdm=True``
UNet), next to the plain SD keys that diffusers loads:

* ``pose_embedding.{conv_in,blocks.0-5,conv_out}.{weight,bias}``: loads into
  ``diffusers.models.controlnets.controlnet.ControlNetConditioningEmbedding``;
* ``class_embedding.{0,3}.{weight,bias}``: loads into
  ``torch.nn.Sequential(Linear, GELU, Dropout, Linear, Dropout)``, assigned
  as ``unet.class_embedding`` it is what diffusers adds to the time embedding;
* ``config.json`` key ``_fpdm_additions`` (their sizes; diffusers ignores it).

``UNet2DConditionModel.from_pretrained`` on such a folder loads the SD part
and reports the extra keys as unused.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax.importers import hf_folder
from fpdm_jax.models.conditioning import ClassEmbeddingMLP, PoseEmbedding
from fpdm_jax.models.unet import UNet2DConditionModel, UNetConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FPDM_PARAMS = r"^(pose_embedding|class_embedding)\."

# (diffusers pattern, ours) applied to the module path (key without the leaf).
_RENAMES = [
    (r"^(down_blocks\.\d+)\.downsamplers\.0\.", r"\1.downsampler."),
    (r"^(up_blocks\.\d+)\.upsamplers\.0\.", r"\1.upsampler."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"^class_embedding\.0\.", "class_embedding.linear_1."),
    (r"^class_embedding\.3\.", "class_embedding.linear_2."),
]
_INVERSE = [
    (r"^(down_blocks\.\d+)\.downsampler\.", r"\1.downsamplers.0."),
    (r"^(up_blocks\.\d+)\.upsampler\.", r"\1.upsamplers.0."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"^class_embedding\.linear_1\.", "class_embedding.0."),
    (r"^class_embedding\.linear_2\.", "class_embedding.3."),
]

# Old diffusers (< 0.14) names of the VAE mid-block attention, still in the
# SD 1.x / 2.x VAE checkpoints on the Hub.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _apply(renames, name: str) -> str:
  # Renames match on dot-delimited segments: pad with dots, strip afterwards.
  name = name + "."
  for pattern, repl in renames:
    name = re.sub(pattern, repl, name)
  return name[:-1]


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers UNet / VAE state dict -> our flat ``{path: array}``."""
  out = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    head, _, last = module.rpartition(".")
    if last in _LEGACY_ATTENTION and ".attentions." in module:
      module = f"{head}.{_LEGACY_ATTENTION[last]}"
    value = np.asarray(value)
    if leaf == "weight":
      if value.ndim == 4 and re.search(r"\.(to_[qkv]|to_out\.0)$", module):
        value = value[:, :, 0, 0]  # 1x1-conv attention projections of very old checkpoints
      if value.ndim == 4:
        leaf, value = "kernel", hf_folder.conv_kernel_to_flax(value)
      elif value.ndim == 2:
        leaf, value = "kernel", hf_folder.linear_kernel_to_flax(value)
      elif value.ndim == 1:
        leaf = "scale"  # only norms have 1-d weights in these models
    out[f"{_apply(_RENAMES, module)}.{leaf}"] = value
  return out


def flax_to_torch(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of ``torch_to_flax`` (new-style attention names)."""
  out = {}
  for key, value in params.items():
    module, _, leaf = key.rpartition(".")
    value = np.asarray(value, dtype=np.float32)
    if leaf == "kernel":
      value = (hf_folder.conv_kernel_to_torch(value) if value.ndim == 4
               else hf_folder.linear_kernel_to_torch(value))
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[f"{_apply(_INVERSE, module)}.{leaf}"] = np.ascontiguousarray(value)
  return out


def model_folder(folder: str | os.PathLike, subfolder: str) -> Path:
  """``folder/subfolder`` for a pipeline folder, else ``folder`` itself."""
  path = Path(folder).expanduser()
  if (path / subfolder / "config.json").is_file():
    return path / subfolder
  if (path / "config.json").is_file():
    return path
  hf_folder.resolve_folder(path)  # raises if the folder does not exist
  raise hf_folder.CheckpointFolderError(
      f"{path} holds neither config.json nor {subfolder}/config.json: point at a diffusers "
      f"pipeline folder (with {subfolder}/) or at the {subfolder} folder itself")


def _check_class(config: dict, expected: str, path: Path) -> None:
  name = config.get("_class_name")
  if name is not None and name != expected:
    raise hf_folder.CheckpointFolderError(
        f"{path}/config.json describes a {name}, not a {expected}")


def load_unet(folder: str | os.PathLike, *, fpdm: bool | None = None, dtype=jnp.float32,
              remat: bool = False, seed: int = 0, **config_overrides) -> UNet2DConditionModel:
  """Builds a UNet from a diffusers folder (pipeline folder or its ``unet/``).

  Args:
    fpdm: build FPDM's additions. None: when the folder has them (its config
      has ``_fpdm_additions`` or its weights ``pose_embedding.*``). Loading a
      plain SD UNet with ``fpdm=True`` initialises the additions fresh (pose
      embedding output conv zero, so the model starts as the plain UNet).
    seed: initialisation of additions the checkpoint lacks.
  """
  path = model_folder(folder, "unet")
  raw = hf_folder.read_config(path)
  _check_class(raw, "UNet2DConditionModel", path)
  state = hf_folder.load_state_dict(path)
  if fpdm is None:
    fpdm = bool(raw.get("_fpdm_additions")) or any(k.startswith("pose_embedding.") for k in state)
  config = UNetConfig.from_diffusers_dict(raw, fpdm=fpdm, **config_overrides)
  # Build without allocating, then fill from the checkpoint.
  model = nnx.eval_shape(lambda: UNet2DConditionModel(config, dtype=dtype, remat=remat,
                                                      rngs=nnx.Rngs(seed)))
  params = torch_to_flax(state)
  missing = hf_folder.assign_params(model, params, allow_missing=FPDM_PARAMS if fpdm else None,
                                    source=str(path))
  _reject_partial_additions(missing, params, path)
  rngs = nnx.Rngs(seed)
  if any(k.startswith("pose_embedding.") for k in missing):
    model.pose_embedding = PoseEmbedding(
        config.block_out_channels[0], in_channels=config.pose_conditioning_channels,
        channels=config.pose_embedding_channels, dtype=dtype, rngs=rngs)
  if any(k.startswith("class_embedding.") for k in missing):
    model.class_embedding = ClassEmbeddingMLP(
        config.class_embed_input_dim, config.time_embed_dim,
        dropout=config.class_embed_dropout, dtype=dtype, rngs=rngs)
  return model


def _reject_partial_additions(missing: list[str], params: dict, path: Path) -> None:
  """A module either comes whole from the checkpoint or is initialised whole."""
  for prefix in ("pose_embedding.", "class_embedding."):
    lacks = [k for k in missing if k.startswith(prefix)]
    has = [k for k in params if k.startswith(prefix)]
    if lacks and has:
      raise hf_folder.ImportMismatchError(
          f"{path} has some but not all {prefix}* tensors: lacks {lacks[:6]}")


def export_unet(model: UNet2DConditionModel, folder: str | os.PathLike) -> Path:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32)
  that diffusers' ``UNet2DConditionModel.from_pretrained(folder)`` loads; FPDM
  additions are written under ``pose_embedding.*`` / ``class_embedding.*``."""
  tensors = flax_to_torch(hf_folder.export_params(model))
  return hf_folder.save_safetensors(tensors, folder, WEIGHTS_NAME,
                                    config=model.config.to_diffusers_dict())
