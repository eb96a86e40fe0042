"""Loading big_vision-style Python configs and applying command-line overrides.

``configs/x.py:variant`` names a file with ``get_config(arg)`` returning an
``ml_collections.ConfigDict``; ``--config.a.b=value`` overrides a field. The
ConfigDict is locked first, so a misspelt key fails with its name and the
keys that do exist, and a value of the wrong type fails with both types.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections


class ConfigError(ValueError):
  pass


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``path/to/config.py[:arg]`` -> the ConfigDict its ``get_config(arg)`` returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"_fpdm_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg)")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except TypeError:
    cfg = module.get_config()
  except KeyError as e:
    raise ConfigError(f"{path}: unknown variant {arg!r} ({e})") from e
  cfg = ml_collections.ConfigDict(cfg) if not isinstance(cfg, ml_collections.ConfigDict) else cfg
  cfg.lock()
  return cfg


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  node, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r} "
                        f"(it has: {', '.join(known)})")
    if i < len(parts) - 1:
      node = node[part]
  old = node[parts[-1]]
  value = _parse_value(text)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
    # A dict literal replaces a whole sub-config (e.g. scheduler_overrides).
    value = ml_collections.ConfigDict(value)
  if old is not None and not isinstance(value, type(old)) and not (
      isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
    raise ConfigError(f"config key {dotted!r} is a {type(old).__name__} "
                      f"({old!r}); cannot set it to {text!r} ({type(value).__name__})")
  with node.unlocked():
    node[parts[-1]] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Each override is ``a.b=value`` (value parsed as a Python literal or kept as text)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like key=value")
    apply_override(cfg, key.removeprefix("--config.").removeprefix("config."), text)
  return cfg


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.x=y`` overrides from the other arguments."""
  overrides, rest = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" in arg:
        overrides.append(arg[len("--config."):])
      else:
        overrides.append(arg[len("--config."):] + "=" + next(it, ""))
    else:
      rest.append(arg)
  return overrides, rest


def load_json_config(path) -> ml_collections.ConfigDict:
  """The ``config.json`` a training run wrote into its workdir."""
  import json
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: pass --config, or point --workdir at a training run")
  cfg = ml_collections.ConfigDict(json.loads(open(path).read()))
  cfg.lock()
  return cfg
