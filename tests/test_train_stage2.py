"""Stage 2 end to end on the synthetic data: training, guidance, per-sample
seeding, evaluation (with LPIPS/FID from random reference weights) and the
pose-transfer CLI on user inputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from fpdm_jax import config_lib, evaluate, sample as sample_cli, sampling, sharding, skeleton
from fpdm_jax.trainers import loop, stage2


def configs(synthetic_data, fusion_path=None, stage="stage1"):
  data_dir, name = synthetic_data
  cfg = config_lib.load_config(f"configs/synthetic.py:{stage}_quick")
  overrides = [f"data.data_dir={data_dir}", f"data.name={name}", "train.async_checkpoints=False"]
  if fusion_path:
    overrides.append(f"fusion.path={fusion_path}")
  cfg = config_lib.apply_overrides(cfg, overrides)
  with cfg.unlocked():
    cfg.mesh = (("data", 1), ("fsdp", 1))
  return cfg


@pytest.fixture(scope="module")
def stage2_run(synthetic_data, tmp_path_factory):
  s1 = tmp_path_factory.mktemp("s1")
  loop.train_and_evaluate(configs(synthetic_data), s1)
  s2 = tmp_path_factory.mktemp("s2")
  summary = loop.train_and_evaluate(configs(synthetic_data, s1 / "fusion_model", "stage2"), s2)
  return s2, summary


def test_stage2_trains_reports_and_exports(stage2_run):
  workdir, summary = stage2_run
  assert summary["step"] == 6 and np.isfinite(summary["train_loss"])
  assert np.isfinite(summary["eval_loss"])
  assert (workdir / "export" / "unet" / "config.json").is_file()
  assert (workdir / "export" / "source_projection.safetensors").is_file()
  events = list((workdir / "tensorboard").glob("events.*"))
  assert events and max(e.stat().st_size for e in events) > 1000  # holds the sample grid


def test_pixel_unshuffle_round_trip():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  y = stage2.space_to_depth(x, 4)
  assert y.shape == (2, 2, 3, 48)
  np.testing.assert_array_equal(stage2.depth_to_space(y, 4), x)
  # A 4x4 block of one pixel position lands in one spatial cell.
  np.testing.assert_array_equal(y[0, 0, 0].reshape(4, 4, 3), x[0, :4, :4])


def test_three_way_guidance_formula():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(5,)), jnp.float32)

  def unet(x, t, ctx, pose_features, class_embedding):  # a toy, per sample, nonlinear
    c = jnp.tanh(ctx.mean(axis=(1, 2)))[:, None, None, None]
    f = jnp.sin(class_embedding.mean(axis=1))[:, None, None, None]
    return x * 0.5 + pose_features * w[0] + c * w[1] + f * w[2] + c * f + t

  cond = sampling.Conditions(jnp.ones((2, 3, 3, 1)), jnp.full((2, 4, 2), 2.0), jnp.full((2, 6), 3.0))
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
  zero = jax.tree.map(jnp.zeros_like, cond)
  e_u = unet(x, 1, zero.context, zero.pose, zero.fusion)
  e_s = unet(x, 1, cond.context, cond.pose, zero.fusion)
  e_f = unet(x, 1, cond.context, cond.pose, cond.fusion)
  got = sampling.guided_prediction(unet, x, 1, cond, 2.0)
  np.testing.assert_allclose(got, e_u + 2 * (e_s - e_u) + 2 * (e_f - e_s), rtol=1e-6)
  np.testing.assert_allclose(sampling.guided_prediction(unet, x, 1, cond, 1.0), e_f, rtol=1e-6)


def test_a_pair_gives_the_same_image_whatever_the_batch(stage2_run):
  workdir, _ = stage2_run
  config = config_lib.load_json_config(workdir / "config.json")
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)))
  setup, params, _ = loop.restore_trained(config, workdir, mesh)
  stage = setup.stage
  cfg = configs((config.data.data_dir, config.data.name), config.fusion.path, "stage2")
  local = next(iter(loop.make_loader(cfg, stage.views, "test", train=False)))
  fn = stage.sample_fn(setup.model_def)
  run = lambda b: np.asarray(fn(params, setup.frozen, b, sampling.sample_keys(7, b["pair_index"])))
  both = run({k: v[:4] for k, v in local.items()})
  alone = run({k: v[2:3] for k, v in local.items()})
  np.testing.assert_allclose(alone[0], both[2], atol=1e-4)
  assert not np.allclose(both[0], both[1])
  # Eight devices, same pairs: the same images.
  mesh8 = sharding.make_mesh((("data", 8), ("fsdp", 1)))
  batch8 = sharding.global_batch({k: np.concatenate([v[:4], v[:4]]) for k, v in local.items()},
                                 mesh8)
  frozen8 = jax.device_put(setup.frozen, sharding.replicated(mesh8))
  params8 = jax.device_put(params, sharding.replicated(mesh8))
  out8 = np.asarray(fn(params8, frozen8, batch8, sampling.sample_keys(7, batch8["pair_index"])))
  np.testing.assert_allclose(out8[:4], both, atol=1e-4)


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
  """Randomly initialised torchvision-layout Inception and LPIPS weight files."""
  from tests.test_metrics import TAlexNet, TInception3, TLPIPS
  folder = tmp_path_factory.mktemp("weights")
  torch.manual_seed(0)
  torch.save(TInception3(transform_input=True).state_dict(), folder / "inception.pth")
  alex = TAlexNet()
  torch.save(alex.state_dict(), folder / "alexnet.pth")
  torch.save(TLPIPS(alex).lin_state_dict(), folder / "alex.pth")
  return folder


def test_evaluate_writes_images_metrics_and_report(stage2_run, metric_weights, capsys):
  workdir, _ = stage2_run
  code = evaluate.main(["--workdir", str(workdir), "--limit", "3", "--config.eval.batch_size=2",
                        "--inception", str(metric_weights / "inception.pth"),
                        "--lpips-alexnet", str(metric_weights / "alexnet.pth"),
                        "--lpips-lin", str(metric_weights / "alex.pth"),
                        "--fid-reference-limit", "2"])
  assert code == 0
  out = workdir / "eval" / "step_6"
  results = json.loads((out / "metrics.json").read_text())
  assert results["num_pairs"] == 3 and results["fid_reference"] == "test"
  for res in ("176x256", "352x512"):
    m = results["resolutions"][res]
    assert m["num_images"] == 3
    assert 0 < m["ssim"] < 1 and 0 < m["ssim_256"] < 1 and 3 < m["psnr"] < 40
    assert m["lpips"] > 0 and np.isfinite(m["fid"])
  images = sorted(p.name for p in (out / "images").iterdir())
  assert len(images) == 3 and images[0].startswith("00000_pose_")
  assert (out / "samples_grid.png").is_file()
  report = (out / "report.md").read_text()
  assert "| 352x512 |" in report and "FID reference set: test" in report


def test_evaluate_reports_missing_weights_as_skipped(stage2_run):
  workdir, _ = stage2_run
  assert evaluate.main(["--workdir", str(workdir), "--limit", "2", "--step", "6"]) == 0
  m = json.loads((workdir / "eval" / "step_6" / "metrics.json").read_text())
  assert m["resolutions"]["176x256"]["fid"] == "skipped"
  assert m["resolutions"]["176x256"]["lpips"] == "skipped"
  assert evaluate.main(["--workdir", str(workdir), "--limit", "1",
                        "--inception", "/nonexistent/inception.pth"]) == 2


def test_sample_cli_on_user_inputs(stage2_run, synthetic_data, tmp_path, capsys):
  workdir, _ = stage2_run
  from data_prep import synthetic_people
  pair = synthetic_people.make_pair(0, "test", 1, 220, 150)
  Image.fromarray(pair["source_image"]).save(tmp_path / "person.jpg")
  k = pair["target_keypoints"]
  vis = skeleton.visible(k)
  k256 = np.where(vis[:, None], np.stack([k[:, 0] * 176 / 150 + 40, k[:, 1] * 256 / 220], -1), -1)
  (tmp_path / "pose.txt").write_text("".join(f"{x:.2e} {y:.2e}\n" for x, y in k256))
  people = {"people": [{"pose_keypoints_2d": [v for (x, y), ok in zip(k, vis)
                                              for v in ((float(x), float(y), 0.9) if ok else (0, 0, 0))]}]}
  (tmp_path / "pose.json").write_text(json.dumps(people))
  Image.fromarray(skeleton.render_pose_image(k, (220, 150))).save(tmp_path / "pose.png")
  for pose, num in (("pose.txt", 1), ("pose.json", 2), ("pose.png", 1)):
    out = tmp_path / f"out_{pose}.png"
    assert sample_cli.main(["--workdir", str(workdir), "--source", str(tmp_path / "person.jpg"),
                            "--pose", str(tmp_path / pose), "--out", str(out),
                            "--num", str(num), "--steps", "2"]) == 0
  assert np.asarray(Image.open(tmp_path / "out_pose.txt.png")).shape == (64, 64, 3)
  assert (tmp_path / "out_pose.json-1.png").is_file()
  # Bad input: clear errors, exit code 2.
  (tmp_path / "short.txt").write_text("1 2\n" * 17)
  (tmp_path / "broken.jpg").write_bytes(b"not an image")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
  capsys.readouterr()
  for src, pose, message in (("person.jpg", "short.txt", "expected 18 lines"),
                             ("broken.jpg", "pose.txt", "not a readable image"),
                             ("person.jpg", "black.png", "empty"),
                             ("person.jpg", "missing.txt", "file not found")):
    assert sample_cli.main(["--workdir", str(workdir), "--source", str(tmp_path / src),
                            "--pose", str(tmp_path / pose), "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err


def test_scheduler_overrides_apply_to_the_builtin_schedule():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(scheduler="sd21",
                                       scheduler_overrides={"prediction_type": "epsilon"}))
  assert stage2.scheduler_config(cfg).prediction_type == "epsilon"
  cfg.scheduler_overrides = {}
  assert stage2.scheduler_config(cfg).prediction_type == "v_prediction"


def test_ema_warms_up_instead_of_averaging_in_the_initialisation():
  import optax
  from fpdm_jax.trainers import common
  tx = optax.sgd(1.0)
  step = jax.jit(common.make_train_step(lambda p, f, b, r: (jnp.sum(p["w"] * b["x"]), {}), tx,
                                        ema_decay=0.999))
  state = common.init_state({"w": jnp.zeros(())}, tx, seed=0, ema=True)
  state, _ = step(state, {}, {"x": jnp.ones(())})
  # Step 0: decay min(0.999, 1/10) = 0.1, so the EMA is 90% the new weights (-1).
  np.testing.assert_allclose(state["ema"]["w"], -0.9, rtol=1e-6)


def test_noise_offset_in_folded_pixel_space_is_one_shift_per_colour():
  key = jax.random.PRNGKey(0)
  off = stage2.offset_noise(key, 2, 48, fold=4)
  image = stage2.depth_to_space(jnp.broadcast_to(off, (2, 3, 5, 48)), 4)  # [2, 12, 20, 3]
  # Unfolded, the offset is a flat brightness shift per image and colour ...
  np.testing.assert_array_equal(image, jnp.broadcast_to(image[:, :1, :1], image.shape))
  # ... drawn independently per colour and image, like the latent-space one.
  assert len(np.unique(np.asarray(image[:, 0, 0]))) == 6
  assert stage2.offset_noise(key, 2, 4).shape == (2, 1, 1, 4)
