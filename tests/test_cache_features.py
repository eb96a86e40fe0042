"""Stage 2 from cached features: the cache writer, its loader, and that the
step computes the same loss from cached features as from images (same RNG),
in pixel space and in latent space (a tiny random VAE, where the latents
are sampled from the cached posterior)."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from data_prep import cache_features
from fpdm_jax import config_lib, feature_cache, input_pipeline, sharding
from fpdm_jax import train as train_cli
from fpdm_jax.importers.vae import export_vae
from fpdm_jax.models.vae import AutoencoderKL, VAEConfig
from fpdm_jax.trainers import common, loop, stage1, stage2

LOSS_RTOL = 1e-5   # cached vs image loss, float32, same key
FEATURE_ATOL = 1e-5


@pytest.fixture(scope="module")
def fusion_export(tmp_path_factory):
  """An untrained tiny stage-1 export (the quick config's CLIP): features need
  weights, not good ones."""
  cfg = config_lib.load_config("configs/synthetic.py:stage1_quick")
  folder = tmp_path_factory.mktemp("fusion") / "fusion_model"
  stage1.export_fusion_model(stage1.build_fusion_model(cfg.model, seed=0), folder)
  return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  """A tiny random VAE, 4x downsampling: 64x64 images -> 16x16x4 latents, the
  quick UNet's size. Random weights give a posterior with a real spread."""
  cfg = VAEConfig(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
                  sample_size=64)
  folder = tmp_path_factory.mktemp("vae")
  export_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(3)), folder)
  return folder


def stage2_config(synthetic_data, fusion, vae=None, *overrides):
  data_dir, name = synthetic_data
  cfg = config_lib.load_config("configs/synthetic.py:stage2_quick")
  ov = [f"data.data_dir={data_dir}", f"data.name={name}", f"fusion.path={fusion}",
        "train.async_checkpoints=False", "train.image_every=0"]
  if vae is not None:
    ov += ["model.latent=True", f"model.vae_path={vae}"]
  cfg = config_lib.apply_overrides(cfg, ov + list(overrides))
  with cfg.unlocked():
    cfg.mesh = (("data", 1), ("fsdp", 1))
  return cfg


@pytest.fixture(scope="module", params=["pixel", "latent"])
def cached(request, synthetic_data, fusion_export, vae_folder, tmp_path_factory):
  """(config, cache dir, info): the train split cached in 3 shards (12, 12, 8
  records: a partial batch inside a shard and a short last shard)."""
  vae = vae_folder if request.param == "latent" else None
  cfg = stage2_config(synthetic_data, fusion_export, vae)
  out = tmp_path_factory.mktemp(f"cache_{request.param}")
  info = cache_features.write_cache(cfg, "train", out, batch_size=8, records_per_shard=12,
                                    progress=False)
  return cfg, out, info


def first_batches(cfg, cache_dir, stage, n=8):
  """The first n train records in dataset order, as images and as cache records."""
  lc = input_pipeline.LoaderConfig(
      data_dir=cfg.data.data_dir, name=cfg.data.name, split="train", views=stage.views,
      batch_size=n, shuffle=False, num_epochs=1, drop_remainder=False)
  images = next(iter(input_pipeline.make_loader(lc, process_index=0, process_count=1)))
  records = next(iter(feature_cache.make_loader(cache_dir, lc, process_index=0,
                                                process_count=1)))
  return images, records


def test_cache_info_and_records_round_trip(cached):
  cfg, out, info = cached
  latent = cfg.model.latent
  assert info["num_records"] == 32 and info["dataset"]["split"] == "train"
  assert [s["num_records"] for s in info["shards"]] == [12, 12, 8]
  assert not (out / feature_cache.PLAN_NAME).exists()
  assert not list(out.glob("*.tmp"))
  fields = {f["name"]: f for f in info["fields"]}
  expected = (["latent_mean", "latent_logvar"] if latent else ["target"]) + [
      "tokens", "fusion", "target_pose", "pair_index"]
  assert sorted(fields) == sorted(expected)
  assert fields["target_pose"]["shape"] == [64, 64, 3] and fields["target_pose"]["dtype"] == "uint8"
  if latent:
    assert fields["latent_mean"]["shape"] == [16, 16, 4]
    assert info["scaling_factor"] == pytest.approx(0.18215)
  for key in ("fusion.path", "model.latent", "model.image_size", "model.source_encoder.kind",
              "model.dtype", "fusion.combiner_sha256"):
    assert key in info["fingerprint"]

  # What was written is what the frozen networks compute on those records.
  stage = stage2.DiffusionStage(cfg, None)
  images, records = first_batches(cfg, out, stage)
  np.testing.assert_array_equal(records["pair_index"], np.arange(8))
  np.testing.assert_array_equal(records["pair_index"], images["pair_index"])
  np.testing.assert_array_equal(records["target_pose"], images["target_pose"])
  if not latent:
    np.testing.assert_array_equal(records["target"], images["target"])
  nets = stage.frozen_def(stage.frozen_params())
  direct = nnx.jit(lambda n, b: stage2.frozen_outputs(
      n, input_pipeline.normalise(b, stage.views), encode_target=True))(nets, images)
  for name in ("tokens", "fusion") + (("latent_mean", "latent_logvar") if latent else ()):
    assert records[name].dtype == np.float32
    np.testing.assert_allclose(records[name], np.asarray(direct[name]), atol=FEATURE_ATOL)
  if latent:  # a posterior with a spread: sampling it is not taking its mean
    assert np.exp(0.5 * records["latent_logvar"]).mean() > 0.1


