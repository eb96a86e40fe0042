"""Golden tests of the reference skeleton drawing on hand-made keypoints."""
import numpy as np
import pytest

from fpdm_jax import skeleton


def kp(**points):
  k = np.full((18, 2), -1.0, np.float32)
  for name, xy in points.items():
    k[skeleton.KEYPOINT_NAMES.index(name)] = xy
  return k


def test_palette_is_listed_palette_with_first_and_last_swapped():
  assert skeleton.PALETTE[1] == (255, 85, 0)
  assert skeleton.PALETTE_RGB[1] == (0, 85, 255)
  assert skeleton.PALETTE_RGB[12] == (255, 0, 0)


def test_single_keypoint_is_a_radius_4_disc_in_saved_rgb_colour():
  img = skeleton.render_skeleton(kp(neck=(20, 30)), 64, 64)
  assert tuple(img[30, 20]) == (0, 85, 255)
  assert tuple(img[30, 24]) == (0, 85, 255) and tuple(img[34, 20]) == (0, 85, 255)
  assert not img[30, 26].any() and not img[36, 20].any()
  ys, xs = np.nonzero(img.any(-1))
  assert ys.min() == 26 and ys.max() == 34 and xs.min() == 16 and xs.max() == 24


def test_limb_is_blended_ellipse_of_half_width_4():
  img = skeleton.render_skeleton(kp(neck=(10, 40), r_shoulder=(70, 40)), 80, 80)
  limb = np.array(skeleton.PALETTE_RGB[0], np.float64)  # limb (2,3) uses colour 0
  # Mid-limb: 0.4 * black + 0.6 * limb colour, rounded like cv2.addWeighted.
  assert tuple(img[40, 40]) == tuple(np.round(0.6 * limb).astype(int))
  assert img[43, 40].any() and img[37, 40].any()      # inside half-width 4
  assert not img[46, 40].any() and not img[34, 40].any()
  # On a keypoint disc: 0.4 * disc colour + 0.6 * limb colour.
  disc = np.array(skeleton.PALETTE_RGB[1], np.float64)
  np.testing.assert_allclose(img[40, 10], np.round(0.4 * disc + 0.6 * limb), atol=1)


def test_missing_points_and_undrawn_limbs():
  # r_shoulder + r_ear form limb 18 (3,17), which the reference does not draw.
  img = skeleton.render_skeleton(kp(r_shoulder=(10, 40), r_ear=(70, 40)), 80, 80)
  assert not img[40, 40].any()
  # A limb with one end missing is not drawn; -1 points draw nothing at all.
  img = skeleton.render_skeleton(kp(neck=(10, 40)), 80, 80)
  assert img.any(-1).sum() < 100
  assert not skeleton.render_skeleton(kp(), 32, 32).any()


def test_limb_orientation_follows_the_points():
  img = skeleton.render_skeleton(kp(r_hip=(40, 10), r_knee=(40, 70)), 80, 80)
  limb = np.array(skeleton.PALETTE_RGB[7])
  assert tuple(img[40, 40]) == tuple(np.round(0.6 * limb).astype(int))
  assert not img[40, 46].any() and img[40, 43].any()


def test_drawing_at_original_size_then_resizing_gives_thinner_limbs():
  k = kp(neck=(88, 40), r_shoulder=(60, 42), r_elbow=(50, 90), r_wrist=(55, 130),
         r_hip=(70, 130), r_knee=(70, 190), r_ankle=(70, 240))
  direct = skeleton.render_pose_image(k, (256, 176))
  via_original = skeleton.render_pose_image(k, (256, 176), canvas_hw=(1101, 750))
  assert via_original.shape == direct.shape == (256, 176, 3)
  # Same limbs, but about 4x thinner relative to the body.
  lit = lambda im: (im.max(-1) > 40).sum()
  assert lit(via_original) < 0.5 * lit(direct)
  assert via_original[130, 70].any()  # still drawn along the leg


def test_deepfashion_frame_to_pixels():
  k = np.full((18, 2), -1.0, np.float32)
  k[0] = (40.0, 0.0)
  k[1] = (216.0, 256.0)
  k[2] = (1.28e2, 1.28e2)
  out = skeleton.deepfashion_to_pixels(k, 1101, 750)
  np.testing.assert_allclose(out[0], (0, 0))
  np.testing.assert_allclose(out[1], (750, 1101))
  np.testing.assert_allclose(out[2], (88 * 750 / 176, 128 * 1101 / 256), rtol=1e-6)
  assert np.all(out[3:] == -1)


def test_flip_swaps_sides_and_is_an_involution():
  k = kp(nose=(10, 5), r_shoulder=(3, 20), l_shoulder=(17, 20))
  f = skeleton.flip_keypoints(k, 32)
  assert tuple(f[2]) == (14, 20) and tuple(f[5]) == (28, 20)
  assert tuple(f[0]) == (21, 5) and np.all(f[3] == -1)
  np.testing.assert_array_equal(skeleton.flip_keypoints(f, 32), k)


def test_rejects_wrong_keypoint_count():
  with pytest.raises(ValueError, match="18, 2"):
    skeleton.render_skeleton(np.zeros((17, 2)), 8, 8)
