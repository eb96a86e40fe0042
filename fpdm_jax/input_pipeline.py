"""From ArrayRecord pair datasets to sharded global batches, with Grain.

The chain is short and every link is a named op that can be tested alone:

  source (TFDS ArrayRecord, images left encoded)
    -> ProcessBlockSampler (global shuffle with a seed; this process's rows)
    -> DecodeRecord -> FlipPair (optional augmentation) -> MakeViews
    -> Batch (per process) -> ``sharding.global_batch`` (global jax.Arrays)

``MakeViews`` resizes each record image to what a network consumes (the
VAE / pixel-space UNet at the model's size, CLIP at 224, the source encoder
at its own size) and stays uint8; ``normalise`` then maps the views to the
network's range inside the jitted step, on the device. Shipping uint8 makes
batches 4x smaller to stack, to pass between worker processes and to copy to
the accelerator, and takes the per-pixel arithmetic off the host CPU. Which
views a stage needs is config, so stage 1 never pays for stage 2's inputs.

The loader is a ``grain.DataLoader``: its iterator state (a few integers) is
saved with every checkpoint, so a resumed run sees exactly the batches it
would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import grain
import numpy as np

from fpdm_jax import skeleton

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALISATIONS = {
    # name: (mean, std) applied to [0, 1] pixels
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),          # [0, 1]
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),     # [-1, 1]: VAE / pixel UNet
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),           # DINOv2
}

IMAGE_KEYS = ("source_image", "target_image", "source_pose_image", "target_pose_image")
NAME_KEYS = ("source_name", "target_name")


@dataclasses.dataclass(frozen=True)
class View:
  """One model input made from a record image: resize, then normalise."""
  key: str                      # record field, e.g. "target_image"
  size: tuple[int, int]         # (height, width)
  norm: str = "symmetric"       # a NORMALISATIONS name

  def __post_init__(self):
    if self.key not in IMAGE_KEYS:
      raise ValueError(f"view of unknown record image {self.key!r}; one of {IMAGE_KEYS}")
    if self.norm not in NORMALISATIONS:
      raise ValueError(f"unknown normalisation {self.norm!r}; one of {sorted(NORMALISATIONS)}")


def parse_views(views: Mapping[str, Any]) -> dict[str, View]:
  """Config form ``{"name": (key, (h, w), norm)}`` -> Views."""
  out = {}
  for name, v in views.items():
    if isinstance(v, View):
      out[name] = v
    else:
      key, size, *norm = v
      out[name] = View(key, tuple(int(s) for s in size), *norm)
  return out


# ----------------------------------------------------------------------------
# Opening datasets.

def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
  """``data_dir/name`` (``name`` = "dataset/config"), newest version folder."""
  base = Path(data_dir).expanduser() / name
  if (base / "dataset_info.json").is_file():
    return base
  versions = sorted((p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
                    key=lambda p: [int(x) if x.isdigit() else x for x in p.name.split(".")])
  if not versions:
    raise FileNotFoundError(
        f"no built dataset at {base}: build it first, e.g. "
        f"`python -m data_prep.build synthetic --data-dir {data_dir}`")
  return versions[-1]


def open_source(data_dir: str | os.PathLike, name: str, split: str):
  """A random-access source of raw records; images stay encoded bytes."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(str(dataset_dir(data_dir, name)))
  if split not in builder.info.splits:
    raise ValueError(f"{name} has splits {list(builder.info.splits)}, not {split!r}")
  decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS}
  return builder.as_data_source(split=split, decoders=decoders)


# ----------------------------------------------------------------------------
# Ops.

def decode_image(data: bytes) -> np.ndarray:
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError("record holds an image that does not decode")
  return image[:, :, ::-1]  # BGR -> RGB


@dataclasses.dataclass
class DecodeRecord(grain.transforms.Map):
  """Encoded PNG/JPEG bytes -> uint8 [H, W, 3]; file names -> str.

  Only the images in ``keys`` are decoded (the others are dropped), so a
  stage that never looks at the source pose image never pays for it.
  """
  keys: Sequence[str] = IMAGE_KEYS

  def map(self, record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in IMAGE_KEYS or k in self.keys}
    for key in self.keys:
      if key in out and isinstance(out[key], (bytes, np.bytes_)):
        out[key] = decode_image(bytes(out[key]))
    for key in NAME_KEYS:
      if key in out and isinstance(out[key], (bytes, np.bytes_)):
        out[key] = bytes(out[key]).decode()
    return out


