"""Reading Hugging Face checkpoint folders and filling NNX modules from them.

Every model family has its own importer (``clip.py``, ``unet.py``, ...) that
knows how PyTorch parameter names map onto ours. What they share lives here:

* ``read_config`` / ``load_state_dict`` read a local folder exactly as
  ``save_pretrained`` writes it (``config.json`` plus ``*.safetensors``, a
  sharded ``*.safetensors.index.json``, or a pickled ``*.bin``). safetensors are
  read with numpy only; a pickled ``.bin`` is opened through
  ``torch.load(weights_only=True)`` and never by plain unpickling, because a
  pickle can run arbitrary code.
* ``assign_params`` writes a flat ``{"a.b.kernel": array}`` dict into a module
  and refuses to finish silently: every checkpoint tensor must be consumed and
  every parameter filled with the right shape, or ``ImportMismatchError``
  lists what did not match.
* ``conv_kernel_to_flax`` and friends are the layout conversions (PyTorch
  OIHW -> Flax HWIO, Linear (out, in) -> (in, out)).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

SAFETENSORS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
BIN_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")


class CheckpointFolderError(FileNotFoundError):
  """A checkpoint folder is missing, incomplete or of the wrong kind."""


class ImportMismatchError(ValueError):
  """Checkpoint tensors and module parameters do not correspond one to one."""


def resolve_folder(folder: str | os.PathLike, subfolder: str | None = None) -> Path:
  path = Path(folder).expanduser()
  if subfolder:
    path = path / subfolder
  if not path.is_dir():
    hint = ""
    if subfolder and Path(folder).is_dir():
      hint = (f" ({folder} exists but has no '{subfolder}/'; a diffusers pipeline "
              f"folder such as stabilityai/stable-diffusion-2-1 has unet/, vae/ and scheduler/)")
    raise CheckpointFolderError(f"checkpoint folder {path} does not exist{hint}")
  return path


def read_config(folder: str | os.PathLike, subfolder: str | None = None,
                name: str = "config.json") -> dict:
  """Reads ``config.json`` (or ``name``) of a Hugging Face folder."""
  path = resolve_folder(folder, subfolder) / name
  if not path.is_file():
    raise CheckpointFolderError(
        f"{path} is missing: point the config at the folder that save_pretrained "
        f"wrote (it holds {name} next to the weights)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointFolderError(f"{path} is not valid JSON ({e}); re-download it") from e


def _weight_files(path: Path) -> list[Path]:
  for index_name in ("model.safetensors.index.json",
                     "diffusion_pytorch_model.safetensors.index.json",
                     "pytorch_model.bin.index.json",
                     "diffusion_pytorch_model.bin.index.json"):
    index = path / index_name
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      missing = [s for s in shards if not (path / s).is_file()]
      if missing:
        raise CheckpointFolderError(
            f"{index} names shards that are not in the folder: {missing[:5]}; "
            "the download is incomplete")
      return [path / s for s in shards]
  for name in SAFETENSORS_NAMES + BIN_NAMES:
    if (path / name).is_file():
      return [path / name]
  found = sorted(p.name for p in path.iterdir())
  raise CheckpointFolderError(
      f"no weights in {path}: expected one of {SAFETENSORS_NAMES + BIN_NAMES} "
      f"(or a sharded *.index.json); the folder holds {found[:20]}")


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(str(file), framework="numpy") as f:
      for key in f.keys():
        out[key] = f.get_tensor(key)
  except Exception as e:  # safetensors raises its own SafetensorError
    if "bfloat16" in str(e) or "bf16" in str(e).lower():
      return _load_safetensors_bf16(file)
    raise CheckpointFolderError(f"cannot read {file}: {e} (truncated download?)") from e
  return out


def _load_safetensors_bf16(file: Path) -> dict[str, np.ndarray]:
  """numpy has no bfloat16: parse the header ourselves and view as ml_dtypes."""
  import ml_dtypes
  dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
            "BOOL": np.bool_}
  data = file.read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  base = 8 + n
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[base + start:base + end], dtype=dtypes[info["dtype"]])
    out[key] = arr.reshape(info["shape"]).copy()
  return out


def _load_bin(file: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise CheckpointFolderError(
        f"{file} is a pickled PyTorch checkpoint; reading it needs torch "
        "(pip install torch), or convert the folder to safetensors") from e
  try:
    sd = torch.load(str(file), map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointFolderError(
        f"cannot read {file} with torch.load(weights_only=True): {e}") from e
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
          for k, v in sd.items()}


def load_state_dict(folder: str | os.PathLike, subfolder: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder as numpy arrays, keyed as in PyTorch."""
  path = resolve_folder(folder, subfolder)
  out: dict[str, np.ndarray] = {}
  for file in _weight_files(path):
    part = _load_safetensors(file) if file.suffix == ".safetensors" else _load_bin(file)
    out.update(part)
  return out


