"""Stage 2's frozen-network outputs, computed once and read back for training.

Stage 2 runs three frozen networks on every step (the VAE encoder, the
source encoder, the stage-1 fusion model); their outputs depend only on the
record, so ``python -m data_prep.cache_features`` computes them once per
split and ``data.cached_features=DIR`` trains from them. This module is the
cache's format, its check against a config, and its Grain loader.

A cache directory holds

  features-KKKKK-of-NNNNN.array_record   shard k = records [k*S, min((k+1)*S, N))
                                         of the split, in pair order
  cache_info.json                        written last: present = complete
  _plan.json                             while being written (what, how, where)

Record i of the cache is record i of the dataset split, so the same sampler
(``ProcessBlockSampler``: seed, shuffle, per-process blocks, iterator state)
gives a run from the cache the batches it would have had from the images.
A record is its fields' raw bytes (C order) concatenated in the order
``cache_info.json`` lists them with their shapes and dtypes: fixed size,
parsed without copies, no schema library.

Fields: ``latent_mean``/``latent_logvar`` (the VAE posterior of the target,
latent space) or ``target`` (the uint8 target view, pixel space: folding it
into channels is a free reshape, and uint8 is 4x smaller than float and
exact); ``tokens`` (source encoder ``last_hidden_state``); ``fusion`` (the
stage-1 embedding f(source, target pose)); ``target_pose`` (uint8: the pose
embedding is trainable, so it needs the image); ``pair_index``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import numpy as np

INFO_NAME = "cache_info.json"
PLAN_NAME = "_plan.json"
FORMAT = "fpdm_jax.feature_cache/1"
# Keys only a cache batch has: how the stage-2 loss tells the two kinds apart.
CACHED_KEYS = ("tokens", "fusion")


class CacheMismatch(ValueError):
  """The cache was made for a different configuration than the one asking for it."""


class CacheIncomplete(FileNotFoundError):
  pass


def is_cached_batch(batch: Mapping) -> bool:
  return all(k in batch for k in CACHED_KEYS)


def shard_name(k: int, num_shards: int) -> str:
  return f"features-{k:05d}-of-{num_shards:05d}.array_record"


# ----------------------------------------------------------------------------
# What determines the features.

def _real(path: str) -> str:
  return os.path.realpath(os.path.expanduser(path)) if path else ""


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fingerprint(config) -> dict:
  """The config fields the cached features depend on (None: irrelevant here).

  Paths are compared resolved. The stage-1 export is also identified by the
  hash of its small ``combiner.safetensors``: retraining stage 1 into the
  same folder (``runs/s1/fusion_model``) is the likely way to make a cache
  stale, and the path alone would not notice. The VAE and source encoder are
  pretrained downloads, identified by their path. ``model.pixel_unshuffle``
  is not among them: the pixel-space target is stored unfolded. (The whole
  writing config is kept in ``cache_info.json`` as provenance.)
  """
  m, enc = config.model, config.model.source_encoder
  combiner = Path(config.fusion.path) / "combiner.safetensors"
  own_encoder = enc.kind != "stage1"
  random_encoder = own_encoder and not enc.path
  return {
      "fusion.path": _real(config.fusion.path),
      "fusion.combiner_sha256": file_sha256(combiner) if combiner.is_file() else None,
      "model.latent": bool(m.latent),
      "model.vae_path": _real(m.vae_path) if m.latent else None,
      "model.image_size": [int(s) for s in m.image_size],
      "model.dtype": m.dtype,
      "model.source_encoder.kind": enc.kind,
      "model.source_encoder.path": _real(enc.path) if own_encoder else None,
      "model.source_encoder.preset": enc.preset if random_encoder else None,
      "model.source_encoder.overrides": (json.loads(json.dumps(dict(enc.overrides)))
                                         if random_encoder else None),
      "model.source_encoder.image_size": int(enc.image_size) if own_encoder else None,
      # A randomly initialised encoder (tests, the synthetic default) is its seed.
      "seed": int(config.seed) if random_encoder else None,
  }


HOW_TO_REBUILD = ("rebuild it with `python -m data_prep.cache_features --config CONFIG "
                  "--split {split} --out NEW_DIR` and the same --config.* overrides as "
                  "training, or fix the config to match the cache")


def read_info(cache_dir: str | os.PathLike) -> dict:
  cache_dir = Path(cache_dir).expanduser()
  info = cache_dir / INFO_NAME
  if not info.is_file():
    if (cache_dir / PLAN_NAME).is_file():
      raise CacheIncomplete(
          f"data.cached_features={cache_dir} is an unfinished cache (it has {PLAN_NAME} but "
          f"no {INFO_NAME}): rerun the python -m data_prep.cache_features command that "
          "was writing it; it continues with the missing shards")
    raise CacheIncomplete(f"data.cached_features={cache_dir}: no feature cache there "
                          f"({INFO_NAME} missing); write one with "
                          "python -m data_prep.cache_features")
  info_dict = json.loads(info.read_text())
  if info_dict.get("format") != FORMAT:
    raise CacheMismatch(f"{info}: format {info_dict.get('format')!r}, this code reads "
                        f"{FORMAT!r}; rebuild the cache")
  return info_dict


def check_config(config, info: dict | None = None) -> dict:
  """Raises ``CacheMismatch`` naming every field where ``config`` and the
  cache ``config.data.cached_features`` disagree; returns the cache's info."""
  d = config.data
  cache_dir = d.cached_features
  info = read_info(cache_dir) if info is None else info
  ds = info["dataset"]
  how = HOW_TO_REBUILD.format(split=d.train_split)
  if d.flip_prob > 0:
    raise CacheMismatch(
        f"data.flip_prob={d.flip_prob} with data.cached_features={cache_dir}: a flip "
        "changes the source image and redraws both poses, so it changes the cached "
        "tokens and fusion embedding too, and the cache holds unflipped features only. "
        "Set --config.data.flip_prob=0 to train from the cache, or train from the images")
  if ds["name"] != d.name:
    raise CacheMismatch(f"data.cached_features={cache_dir} was written from dataset "
                        f"{ds['name']!r}, but data.name={d.name!r}; {how}")
  if ds["split"] != d.train_split:
    raise CacheMismatch(f"data.cached_features={cache_dir} holds split {ds['split']!r}, but "
                        f"data.train_split={d.train_split!r}; {how}")
  want = fingerprint(config)
  differs = [k for k in sorted(set(want) | set(info["fingerprint"]))
             if want.get(k) != info["fingerprint"].get(k)]
  if differs:
    if "fusion.combiner_sha256" in differs and "fusion.path" not in differs:
      raise CacheMismatch(
          f"data.cached_features={cache_dir}: the stage-1 export at fusion.path="
          f"{config.fusion.path} changed since the cache was written (its "
          f"combiner.safetensors differs), so the cached fusion embeddings are stale; {how}")
    shown = [k for k in differs if k != "fusion.combiner_sha256"]
    detail = "; ".join(f"{k}: cache {info['fingerprint'].get(k)!r}, config {want.get(k)!r}"
                       for k in shown)
    raise CacheMismatch(f"data.cached_features={cache_dir} was written for a different "
                        f"config ({detail}); {how}")
  return info


