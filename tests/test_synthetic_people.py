"""Tests for the procedural synthetic people (data_prep/synthetic_people.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data_prep import synthetic_people as sp


def _visible(k: np.ndarray) -> np.ndarray:
  return np.all(k >= 0, -1)


def test_make_pair_is_deterministic_and_index_dependent():
  a = sp.make_pair(3, "train", 17, 64, 64)
  b = sp.make_pair(3, "train", 17, 64, 64)
  for key in ("source_image", "target_image", "source_keypoints", "target_keypoints"):
    np.testing.assert_array_equal(a[key], b[key])
  for key in ("identity_id", "source_name", "target_name"):
    assert a[key] == b[key]
  c = sp.make_pair(3, "train", 18, 64, 64)
  assert not np.array_equal(a["target_image"], c["target_image"])
  assert not np.array_equal(a["target_keypoints"], c["target_keypoints"])
  d = sp.make_pair(4, "train", 17, 64, 64)
  assert not np.array_equal(a["source_image"], d["source_image"])


def test_pairs_share_identity_and_splits_are_disjoint():
  ppi = sp.PAIRS_PER_IDENTITY
  ps = [sp.make_pair(0, "train", i, 64, 64) for i in range(2 * ppi)]
  ids = [p["identity_id"] for p in ps]
  assert ids == [0] * ppi + [1] * ppi
  assert ps[0]["source_name"] == "synthetic/train/id_000000/pose_0.png"
  assert ps[0]["target_name"] == "synthetic/train/id_000000/pose_1.png"
  # a pose image with the same name is the same picture in every pair it appears in
  np.testing.assert_array_equal(ps[0]["target_image"], ps[1]["source_image"])
  for p in ps:
    assert p["source_name"] != p["target_name"]
    assert p["source_name"].rsplit("/", 1)[0] == p["target_name"].rsplit("/", 1)[0]
  train_ids = {sp.make_pair(0, "train", i, 32, 32)["identity_id"] for i in range(0, 400, ppi)}
  test_ids = {sp.make_pair(0, "test", i, 32, 32)["identity_id"] for i in range(0, 40, ppi)}
  assert not train_ids & test_ids
  # same identity index in another split is another person
  assert sp.identity_for(0, "train", 5) != sp.identity_for(0, "test", 5)
  with pytest.raises(ValueError):
    sp.make_pair(0, "nonsense", 0, 64, 64)


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (64, 48), (220, 150)])
def test_shapes_dtypes_and_keypoints_in_image(hw):
  h, w = hw
  for i in range(0, 24, 3):
    p = sp.make_pair(1, "train", i, h, w)
    for side in ("source", "target"):
      img, k = p[f"{side}_image"], p[f"{side}_keypoints"]
      assert img.shape == (h, w, 3) and img.dtype == np.uint8
      assert k.shape == (18, 2) and k.dtype == np.float32
      vis = _visible(k)
      assert np.all(k[~vis] == -1.0)
      assert np.all((k[vis, 0] >= 0) & (k[vis, 0] <= w - 1))
      assert np.all((k[vis, 1] >= 0) & (k[vis, 1] <= h - 1))
      assert vis[list(sp.BODY_KEYPOINTS)].all()  # body joints are always drawn and in frame
      if vis[sp.NOSE]:  # front view
        assert vis.sum() >= 15
      # the person is drawn: plenty of non-background pixels
      assert np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1).astype(bool).mean() > 0.08


def test_views_vary_and_back_views_hide_the_face():
  rng = np.random.default_rng(0)
  ks = np.stack([sp.sample_pose(rng, 64, 64) for _ in range(200)])
  vis = np.all(ks >= 0, -1)
  front, back = vis[:, sp.NOSE], ~vis[:, sp.NOSE]
  assert 0.1 < back.mean() < 0.5
  assert not vis[back][:, [sp.R_EYE, sp.L_EYE]].any()
  assert vis[front].sum(-1).min() >= 15
  # left/right swap in image space: in a front view the person's right shoulder is
  # at image left, in a back view at image right
  dx = ks[:, sp.R_SHO, 0] - ks[:, sp.L_SHO, 0]
  assert np.all(dx[front] < 0) and np.all(dx[back] > 0)
  # the drawing recovers the view from the body keypoints alone, consistently
  cos_phi = np.array([np.cos(sp._recover_frame(k, 64, 64).phi) for k in ks])
  assert np.all(cos_phi[front] > 0) and np.all(cos_phi[back] < 0)
  # turned views: some shoulders much narrower than others, and some lose the far ear
  width = np.abs(dx) / np.linalg.norm(ks[:, sp.NECK] - ks[:, sp.R_HIP], axis=-1)
  assert width.min() < 0.5 * np.median(width)
  assert (vis[front][:, sp.R_EAR] != vis[front][:, sp.L_EAR]).any()
  # arms and legs move: wrist and ankle positions relative to the neck spread widely
  rel = ks[:, [sp.R_WRI, sp.L_WRI, sp.R_ANK, sp.L_ANK]] - ks[:, None, sp.NECK]
  assert rel.std(0).min() > 2.0


def test_pairs_need_a_pose_change():
  disp = []
  for i in range(40):
    p = sp.make_pair(0, "train", i, 64, 64)
    ks, kt = p["source_keypoints"], p["target_keypoints"]
    both = _visible(ks) & _visible(kt)
    disp.append(np.linalg.norm(ks[both] - kt[both], axis=-1).mean())
  # measured: mean ~8.8 px on a 64-px image (the body is ~55 px tall)
  assert np.mean(disp) > 5.0
  assert np.median(disp) > 4.0


def test_textures_differ_between_identities_and_are_visible():
  ids = [sp.identity_for(0, "train", i) for i in range(30)]
  for ident in ids:
    assert "plain" in sp.PATTERNS
    assert ident.shirt.pattern != "plain" or ident.trousers.pattern != "plain"
  shirts = {(g.pattern, round(g.period, 4), round(g.angle, 4), g.colour2)
            for g in (i.shirt for i in ids)}
  assert len(shirts) == len(ids)
  assert len({i.shirt.pattern for i in ids}) >= 3
  assert len({i.shirt.colour for i in ids}) == len(ids)
  # the texture is really drawn: removing it changes the picture
  k = sp.sample_pose(np.random.default_rng(5), 64, 64)
  for ident in ids[:5]:
    plain = dataclasses.replace(
        ident, shirt=dataclasses.replace(ident.shirt, pattern="plain"),
        trousers=dataclasses.replace(ident.trousers, pattern="plain"))
    diff = np.abs(sp.draw_person(ident, k, 64, 64).astype(int) -
                  sp.draw_person(plain, k, 64, 64).astype(int)).sum(-1)
    assert (diff > 30).sum() >= 30


def test_texture_moves_with_the_body():
  """Shifting the pose shifts the whole person, texture included (not screen-fixed)."""
  ident = sp.identity_for(0, "train", 2)
  for seed in range(3):
    k = sp.sample_pose(np.random.default_rng(seed), 64, 64)
    shifted = np.where(_visible(k)[:, None], k + np.float32([3.0, 2.0]), -1.0)
    a = sp.draw_person(ident, k, 64, 64).astype(int)
    b = sp.draw_person(ident, shifted, 64, 64).astype(int)
    d = np.abs(b[2:, 3:] - a[:-2, :-3])
    assert d.mean() < 0.05 and d.max() <= 2
    # the same shift by a non-multiple of the texture period in screen space would
    # break a screen-fixed texture: the unshifted pair really differs
    assert np.abs(b - a).mean() > 2.0


def test_copying_the_source_or_the_wrong_person_scores_clearly_worse():
  """Both pose and appearance matter.

  Over 50 pairs at 64x64, against the target (the correct render: SSIM 1, PSNR inf),
  measured (mean / worst case over pairs):
    copy the source image:                 SSIM 0.61 / 0.81, PSNR 15.9 / 19.4 dB
    right pose, wrong identity:            SSIM 0.83 / 0.90, PSNR 17.8 / 20.8 dB
    correct render blurred (sigma 0.6 px): SSIM 0.977 / 0.972, PSNR 31.3 / 29.6 dB
  So a nearly-right answer (the blurred target) beats copy-source by ~15 dB and the
  wrong-identity render by ~13 dB of mean PSNR.
  """
  h = w = 64
  scores = {k: ([], []) for k in ("copy", "wrong", "blur")}
  for i in range(50):
    p = sp.make_pair(0, "train", i, h, w)
    tgt = p["target_image"]
    other = sp.identity_for(0, "train", i // sp.PAIRS_PER_IDENTITY + 1000)
    cands = {
        "copy": p["source_image"],
        "wrong": sp.draw_person(other, p["target_keypoints"], h, w),
        "blur": np.clip(np.round(gaussian_filter(tgt.astype(float), (0.6, 0.6, 0))), 0,
                        255).astype(np.uint8),
    }
    assert structural_similarity(tgt, tgt, channel_axis=-1, data_range=255) == 1.0
    for name, img in cands.items():
      scores[name][0].append(structural_similarity(img, tgt, channel_axis=-1, data_range=255))
      scores[name][1].append(peak_signal_noise_ratio(tgt, img, data_range=255))
  ssim = {k: np.array(v[0]) for k, v in scores.items()}
  psnr = {k: np.array(v[1]) for k, v in scores.items()}
  # every single naive answer is clearly below the correct render
  assert ssim["copy"].max() < 0.93 and ssim["wrong"].max() < 0.96
  assert psnr["copy"].max() < 25.0 and psnr["wrong"].max() < 25.0
  # on average, far below it
  assert ssim["copy"].mean() < 0.75 and ssim["wrong"].mean() < 0.9
  assert psnr["copy"].mean() < 20.0 and psnr["wrong"].mean() < 21.0
  # and several dB below even a slightly blurred correct render
  assert ssim["blur"].mean() > 0.95
  assert psnr["blur"].mean() - psnr["copy"].mean() > 8.0
  assert psnr["blur"].mean() - psnr["wrong"].mean() > 8.0
  assert ssim["blur"].mean() - max(ssim["copy"].mean(), ssim["wrong"].mean()) > 0.08
