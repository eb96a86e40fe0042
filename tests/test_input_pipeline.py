"""The Grain input pipeline: views, augmentation, exact resume, sharding."""
import jax
import numpy as np
import pytest

from fpdm_jax import input_pipeline as ip
from fpdm_jax import sharding, skeleton

VIEWS = {
    "target": ("target_image", (64, 64), "symmetric"),
    "target_pose": ("target_pose_image", (64, 64), "unit"),
    "source_clip": ("source_image", (224, 224), "clip"),
    "source_dino": ("source_image", (56, 56), "imagenet"),
}


def loader_cfg(synthetic_data, **kw):
  data_dir, name = synthetic_data
  return ip.LoaderConfig(data_dir=data_dir, name=name, views=VIEWS, batch_size=4, **kw)


def test_views_have_model_sizes_and_normalisations(synthetic_data):
  src = ip.open_source(*synthetic_data, "train")
  record = ip.DecodeRecord().map(src[3])
  raw = ip.MakeViews(ip.parse_views(VIEWS)).map(record)
  assert raw["target"].dtype == np.uint8
  out = {k: np.asarray(v) for k, v in ip.normalise(raw, VIEWS).items()}
  assert out["target"].shape == (64, 64, 3) and out["target"].dtype == np.float32
  np.testing.assert_allclose(out["target"], record["target_image"] / 127.5 - 1, atol=1e-6)
  mean, std = np.array(ip.CLIP_MEAN), np.array(ip.CLIP_STD)
  np.testing.assert_allclose(out["source_clip"], (raw["source_clip"] / 255 - mean) / std,
                             atol=1e-5)
  np.testing.assert_allclose(out["target_pose"], record["target_pose_image"] / 255.0, atol=1e-6)
  assert out["source_clip"].shape == (224, 224, 3)
  # A white pixel under CLIP normalisation is (1 - mean) / std.
  white = (1 - np.array(ip.CLIP_MEAN)) / np.array(ip.CLIP_STD)
  assert np.all(out["source_clip"] <= white + 1e-5)
  assert out["source_dino"].shape == (56, 56, 3)
  assert out["pair_index"] == 3
  np.testing.assert_array_equal(out["target_keypoints"], record["target_keypoints"])


def test_bad_view_config_is_named():
  with pytest.raises(ValueError, match="target_img"):
    ip.parse_views({"x": ("target_img", (8, 8))})
  with pytest.raises(ValueError, match="unknown normalisation"):
    ip.parse_views({"x": ("target_image", (8, 8), "zscore")})


def test_missing_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_prep.build synthetic"):
    ip.open_source(tmp_path, "synthetic_people/64x64_train1_test1_seed0", "train")


def test_flip_redraws_the_pose_from_mirrored_keypoints(synthetic_data):
  record = ip.DecodeRecord().map(ip.open_source(*synthetic_data, "train")[0])
  flipped = ip.FlipPair(p=1.0, pose_canvas_scale=4).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["target_image"], record["target_image"][:, ::-1])
  k = skeleton.flip_keypoints(record["target_keypoints"], 64)
  np.testing.assert_array_equal(flipped["target_keypoints"], k)
  np.testing.assert_array_equal(flipped["target_pose_image"],
                                skeleton.render_pose_image(k, (64, 64), (256, 256)))
  # Left and right colours differ, so this is not the mirrored drawing.
  assert not np.array_equal(flipped["target_pose_image"], record["target_pose_image"][:, ::-1])


def take(it, n):
  return [next(it) for _ in range(n)]


def test_only_the_images_views_use_are_decoded(synthetic_data):
  record = ip.open_source(*synthetic_data, "train")[0]
  out = ip.DecodeRecord(("target_image",)).map(record)
  assert out["target_image"].shape == (64, 64, 3)
  assert "source_image" not in out and "source_pose_image" not in out


def test_worker_processes_give_the_same_batches(synthetic_data):
  a = next(iter(ip.make_loader(loader_cfg(synthetic_data, seed=5))))
  b = next(iter(ip.make_loader(loader_cfg(synthetic_data, seed=5, worker_count=1))))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_iterator_state_restores_exactly(synthetic_data):
  cfg = loader_cfg(synthetic_data, seed=7, flip_prob=0.5, pose_canvas_scale=4)
  it = iter(ip.make_loader(cfg))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 10)  # crosses an epoch boundary (32 records / 4 = 8 per epoch)
  resumed = iter(ip.make_loader(cfg))
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 10)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_shuffle_is_seeded(synthetic_data):
  first = lambda seed: next(iter(ip.make_loader(loader_cfg(synthetic_data, seed=seed))))["pair_index"]
  np.testing.assert_array_equal(first(1), first(1))
  epoch = lambda seed: np.concatenate([b["pair_index"] for b in ip.make_loader(
      loader_cfg(synthetic_data, seed=seed, num_epochs=1))])
  assert sorted(epoch(1)) == list(range(32))
  assert not np.array_equal(epoch(1), epoch(2))


def test_two_processes_see_disjoint_records_covering_the_split(synthetic_data):
  seen = []
  for process in range(2):
    cfg = loader_cfg(synthetic_data, seed=3, num_epochs=1)
    batches = list(ip.make_loader(cfg, process_index=process, process_count=2))
    assert all(b["target"].shape[0] == 2 for b in batches)  # global 4 / 2 processes
    seen.append(np.concatenate([b["pair_index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(32))


def test_global_batch_is_sharded_over_data_and_fsdp(synthetic_data):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  cfg = loader_cfg(synthetic_data, seed=0)
  cfg.batch_size = 8
  local = next(iter(ip.make_loader(cfg)))
  batch = sharding.global_batch(local, mesh)
  assert batch["target"].shape == (8, 64, 64, 3)
  assert batch["target"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
  assert len(batch["target"].addressable_shards) == 8
  assert all(s.data.shape == (1, 64, 64, 3) for s in batch["target"].addressable_shards)
  np.testing.assert_array_equal(np.asarray(batch["target"]), local["target"])


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh((("data", -1), ("fsdp", -1)))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((("data", 8), ("fsdp", 2)))
  assert sharding.make_mesh((("data", 1), ("fsdp", 1))).devices.size == 1
