"""DeepFashion In-shop pairs, from the FPDM or the CFLD/PATN folder layout.

Both layouts end in the same records: photos resized to the configured size
(bicubic), keypoints in the stored image's pixels, and pose images drawn at
the photo's original size then resized with it, as the reference does.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import builder_base, pairs
from fpdm_jax import skeleton

LAYOUTS = ("fpdm", "cfld")


@dataclasses.dataclass(eq=False)
class DeepfashionConfig(builder_base.PairConfig):
  src: str = ""
  layout: str = "fpdm"
  min_keypoints: int = 4


@dataclasses.dataclass(frozen=True)
class PairSpec:
  index: int
  source: str          # path relative to the dataset root (as the pair file names it)
  target: str
  source_keypoints: tuple | None = None  # CFLD: (ys, xs) in 256x176 frame
  target_keypoints: tuple | None = None


# ----------------------------------------------------------------------------
# Reading the layouts.

def read_fpdm_pairs(root: Path, split: str) -> list[PairSpec]:
  path = root / f"{split}_pairs_data.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: an FPDM-layout folder holds train_pairs_data.json and "
        "test_pairs_data.json next to img/ and pose/ (use --layout cfld for the "
        "fasion-resize-*.csv layout)")
  try:
    entries = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  specs = []
  for i, e in enumerate(entries):
    try:
      specs.append(PairSpec(i, _clean(e["source_image"]), _clean(e["target_image"])))
    except (KeyError, TypeError) as err:
      raise ValueError(f"{path}: entry {i} lacks source_image/target_image: {e!r}") from err
  return specs


def _clean(p: str) -> str:
  return p[2:] if p.startswith("./") else p


def fpdm_pose_path(root: Path, image_rel: str) -> Path:
  """``img/MEN/.../x.jpg`` -> ``pose/MEN/.../x.txt``."""
  parts = Path(image_rel).parts
  if parts and parts[0] == "img":
    parts = ("pose",) + parts[1:]
  else:
    parts = ("pose",) + parts
  return (root / Path(*parts)).with_suffix(".txt")


def read_fpdm_keypoints(path: Path) -> np.ndarray:
  """18 lines "x y" in the 256x256 frame; raises BadInput."""
  if not path.is_file():
    raise pairs.BadInput("missing_keypoints", path, "keypoint file not found")
  try:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    k = np.array(rows, dtype=np.float32)
  except (ValueError, UnicodeDecodeError) as e:
    raise pairs.BadInput("malformed_keypoints", path, f"cannot parse: {e}") from e
  if k.shape != (skeleton.NUM_KEYPOINTS, 2):
    raise pairs.BadInput("malformed_keypoints", path,
                         f"expected 18 lines of 'x y', got shape {k.shape}")
  return k


def read_cfld_pairs(root: Path, split: str) -> list[PairSpec]:
  pairs_csv = root / f"fasion-resize-pairs-{split}.csv"
  ann_csv = root / f"fasion-resize-annotation-{split}.csv"
  for p in (pairs_csv, ann_csv):
    if not p.is_file():
      raise FileNotFoundError(
          f"{p} not found: a CFLD/PATN-layout folder holds fasion-resize-pairs-"
          "{train,test}.csv and fasion-resize-annotation-{train,test}.csv "
          "(use --layout fpdm for the *_pairs_data.json layout)")
  annotations = {}
  with ann_csv.open() as f:
    reader = csv.reader(f, delimiter=":")
    header = next(reader, None)
    for row in reader:
      if len(row) == 3:
        annotations[row[0].strip()] = (row[1], row[2])
      elif row:
        annotations[row[0].strip()] = None  # malformed, reported per pair
  specs = []
  with pairs_csv.open() as f:
    reader = csv.DictReader(f)
    for i, row in enumerate(reader):
      src, tgt = row["from"].strip(), row["to"].strip()
      specs.append(PairSpec(i, src, tgt, annotations.get(src, "absent"),
                            annotations.get(tgt, "absent")))
  del header
  return specs


def parse_cfld_keypoints(entry, name: str, ann_file: str) -> np.ndarray:
  """(keypoints_y, keypoints_x) JSON lists in 256x176 (h x w); -1 missing."""
  if entry == "absent":
    raise pairs.BadInput("missing_keypoints", name, f"no row in {ann_file}")
  try:
    ys = np.array(json.loads(entry[0]), np.float32)
    xs = np.array(json.loads(entry[1]), np.float32)
  except (TypeError, ValueError) as e:
    raise pairs.BadInput("malformed_keypoints", name, f"bad row in {ann_file}: {e}") from e
  if ys.shape != (skeleton.NUM_KEYPOINTS,) or xs.shape != (skeleton.NUM_KEYPOINTS,):
    raise pairs.BadInput("malformed_keypoints", name,
                         f"expected 18 y and 18 x values in {ann_file}")
  k = np.stack([xs, ys], -1)
  return np.where(skeleton.visible(k)[:, None], k, -1.0).astype(np.float32)


def find_cfld_image(root: Path, split: str, name: str) -> Path:
  for candidate in (root / split / name, root / f"{split}_highres" / name,
                    root / "img" / name, root / name):
    if candidate.is_file():
      return candidate
  raise pairs.BadInput("missing_file", root / split / name,
                       f"image not found in {split}/, {split}_highres/, img/ or the root")


# ----------------------------------------------------------------------------
# One pair -> one record (runs in worker processes).

def load_photo(path: Path) -> np.ndarray:
  if not path.is_file():
    raise pairs.BadInput("missing_file", path, "image file not found")
  try:
    with Image.open(path) as im:
      im.load()  # forces a full decode: truncated files fail here
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL raises many kinds for corrupt files
    raise pairs.BadInput("unreadable_image", path, f"cannot decode: {e}") from e


@dataclasses.dataclass(frozen=True)
class DeepfashionProcessor:
  root: str
  layout: str
  split: str
  height: int
  width: int
  min_keypoints: int

  def _side(self, rel: str, raw_keypoints) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    root = Path(self.root)
    if self.layout == "fpdm":
      path = root / rel
      photo = load_photo(path)
      h, w = photo.shape[:2]
      k256 = read_fpdm_keypoints(fpdm_pose_path(root, rel))
      keypoints = skeleton.deepfashion_to_pixels(k256, h, w)
    else:
      path = find_cfld_image(root, self.split, rel)
      photo = load_photo(path)
      h, w = photo.shape[:2]
      k = parse_cfld_keypoints(raw_keypoints, rel, f"fasion-resize-annotation-{self.split}.csv")
      keypoints = skeleton.scale_keypoints(k, (256, 176), (h, w))
    pairs.check_keypoints(keypoints, h, w, str(path), self.min_keypoints)
    out_hw = (self.height, self.width)
    pose = skeleton.render_pose_image(skeleton.scale_keypoints(keypoints, (h, w), out_hw),
                                      out_hw, canvas_hw=(h, w))
    resized = np.asarray(Image.fromarray(photo).resize((self.width, self.height), Image.BICUBIC))
    return resized, skeleton.scale_keypoints(keypoints, (h, w), out_hw), pose, rel

  def __call__(self, spec: PairSpec) -> dict:
    src, src_k, src_pose, src_name = self._side(spec.source, spec.source_keypoints)
    tgt, tgt_k, tgt_pose, tgt_name = self._side(spec.target, spec.target_keypoints)
    fmt = Deepfashion.PHOTO_FORMAT
    return {
        "source_image": pairs.encode_image(src, fmt),
        "target_image": pairs.encode_image(tgt, fmt),
        "source_pose_image": pairs.encode_image(src_pose, "png"),
        "target_pose_image": pairs.encode_image(tgt_pose, "png"),
        "source_keypoints": src_k,
        "target_keypoints": tgt_k,
        "pair_index": spec.index,
        "source_name": src_name,
        "target_name": tgt_name,
    }


class Deepfashion(builder_base.PairDatasetBuilder):
  """DeepFashion In-shop pose-transfer pairs (FPDM or CFLD/PATN layout)."""

  PHOTO_FORMAT = "jpeg"
  BUILDER_CONFIGS = []  # made per build by make_config (source folder, size)

  def _pair_specs(self, split: str) -> list[PairSpec]:
    cfg = self.builder_config
    root = Path(cfg.src)
    if cfg.layout == "fpdm":
      return read_fpdm_pairs(root, split)
    return read_cfld_pairs(root, split)

  def _processor(self, split: str) -> DeepfashionProcessor:
    cfg = self.builder_config
    return DeepfashionProcessor(cfg.src, cfg.layout, split, cfg.height, cfg.width,
                                cfg.min_keypoints)


def make_config(src: str, layout: str, height: int, width: int, min_keypoints: int = 4):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
  return DeepfashionConfig(name=f"{layout}_{height}x{width}", src=str(Path(src).resolve()),
                           layout=layout, height=height, width=width,
                           min_keypoints=min_keypoints,
                           description=f"DeepFashion pairs from {src} ({layout} layout)")
