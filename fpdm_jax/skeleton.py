"""COCO-18 keypoints and the reference's skeleton rendering.

FPDM's pose images are OpenPose-style stick figures drawn with OpenCV on a BGR
canvas and saved as RGB. One renderer serves every dataset builder and
inference on user inputs, so a model never sees pose images drawn two ways.

The drawing reproduces the reference exactly (see DATA_FORMATS.md):
radius-4 keypoint discs, limbs as filled ellipses of half-width 4 blended as
``0.4 * canvas + 0.6 * canvas_with_limb``, colours with the first and last
channel swapped relative to the listed palette (BGR drawing, RGB file), drawn
at the photo's original size and resized with the photo.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

NUM_KEYPOINTS = 18
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder",
    "l_elbow", "l_wrist", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee",
    "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")

# 1-based keypoint pairs as in the reference; only the first 17 are drawn.
LIMBS_1BASED = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
    (3, 17), (6, 18))
DRAWN_LIMBS = tuple((a - 1, b - 1) for a, b in LIMBS_1BASED[:17])

# The OpenPose palette as listed in the reference (it is drawn on a BGR canvas).
PALETTE = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0),
    (85, 255, 0), (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255),
    (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255),
    (255, 0, 255), (255, 0, 170), (255, 0, 85))
# What the saved RGB files contain.
PALETTE_RGB = tuple((c[2], c[1], c[0]) for c in PALETTE)

RADIUS = 4
STICKWIDTH = 4

# Left/right partner of every keypoint, for horizontal-flip augmentation.
FLIP_PERMUTATION = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)


def visible(keypoints: np.ndarray) -> np.ndarray:
  """Boolean [K]: a keypoint is missing when either coordinate is negative."""
  keypoints = np.asarray(keypoints)
  return np.all(keypoints >= 0, axis=-1)


def scale_keypoints(keypoints: np.ndarray, from_hw: tuple[int, int],
                    to_hw: tuple[int, int]) -> np.ndarray:
  """Maps pixel coordinates between two sizes of the same image; -1 stays -1."""
  keypoints = np.asarray(keypoints, np.float32)
  sy = to_hw[0] / from_hw[0]
  sx = to_hw[1] / from_hw[1]
  out = keypoints * np.array([sx, sy], np.float32)
  return np.where(visible(keypoints)[:, None], out, -1.0).astype(np.float32)


def render_skeleton(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
  """Draws COCO-18 ``keypoints`` ([18, 2] x, y pixels; -1 missing) as RGB uint8.

  This is the reference's OpenCV drawing code, step for step, on a canvas of
  the given size; for the reference's look at a small output size use
  ``render_pose_image``, which draws at the original size and resizes.
  """
  keypoints = np.asarray(keypoints, np.float64)
  if keypoints.shape != (NUM_KEYPOINTS, 2):
    raise ValueError(f"expected keypoints of shape (18, 2), got {keypoints.shape}")
  present = visible(keypoints)
  canvas = np.zeros((height, width, 3), np.uint8)  # BGR, as the reference
  for i in range(NUM_KEYPOINTS):
    if present[i]:
      x, y = keypoints[i]
      cv2.circle(canvas, (int(x), int(y)), RADIUS, PALETTE[i], thickness=-1)
  for i, (a, b) in enumerate(DRAWN_LIMBS):
    if not (present[a] and present[b]):
      continue
    cur = canvas.copy()
    ys = keypoints[[a, b], 0]  # the reference's naming: Y holds x, X holds y
    xs = keypoints[[a, b], 1]
    m_x, m_y = np.mean(xs), np.mean(ys)
    length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
    angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
    polygon = cv2.ellipse2Poly((int(m_y), int(m_x)), (int(length / 2), STICKWIDTH),
                               int(angle), 0, 360, 1)
    cv2.fillConvexPoly(cur, polygon, PALETTE[i])
    canvas = cv2.addWeighted(canvas, 0.4, cur, 0.6, 0)
  return canvas[:, :, ::-1].copy()  # BGR canvas saved as RGB


def render_pose_image(keypoints: np.ndarray, out_hw: tuple[int, int],
                      canvas_hw: tuple[int, int] | None = None) -> np.ndarray:
  """The pose image as the reference ships it, at ``out_hw``.

  Args:
    keypoints: [18, 2] in ``out_hw`` pixel coordinates.
    out_hw: (height, width) of the stored photo.
    canvas_hw: the photo's original size, where the reference drew (e.g.
      (1101, 750) for high-resolution DeepFashion). The drawing is resized to
      ``out_hw`` with bicubic filtering, as the reference resizes its pose
      images with the photos. None draws directly at ``out_hw``.
  """
  canvas_hw = tuple(canvas_hw or out_hw)
  drawn = render_skeleton(scale_keypoints(keypoints, out_hw, canvas_hw), *canvas_hw)
  if canvas_hw == tuple(out_hw):
    return drawn
  return np.asarray(Image.fromarray(drawn).resize((out_hw[1], out_hw[0]), Image.BICUBIC))


def deepfashion_to_pixels(keypoints_256: np.ndarray, height: int, width: int) -> np.ndarray:
  """FPDM pose-txt coordinates (256x256 frame, crop at x=40) -> pixels of HxW."""
  k = np.asarray(keypoints_256, np.float32)
  out = np.stack([(k[:, 0] - 40.0) * width / 176.0, k[:, 1] * height / 256.0], -1)
  return np.where(visible(k)[:, None], out, -1.0).astype(np.float32)


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
  """Horizontal flip: mirror x and swap left/right keypoints."""
  k = np.asarray(keypoints, np.float32)
  flipped = np.where(visible(k)[:, None], np.stack([width - 1 - k[:, 0], k[:, 1]], -1), -1.0)
  return flipped[list(FLIP_PERMUTATION)].astype(np.float32)
