"""Stage-1 training: the loss against its definition, the combiner against a
PyTorch CLIP4Cir combiner, exact resume, sharded == unsharded, the
non-finite guard, corrupt checkpoints and config errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from fpdm_jax import config_lib, losses, sharding
from fpdm_jax.models.fusion import Combiner
from fpdm_jax.trainers import common, loop


def test_fusion_infonce_matches_its_definition():
  rng = np.random.default_rng(0)
  t, s, f = (rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3))
  loss, m = losses.fusion_infonce_loss(t, s, f, temperature=0.07, l1_weight=1e-4)
  T, F, S = np.concatenate([t, s]), np.concatenate([f, s]), np.concatenate([s, s])
  n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  C = n(T) @ n(F).T / 0.07
  lse = np.log(np.exp(C - C.max(1, keepdims=True)).sum(1)) + C.max(1)
  want = np.mean(lse - np.diag(C)) + 1e-4 * np.mean(np.abs(S - F))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  ranks = 1 + (C > np.diag(C)[:, None]).sum(1)
  np.testing.assert_allclose(m["mean_rank"], ranks.mean())
  np.testing.assert_allclose(m["top1"], (ranks == 1).mean())


class TorchCombiner(torch.nn.Module):
  """CLIP4Cir's Combiner with FPDM's sizes, written from DESIGN.md."""

  def __init__(self, d):
    super().__init__()
    self.pose_projection = torch.nn.Linear(d, d)
    self.image_projection = torch.nn.Linear(d, d)
    self.combiner_layer = torch.nn.Linear(2 * d, d)
    self.dynamic_scalar = torch.nn.Sequential(torch.nn.Linear(2 * d, d), torch.nn.ReLU(),
                                              torch.nn.Dropout(0.5), torch.nn.Linear(d, 1),
                                              torch.nn.Sigmoid())
    self.output_layer = torch.nn.Linear(d, d)
    self.dropout = torch.nn.Dropout(0.5)

  def forward(self, x_img, x_pose):
    p = self.dropout(torch.relu(self.pose_projection(x_pose)))
    q = self.dropout(torch.relu(self.image_projection(x_img)))
    r = torch.cat([p, q], -1)
    h = self.dropout(torch.relu(self.combiner_layer(r)))
    lam = self.dynamic_scalar(r)
    out = self.output_layer(h) + lam * x_pose + (1 - lam) * x_img
    return torch.nn.functional.normalize(out, dim=-1)


def test_combiner_matches_torch_reference():
  torch.manual_seed(0)
  ref = TorchCombiner(16).eval()
  ours = Combiner(16, rngs=nnx.Rngs(0))
  names = {"pose_projection": "pose_projection", "image_projection": "image_projection",
           "combiner_layer": "combiner_layer", "dynamic_scalar.0": "dynamic_scalar_1",
           "dynamic_scalar.3": "dynamic_scalar_2", "output_layer": "output_layer"}
  for t_name, o_name in names.items():
    lin = ref.get_submodule(t_name)
    getattr(ours, o_name).kernel.set_value(jnp.asarray(lin.weight.detach().numpy().T))
    getattr(ours, o_name).bias.set_value(jnp.asarray(lin.bias.detach().numpy()))
  x, p = torch.randn(4, 16), torch.randn(4, 16)
  want = ref(x, p).detach().numpy()
  got = ours(jnp.asarray(x.numpy()), jnp.asarray(p.numpy()))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Dropout is active in training mode and keyed.
  a = ours(jnp.asarray(x.numpy()), jnp.asarray(p.numpy()), deterministic=False,
           rngs=jax.random.PRNGKey(1))
  assert not np.allclose(a, got)


def quick_config(synthetic_data, **train):
  cfg = config_lib.load_config("configs/synthetic.py:stage1_quick")
  data_dir, name = synthetic_data
  overrides = [f"data.data_dir={data_dir}", f"data.name={name}",
               "train.async_checkpoints=False"]
  overrides += [f"train.{k}={v!r}" for k, v in train.items()]
  cfg = config_lib.apply_overrides(cfg, overrides)
  with cfg.unlocked():
    cfg.mesh = (("data", 1), ("fsdp", 1))  # one device unless a test asks for more
  return cfg


def final_params(workdir):
  """The trained parameters, read back through the stage-1 export."""
  from fpdm_jax.trainers.stage1 import load_fusion_model
  return common.pure_params(load_fusion_model(workdir / "fusion_model"))


def assert_trees_equal(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if atol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(synthetic_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("s1_full")
  summary = loop.train_and_evaluate(quick_config(synthetic_data), workdir)
  return workdir, summary


def test_quick_run_trains_and_reports(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["step"] == 6 and summary["nonfinite_total"] == 0
  assert np.isfinite(summary["train_loss"]) and "eval_top1" in summary
  assert (workdir / "config.json").is_file()
  assert any((workdir / "tensorboard").iterdir())
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_resume_reaches_the_same_parameters_bitwise(synthetic_data, uninterrupted, tmp_path):
  loop.train_and_evaluate(quick_config(synthetic_data, stop_at_step=2), tmp_path)
  assert not (tmp_path / "fusion_model").exists()
  summary = loop.train_and_evaluate(quick_config(synthetic_data), tmp_path)
  assert summary["step"] == 6
  assert_trees_equal(final_params(tmp_path), final_params(uninterrupted[0]))


def test_corrupt_latest_checkpoint_falls_back_to_previous(synthetic_data, uninterrupted,
                                                          tmp_path, caplog):
  shutil.copytree(uninterrupted[0] / "checkpoints", tmp_path / "checkpoints")
  # Damage every file of the step-6 state as a crash mid-copy would.
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  caplog.set_level("INFO")
  summary = loop.train_and_evaluate(quick_config(synthetic_data, num_steps=6), tmp_path)
  assert "cannot be read" in caplog.text and "step 6" in caplog.text
  assert "Resumed from the checkpoint at step 3" in caplog.text
  assert summary["step"] == 6
  assert_trees_equal(final_params(tmp_path), final_params(uninterrupted[0]))


def test_eight_devices_match_one_device(synthetic_data, uninterrupted, tmp_path):
  cfg = quick_config(synthetic_data)
  with cfg.unlocked():
    cfg.mesh = (("data", 4), ("fsdp", 2))
    cfg.sharding.min_fsdp_size = 1  # shard even the tiny kernels along fsdp
  summary = loop.train_and_evaluate(cfg, tmp_path)
  ref = json.loads((uninterrupted[0] / "train_summary.json").read_text())
  np.testing.assert_allclose(summary["train_loss"], ref["train_loss"], rtol=1e-4)
  # Different reduction orders: equal to float32 round-off, not bitwise.
  assert_trees_equal(final_params(tmp_path), final_params(uninterrupted[0]), atol=1e-4)


def test_nonfinite_steps_are_skipped_then_stop_the_run(synthetic_data, monkeypatch, tmp_path):
  loop.train_and_evaluate(quick_config(synthetic_data, stop_at_step=3), tmp_path)
  real = losses.fusion_infonce_loss

  def poisoned(*args, **kw):
    loss, m = real(*args, **kw)
    return loss * jnp.nan, m

  monkeypatch.setattr(losses, "fusion_infonce_loss", poisoned)
  with pytest.raises(common.NonFiniteError, match="last good checkpoint"):
    loop.train_and_evaluate(quick_config(synthetic_data, max_nonfinite_in_a_row=2), tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]  # nothing written after the NaNs started


def test_config_errors_name_the_key():
  cfg = config_lib.load_config("configs/synthetic.py:stage1_quick")
  with pytest.raises(config_lib.ConfigError, match="'trian'"):
    config_lib.apply_overrides(cfg, ["trian.num_steps=3"])
  with pytest.raises(config_lib.ConfigError, match="has no 'num_step'.*num_steps"):
    config_lib.apply_overrides(cfg, ["train.num_step=3"])
  with pytest.raises(config_lib.ConfigError, match="is a int"):
    config_lib.apply_overrides(cfg, ["train.num_steps=fast"])
  with pytest.raises(config_lib.ConfigError, match="variant"):
    config_lib.load_config("configs/synthetic.py:stage3")
  for variant in ("stage1", "stage2"):  # the reference configs load and validate
    ref = config_lib.load_config(f"configs/fpdm_deepfashion.py:{variant}")
    assert ref.model.image_size == (512, 352) if variant == "stage2" else ref.train.batch_size == 48
  cfg = config_lib.apply_overrides(cfg, ["optim.lr=1", "train.batch_size=16"])
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.train.batch_size == 16
  # A dict literal replaces a whole sub-config; a non-dict for one still fails.
  cfg2 = config_lib.load_config("configs/synthetic.py:stage2_quick")
  config_lib.apply_overrides(cfg2, ['diffusion.scheduler_overrides={"prediction_type": "sample"}'])
  assert cfg2.diffusion.scheduler_overrides.to_dict() == {"prediction_type": "sample"}
  with pytest.raises(config_lib.ConfigError, match="scheduler_overrides"):
    config_lib.apply_overrides(cfg2, ["diffusion.scheduler_overrides=3"])


def test_train_cli_reports_config_errors(capsys):
  from fpdm_jax import train
  assert train.main(["--config", "configs/synthetic.py:stage1_quick", "--workdir", "/tmp/x",
                     "--config.train.nope=1"]) == 2
  assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_gradient_accumulation_is_one_big_batch_on_an_fsdp_mesh():
  """grad_accum=4 over a batch updates the parameters as one step over the
  whole batch (a loss that is a mean over examples and ignores the RNG), with
  the parameters FSDP-sharded over 8 devices."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 8)))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
  batch = {"x": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}

  def loss_fn(p, frozen, b, key):
    err = jnp.tanh(b["x"] @ p["w"] + p["b"]) - b["y"]
    return jnp.mean(err ** 2), {"err": jnp.mean(jnp.abs(err))}

  tx = optax.sgd(0.5)  # linear in the gradient: the parameter change is the gradient
  out = {}
  for k in (1, 4):
    state = jax.device_put(common.init_state(params, tx, seed=0, ema=False),
                           NamedSharding(mesh, P()))
    state["params"] = jax.device_put(params, shardings)
    step = jax.jit(common.make_train_step(loss_fn, tx, grad_accum=k))
    out[k] = step(state, None, batch)
  new1, m1 = out[1]
  new4, m4 = out[4]
  assert new4["params"]["w"].sharding.is_equivalent_to(shardings["w"], 2)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["err"], m1["err"], rtol=1e-6)
  for name in params:
    assert np.abs(np.asarray(new1["params"][name]) - np.asarray(params[name])).max() > 1e-3
    np.testing.assert_allclose(new4["params"][name], new1["params"][name], atol=1e-6)


def test_train_cli_points_the_compilation_cache_at_the_config(monkeypatch, tmp_path):
  from fpdm_jax import train
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    train.use_compilation_cache(str(tmp_path / "xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    # The user's environment wins; "" leaves JAX alone.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    train.use_compilation_cache(str(tmp_path / "other"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    train.use_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