def load_weight_file(file: str | os.PathLike) -> dict[str, np.ndarray]:
  """One ``.safetensors`` / ``.pth`` / ``.bin`` file (LPIPS, Inception, ...)."""
  file = Path(file)
  if not file.is_file():
    raise CheckpointFolderError(f"weight file {file} does not exist")
  return _load_safetensors(file) if file.suffix == ".safetensors" else _load_bin(file)


# ----------------------------------------------------------------------------
# Layout conversions.

def conv_kernel_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d (O, I, H, W) -> Flax (H, W, I, O)."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_kernel_to_torch(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (3, 2, 0, 1))


def linear_kernel_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear (out, in) -> Flax (in, out)."""
  return np.transpose(w)


linear_kernel_to_torch = linear_kernel_to_flax


def torch_to_flax_generic(sd: Mapping[str, np.ndarray],
                          rename: Callable[[str], str | None] = lambda k: k,
                          norm_modules: Callable[[str], bool] = lambda k: False,
                          ) -> dict[str, np.ndarray]:
  """The common case: rename keys, then convert by tensor kind.

  ``rename`` maps a PyTorch key (without the final ``.weight``/``.bias``) to
  ours, or returns None to drop it. A ``weight`` of rank 4 becomes a conv
  ``kernel``, rank 2 a linear ``kernel``, rank 1 a norm ``scale`` (when
  ``norm_modules`` says the module is a norm) or an embedding table.
  """
  out = {}
  for key, value in sd.items():
    module, _, leaf = key.rpartition(".")
    new_module = rename(module)
    if new_module is None:
      continue
    value = np.asarray(value)
    if leaf == "weight":
      if value.ndim == 4:
        leaf, value = "kernel", conv_kernel_to_flax(value)
      elif value.ndim == 2:
        leaf, value = "kernel", linear_kernel_to_flax(value)
      elif value.ndim == 1 and norm_modules(module):
        leaf = "scale"
    out[f"{new_module}.{leaf}" if new_module else leaf] = value
  return out


# ----------------------------------------------------------------------------
# Filling modules.

def _path_str(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


def module_params(module: nnx.Module) -> dict[str, nnx.Variable]:
  """``{"a.b.kernel": Param}`` of every parameter in ``module``."""
  return {_path_str(k): v for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assign_params(module: nnx.Module, params: Mapping[str, np.ndarray], *,
                  allow_missing: str | None = None, source: str = "checkpoint",
                  dtype=None) -> list[str]:
  """Writes ``params`` into ``module``; every key must match a parameter.

  Args:
    allow_missing: regex over our parameter paths that the checkpoint may
      lack (e.g. the FPDM additions when loading a plain SD UNet); those keep
      their initialisation. Returns their names.
    source: named in error messages (usually the folder).
    dtype: cast to this dtype (default: the parameter's own dtype).
  """
  ours = module_params(module)
  missing = sorted(set(ours) - set(params))
  unexpected = sorted(set(params) - set(ours))
  allowed = [k for k in missing if allow_missing and re.search(allow_missing, k)]
  missing = [k for k in missing if k not in allowed]
  shape_errors = [
      f"{k}: checkpoint {tuple(np.shape(params[k]))} vs module {tuple(ours[k].shape)}"
      for k in sorted(set(ours) & set(params))
      if tuple(np.shape(params[k])) != tuple(ours[k].shape)]
  if missing or unexpected or shape_errors:
    lines = [f"{source} does not match the module {type(module).__name__}:"]
    for title, items in (("parameters the checkpoint lacks", missing),
                         ("checkpoint tensors no parameter takes", unexpected),
                         ("shape mismatches", shape_errors)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12])
                     + (" ..." if len(items) > 12 else ""))
    lines.append("  Is the folder the right model family and size for this config?")
    raise ImportMismatchError("\n".join(lines))
  for k, var in ours.items():
    if k in params:
      var.set_value(jnp.asarray(params[k], dtype=dtype or var.get_value().dtype))
  return allowed


def export_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """``{"a.b.kernel": np.ndarray}`` of the module, for exporters."""
  return {k: np.asarray(v.get_value()) for k, v in module_params(module).items()}


def save_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike,
                     filename: str, config: Mapping | None = None) -> Path:
  """Writes a Hugging Face-style folder: ``config.json`` + one safetensors file."""
  from safetensors.numpy import save_file
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / filename))
  if config is not None:
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
  return folder
