"""Memory plans on the tiny synthetic configs: the abstract batch is what the
loader feeds, the per-device bytes are the shards', the planned executable is
the real step's, fsdp halves the large kernels, the batch search, the CLI."""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fpdm_jax import config_lib, plan, sharding
from fpdm_jax.trainers import common, loop, stage1, stage2

STAGE1 = "configs/synthetic.py:stage1_quick"
STAGE2 = "configs/synthetic.py:stage2_quick"


def load(spec, *overrides):
  return config_lib.apply_overrides(config_lib.load_config(spec), list(overrides))


def mesh_of(text):
  return sharding.make_mesh(plan.parse_mesh(text))


def test_parse_mesh():
  assert plan.parse_mesh("data=4,fsdp=2") == (("data", 4), ("fsdp", 2))
  assert plan.parse_mesh(" fsdp = 8 ") == (("fsdp", 8),)
  for bad in ("data=4,fsdp", "data=0", "data=-1", "data=4,data=2", "model=8", ""):
    with pytest.raises(plan.PlanError):
      plan.parse_mesh(bad)


def test_find_max_batch_doubles_then_bisects():
  for step in (1, 3):
    for largest in (0, 1, 2, 5, 6, 7, 64, 100):
      tried = []

      def fits(b):
        tried.append(b)
        return b <= largest * step
      got = plan.find_max_batch(fits, step=step, limit=1000)
      assert got == largest * step
      assert all(b % step == 0 for b in tried)
      assert len(tried) <= 2 * math.log2(largest + 2) + 2  # no linear scan
  # The limit caps the search.
  assert plan.find_max_batch(lambda b: True, limit=50) == 50
  assert plan.find_max_batch(lambda b: True, step=3, limit=50) == 48


def test_abstract_batch_is_what_the_loader_feeds(synthetic_data):
  cfg = load(STAGE2, f"data.data_dir={synthetic_data[0]}", f"data.name={synthetic_data[1]}")
  mesh = mesh_of("data=4,fsdp=2")
  stage = plan.abstract_stage(cfg, mesh, load(STAGE1))
  local = next(iter(loop.make_loader(cfg, stage.views, "train", train=True)))
  real = sharding.global_batch(local, mesh)
  want = plan.abstract_batch(stage.views, cfg.train.batch_size, mesh)
  assert sorted(real) == sorted(want)
  for k, x in real.items():
    assert (x.shape, x.dtype, x.sharding) == (want[k].shape, want[k].dtype, want[k].sharding), k


def shard_bytes_by_hand(tree, fsdp, min_size):
  """What one device holds under the config's rule (".*" -> fsdp): a leaf of
  at least ``min_size`` elements with a dimension divisible by ``fsdp`` is
  split in ``fsdp``, the rest replicated."""
  total = 0
  for x in jax.tree.leaves(tree):
    n = math.prod(x.shape) * x.dtype.itemsize
    split = fsdp > 1 and math.prod(x.shape) >= min_size and any(d % fsdp == 0 for d in x.shape)
    total += n // fsdp if split else n
  return total


@pytest.fixture(scope="module")
def stage1_planner():
  cfg = load(STAGE1, "sharding.min_fsdp_size=1024", "train.ema_decay=0.99")
  return cfg, plan.Planner(cfg, mesh_of("data=4,fsdp=2"))


def test_per_device_bytes_are_the_shards_and_fsdp_halves_kernels(stage1_planner):
  cfg, planner = stage1_planner
  replicated = plan.Planner(cfg, mesh_of("data=8")).held_bytes(2)
  params = planner.setup.abstract["params"]
  for fsdp, held in ((1, replicated), (2, planner.held_bytes(2))):
    assert held["params"] == shard_bytes_by_hand(params, fsdp, cfg.sharding.min_fsdp_size)
    assert held["ema"] == held["params"]
    # AdamW: mu and nu shard like the parameters (+ replicated step counts).
    assert 0 <= held["opt_state"] - 2 * held["params"] <= 16
  big = [x for x in jax.tree.leaves(params)
         if math.prod(x.shape) >= cfg.sharding.min_fsdp_size and any(d % 2 == 0 for d in x.shape)]
  big_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in big)
  assert big and replicated["params"] - held["params"] == big_bytes // 2

  # The executable is one device's program: its arguments are exactly these
  # shards, less the fields the loss never reads (keypoints, pair index).
  p = planner.plan(2)
  assert p.resident == plan.per_device_bytes(planner.setup.abstract) + p.frozen + p.inputs
  batch = plan.abstract_batch(planner.setup.stage.views, p.global_batch, planner.mesh)
  assert p.argument == p.resident - plan.per_device_bytes(
      {k: batch[k] for k in plan.KEPT_FIELDS})
  assert p.alias > 2 * p.params  # the state is donated: parameters and moments
  assert p.num_params == common.count_params(params)