# ----------------------------------------------------------------------------
# Records.

def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  shape: tuple[int, ...]
  dtype: str                  # as stored; numpy name, "bfloat16" via ml_dtypes
  # Stored narrower than computed (``--feature-dtype``): read back as this, so
  # the step computes in the dtype the image path would.
  compute_dtype: str | None = None

  @property
  def np_dtype(self) -> np.dtype:
    return _np_dtype(self.dtype)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.np_dtype.itemsize

  def to_json(self) -> dict:
    out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
    if self.compute_dtype:
      out["compute_dtype"] = self.compute_dtype
    return out

  @classmethod
  def from_json(cls, d: Mapping) -> Field:
    return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"],
               d.get("compute_dtype"))


def record_nbytes(fields: Sequence[Field]) -> int:
  return sum(f.nbytes for f in fields)


def encode_record(fields: Sequence[Field], values: Mapping[str, np.ndarray]) -> bytes:
  parts = []
  for f in fields:
    v = np.asarray(values[f.name], dtype=f.np_dtype)
    if v.shape != f.shape:
      raise ValueError(f"cache field {f.name}: shape {v.shape}, expected {f.shape}")
    parts.append(v.tobytes())  # C order
  return b"".join(parts)


def decode_record(fields: Sequence[Field], data: bytes) -> dict:
  expected = record_nbytes(fields)
  if len(data) != expected:
    raise ValueError(f"feature cache record of {len(data)} bytes, expected {expected}: the "
                     "cache is corrupt or from another writer; rebuild it")
  out, offset = {}, 0
  for f in fields:
    n = math.prod(f.shape)
    x = np.frombuffer(data, f.np_dtype, count=n, offset=offset).reshape(f.shape)
    out[f.name] = x.astype(_np_dtype(f.compute_dtype)) if f.compute_dtype else x
    offset += f.nbytes
  return out


@dataclasses.dataclass
class ParseRecord(grain.transforms.Map):
  """Cache record bytes -> {field: array} (views into the bytes)."""
  fields: tuple[Field, ...]

  def map(self, data: bytes) -> dict:
    return decode_record(self.fields, data)


def info_fields(info: Mapping) -> tuple[Field, ...]:
  return tuple(Field.from_json(f) for f in info["fields"])


def shard_paths(cache_dir: str | os.PathLike, info: Mapping) -> list[str]:
  return [str(Path(cache_dir).expanduser() / s["file"]) for s in info["shards"]]


def open_source(cache_dir: str | os.PathLike, info: Mapping | None = None):
  """The cache as one random-access source: index i = dataset record i."""
  info = read_info(cache_dir) if info is None else info
  paths = shard_paths(cache_dir, info)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise CacheIncomplete(f"feature cache {cache_dir}: {len(missing)} shard(s) listed in "
                          f"{INFO_NAME} are missing, e.g. {missing[0]}; rebuild the cache")
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) != info["num_records"]:
    raise CacheIncomplete(f"feature cache {cache_dir}: {len(source)} records in the shards, "
                          f"{INFO_NAME} says {info['num_records']}; rebuild the cache")
  return source


def make_loader(cache_dir: str | os.PathLike, cfg, *, process_index: int | None = None,
                process_count: int | None = None) -> grain.DataLoader:
  """The training loader over a cache: ``input_pipeline.make_loader``'s
  sampler, batching and iterator state, with ParseRecord in place of the
  image ops (``cfg.views``, ``flip_prob`` and the dataset location unused)."""
  from fpdm_jax import input_pipeline
  info = read_info(cache_dir)
  return input_pipeline.batch_loader(
      open_source(cache_dir, info), [ParseRecord(info_fields(info))], cfg,
      process_index=process_index, process_count=process_count)
