"""Dataset builders: both DeepFashion layouts, every bad-input reason,
resumable builds, and the synthetic dataset's determinism."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import build, pairs
from fpdm_jax import input_pipeline, skeleton
from tests import deepfashion_fixture as fx

SIZE = (64, 48)  # stored HxW for the DeepFashion fixtures: keeps builds fast


def run_build(*argv):
  assert build.main(list(argv)) == 0


@pytest.fixture(scope="module")
def fpdm_built(tmp_path_factory):
  root = tmp_path_factory.mktemp("fpdm_src")
  info = fx.make_fpdm_layout(root, num_train=5, num_test=2, bad=True)
  out = tmp_path_factory.mktemp("fpdm_out")
  run_build("deepfashion", "--src", str(root), "--data-dir", str(out), "--layout", "fpdm",
            "--image-size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1", "--chunk-size", "4")
  return root, out, info


def read_split(data_dir, name, split):
  src = input_pipeline.open_source(data_dir, name, split)
  return [input_pipeline.DecodeRecord().map(src[i]) for i in range(len(src))]


def test_fpdm_layout_records_have_right_shapes_and_values(fpdm_built):
  root, out, info = fpdm_built
  records = read_split(out, f"deepfashion/fpdm_{SIZE[0]}x{SIZE[1]}", "train")
  assert len(records) == 5  # the 6 broken pairs are skipped
  for i, r in enumerate(records):
    src_rel, tgt_rel = info["train"][i]
    assert r["pair_index"] == i
    assert r["source_name"] == src_rel and r["target_name"] == tgt_rel
    for key in input_pipeline.IMAGE_KEYS:
      assert r[key].shape == (*SIZE, 3) and r[key].dtype == np.uint8
    # Keypoints: FPDM 256-frame -> original pixels -> stored pixels.
    orig = skeleton.deepfashion_to_pixels(info["keypoints"][tgt_rel], *fx.ORIGINAL_HW)
    want = skeleton.scale_keypoints(orig, fx.ORIGINAL_HW, SIZE)
    np.testing.assert_allclose(r["target_keypoints"], want, atol=1e-3)
    # The photo is the original, bicubic-resized (JPEG round trips: loose).
    photo = np.asarray(Image.fromarray(info["photos"][tgt_rel]).resize(SIZE[::-1], Image.BICUBIC))
    assert np.abs(r["target_image"].astype(float) - photo).mean() < 6
    # Pose image: drawn at the original size, resized with the photo.
    pose = skeleton.render_pose_image(want, SIZE, canvas_hw=fx.ORIGINAL_HW)
    assert np.abs(r["target_pose_image"].astype(int) - pose).max() <= 1


def test_every_bad_input_reason_is_skipped_and_reported(fpdm_built):
  _, out, _ = fpdm_built
  report_path = next(Path(out).glob("deepfashion/*/1.0.0/prep_report.json"))
  report = json.loads(report_path.read_text())
  assert report["written"] == {"train": 5, "test": 2}
  assert report["skipped"]["train"] == {reason: 1 for reason in fx.BAD_REASONS}
  assert "truncated.jpg" in report["first_offending_paths"]["unreadable_image"][0]
  assert "malformed.txt" in report["first_offending_paths"]["malformed_keypoints"][0]


def test_strict_stops_at_first_problem_naming_the_file(tmp_path, capsys):
  root = tmp_path / "src"
  fx.make_fpdm_layout(root, num_train=1, num_test=1, bad=True)
  code = build.main(["deepfashion", "--src", str(root), "--data-dir", str(tmp_path / "out"),
                     "--image-size", "64x48", "--workers", "1", "--strict"])
  assert code == 2
  assert "absent.jpg" in capsys.readouterr().err


def test_missing_pair_file_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "src").mkdir()
  code = build.main(["deepfashion", "--src", str(tmp_path / "src"), "--data-dir",
                     str(tmp_path / "out"), "--workers", "1"])
  assert code == 2
  assert "train_pairs_data.json" in capsys.readouterr().err


def test_cfld_layout(tmp_path, monkeypatch):
  root = tmp_path / "src"
  info = fx.make_cfld_layout(root, num_train=3, num_test=2)
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  run_build("deepfashion", "--src", str(root), "--data-dir", str(tmp_path / "out"),
            "--layout", "cfld", "--image-size", "64x48", "--workers", "1")
  assert not list(temp.glob("*tfds*"))  # TFDS's GCS lookup leaves none behind
  records = read_split(tmp_path / "out", "deepfashion/cfld_64x48", "test")
  assert len(records) == 2
  name = info["test"][1][1]
  k = info["keypoints"][name].astype(np.float32)
  want = skeleton.scale_keypoints(np.where(k >= 0, k, -1), (256, 176), (64, 48))
  assert records[1]["target_name"] == name
  np.testing.assert_allclose(records[1]["target_keypoints"], want, atol=1e-3)


class Interrupted(Exception):
  pass


def test_interrupted_build_keeps_finished_chunks(tmp_path, monkeypatch):
  root = tmp_path / "src"
  fx.make_fpdm_layout(root, num_train=6, num_test=2)
  args = ["deepfashion", "--src", str(root), "--data-dir", str(tmp_path / "out"),
          "--image-size", "64x48", "--workers", "1", "--chunk-size", "2"]
  from data_prep import deepfashion
  calls, armed = [], [True]
  real = deepfashion.DeepfashionProcessor.__call__

  def flaky(self, spec):
    calls.append(spec.index)
    if self.split == "train" and spec.index == 4 and armed[0]:
      armed[0] = False
      raise Interrupted  # the machine goes away in the middle of the split
    return real(self, spec)

  monkeypatch.setattr(deepfashion.DeepfashionProcessor, "__call__", flaky)
  with pytest.raises(Interrupted):
    build.main(args)
  staged = sorted(p.name for p in (tmp_path / "out" / "_staging").rglob("*.npz"))
  assert staged == ["train-000000.npz", "train-000001.npz"]
  calls.clear()
  run_build(*args)
  assert calls[:2] == [4, 5]  # the rerun starts where the first one stopped
  records = read_split(tmp_path / "out", "deepfashion/fpdm_64x48", "train")
  assert [r["pair_index"] for r in records] == list(range(6))
  assert not (tmp_path / "out" / "_staging" / "deepfashion").exists() or not any(
      (tmp_path / "out" / "_staging" / "deepfashion").rglob("*.npz"))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  run_build("synthetic", "--data-dir", str(out), "--num-train", "24", "--num-test", "8",
            "--workers", "1", "--seed", "3")
  return out


SYNTH = "synthetic_people/64x64_train24_test8_seed3"


def test_synthetic_build_is_deterministic(synthetic_dir, tmp_path):
  run_build("synthetic", "--data-dir", str(tmp_path), "--num-train", "24", "--num-test", "8",
            "--workers", "2", "--chunk-size", "5", "--seed", "3")
  a = read_split(synthetic_dir, SYNTH, "train")
  b = read_split(tmp_path, SYNTH, "train")
  assert len(a) == len(b) == 24
  for ra, rb in zip(a, b):
    for key in ra:
      np.testing.assert_array_equal(ra[key], rb[key])
  report = json.loads(next(Path(tmp_path).glob("synthetic_people/*/1.0.0/prep_report.json")).read_text())
  assert report["written"] == {"train": 24, "test": 8}


def test_synthetic_records_are_pose_transfer_pairs(synthetic_dir):
  records = read_split(synthetic_dir, SYNTH, "test")
  r = records[0]
  assert r["source_image"].shape == (64, 64, 3)
  assert not np.array_equal(r["source_keypoints"], r["target_keypoints"])
  # The pose image is the reference drawing of the stored keypoints.
  from data_prep.synthetic import POSE_CANVAS_SCALE
  pose = skeleton.render_pose_image(r["target_keypoints"], (64, 64),
                                    (64 * POSE_CANVAS_SCALE, 64 * POSE_CANVAS_SCALE))
  np.testing.assert_array_equal(r["target_pose_image"], pose)


def test_parse_size_validation():
  assert build.parse_size("512x352") == (512, 352)
  with pytest.raises(Exception, match="HEIGHTxWIDTH"):
    build.parse_size("512")
  with pytest.raises(Exception, match="multiples of 8"):
    build.parse_size("100x50")
