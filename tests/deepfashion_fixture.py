"""Writes small DeepFashion-shaped folders (FPDM and CFLD layouts) for tests.

The photos are synthetic people saved as real JPEGs at a small "original"
size with the DeepFashion aspect ratio; keypoint files use the exact text
formats of the real data. ``bad=True`` adds one pair per skip reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import synthetic_people

ORIGINAL_HW = (220, 150)  # DeepFashion originals are 1101x750; same aspect, smaller
NUM_IDS = 3

# (reason, how the pair is broken) for the bad-input fixture.
BAD_REASONS = ("missing_file", "unreadable_image", "missing_keypoints",
               "malformed_keypoints", "keypoints_outside_image", "too_few_keypoints")


def _person(seed: int, index: int, hw=ORIGINAL_HW):
  rng = np.random.default_rng([seed, index])
  ident = synthetic_people.sample_identity(np.random.default_rng([seed, index // 2]))
  k = synthetic_people.sample_pose(rng, *hw)
  return synthetic_people.draw_person(ident, k, *hw), k


def _to_fpdm_frame(k: np.ndarray, hw) -> np.ndarray:
  h, w = hw
  vis = np.all(k >= 0, -1)
  out = np.stack([k[:, 0] * 176.0 / w + 40.0, k[:, 1] * 256.0 / h], -1)
  return np.where(vis[:, None], out, -1.0)


def _write_txt(path: Path, k256: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{x:.2e} {y:.2e}\n" for x, y in k256))


def make_fpdm_layout(root: Path, num_train: int = 6, num_test: int = 3,
                     bad: bool = False, seed: int = 0) -> dict:
  """Returns {"train": [(src_rel, tgt_rel), ...], "test": [...], "keypoints": {rel: k256}}."""
  root = Path(root)
  info = {"keypoints": {}, "photos": {}}
  names = []
  for i in range((num_train + num_test) * 2):
    gender = "MEN" if i % 2 else "WOMEN"
    rel = f"img/{gender}/Tees_Tanks/id_{i // 2:08d}/0{i % 2 + 1}_1_front.jpg"
    photo, k = _person(seed, i)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(root / rel, quality=95)
    k256 = np.vectorize(lambda v: float(f"{v:.2e}"))(_to_fpdm_frame(k, ORIGINAL_HW))
    _write_txt(root / rel.replace("img/", "pose/", 1).replace(".jpg", ".txt"), k256)
    info["keypoints"][rel] = k256
    info["photos"][rel] = photo
    names.append(rel)
  pairs = [(names[2 * j], names[2 * j + 1]) for j in range(num_train + num_test)]
  splits = {"train": pairs[:num_train], "test": pairs[num_train:]}
  if bad:
    splits["train"] = splits["train"] + _break_fpdm(root, names[0], seed)
  for split, lst in splits.items():
    (root / f"{split}_pairs_data.json").write_text(json.dumps(
        [{"source_image": f"./{s}", "target_image": f"./{t}"} for s, t in lst]))
  info.update(splits)
  return info


def _break_fpdm(root: Path, good: str, seed: int) -> list[tuple[str, str]]:
  """One broken pair per skip reason; the good image is the other side."""
  bad_pairs = []
  def new(name, photo_bytes=None, k256=None, txt=None):
    rel = f"img/MEN/Bad/{name}.jpg"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    if photo_bytes is not None:
      (root / rel).write_bytes(photo_bytes)
    pose = root / rel.replace("img/", "pose/", 1).replace(".jpg", ".txt")
    if k256 is not None:
      _write_txt(pose, k256)
    if txt is not None:
      pose.parent.mkdir(parents=True, exist_ok=True)
      pose.write_text(txt)
    return rel
  good_bytes = (root / good).read_bytes()
  good_k = np.loadtxt(root / good.replace("img/", "pose/", 1).replace(".jpg", ".txt"))
  # missing_file: names an image that does not exist.
  bad_pairs.append((good, "img/MEN/Bad/absent.jpg"))
  # unreadable_image: a truncated JPEG.
  bad_pairs.append((new("truncated", good_bytes[: len(good_bytes) // 3], good_k), good))
  # missing_keypoints: an image without its pose txt.
  bad_pairs.append((good, new("nopose", good_bytes)))
  # malformed_keypoints: 17 lines.
  bad_pairs.append((good, new("malformed", good_bytes, txt="1 2\n" * 17)))
  # keypoints_outside_image: x far right of the crop.
  k = good_k.copy(); k[0] = [250.0, 100.0]
  bad_pairs.append((good, new("outside", good_bytes, k)))
  # too_few_keypoints: only two points.
  k = np.full((18, 2), -1.0); k[0] = [100, 40]; k[1] = [100, 60]
  bad_pairs.append((good, new("fewpoints", good_bytes, k)))
  return bad_pairs


def make_cfld_layout(root: Path, num_train: int = 4, num_test: int = 2, seed: int = 1) -> dict:
  """256x176 images in train/ and test/, with the fasion-resize-*.csv files."""
  root = Path(root)
  info = {"keypoints": {}}
  for split, n in (("train", num_train), ("test", num_test)):
    names = []
    for i in range(2 * n):
      name = f"fashion{split.upper()}id{i // 2:05d}_{i % 2}front.jpg"
      photo, k = _person(seed + (split == "test"), i, (256, 176))
      (root / split).mkdir(parents=True, exist_ok=True)
      Image.fromarray(photo).save(root / split / name, quality=95)
      k = np.where(np.all(k >= 0, -1)[:, None], np.round(k), -1).astype(int)
      info["keypoints"][name] = k
      names.append(name)
    with open(root / f"fasion-resize-annotation-{split}.csv", "w") as f:
      f.write("name:keypoints_y:keypoints_x\n")
      for name in names:
        k = info["keypoints"][name]
        f.write(f"{name}: {json.dumps(k[:, 1].tolist())}: {json.dumps(k[:, 0].tolist())}\n")
    with open(root / f"fasion-resize-pairs-{split}.csv", "w") as f:
      f.write("from,to\n")
      pairs = [(names[2 * j], names[2 * j + 1]) for j in range(n)]
      f.writelines(f"{s},{t}\n" for s, t in pairs)
    info[split] = pairs
  return info
