"""The training loop both stages share: ``train_and_evaluate(config, workdir)``.

A stage (``stage1.FusionStage``, ``stage2.DiffusionStage``) supplies the
trainable module, the frozen networks, the input views it needs, its loss,
its evaluation and its image reports; this loop owns everything else: the
mesh and shardings, the jitted step, checkpoints and exact resume, the
non-finite guard, and CLU reports.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from clu import metric_writers, metrics as clu_metrics, parameter_overview, periodic_actions

from fpdm_jax import input_pipeline, sharding
from fpdm_jax.trainers import adamw, common


def _stage_class(name: str):
  import importlib
  stages = {"stage1": "FusionStage", "stage2": "DiffusionStage"}
  if name not in stages:
    raise ValueError(f"config.stage={name!r}: one of {sorted(stages)}")
  return getattr(importlib.import_module(f"fpdm_jax.trainers.{name}"), stages[name])


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def make_loader(config, views, split: str, *, train: bool):
  d = config.data
  cfg = input_pipeline.LoaderConfig(
      data_dir=d.data_dir, name=d.name, split=split, views=views,
      batch_size=config.train.batch_size if train else config.eval.batch_size,
      shuffle=train, seed=config.seed, num_epochs=None if train else 1,
      flip_prob=d.flip_prob if train else 0.0, pose_canvas_scale=d.pose_canvas_scale,
      worker_count=d.worker_count, drop_remainder=train)
  if train and d.get("cached_features"):
    from fpdm_jax import feature_cache
    return feature_cache.make_loader(d.cached_features, cfg)
  return input_pipeline.make_loader(cfg)


def check_cached_features(config: ml_collections.ConfigDict) -> None:
  """Before anything is loaded: a feature cache must suit the config."""
  if not config.data.get("cached_features"):
    return
  from fpdm_jax import feature_cache
  if config.stage != "stage2":
    raise feature_cache.CacheMismatch(
        f"data.cached_features is for stage 2 (the config's stage is {config.stage})")
  info = feature_cache.check_config(config)
  logging.info("Training from the feature cache %s (%d records of %s/%s): the frozen "
               "networks do not run in the train step", config.data.cached_features,
               info["num_records"], info["dataset"]["name"], info["dataset"]["split"])


def metric_collection(names):
  return clu_metrics.Collection.create(
      **{n: clu_metrics.Average.from_output(n) for n in names})


@dataclasses.dataclass
class Setup:
  """Everything about a run that follows from its config, before any data."""
  stage: Any
  model_def: common.ModelDef
  tx: adamw.AdamW
  params: Any            # initial trainable parameters (host)
  state_sh: dict         # shardings of the train state
  frozen: Any            # frozen networks' parameters, on the mesh
  frozen_sh: Any
  init: Any              # jitted params -> train state
  abstract: Any          # abstract train state with shardings (for restoring)


def build_setup(config: ml_collections.ConfigDict, mesh, stage=None) -> Setup:
  """``stage``: one already built. Built abstractly (``fpdm_jax.plan``), its
  frozen parameters stay abstract (with their shardings) instead of being put
  on the devices."""
  tc = config.train
  stage = stage if stage is not None else _stage_class(config.stage)(config, mesh)
  module = stage.trainable
  model_def = common.ModelDef(module)
  params = common.pure_params(module)
  tx = common.make_optimizer(config.optim, tc.num_steps)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  params_sh = common.tree_shardings(params, mesh, rules, config.sharding.min_fsdp_size)
  repl = sharding.replicated(mesh)
  opt_shape = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, params_sh,
                                 transform_non_params=lambda _: repl)
  use_ema = tc.ema_decay > 0
  state_sh = {"step": repl, "params": params_sh, "opt_state": opt_sh,
              "ema": params_sh if use_ema else None, "rng": repl,
              "nonfinite_in_a_row": repl, "nonfinite_total": repl}
  frozen = stage.frozen_params()
  frozen_sh = common.tree_shardings(frozen, mesh, rules, config.sharding.min_fsdp_size)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
    frozen = common.abstract_with_shardings(frozen, frozen_sh)
  else:
    frozen = jax.device_put(frozen, frozen_sh)
  init = jax.jit(lambda p: common.init_state(p, tx, seed=config.seed, ema=use_ema),
                 out_shardings=state_sh)
  abstract = common.abstract_with_shardings(jax.eval_shape(init, params), state_sh)
  return Setup(stage, model_def, tx, params, state_sh, frozen, frozen_sh, init, abstract)


def jit_train_step(config: ml_collections.ConfigDict, setup: Setup, mesh, batch_sh):
  """The train step as the loop runs it (``fpdm_jax.plan`` compiles this same
  function for its memory plans)."""
  tc = config.train
  stage, model_def = setup.stage, setup.model_def
  step_fn = common.make_train_step(
      lambda p, f, b, r: stage.loss_fn(model_def(p), f, b, r), setup.tx,
      grad_accum=tc.grad_accum, ema_decay=tc.ema_decay)
  return jax.jit(step_fn, in_shardings=(setup.state_sh, setup.frozen_sh, batch_sh),
                 out_shardings=(setup.state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def restore_trained(config: ml_collections.ConfigDict, workdir: str | Path, mesh,
                    step: int | None = None):
  """(setup, params for inference (EMA when kept), step) from a run's checkpoints."""
  import orbax.checkpoint as ocp
  setup = build_setup(config, mesh)
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first with "
                            f"python -m fpdm_jax.train --config ... --workdir {workdir}")
  mngr = ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("state", "data"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  for s in steps:
    try:
      restored = mngr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(setup.abstract)))
    except Exception as e:
      logging.warning("checkpoint %d in %s cannot be read (%s); trying the previous one",
                      s, ckpt_dir, str(e)[:200])
      continue
    state = restored["state"]
    params = state["ema"] if state["ema"] is not None else state["params"]
    return setup, params, s
  raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains ``config.stage`` into ``workdir``; rerunning resumes. Returns the last metrics."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)
  tc = config.train
  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape),
               jax.device_count(), jax.process_count())
  check_cached_features(config)
  setup = build_setup(config, mesh)
  stage, model_def, frozen = setup.stage, setup.model_def, setup.frozen

  train_loader = make_loader(config, stage.views, config.data.train_split, train=True)
  train_iter = iter(train_loader)

  ckpt_dir = workdir / "checkpoints"
  mngr = common.make_checkpoint_manager(ckpt_dir, tc)
  local_batch = tc.batch_size // jax.process_count()
  state, start = common.restore_checkpoint(
      mngr, setup.abstract, train_iter, log=logging.info,
      reposition=lambda step: train_iter.set_state(
          input_pipeline.state_after_batches(train_iter, step, local_batch)))
  if state is None:
    state = setup.init(setup.params)
  setup.params = None  # the state holds them now

  train_step = None

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir / "tensorboard", just_logging=not is_main)
  if start == 0:
    parameter_overview.log_parameter_overview(state["params"], msg=f"{config.stage} trainable")
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                           every_steps=tc.log_every)]
  if is_main and tc.profile:
    hooks.append(periodic_actions.Profile(logdir=str(workdir / "tensorboard"),
                                          num_profile_steps=3, first_profile=start + 5))
  collection = acc = None
  last = {}
  prev_row = None
  step = start
  for step in range(start, tc.num_steps):
    local = next(train_iter)
    batch = sharding.global_batch(local, mesh)
    if train_step is None:
      train_step = jit_train_step(config, setup, mesh,
                                  jax.tree.map(lambda x: x.sharding, batch))
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, frozen, batch)
    nonfinite_row = metrics.pop("nonfinite_in_a_row")  # not donated, unlike the state
    if collection is None:
      collection = metric_collection(sorted(metrics))
    update = collection.single_from_model_output(**metrics)
    acc = update if acc is None else acc.merge(update)
    # The guard reads the previous step's counter, so dispatch never waits on it.
    if prev_row is not None:
      common.check_nonfinite(int(prev_row), tc.max_nonfinite_in_a_row, step, ckpt_dir)
    prev_row = nonfinite_row
    done = step + 1
    for hook in hooks:
      hook(done)
    if done % tc.log_every == 0 or done == tc.num_steps:
      last = {f"train_{k}": float(v) for k, v in acc.compute().items()}
      last["learning_rate"] = float(common.make_schedule(config.optim, tc.num_steps)(done - 1))
      writer.write_scalars(done, last)
      acc = None
    if tc.eval_every and (done % tc.eval_every == 0 or done == tc.num_steps):
      ev = stage.evaluate(state, frozen, model_def)
      writer.write_scalars(done, {f"eval_{k}": v for k, v in ev.items()})
      last.update({f"eval_{k}": v for k, v in ev.items()})
    if tc.image_every and (done % tc.image_every == 0 or done == tc.num_steps):
      images = stage.report_images(state, frozen, model_def, done)
      if images:
        writer.write_images(done, images)
    preempted = mngr.reached_preemption(done) or done == tc.stop_at_step
    if done % tc.checkpoint_every == 0 or done == tc.num_steps or preempted:
      common.check_nonfinite(int(nonfinite_row), tc.max_nonfinite_in_a_row, done, ckpt_dir)
      common.save_checkpoint(mngr, done, state, train_iter, force=preempted)
    if preempted:
      mngr.wait_until_finished()
      logging.warning("Stopped at step %d (%s): checkpoint saved; rerun the same command "
                      "to resume.", done, "train.stop_at_step" if done == tc.stop_at_step
                      else "preemption")
      break
  mngr.wait_until_finished()
  if step + 1 >= tc.num_steps or start >= tc.num_steps:
    stage.export(state, model_def, workdir)
  writer.flush()
  summary = {"step": int(state["step"]), "nonfinite_total": int(state["nonfinite_total"]), **last}
  if is_main:
    (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
  mngr.close()
  return summary
