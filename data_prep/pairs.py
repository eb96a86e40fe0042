"""What every pair-dataset builder shares: the record schema, resumable
staging of processed pairs, and the report of skipped input.

A build has two phases. Phase 1 turns raw input (JPEGs, keypoint files, or
the synthetic generator) into finished records, in parallel, chunk by chunk,
each chunk written atomically to a staging folder: an interrupted build keeps
every finished chunk and a rerun does only what is missing. Phase 2 is TFDS
writing the staged records, in pair order, into ArrayRecord shards.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import tensorflow_datasets as tfds

from fpdm_jax import skeleton

SKIP_REASONS = (
    "missing_file",          # a pair names an image that is not there
    "unreadable_image",      # corrupt, truncated or not an image
    "missing_keypoints",     # no keypoint file / annotation row for an image
    "malformed_keypoints",   # a keypoint file that does not parse as 18 points
    "keypoints_outside_image",
    "too_few_keypoints",
)


class BadInput(Exception):
  """One pair cannot be built; ``reason`` is one of SKIP_REASONS."""

  def __init__(self, reason: str, path: str | os.PathLike, message: str):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {path}: {message}")
    self.reason, self.path, self.message = reason, str(path), message


def pair_features(height: int, width: int, photo_format: str) -> tfds.features.FeaturesDict:
  """The record schema of every pair dataset (DeepFashion, synthetic, ...)."""
  photo = lambda: tfds.features.Image(shape=(height, width, 3), encoding_format=photo_format)
  pose = lambda: tfds.features.Image(shape=(height, width, 3), encoding_format="png")
  keypoints = lambda: tfds.features.Tensor(shape=(skeleton.NUM_KEYPOINTS, 2), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "source_image": photo(),
      "target_image": photo(),
      "source_pose_image": pose(),
      "target_pose_image": pose(),
      "source_keypoints": keypoints(),
      "target_keypoints": keypoints(),
      "pair_index": tfds.features.Scalar(dtype=np.int64),
      "source_name": tfds.features.Text(),
      "target_name": tfds.features.Text(),
  })


IMAGE_KEYS = ("source_image", "target_image", "source_pose_image", "target_pose_image")


def encode_image(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  if fmt == "jpeg":
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
  else:
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def check_keypoints(keypoints: np.ndarray, height: int, width: int, path: str,
                    min_visible: int, tolerance: float = 0.5) -> None:
  """Raises BadInput for keypoints off the image or too few visible points."""
  vis = skeleton.visible(keypoints)
  k = keypoints[vis]
  if np.any(k[:, 0] > width - 1 + tolerance) or np.any(k[:, 1] > height - 1 + tolerance):
    raise BadInput("keypoints_outside_image", path,
                   f"a keypoint lies outside the {width}x{height} image")
  if int(vis.sum()) < min_visible:
    raise BadInput("too_few_keypoints", path,
                   f"{int(vis.sum())} visible keypoints, fewer than {min_visible}")


# ----------------------------------------------------------------------------
# Staging: chunks of finished records, written atomically.

@dataclasses.dataclass
class SkipReport:
  """Counts of skipped pairs per split and reason, with example paths."""
  max_examples: int = 5
  written: dict = dataclasses.field(default_factory=collections.Counter)
  skipped: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, split: str, ok: int, skips: Sequence[dict]) -> None:
    self.written[split] += ok
    for s in skips:
      self.skipped[split][s["reason"]] += 1
      if len(self.examples[s["reason"]]) < self.max_examples:
        self.examples[s["reason"]].append(f"{s['path']}: {s['message']}")

  def to_json(self) -> dict:
    return {
        "written": dict(self.written),
        "skipped": {split: dict(c) for split, c in self.skipped.items()},
        "skipped_total": {split: sum(c.values()) for split, c in self.skipped.items()},
        "first_offending_paths": dict(self.examples),
    }

  @staticmethod
  def summary_of(report: dict) -> str:
    """Human-readable lines of a ``to_json()`` report."""
    lines = []
    written, skipped_all = report.get("written", {}), report.get("skipped", {})
    for split in sorted(set(written) | set(skipped_all)):
      skipped = skipped_all.get(split, {})
      detail = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
      lines.append(f"  {split}: {written.get(split, 0)} pairs written, "
                   f"{sum(skipped.values())} skipped ({detail})")
    for reason, paths in report.get("first_offending_paths", {}).items():
      lines.append(f"  e.g. {reason}: {paths[0]}")
    return "\n".join(lines)


def _save_chunk(path: Path, records: list[dict], skips: list[dict]) -> None:
  arrays = {}
  meta = {"records": [], "skips": skips}
  for i, rec in enumerate(records):
    entry = {}
    for key, value in rec.items():
      if isinstance(value, bytes):
        arrays[f"{i}/{key}"] = np.frombuffer(value, np.uint8)
        entry[key] = "bytes"
      elif isinstance(value, np.ndarray):
        arrays[f"{i}/{key}"] = value
        entry[key] = "array"
      else:
        entry[key] = value
    meta["records"].append(entry)
  arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: a chunk is either complete or absent


def load_chunk(path: Path) -> tuple[list[dict], list[dict]]:
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(z["__meta__"].tobytes())
    records = []
    for i, entry in enumerate(meta["records"]):
      rec = {}
      for key, kind in entry.items():
        if kind == "bytes":
          rec[key] = z[f"{i}/{key}"].tobytes()
        elif kind == "array":
          rec[key] = z[f"{i}/{key}"]
        else:
          rec[key] = kind
      records.append(rec)
  return records, meta["skips"]


@dataclasses.dataclass
class _ChunkTask:
  process: Callable[[Any], dict]  # picklable: a top-level function or partial
  specs: list
  path: Path
  strict: bool


def _run_chunk(task: _ChunkTask) -> tuple[int, list[dict]]:
  records, skips = [], []
  for spec in task.specs:
    try:
      records.append(task.process(spec))
    except BadInput as e:
      if task.strict:
        raise
      skips.append({"reason": e.reason, "path": e.path, "message": e.message})
  _save_chunk(task.path, records, skips)
  return len(records), skips


def stage_split(process: Callable[[Any], dict], specs: Sequence, staging_dir: Path, *,
                split: str, chunk_size: int = 256, workers: int = 1, strict: bool = False,
                report: SkipReport | None = None, desc: str = "") -> list[Path]:
  """Processes every spec of a split into staged chunks; returns the chunk paths.

  Chunks already on disk from an earlier, interrupted run are reused.
  """
  from tqdm import tqdm
  staging_dir.mkdir(parents=True, exist_ok=True)
  paths, todo = [], []
  for start in range(0, len(specs), chunk_size):
    path = staging_dir / f"{split}-{start // chunk_size:06d}.npz"
    paths.append(path)
    if path.exists():
      if report is not None:
        records, skips = load_chunk(path)
        report.add(split, len(records), skips)
    else:
      todo.append(_ChunkTask(process, list(specs[start:start + chunk_size]), path, strict))
  done_pairs = len(specs) - sum(len(t.specs) for t in todo)
  bar = tqdm(total=len(specs), initial=done_pairs, desc=desc or f"{split} pairs",
             unit="pair", file=sys.stderr, disable=None)
  def finished(task, result):
    n_ok, skips = result
    if report is not None:
      report.add(split, n_ok, skips)
    bar.update(len(task.specs))
  try:
    if workers <= 1 or len(todo) <= 1:
      for task in todo:
        finished(task, _run_chunk(task))
    else:
      # spawn: TensorFlow (imported by TFDS) is not fork-safe.
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(workers) as pool:
        for task, result in zip(todo, pool.imap(_run_chunk, todo)):
          finished(task, result)
  finally:
    bar.close()
  return paths


def iter_staged(paths: Sequence[Path]):
  """Yields (pair_index, record) from staged chunks in pair order."""
  for path in paths:
    records, _ = load_chunk(path)
    for rec in records:
      yield int(rec["pair_index"]), rec


def to_tfds_example(record: dict) -> dict:
  """Staged record -> TFDS example; encoded images pass through untouched."""
  out = dict(record)
  for key in IMAGE_KEYS:
    out[key] = io.BytesIO(record[key])
  return out


def write_report(report: SkipReport, path: Path, extra: dict | None = None) -> dict:
  data = report.to_json()
  if extra:
    data.update(extra)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=2, sort_keys=True))
  return data