@dataclasses.dataclass
class FlipPair(grain.transforms.RandomMap):
  """Mirrors source and target (images and keypoints) with probability ``p``.

  A mirrored person has left and right swapped, and the skeleton's colours
  say which limb is which, so the pose images are redrawn from the flipped
  keypoints rather than mirrored (a mirrored drawing would be a wrong pose).
  """
  p: float = 0.5
  pose_canvas_scale: float = 1.0

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    if rng.random() >= self.p:
      return record
    out = dict(record)
    for side in ("source", "target"):
      image = record[f"{side}_image"]
      h, w = image.shape[:2]
      k = skeleton.flip_keypoints(record[f"{side}_keypoints"], w)
      out[f"{side}_image"] = np.ascontiguousarray(image[:, ::-1])
      out[f"{side}_keypoints"] = k
      canvas = (round(h * self.pose_canvas_scale), round(w * self.pose_canvas_scale))
      out[f"{side}_pose_image"] = skeleton.render_pose_image(k, (h, w), canvas)
    return out


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == tuple(size):
    return image
  h, w = size
  shrinking = h < image.shape[0] and w < image.shape[1]
  return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


@dataclasses.dataclass
class MakeViews(grain.transforms.Map):
  """Record -> the uint8 model inputs named in ``views`` plus keypoints/ids."""
  views: Mapping[str, View]
  keep: Sequence[str] = ("source_keypoints", "target_keypoints", "pair_index")

  def map(self, record: dict) -> dict:
    out = {name: np.ascontiguousarray(resize(record[view.key], view.size))
           for name, view in self.views.items()}
    for key in self.keep:
      out[key] = np.asarray(record[key])
    return out


def normalise(batch: Mapping[str, Any], views: Mapping[str, Any], dtype=None) -> dict:
  """uint8 views -> each network's input range, as float32 (or ``dtype``).

  Runs inside the jitted step (jnp), or on the host with numpy arrays.
  """
  import jax.numpy as jnp
  views = parse_views(views)
  out = dict(batch)
  for name, view in views.items():
    mean, std = NORMALISATIONS[view.norm]
    scale = jnp.asarray([1.0 / (255.0 * s) for s in std], jnp.float32)
    offset = jnp.asarray([-m / s for m, s in zip(mean, std)], jnp.float32)
    x = batch[name].astype(jnp.float32) * scale + offset
    out[name] = x.astype(dtype) if dtype is not None else x
  return out


# ----------------------------------------------------------------------------
# The loader.

@dataclasses.dataclass
class LoaderConfig:
  data_dir: str
  name: str
  split: str = "train"
  views: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_size: int = 8            # GLOBAL batch; each process loads its share
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever (training)
  flip_prob: float = 0.0
  pose_canvas_scale: float = 1.0
  worker_count: int = 0          # 0: load in the main process
  worker_buffer_size: int = 2
  drop_remainder: bool = True


