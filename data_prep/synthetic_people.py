"""Procedurally drawn people for a small, real pose-transfer task.

Pure numpy + PIL; the TFDS builder in ``data_prep.synthetic`` wraps it.

Model
-----
Every identity (``Identity``) has its own skin, hair, shirt, trousers, shoe and
background colours, sleeve / trouser / hair length, build, and a texture
(stripes, checks or dots, with its own period, orientation and second colour)
on at least one garment. A pose (``sample_pose``) is a small 3-D skeleton:
arm and leg joint angles, a turn of the body about the vertical axis (front
views, turned views, back views), a slight lean, scale and translation. It is
projected to the 18 COCO-18 keypoints (OpenPose order, see
``KEYPOINT_NAMES``), with face keypoints (nose, eyes, ears) set to ``-1`` when
they face away from the camera: a back view has no nose and eyes, a turned
view loses the far ear (and at a large turn the far eye). The 13 body joints
are always inside the image (the scale and translation are chosen so).

``draw_person(identity, keypoints)`` draws the person from the keypoints
alone: the body frame (scale, lean, turn, front/back) is recovered exactly
from the shoulders, hips and neck (the neck keypoint sits slightly in front
of the shoulder line, so its sideways offset encodes the turn), so the target
image of a pair is a deterministic function of (identity, target keypoints):
a model that copies the appearance from the source and the pose from the
keypoints can reproduce it exactly. Limbs are tapered capsules, torso and
pelvis polygons, the head an ellipsoid whose hair region is computed on the
sphere (so the back view shows only hair), hands and shoes small blobs.
Garment textures live in garment coordinates (across / along each limb, and
around / down the torso cylinder), so they move, turn and foreshorten with
the body instead of being fixed to the screen. Drawing happens on a canvas
``SUPERSAMPLE`` times larger and is box-filtered down (anti-aliasing).

``make_pair(seed, split, index, height, width)`` gives pair ``index`` of a
split: identity ``index // PAIRS_PER_IDENTITY`` of that split (identities of
different splits are disjoint: their ids carry a split offset and their
random streams a split code), source and target two different poses of it.
Every random stream is a ``numpy.random.Generator`` seeded from
(seed, split, identity, pose), so any pair can be regenerated on its own.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

NUM_KEYPOINTS = 18
KEYPOINT_NAMES = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow",
                  "l_wrist", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye",
                  "l_eye", "r_ear", "l_ear")
(NOSE, NECK, R_SHO, R_ELB, R_WRI, L_SHO, L_ELB, L_WRI, R_HIP, R_KNE, R_ANK, L_HIP, L_KNE, L_ANK,
 R_EYE, L_EYE, R_EAR, L_EAR) = range(NUM_KEYPOINTS)
BODY_KEYPOINTS = (NECK, R_SHO, R_ELB, R_WRI, L_SHO, L_ELB, L_WRI, R_HIP, R_KNE, R_ANK, L_HIP, L_KNE,
                  L_ANK)
FACE_KEYPOINTS = (NOSE, R_EYE, L_EYE, R_EAR, L_EAR)

PAIRS_PER_IDENTITY = 4
POSES_PER_IDENTITY = 4  # pair j of an identity: pose j -> pose (j + 1) % POSES_PER_IDENTITY
SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}
IDENTITY_ID_STRIDE = 10_000_000  # identity_id = split code * stride + identity index in split
SUPERSAMPLE = 4
PATTERNS = ("plain", "stripes", "checks", "dots")

# ---------------------------------------------------------------------------
# Body model, in units of the body height L (head top y=0, soles y~1), body
# frame: x to the person's LEFT (so the right side is at image left in a front
# view), y down, z towards the camera at turn 0.
_Y_HEAD = 0.072          # head centre
_HEAD_RX, _HEAD_RY = 0.058, 0.072
_HEAD_R = 0.060          # radius at which face keypoints sit
_Y_NOSE, _Y_EYE, _Y_EAR = 0.084, 0.060, 0.070
_EYE_ANGLE = 0.45        # rad from the face centre line
_Y_NECK, _NECK_Z = 0.150, 0.030
_Y_SHO, _SHO_X = 0.180, 0.100
_Y_HIP, _HIP_X = 0.500, 0.055
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.165, 0.150, 0.235, 0.230
_TORSO_DEPTH = 0.065
# (y, half width) of the shirt outline; the pelvis (trousers) below it.
_TORSO_LEVELS = ((_Y_SHO - 0.022, 0.080), (_Y_SHO + 0.004, 0.126), (_Y_SHO + 0.090, 0.112),
                 (0.400, 0.094), (0.462, 0.100))
_PELVIS_LEVELS = ((0.430, 0.094), (0.500, 0.104), (0.560, 0.098))
_FACE_VISIBLE = 0.10     # cos(angle to camera) above which nose / eyes are visible
_EAR_VISIBLE = -0.25


@dataclasses.dataclass(frozen=True)
class Garment:
  colour: tuple[int, int, int]
  colour2: tuple[int, int, int]  # second texture colour
  pattern: str                   # one of PATTERNS
  period: float                  # texture period, in body heights
  angle: float                   # texture orientation (rad) in garment coordinates


@dataclasses.dataclass(frozen=True)
class Identity:
  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  shirt: Garment
  trousers: Garment
  shoes: tuple[int, int, int]
  background: tuple[int, int, int]
  long_sleeves: bool
  long_trousers: bool
  long_hair: bool
  hairline: float   # head-sphere height (-1 top .. 1 chin) where the front hair ends
  hair_back: float  # head-sphere forward component below which the hair covers the head
  build: float      # limb / torso thickness multiplier


# ---------------------------------------------------------------------------
# Identities

_SKIN_TONES = np.array([(250, 222, 196), (240, 200, 165), (226, 178, 140), (200, 145, 105),
                        (165, 112, 78), (120, 80, 55), (88, 60, 44)], np.float64)
_HAIR_COLOURS = np.array([(28, 24, 22), (62, 40, 28), (105, 70, 42), (205, 172, 105),
                          (145, 68, 35), (165, 162, 158)], np.float64)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  i = int(h * 6.0) % 6
  f = h * 6.0 - math.floor(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb) * 255.0


def _luma(c) -> float:
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _as_rgb(c) -> tuple[int, int, int]:
  c = np.clip(np.round(c), 0, 255).astype(int)
  return (int(c[0]), int(c[1]), int(c[2]))


def _second_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
  """A texture colour that contrasts with ``base`` (luma difference >= 70)."""
  for _ in range(20):
    kind = rng.random()
    if kind < 0.3:
      c = np.full(3, 240.0) - rng.uniform(0, 25, 3)   # off-white
    elif kind < 0.5:
      c = np.full(3, 30.0) + rng.uniform(0, 25, 3)    # near-black
    else:
      c = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0))
    if abs(_luma(c) - _luma(base)) >= 70:
      return c
  return np.full(3, 235.0) if _luma(base) < 128 else np.full(3, 35.0)


def _garment(rng: np.random.Generator, base: np.ndarray, pattern: str) -> Garment:
  period = float(rng.uniform(0.075, 0.14))
  if rng.random() < 0.5:
    angle = float(rng.choice([0.0, 0.5 * math.pi]) + rng.normal(0, 0.05))
  else:
    angle = float(rng.uniform(0, math.pi))
  return Garment(_as_rgb(base), _as_rgb(_second_colour(rng, base)), pattern, period, angle)


def sample_identity(rng: np.random.Generator) -> Identity:
  """Draws clothing, colours and texture parameters of one person."""
  skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 5, 3)
  hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 6, 3)
  shirt = _hsv(rng.random(), rng.uniform(0.25, 0.9), rng.uniform(0.35, 0.95))
  if rng.random() < 0.35:  # denim-ish
    trousers = _hsv(rng.uniform(0.56, 0.64), rng.uniform(0.35, 0.75), rng.uniform(0.25, 0.6))
  else:
    trousers = _hsv(rng.random(), rng.uniform(0.1, 0.8), rng.uniform(0.15, 0.85))
  shirt_pattern = str(rng.choice(PATTERNS, p=[0.15, 0.4, 0.25, 0.2]))
  trousers_pattern = str(rng.choice(PATTERNS, p=[0.6, 0.15, 0.15, 0.1]))
  if shirt_pattern == "plain" and trousers_pattern == "plain":
    shirt_pattern = "stripes"
  shirt_g = _garment(rng, shirt, shirt_pattern)
  trousers_g = _garment(rng, trousers, trousers_pattern)
  shoes = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.08, 0.5))
  background = rng.uniform(205, 235) + rng.uniform(-9, 9, 3)
  return Identity(
      skin=_as_rgb(skin), hair=_as_rgb(hair), shirt=shirt_g, trousers=trousers_g,
      shoes=_as_rgb(shoes), background=_as_rgb(background),
      long_sleeves=bool(rng.random() < 0.5), long_trousers=bool(rng.random() < 0.75),
      long_hair=bool(rng.random() < 0.35), hairline=float(rng.uniform(-0.6, -0.25)),
      hair_back=float(rng.uniform(-0.35, 0.05)), build=float(rng.uniform(0.88, 1.15)))


# ---------------------------------------------------------------------------
# Poses


def _limb_dir(side: float, abduction: float, flexion: float) -> np.ndarray:
  """Unit direction from hanging straight down, swung out (abduction) and forward."""
  return np.array([side * math.sin(abduction) * math.cos(flexion),
                   math.cos(abduction) * math.cos(flexion), math.sin(flexion)])


def _bend(upper: np.ndarray, towards: np.ndarray, angle: float) -> np.ndarray:
  t = towards - np.dot(towards, upper) * upper
  n = np.linalg.norm(t)
  if n < 1e-6:
    return upper
  return upper * math.cos(angle) + (t / n) * math.sin(angle)


def _sample_arm(rng: np.random.Generator, side: float):
  r = rng.random()
  if r < 0.6:
    ab = rng.uniform(0.05, 0.45)
  elif r < 0.85:
    ab = rng.uniform(0.45, 1.6)
  else:
    ab = rng.uniform(1.6, 2.6)
  upper = _limb_dir(side, ab, rng.uniform(-0.35, 0.55) * (1.0 if ab < 1.6 else 0.3))
  elbow = rng.uniform(0.0, 0.35) if rng.random() < 0.5 else rng.uniform(0.35, 2.0)
  psi = rng.uniform(0, 0.5 * math.pi)
  towards = math.cos(psi) * np.array([0.0, 0.0, 1.0]) + math.sin(psi) * np.array(
      [-side, -1.0, 0.0]) / math.sqrt(2.0)
  return upper, _bend(upper, towards, elbow)


def _sample_legs(rng: np.random.Generator):
  legs = []
  stride = rng.random() < 0.5
  front = rng.integers(2)
  for k, side in enumerate((-1.0, 1.0)):
    ab = rng.uniform(-0.04, 0.3)
    if not stride:
      flex, knee = rng.uniform(-0.12, 0.12), rng.uniform(0.0, 0.15)
    elif k == front:
      flex, knee = rng.uniform(0.15, 0.5), rng.uniform(0.0, 0.35)
    else:
      flex, knee = -rng.uniform(0.05, 0.35), rng.uniform(0.1, 0.7)
    thigh = _limb_dir(side, ab, flex)
    legs.append((thigh, _bend(thigh, np.array([0.0, 0.0, -1.0]), knee)))
  return legs


def _yaw(p: np.ndarray, phi: float) -> np.ndarray:
  """Turns body-frame points [..., 3] about the vertical axis; returns x' and z'."""
  c, s = math.cos(phi), math.sin(phi)
  return np.stack([p[..., 0] * c + p[..., 2] * s, p[..., 1], -p[..., 0] * s + p[..., 2] * c], -1)


def _face_points(phi: float):
  """Body-frame (x', y) of nose, eyes, ears after the turn, and their facing (cos)."""
  betas = np.array([0.0, -_EYE_ANGLE, _EYE_ANGLE, -0.5 * math.pi, 0.5 * math.pi])
  ys = np.array([_Y_NOSE, _Y_EYE, _Y_EYE, _Y_EAR, _Y_EAR])
  r = np.array([_HEAD_R, _HEAD_R * 0.97, _HEAD_R * 0.97, _HEAD_RX, _HEAD_RX])
  xy = np.stack([r * np.sin(betas + phi), ys], -1)
  return xy, np.cos(betas + phi)


def _face_visible(facing: np.ndarray) -> np.ndarray:
  return facing > np.array([_FACE_VISIBLE, _FACE_VISIBLE, _FACE_VISIBLE, _EAR_VISIBLE,
                            _EAR_VISIBLE])


def sample_pose(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Random pose: float32 [18, 2] (x, y) pixel coordinates, (-1, -1) for missing."""
  back = rng.random() < 0.3
  if back:
    phi = math.pi + float(np.clip(rng.normal(0, 0.4), -0.85, 0.85))
  else:
    phi = float(np.clip(rng.normal(0, 0.45), -1.2, 1.2))
  lean = float(np.clip(rng.normal(0, 0.05), -0.12, 0.12))

  p3 = np.zeros((NUM_KEYPOINTS, 3))
  p3[NECK] = (0.0, _Y_NECK, _NECK_Z)
  extra = []  # body-frame points that must be inside the image too
  for side, (sho, elb, wri) in ((-1.0, (R_SHO, R_ELB, R_WRI)), (1.0, (L_SHO, L_ELB, L_WRI))):
    upper, fore = _sample_arm(rng, side)
    p3[sho] = (side * _SHO_X, _Y_SHO, 0.0)
    p3[elb] = p3[sho] + _UPPER_ARM * upper
    p3[wri] = p3[elb] + _FOREARM * fore
    extra.append(p3[wri] + 0.06 * fore)
  for side, (hip, kne, ank), (thigh, shin) in zip((-1.0, 1.0), ((R_HIP, R_KNE, R_ANK),
                                                                (L_HIP, L_KNE, L_ANK)),
                                                  _sample_legs(rng)):
    p3[hip] = (side * _HIP_X, _Y_HIP, 0.0)
    p3[kne] = p3[hip] + _THIGH * thigh
    p3[ank] = p3[kne] + _SHIN * shin
  q = _yaw(p3, phi)[:, :2]
  face_xy, facing = _face_points(phi)
  q[list(FACE_KEYPOINTS)] = face_xy
  head = np.array([(0.0, _Y_HEAD - _HEAD_RY), (_HEAD_RX, _Y_HEAD), (-_HEAD_RX, _Y_HEAD)])
  extra = np.concatenate([_yaw(np.array(extra), phi)[:, :2], head])
  ankles = q[[R_ANK, L_ANK]]
  extra = np.concatenate([extra, ankles + (0.06, 0.03), ankles + (-0.06, 0.03)])
  # lean: rotate in the image plane
  ca, sa = math.cos(lean), math.sin(lean)
  rot = np.array([[ca, -sa], [sa, ca]])
  q = q @ rot.T
  extra = extra @ rot.T
  pts = np.concatenate([q, extra])
  pad = 0.035
  lo, hi = pts.min(0) - pad, pts.max(0) + pad
  ext = hi - lo
  margin = max(1.0, 0.015 * min(height, width))
  scale = min(height * rng.uniform(0.8, 0.93), (height - 1 - 2 * margin) / ext[1],
              (width - 1 - 2 * margin) / ext[0])
  # translation: body centre near the image centre, clipped so the body fits
  cx_lo, cx_hi = margin - scale * lo[0], width - 1 - margin - scale * hi[0]
  cx = np.clip(0.5 * (width - 1) + rng.normal(0, 0.04 * width), cx_lo, cx_hi)
  cy_lo, cy_hi = margin - scale * lo[1], height - 1 - margin - scale * hi[1]
  cy = np.clip(0.5 * (cy_lo + cy_hi) + rng.normal(0, 0.25) * 0.5 * (cy_hi - cy_lo), cy_lo,
               cy_hi)
  kp = np.array([cx, cy]) + scale * q
  kp[list(FACE_KEYPOINTS)] = np.where(_face_visible(facing)[:, None],
                                      kp[list(FACE_KEYPOINTS)], -1.0)
  return kp.astype(np.float32)


# ---------------------------------------------------------------------------
# Drawing


@dataclasses.dataclass(frozen=True)
class _Frame:
  """Image placement of the body frame: point = c + L * (x' * ex + y * ey)."""
  c: np.ndarray
  L: float
  ex: np.ndarray
  ey: np.ndarray
  phi: float

  def to_image(self, xy) -> np.ndarray:
    xy = np.asarray(xy, np.float64)
    return self.c + self.L * (xy[..., :1] * self.ex + xy[..., 1:2] * self.ey)


def _recover_frame(kp: np.ndarray, height: int, width: int) -> _Frame:
  """Inverts sample_pose's projection from the neck, shoulders and hips."""
  kp = kp.astype(np.float64)
  need = (NECK, R_SHO, L_SHO, R_HIP, L_HIP)
  if np.any(kp[list(need)] < 0):
    # Not a sample_pose pose: an upright front view filling the image.
    L = 0.85 * height
    return _Frame(np.array([0.5 * (width - 1), 0.07 * height]), L, np.array([1.0, 0.0]),
                  np.array([0.0, 1.0]), 0.0)
  sh_mid = 0.5 * (kp[R_SHO] + kp[L_SHO])
  axis = 0.5 * (kp[R_HIP] + kp[L_HIP]) - sh_mid
  n = float(np.linalg.norm(axis))
  L = max(n / (_Y_HIP - _Y_SHO), 1e-3)
  ey = axis / max(n, 1e-9)
  ex = np.array([ey[1], -ey[0]])
  cos_phi = float(np.dot(kp[R_SHO] - kp[L_SHO], ex)) / (-2.0 * _SHO_X * L)
  sin_phi = float(np.dot(kp[NECK] - sh_mid, ex)) / (_NECK_Z * L)
  phi = math.atan2(sin_phi, cos_phi)
  return _Frame(sh_mid - L * _Y_SHO * ey, L, ex, ey, phi)


class _Canvas:
  """Supersampled float canvas; coordinates are output pixels (centre = integer)."""

  def __init__(self, height: int, width: int, background):
    s = SUPERSAMPLE
    self.h, self.w = height, width
    self.img = np.empty((height * s, width * s, 3), np.float32)
    self.img[...] = np.asarray(background, np.float32)
    self.grid = (np.arange(max(height, width) * s, dtype=np.float32) + 0.5) / s - 0.5

  def region(self, lo, hi):
    """Supersample index box covering [lo, hi] (x, y), and its pixel coordinates."""
    s = SUPERSAMPLE
    j0 = max(int(math.floor((lo[0] + 0.5) * s)), 0)
    j1 = min(int(math.ceil((hi[0] + 0.5) * s)) + 1, self.w * s)
    i0 = max(int(math.floor((lo[1] + 0.5) * s)), 0)
    i1 = min(int(math.ceil((hi[1] + 0.5) * s)) + 1, self.h * s)
    if j1 <= j0 or i1 <= i0:
      return None
    return (i0, i1, j0, j1), self.grid[j0:j1][None, :], self.grid[i0:i1][:, None]

  def paint(self, box, mask, colours):
    i0, i1, j0, j1 = box
    self.img[i0:i1, j0:j1][mask] = colours

  def result(self) -> np.ndarray:
    s = SUPERSAMPLE
    small = self.img.reshape(self.h, s, self.w, s, 3).mean((1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, period: float, angle: float) -> np.ndarray:
  ca, sa = math.cos(angle), math.sin(angle)
  a = (u * ca + v * sa) * (1.0 / period)
  if kind == "stripes":
    return (a - np.floor(a)) < 0.5
  b = (v * ca - u * sa) * (1.0 / period)
  if kind == "checks":
    return ((np.floor(a) + np.floor(b)) % 2.0) < 0.5
  if kind == "dots":
    fa, fb = a - np.round(a), b - np.round(b)
    return fa * fa + fb * fb < 0.32 ** 2
  return np.zeros(u.shape, bool)


def _fill(colour, n: np.ndarray, garment: Garment | None = None, u=None, v=None) -> np.ndarray:
  """Per-pixel colours [N, 3]: garment texture at (u, v), shaded by |n| (0 centre, 1 edge)."""
  base = np.asarray(colour, np.float32)
  if garment is not None and garment.pattern != "plain":
    pat = _pattern(garment.pattern, u, v, garment.period, garment.angle)
    cols = np.where(pat[:, None], np.asarray(garment.colour2, np.float32), base)
  else:
    cols = np.broadcast_to(base, (n.shape[0], 3))
  shade = 0.72 + 0.28 * np.sqrt(np.clip(1.0 - n * n, 0.0, 1.0))
  return cols * shade[:, None].astype(np.float32)


def _capsule(cv: _Canvas, a, b, ra: float, rb: float, colour, L: float,
             garment: Garment | None = None, u_offset: float = 0.0) -> None:
  """Tapered capsule a -> b with radii ra, rb (pixels); texture in limb coordinates."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  r = max(ra, rb)
  reg = cv.region(np.minimum(a, b) - r, np.maximum(a, b) + r)
  if reg is None:
    return
  box, xs, ys = reg
  d = b - a
  l2 = float(np.dot(d, d))
  dx, dy = xs - a[0], ys - a[1]
  if l2 < 1e-9:
    t_raw = np.zeros_like(dx * dy)
  else:
    t_raw = (dx * d[0] + dy * d[1]) * (1.0 / l2)
  t = np.clip(t_raw, 0.0, 1.0)
  px, py = dx - t * d[0], dy - t * d[1]
  rad = ra + (rb - ra) * t
  mask = px * px + py * py <= rad * rad
  if not mask.any():
    return
  length = math.sqrt(l2)
  if length > 1e-6:
    perp = (dy * d[0] - dx * d[1]) * (1.0 / length)
  else:
    perp = np.sqrt(px * px + py * py)
  n = (perp[mask] / rad[mask])
  if garment is not None:
    rm = 0.5 * (ra + rb)
    u = rm * np.arcsin(np.clip(n, -1, 1)) / L
    v = t_raw[mask] * (length / L) + u_offset
    cols = _fill(colour, n, garment, u, v)
  else:
    cols = _fill(colour, n)
  cv.paint(box, mask, cols)


def _ellipse(cv: _Canvas, centre, rx: float, ry: float, ex, colour, shaded: bool = True) -> None:
  """Ellipse with half-axes rx along unit vector ex and ry along its normal (pixels)."""
  r = max(rx, ry)
  centre = np.asarray(centre, np.float32)
  reg = cv.region(centre - r, centre + r)
  if reg is None:
    return
  box, xs, ys = reg
  dx, dy = xs - centre[0], ys - centre[1]
  lx = (dx * ex[0] + dy * ex[1]) / rx
  ly = (-dx * ex[1] + dy * ex[0]) / ry
  rr = lx * lx + ly * ly
  mask = rr <= 1.0
  if mask.any():
    n = np.sqrt(rr[mask]) if shaded else np.zeros(int(mask.sum()), np.float32)
    cv.paint(box, mask, _fill(colour, n))


def _torso_piece(cv: _Canvas, fr: _Frame, levels, colour, garment: Garment, build: float) -> None:
  """Convex trapezoids between consecutive (y, half-width) levels, cylinder-textured."""
  c, s = math.cos(fr.phi), math.sin(fr.phi)
  pts = []
  for y, w in levels:
    half = math.hypot(w * build * c, _TORSO_DEPTH * build * s)
    pts.append((fr.to_image((-half, y)), fr.to_image((half, y))))
  allp = np.array([p for pair in pts for p in pair])
  reg = cv.region(allp.min(0), allp.max(0))
  if reg is None:
    return
  box, xs, ys = reg
  rel_x, rel_y = xs - np.float32(fr.c[0]), ys - np.float32(fr.c[1])
  bx = (rel_x * fr.ex[0] + rel_y * fr.ex[1]) / fr.L  # body x' (L units)
  by = (rel_x * fr.ey[0] + rel_y * fr.ey[1]) / fr.L  # body y
  mask = np.zeros(bx.shape, bool)
  for (y0, w0), (y1, w1) in zip(levels[:-1], levels[1:]):
    h0 = math.hypot(w0 * build * c, _TORSO_DEPTH * build * s)
    h1 = math.hypot(w1 * build * c, _TORSO_DEPTH * build * s)
    tt = (by - y0) / (y1 - y0)
    mask |= (tt >= 0) & (tt <= 1) & (np.abs(bx) <= h0 + (h1 - h0) * tt)
  if not mask.any():
    return
  # around-the-body coordinate of an elliptic cylinder (a = half width, b = depth)
  a, b = 0.11 * build, _TORSO_DEPTH * build
  wp = math.hypot(a * c, b * s)
  delta = math.atan2(b * s, a * c)
  n = np.clip(bx[mask] / wp, -1.0, 1.0)
  u = a * (np.arcsin(n) - delta)
  cv.paint(box, mask, _fill(colour, n, garment, u, by[mask]))


def _head(cv: _Canvas, fr: _Frame, ident: Identity) -> None:
  L = fr.L
  centre = fr.to_image((0.0, _Y_HEAD)).astype(np.float32)
  rx, ry = _HEAD_RX * L, _HEAD_RY * L
  reg = cv.region(centre - max(rx, ry), centre + max(rx, ry))
  if reg is None:
    return
  box, xs, ys = reg
  dx, dy = xs - centre[0], ys - centre[1]
  nx = (dx * fr.ex[0] + dy * fr.ex[1]) / rx
  ny = (dx * fr.ey[0] + dy * fr.ey[1]) / ry
  rr = nx * nx + ny * ny
  mask = rr <= 1.0
  if not mask.any():
    return
  nx, ny = nx[mask], ny[mask]
  nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
  c, s = math.cos(fr.phi), math.sin(fr.phi)
  hz = nx * s + nz * c  # forward (face-direction) component on the head sphere
  hair = (ny < ident.hairline + 0.25 * (1.0 - hz)) | ((hz < ident.hair_back) & (ny < 0.55))
  if ident.long_hair:
    hair |= (hz < 0.15) & (ny < 0.9)
  cols = np.where(hair[:, None], np.asarray(ident.hair, np.float32),
                  np.asarray(ident.skin, np.float32))
  shade = 0.7 + 0.3 * nz
  cv.paint(box, mask, cols * shade[:, None])


def _arm(cv, kp, fr, ident, sho, elb, wri):
  L, b = fr.L, ident.build
  sleeve = ident.shirt if ident.long_sleeves else None
  fore_col = ident.shirt.colour if ident.long_sleeves else ident.skin
  d = kp[wri] - kp[elb]
  nd = float(np.linalg.norm(d))
  tip = kp[wri] + (d / nd * 0.035 * L if nd > 1e-6 else 0.0)
  _ellipse(cv, tip, 0.026 * L, 0.03 * L, fr.ex, ident.skin)  # hand
  _capsule(cv, kp[elb], kp[wri], 0.030 * L * b, 0.024 * L * b, fore_col, L, sleeve,
           _UPPER_ARM)
  _capsule(cv, kp[sho], kp[elb], 0.040 * L * b, 0.031 * L * b, ident.shirt.colour, L,
           ident.shirt)


def _leg(cv, kp, fr, ident, hip, kne, ank):
  L, b = fr.L, ident.build
  fwd = math.sin(fr.phi)
  toe = kp[ank] + L * (0.055 * fwd * fr.ex + 0.025 * fr.ey)
  _capsule(cv, kp[ank] + 0.01 * L * fr.ey, toe, 0.027 * L, 0.024 * L, ident.shoes, L)
  shin_col = ident.trousers.colour if ident.long_trousers else ident.skin
  shin_g = ident.trousers if ident.long_trousers else None
  _capsule(cv, kp[kne], kp[ank], 0.042 * L * b, 0.032 * L * b, shin_col, L, shin_g, _THIGH)
  _capsule(cv, kp[hip], kp[kne], 0.058 * L * b, 0.044 * L * b, ident.trousers.colour, L,
           ident.trousers)


def draw_person(identity: Identity, keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
  """Draws ``identity`` in the pose ``keypoints`` (from ``sample_pose``): uint8 [H, W, 3]."""
  kp = np.asarray(keypoints, np.float64)
  fr = _recover_frame(kp, height, width)
  cv = _Canvas(height, width, identity.background)
  s = math.sin(fr.phi)
  c = math.cos(fr.phi)
  # the side whose shoulder is nearer the camera: right if z'(r_sho) = SHO_X * sin(phi) > 0
  arms = {"r": (R_SHO, R_ELB, R_WRI), "l": (L_SHO, L_ELB, L_WRI)}
  legs = {"r": (R_HIP, R_KNE, R_ANK), "l": (L_HIP, L_KNE, L_ANK)}
  near, far = ("r", "l") if s > 0 else ("l", "r")
  turned = abs(s) > 0.2
  ok = lambda idx: bool(np.all(kp[list(idx)] >= 0))  # noqa: E731

  for side in (far, near):
    if ok(legs[side]):
      _leg(cv, kp, fr, identity, *legs[side])
  _torso_piece(cv, fr, _PELVIS_LEVELS, identity.trousers.colour, identity.trousers,
               identity.build)
  if turned and ok(arms[far]):
    _arm(cv, kp, fr, identity, *arms[far])
  L = fr.L
  if identity.long_hair and c > 0:  # hair falling behind the shoulders
    _capsule(cv, fr.to_image((0.0, _Y_HEAD)), fr.to_image((0.0, _Y_SHO + 0.05)),
             0.062 * L, 0.075 * L, identity.hair, L)
  _torso_piece(cv, fr, _TORSO_LEVELS, identity.shirt.colour, identity.shirt, identity.build)
  _capsule(cv, fr.to_image((0.0, _Y_HEAD)), fr.to_image((0.01 * s, _Y_NECK + 0.02)),
           0.03 * L, 0.03 * L, identity.skin, L)
  if identity.long_hair and c <= 0:  # hair over the upper back
    _capsule(cv, fr.to_image((0.0, _Y_HEAD)), fr.to_image((0.0, _Y_SHO + 0.05)),
             0.062 * L, 0.075 * L, identity.hair, L)
  # ears behind the head outline, then the head (skin + hair), then eyes and mouth
  xy, facing = _face_points(fr.phi)
  skin_dark = tuple(0.85 * np.asarray(identity.skin))
  if not identity.long_hair:
    for k in (3, 4):
      if _EAR_VISIBLE < facing[k] < 0.8:
        _ellipse(cv, fr.to_image(xy[k]), 0.013 * L, 0.02 * L, fr.ex, skin_dark)
  _head(cv, fr, identity)
  for k in (1, 2):
    if facing[k] > _FACE_VISIBLE:
      squash = max(float(facing[k]), 0.35)
      _ellipse(cv, fr.to_image(xy[k]), 0.011 * L * squash, 0.013 * L, fr.ex, (35, 28, 28),
               shaded=False)
  if facing[0] > 0.3:
    m = np.array([xy[0, 0] * 0.95, _Y_NOSE + 0.027])
    lip = tuple(0.55 * np.asarray(identity.skin) + 0.45 * np.array([150, 40, 45]))
    _ellipse(cv, fr.to_image(m), 0.016 * L * float(facing[0]), 0.006 * L, fr.ex, lip,
             shaded=False)
  for side in ((near,) if turned else (far, near)):
    if ok(arms[side]):
      _arm(cv, kp, fr, identity, *arms[side])
  return cv.result()


# ---------------------------------------------------------------------------
# Pairs


def _split_code(split: str) -> int:
  try:
    return SPLIT_CODES[split]
  except KeyError:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}") from None


def identity_for(seed: int, split: str, identity_index: int) -> Identity:
  """The identity ``identity_index`` of a split (its own random stream)."""
  return sample_identity(np.random.default_rng([int(seed), _split_code(split), 0,
                                                int(identity_index)]))


def pose_for(seed: int, split: str, identity_index: int, pose_index: int, height: int,
             width: int) -> np.ndarray:
  """Pose ``pose_index`` of an identity (its own random stream)."""
  rng = np.random.default_rng([int(seed), _split_code(split), 1, int(identity_index),
                               int(pose_index)])
  return sample_pose(rng, height, width)


def make_pair(seed: int, split: str, index: int, height: int = 64, width: int = 64) -> dict:
  """Pair ``index`` of ``split``: one identity in two different poses."""
  if index < 0 or seed < 0:
    raise ValueError("seed and index must be non-negative")
  code = _split_code(split)
  ident_index, j = divmod(int(index), PAIRS_PER_IDENTITY)
  src_pose, tgt_pose = j % POSES_PER_IDENTITY, (j + 1) % POSES_PER_IDENTITY
  ident = identity_for(seed, split, ident_index)
  k_src = pose_for(seed, split, ident_index, src_pose, height, width)
  k_tgt = pose_for(seed, split, ident_index, tgt_pose, height, width)
  folder = f"synthetic/{split}/id_{ident_index:06d}"
  return {
      "source_image": draw_person(ident, k_src, height, width),
      "target_image": draw_person(ident, k_tgt, height, width),
      "source_keypoints": k_src,
      "target_keypoints": k_tgt,
      "identity_id": code * IDENTITY_ID_STRIDE + ident_index,
      "source_name": f"{folder}/pose_{src_pose}.png",
      "target_name": f"{folder}/pose_{tgt_pose}.png",
  }


# ---------------------------------------------------------------------------
# Preview


def _mark_keypoints(img: np.ndarray, kp: np.ndarray, zoom: int) -> Image.Image:
  from PIL import ImageDraw
  im = Image.fromarray(img).resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST)
  draw = ImageDraw.Draw(im)
  for i, (x, y) in enumerate(kp):
    if x < 0:
      continue
    col = (255, 0, 0) if i in (R_SHO, R_ELB, R_WRI, R_HIP, R_KNE, R_ANK, R_EYE, R_EAR) else (
        (0, 90, 255) if i not in (NOSE, NECK) else (0, 200, 0))
    cx, cy = (x + 0.5) * zoom, (y + 0.5) * zoom
    draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=col)
  return im


def save_preview(path: str, num_pairs: int = 8, height: int = 64, width: int = 64,
                 seed: int = 0, split: str = "train", zoom: int = 3, start: int = 0) -> None:
  """Grid: one row per pair: source, source + keypoints, target, target + keypoints."""
  tiles = []
  for i in range(start, start + num_pairs):
    p = make_pair(seed, split, i * PAIRS_PER_IDENTITY + (i % PAIRS_PER_IDENTITY), height, width)
    row = [Image.fromarray(p["source_image"]).resize((width * zoom, height * zoom), Image.NEAREST),
           _mark_keypoints(p["source_image"], p["source_keypoints"], zoom),
           Image.fromarray(p["target_image"]).resize((width * zoom, height * zoom), Image.NEAREST),
           _mark_keypoints(p["target_image"], p["target_keypoints"], zoom)]
    tiles.append(row)
  gap = 4
  grid = Image.new("RGB", (4 * width * zoom + 3 * gap, num_pairs * (height * zoom + gap) - gap),
                   (255, 255, 255))
  for r, row in enumerate(tiles):
    for col, tile in enumerate(row):
      grid.paste(tile, (col * (width * zoom + gap), r * (height * zoom + gap)))
  grid.save(path)


if __name__ == "__main__":
  import argparse
  import time

  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preview", default="/tmp/synthetic_preview.png")
  ap.add_argument("--height", type=int, default=64)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--pairs", type=int, default=8)
  ap.add_argument("--start", type=int, default=0)
  ap.add_argument("--zoom", type=int, default=3)
  args = ap.parse_args()
  save_preview(args.preview, args.pairs, args.height, args.width, zoom=args.zoom,
               start=args.start)
  t0 = time.perf_counter()
  n = 200
  for i in range(n):
    make_pair(0, "train", i, args.height, args.width)
  dt = (time.perf_counter() - t0) / n
  print(f"wrote {args.preview}; {dt * 1e3:.2f} ms per {args.height}x{args.width} pair")