def test_planned_memory_is_the_real_train_steps(stage1_planner):
  """The real set-up (weights initialised, state and batch on the devices)
  compiles to the executable the plan measured."""
  cfg, planner = stage1_planner
  mesh = planner.mesh
  setup = loop.build_setup(cfg, mesh)
  abstract = planner.inputs(2)[2]
  batch = sharding.global_batch({k: np.zeros(x.shape, x.dtype) for k, x in abstract.items()},
                                mesh)
  step = loop.jit_train_step(cfg, setup, mesh, jax.tree.map(lambda x: x.sharding, batch))
  state = setup.init(setup.params)
  compiled = step.lower(state, setup.frozen, batch).compile()
  real = plan.memory_stats(compiled)
  assert real == {k: getattr(planner.plan(2), k) for k in real}
  state, metrics = compiled(state, setup.frozen, batch)  # and it is the step that trains
  assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_stage2_plan_is_the_program_of_the_loaded_networks(tmp_path):
  """Stage 2's abstract networks (fusion model from the export's config, no
  weight paths) lower to the same step as ``stage2.build`` loading the export."""
  fusion = nnx.eval_shape(lambda: stage1.build_fusion_model(load(STAGE1).model, seed=0))
  nnx.update(fusion, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.state(fusion)))
  stage1.export_fusion_model(fusion, tmp_path / "fusion_model")  # values do not matter here
  cfg = load(STAGE2, f"fusion.path={tmp_path / 'fusion_model'}", "train.grad_accum=2")
  mesh = mesh_of("data=4,fsdp=2")

  def lowered(stage):
    setup = loop.build_setup(cfg, mesh, stage)
    args = (setup.abstract, setup.frozen, plan.abstract_batch(stage.views, 16, mesh))
    step = loop.jit_train_step(cfg, setup, mesh, jax.tree.map(lambda x: x.sharding, args[2]))
    return step.lower(*args).as_text()

  views = {}

  def loaded():  # build() as training calls it: reads fusion.path
    trainable, frozen, v = stage2.build(cfg)
    views.update(v)
    return trainable, frozen
  networks = (*nnx.eval_shape(loaded), views)
  assert lowered(plan.abstract_stage(cfg, mesh)) == lowered(
      stage2.DiffusionStage(cfg, mesh, networks))


def test_the_sampler_plan():
  cfg = load(STAGE2, "model.remat=True")  # as the reference config: the sampler traces with it
  p = plan.Planner(cfg, mesh_of("data=8"), "sample", load(STAGE1)).plan(1)
  assert p.opt_state == p.ema == p.alias == 0
  assert p.output == 64 * 64 * 3 * 4  # the images: 1 per device, float32
  assert p.temp > 0 and p.argument <= p.resident
  with pytest.raises(plan.PlanError, match="stage 2's sampler"):
    plan.Planner(load(STAGE1), mesh_of("data=8"), "sample")


def test_find_max_batch_against_a_small_budget(stage1_planner):
  planner = stage1_planner[1]
  one, two = planner.plan(1).total, planner.plan(2).total
  assert two > one
  budget_gib = (one + two) / 2 / plan.GIB / 0.9  # 1 fits, 2 does not, after 10% headroom
  assert plan.max_batches(planner, accelerators=(("tiny", budget_gib), ("none", 1e-9))) == {
      "tiny": 1, "none": 0}
  assert planner.plan(1).fits(budget_gib) and not planner.plan(2).fits(budget_gib)
  assert sorted(planner.plans) == [1, 2]


def test_cli_errors_and_json(tmp_path, capsys):
  run = lambda *a: plan.main(["--config", STAGE1, *a])
  assert run("--mesh", "data=x", "--batch", "1") == 2
  assert "expected AXIS=SIZE" in capsys.readouterr().err
  assert run("--mesh", "data=4", "--batch", "3", "--config.train.grad_accum=2") == 2
  assert "multiple of train.grad_accum=2" in capsys.readouterr().err
  assert run("--mesh", "data=4") == 2
  assert run("--mesh", "data=4", "--batch", "1", "--config.train.nope=1") == 2
  assert "unknown config key" in capsys.readouterr().err
  assert run("--mesh", "data=4", "--batch", "1", "--hbm", "L4") == 2
  out = tmp_path / "plan.json"
  assert run("--mesh", "data=4,fsdp=2", "--batch", "2", "--hbm", "toy=1e-9",
             "--config.sharding.min_fsdp_size=1024", "--config.train.ema_decay=0.99",
             "--json", str(out)) == 0
  text = capsys.readouterr().out
  assert "TPU v5e" in text and "toy" in text and "XLA:CPU estimate" in text
  saved = json.loads(out.read_text())["plan"]
  assert saved["fits"]["TPU v5e"] and not saved["fits"]["toy"]
  assert saved["total"] == (saved["resident"] + saved["output"] - saved["alias"]
                            + saved["temp"])


def test_cli_simulates_the_mesh_devices(capsys):
  """As a command it starts JAX with as many CPU devices as the mesh has: 16
  here, so the mesh builds and the bad batch is what fails."""
  proc = subprocess.run(
      [sys.executable, "-m", "fpdm_jax.plan", "--config", STAGE1, "--mesh", "data=8,fsdp=2",
       "--batch", "3", "--config.train.grad_accum=2"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "multiple of train.grad_accum=2" in proc.stderr
  with pytest.raises(SystemExit) as e:
    plan.main(["--help"])
  assert e.value.code == 0 and "--find-max-batch" in capsys.readouterr().out