class ProcessBlockSampler:
  """This process's rows of each global batch, read from ONE global order.

  The global sequence of record indices (shuffled with the seed, epoch after
  epoch) is the same for any number of processes; global batch k is its
  positions [k*B, (k+1)*B) and process p reads the block [p*b, (p+1)*b) of
  it (b = B / processes), which is what ``sharding.global_batch`` expects.
  So N processes train on exactly the batches one process would, and a run
  can resume on a different number of hosts (``state_after_batches``).

  For a finite pass without ``drop_remainder`` (evaluation) the last global
  batch is completed with repeats of the last record, so every process sees
  the same number of full batches; ``valid_rows`` says how many rows count.
  """

  def __init__(self, num_records: int, batch_size: int, process_index: int,
               process_count: int, *, shuffle: bool, seed: int, num_epochs: int | None,
               drop_remainder: bool):
    self._global = grain.samplers.IndexSampler(num_records=num_records, shuffle=shuffle,
                                               seed=seed, num_epochs=num_epochs)
    self._num_records, self._batch = num_records, batch_size
    self._local = batch_size // process_count
    self._offset = process_index * self._local
    self._shuffle, self._seed, self._num_epochs = shuffle, seed, num_epochs
    if num_epochs is None:
      self._len = None
    else:
      total = num_epochs * num_records
      batches = total // batch_size if drop_remainder else -(-total // batch_size)
      self._len, self._total = batches * self._local, total

  def __len__(self) -> int:
    return sys.maxsize if self._len is None else self._len

  def __repr__(self) -> str:  # Grain stores this with the iterator state
    return (f"ProcessBlockSampler(num_records={self._num_records}, batch_size={self._batch}, "
            f"shuffle={self._shuffle}, seed={self._seed}, num_epochs={self._num_epochs})")

  def __getitem__(self, index: int):
    if index < 0 or (self._len is not None and index >= self._len):
      raise IndexError(f"index {index} out of range")
    g = (index // self._local) * self._batch + self._offset + index % self._local
    if self._len is not None and g >= self._total:
      g = self._total - 1  # padding of the last evaluation batch
    return self._global[g]


def valid_rows(num_records: int, batch_size: int, batch_index: int) -> int:
  """How many rows of global batch ``batch_index`` of one padded pass are real."""
  return max(0, min(batch_size, num_records - batch_index * batch_size))


def state_after_batches(iterator, num_batches: int, local_batch_size: int) -> bytes:
  """The Grain iterator state of a loader that has yielded ``num_batches``.

  For resuming when the saved states belong to a different number of
  processes: with ``ProcessBlockSampler`` every process has consumed
  ``num_batches * local_batch_size`` of its indices, whatever the count.
  Mirrors ``grain.DataLoader``'s state layout (per-worker last seen index,
  batches dealt to workers round-robin).
  """
  state = json.loads(iterator.get_state())
  workers = state["worker_count"]
  if workers == 0:
    state["last_seen_indices"] = {"0": num_batches * local_batch_size - 1}
    state["last_worker_index"] = -1
  else:
    seen = {}
    for i in range(workers):
      produced = max(0, -(-(num_batches - i) // workers)) * local_batch_size
      seen[str(i)] = i - workers + produced * workers
    state["last_seen_indices"] = seen
    state["last_worker_index"] = num_batches % workers - 1
  return json.dumps(state, indent=4).encode()


def make_loader(cfg: LoaderConfig, *, process_index: int | None = None,
                process_count: int | None = None, source=None) -> grain.DataLoader:
  """A Grain DataLoader yielding this process's part of each global batch
  (``ProcessBlockSampler``: the global batches do not depend on the number of
  processes)."""
  source = source if source is not None else open_source(cfg.data_dir, cfg.name, cfg.split)
  views = parse_views(cfg.views)
  needed = {v.key for v in views.values()}
  if cfg.flip_prob > 0:  # the flip redraws both sides' pose images
    needed |= {"source_image", "target_image", "source_pose_image", "target_pose_image"}
  ops: list = [DecodeRecord(tuple(k for k in IMAGE_KEYS if k in needed))]
  if cfg.flip_prob > 0:
    ops.append(FlipPair(cfg.flip_prob, cfg.pose_canvas_scale))
  ops.append(MakeViews(views))
  return batch_loader(source, ops, cfg, process_index=process_index,
                      process_count=process_count)


def batch_loader(source, ops: Sequence, cfg: LoaderConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.DataLoader:
  """``ops`` over ``source`` record by record, then this process's batches.

  The part of the loader that decides which records a batch holds (the
  sampler) and that checkpoints (the iterator state); shared by the image
  loader and the feature-cache loader (``feature_cache.make_loader``), so
  both shuffle, split over processes and resume identically.
  """
  import jax
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if cfg.batch_size % process_count:
    raise ValueError(f"global batch {cfg.batch_size} is not divisible by "
                     f"{process_count} processes")
  sampler = ProcessBlockSampler(len(source), cfg.batch_size, process_index, process_count,
                                shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
                                drop_remainder=cfg.drop_remainder)
  ops = list(ops) + [grain.transforms.Batch(cfg.batch_size // process_count,
                                            drop_remainder=cfg.drop_remainder)]
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops,
      worker_count=cfg.worker_count, worker_buffer_size=cfg.worker_buffer_size,
      shard_options=grain.sharding.NoSharding())
