"""The embedded default dataset: procedurally drawn people in two poses.

The people come from ``synthetic_people``; this module makes them a TFDS
dataset with the same record schema as DeepFashion, so every part of the
system (input pipeline, training, evaluation) runs on it unchanged.
"""
from __future__ import annotations

import dataclasses

from data_prep import builder_base, pairs, synthetic_people
from fpdm_jax import skeleton

# Pose images are drawn on a canvas this many times the stored size and then
# resized, as the reference draws at the photo's original size: at 64x64 the
# limbs come out about as thick, relative to the body, as DeepFashion's at
# 256x176 (drawn at 1101x750).
POSE_CANVAS_SCALE = 4


@dataclasses.dataclass(eq=False)
class SyntheticPeopleConfig(builder_base.PairConfig):
  num_train: int = 2000
  num_test: int = 200
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SyntheticProcessor:
  seed: int
  split: str
  height: int
  width: int

  def __call__(self, index: int) -> dict:
    p = synthetic_people.make_pair(self.seed, self.split, index, self.height, self.width)
    hw = (self.height, self.width)
    canvas = (self.height * POSE_CANVAS_SCALE, self.width * POSE_CANVAS_SCALE)
    return {
        "source_image": pairs.encode_image(p["source_image"], "png"),
        "target_image": pairs.encode_image(p["target_image"], "png"),
        "source_pose_image": pairs.encode_image(
            skeleton.render_pose_image(p["source_keypoints"], hw, canvas), "png"),
        "target_pose_image": pairs.encode_image(
            skeleton.render_pose_image(p["target_keypoints"], hw, canvas), "png"),
        "source_keypoints": p["source_keypoints"],
        "target_keypoints": p["target_keypoints"],
        "pair_index": index,
        "source_name": p["source_name"],
        "target_name": p["target_name"],
    }


class SyntheticPeople(builder_base.PairDatasetBuilder):
  """Synthetic pose-transfer pairs: same person (clothes, texture), two poses."""

  PHOTO_FORMAT = "png"
  BUILDER_CONFIGS = []  # made per build by make_config (size, counts, seed)

  def _pair_specs(self, split: str) -> list[int]:
    cfg = self.builder_config
    return list(range(cfg.num_train if split == "train" else cfg.num_test))

  def _processor(self, split: str) -> SyntheticProcessor:
    cfg = self.builder_config
    return SyntheticProcessor(cfg.seed, split, cfg.height, cfg.width)


def make_config(height: int = 64, width: int = 64, num_train: int = 2000,
                num_test: int = 200, seed: int = 0) -> SyntheticPeopleConfig:
  return SyntheticPeopleConfig(
      name=f"{height}x{width}_train{num_train}_test{num_test}_seed{seed}", height=height, width=width,
      num_train=num_train, num_test=num_test, seed=seed,
      description=f"{num_train}/{num_test} synthetic pairs at {height}x{width}, seed {seed}")