@pytest.mark.parametrize("cached", ["pixel"], indirect=True)
def test_bfloat16_storage_reads_back_as_computed(cached, tmp_path):
  cfg, out, _ = cached
  narrow = cache_features.write_cache(cfg, "train", tmp_path, batch_size=8,
                                      feature_dtype="bfloat16", progress=False)
  fields = {f["name"]: f for f in narrow["fields"]}
  assert fields["tokens"]["dtype"] == "bfloat16" and fields["tokens"]["compute_dtype"] == "float32"
  assert narrow["record_bytes"] < json.loads((out / feature_cache.INFO_NAME).read_text())[
      "record_bytes"]
  lc = input_pipeline.LoaderConfig(data_dir="", name="", batch_size=8, shuffle=False,
                                   num_epochs=1)
  full, half = (next(iter(feature_cache.make_loader(d, lc, process_index=0, process_count=1)))
                for d in (out, tmp_path))
  assert half["tokens"].dtype == np.float32
  np.testing.assert_allclose(half["tokens"], full["tokens"], rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(half["target_pose"], full["target_pose"])


def test_loss_from_cache_equals_loss_from_images(cached):
  cfg, out, _ = cached
  stage = stage2.DiffusionStage(cfg, None)
  images, records = first_batches(cfg, out, stage)
  model_def = common.ModelDef(stage.trainable)
  params = common.pure_params(stage.trainable)
  loss = jax.jit(lambda p, f, b, r: stage.loss_fn(model_def(p), f, b, r))
  rng = jax.random.PRNGKey(42)
  from_images, m_images = loss(params, stage.frozen_params(), images, rng)
  # No frozen networks at all: the cached path must not need them.
  from_cache, m_cache = loss(params, None, records, rng)
  np.testing.assert_allclose(float(from_cache), float(from_images), rtol=LOSS_RTOL)
  for k in ("dropped_pose", "dropped_source", "dropped_fusion"):
    assert float(m_cache[k]) == float(m_images[k])
  # ... and the key matters (noise, t, and in latent space the latent draw).
  other, _ = loss(params, None, records, jax.random.PRNGKey(43))
  assert abs(float(other) - float(from_cache)) > 1e-4


def test_writer_resumes_and_refuses_a_different_config(cached, synthetic_data, fusion_export):
  cfg, out, info = cached
  last = out / feature_cache.shard_name(2, 3)
  before = last.read_bytes()
  # An interrupted run: no info yet, its plan, a missing shard, a half-written one.
  copy = out.parent / (out.name + "_interrupted")
  shutil.copytree(out, copy)
  (copy / feature_cache.INFO_NAME).rename(copy / feature_cache.PLAN_NAME)
  (copy / last.name).unlink()
  (copy / (last.name + ".tmp")).write_bytes(b"half")
  with pytest.raises(feature_cache.CacheIncomplete, match="unfinished cache"):
    feature_cache.read_info(copy)
  with pytest.raises(feature_cache.CacheIncomplete, match="no feature cache"):
    feature_cache.read_info(out.parent / "nowhere")
  mtime = (copy / feature_cache.shard_name(0, 3)).stat().st_mtime_ns
  again = cache_features.write_cache(cfg, "train", copy, batch_size=8, progress=False)
  assert again["stats"]["last_run_records"] == 8  # only the missing shard
  assert (copy / last.name).read_bytes() == before
  assert (copy / feature_cache.shard_name(0, 3)).stat().st_mtime_ns == mtime
  assert not list(copy.glob("*.tmp")) and not (copy / feature_cache.PLAN_NAME).exists()
  # A complete cache is left alone; one for another config is not overwritten.
  assert cache_features.write_cache(cfg, "train", copy, batch_size=8,
                                    progress=False)["stats"] == again["stats"]
  other = config_lib.apply_overrides(cfg.copy_and_resolve_references(),
                                     ["model.dtype=bfloat16"])
  with pytest.raises(feature_cache.CacheMismatch, match="already holds a complete"):
    cache_features.write_cache(other, "train", copy, batch_size=8, progress=False)


def test_metadata_mismatch_errors_name_the_field(cached, capsys):
  cfg, out, info = cached

  def with_cache(*overrides):
    return config_lib.apply_overrides(cfg.copy_and_resolve_references(),
                                      [f"data.cached_features={out}", *overrides])

  assert feature_cache.check_config(with_cache())["num_records"] == 32
  cases = [(("model.image_size=(32, 32)",), "model.image_size"),
           (("model.source_encoder.kind=clip",), "model.source_encoder.kind"),
           (("model.dtype=bfloat16",), "model.dtype"),
           (("data.flip_prob=0.5",), "data.flip_prob=0.5"),
           (("data.train_split=test",), "holds split 'train'"),
           (("fusion.path=/elsewhere/fusion_model",), "fusion.path")]
  for overrides, message in cases:
    with pytest.raises(feature_cache.CacheMismatch, match=message) as e:
      feature_cache.check_config(with_cache(*overrides))
    assert "flip_prob" in message or "data_prep.cache_features" in str(e.value)
  stale = json.loads(json.dumps(info))
  stale["fingerprint"]["fusion.combiner_sha256"] = "0" * 64
  with pytest.raises(feature_cache.CacheMismatch, match="stage-1 export .* changed"):
    feature_cache.check_config(with_cache(), stale)
  # The training CLI stops before loading anything, with the message.
  capsys.readouterr()
  argv = ["--config", "configs/synthetic.py:stage2_quick", "--workdir", str(out.parent / "w"),
          f"--config.data.data_dir={cfg.data.data_dir}", f"--config.data.name={cfg.data.name}",
          f"--config.fusion.path={cfg.fusion.path}", f"--config.data.cached_features={out}",
          "--config.model.image_size=(32, 32)"]
  assert train_cli.main(argv) == 2
  assert "model.image_size" in capsys.readouterr().err


def test_cache_loader_resumes_exactly(cached):
  cfg, out, _ = cached
  lc = input_pipeline.LoaderConfig(data_dir="", name="", batch_size=8, shuffle=True, seed=3,
                                   num_epochs=None)
  it = iter(feature_cache.make_loader(out, lc, process_index=0, process_count=1))
  seen = [next(it)["pair_index"] for _ in range(5)]  # crosses an epoch (4 batches)
  assert sorted(np.concatenate(seen[:4]).tolist()) == list(range(32))
  it2 = iter(feature_cache.make_loader(out, lc, process_index=0, process_count=1))
  next(it2)
  next(it2)
  state = it2.get_state()
  it3 = iter(feature_cache.make_loader(out, lc, process_index=0, process_count=1))
  it3.set_state(state)
  np.testing.assert_array_equal(next(it3)["pair_index"], seen[2])
  # Repositioned from a step count (resuming on another number of processes).
  it4 = iter(feature_cache.make_loader(out, lc, process_index=0, process_count=1))
  it4.set_state(input_pipeline.state_after_batches(it4, 3, 8))
  np.testing.assert_array_equal(next(it4)["pair_index"], seen[3])
  # The same order as the image loader: record i of the cache is record i of the split.
  views = {"target_pose": ("target_pose_image", (64, 64), "unit")}
  images = iter(input_pipeline.make_loader(
      input_pipeline.LoaderConfig(data_dir=cfg.data.data_dir, name=cfg.data.name, views=views,
                                  batch_size=8, shuffle=True, seed=3, num_epochs=None),
      process_index=0, process_count=1))
  for expected in seen[:2]:
    np.testing.assert_array_equal(next(images)["pair_index"], expected)


@pytest.mark.parametrize("cached", ["pixel"], indirect=True)  # the loss tests cover both
def test_training_from_the_cache_and_resume_are_exact(cached, tmp_path):
  cfg, out, _ = cached
  run = lambda *o: config_lib.apply_overrides(cfg.copy_and_resolve_references(),
                                              [f"data.cached_features={out}", *o])
  full = loop.train_and_evaluate(run(), tmp_path / "full")
  assert full["step"] == 6 and np.isfinite(full["train_loss"])
  assert np.isfinite(full["eval_loss"])  # evaluation still runs on test images
  # Evaluation does not touch the parameters: skip it in the interrupted run.
  loop.train_and_evaluate(run("train.stop_at_step=3", "train.eval_every=0"), tmp_path / "resumed")
  resumed = loop.train_and_evaluate(run("train.eval_every=0"), tmp_path / "resumed")
  assert resumed["step"] == 6
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)))
  _, a, _ = loop.restore_trained(run(), tmp_path / "full", mesh)
  _, b, _ = loop.restore_trained(run(), tmp_path / "resumed", mesh)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
