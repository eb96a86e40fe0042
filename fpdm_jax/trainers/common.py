"""Pieces both stages' trainers share: optimiser, sharding rules, the update
with its non-finite guard and EMA, and checkpoints.

The train state is a plain dict pytree, so it shards, donates and
checkpoints without ceremony:

  {"step": int32, "params": {...}, "opt_state": ..., "ema": {...} | None,
   "rng": uint32[2], "nonfinite_in_a_row": int32, "nonfinite_total": int32}
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fpdm_jax import sharding as sharding_lib
from fpdm_jax.trainers import adamw

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPES)}")
  return DTYPES[name]


# ----------------------------------------------------------------------------
# Optimiser.

def make_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up, then "constant", "cosine" or "step" (multiply by
  ``decay_factor`` at each of ``decay_steps``, the reference's step decay)."""
  lr, warmup = optim.lr, optim.warmup_steps
  if optim.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
  elif optim.schedule == "step":
    after = optax.piecewise_constant_schedule(
        lr, {max(1, int(s) - warmup): optim.decay_factor for s in optim.decay_steps})
  else:
    raise ValueError(f"optim.schedule={optim.schedule!r}: use constant, cosine or step")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> adamw.AdamW:
  if optim.name != "adamw":
    raise ValueError(f"optim.name={optim.name!r}: only adamw is implemented")
  return adamw.AdamW(make_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, grad_clip=max(optim.grad_clip, 0.0))


# ----------------------------------------------------------------------------
# Sharding rules.

def _path(keypath) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)


def param_spec(path: str, shape: Sequence[int], rules: Sequence[tuple[str, str]],
               mesh: Mesh, min_fsdp_size: int) -> P:
  """The first rule whose regex matches ``path`` decides: "replicate" or
  "fsdp" (split the largest dimension divisible by the fsdp axis size)."""
  for pattern, strategy in rules:
    if re.search(pattern, path):
      break
  else:
    strategy = "replicate"
  if strategy == "replicate":
    return P()
  if strategy != "fsdp":
    raise ValueError(f"sharding rule {pattern!r}: strategy {strategy!r} is not replicate/fsdp")
  n = mesh.shape.get("fsdp", 1)
  if n == 1 or math.prod(shape) < min_fsdp_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, rules, min_fsdp_size: int = 2 ** 14):
  """NamedShardings for every array leaf of ``tree`` (params, EMA, ...)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, param_spec(_path(kp), np.shape(x), rules, mesh,
                                                   min_fsdp_size)), tree)


# ----------------------------------------------------------------------------
# NNX <-> pure pytrees.

class ModelDef:
  """A module's graph definition and a template of its parameter State.

  Step functions receive parameters as plain nested dicts (what the
  optimiser, Orbax and the sharding rules want) and rebuild the module
  inside the trace with ``module(params)``.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  def __call__(self, params) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def pure_params(module: nnx.Module):
  return nnx.to_pure_dict(nnx.state(module))


# ----------------------------------------------------------------------------
# The update.

def init_state(params, tx: adamw.AdamW | optax.GradientTransformation, *, seed: int,
               ema: bool) -> dict:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema": jax.tree.map(jnp.copy, params) if ema else None,
      "rng": jax.random.PRNGKey(seed),
      "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
  }


def micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... so each stays
  spread over every device of the batch axes."""
  def split(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch {b} is not divisible by grad_accum={k}")
    return jnp.moveaxis(x.reshape(b // k, k, *x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable, tx: adamw.AdamW | optax.GradientTransformation, *,
                    grad_accum: int = 1, ema_decay: float = 0.0) -> Callable:
  """Builds ``train_step(state, frozen, batch) -> (state, metrics)``.

  ``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``. Gradients are
  averaged over ``grad_accum`` micro-batches inside one step (one optimiser
  update per step). If the loss or any gradient is not finite the update is
  skipped (parameters, optimiser state and EMA keep their values) and
  counted; the loop decides when too many in a row must stop the run.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # make_optimizer's AdamW runs its update as one native call where it can.
  apply_update = (tx.apply if isinstance(tx, adamw.AdamW)
                  else functools.partial(adamw.apply_optax, tx))

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    params = state["params"]
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
    else:
      def body(carry, xs):
        i, micro = xs
        (l, m), g = grad_fn(params, frozen, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, m, g)), None
      zeros = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(
          lambda x: x[0], micro_batches(batch, grad_accum)), rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(
          body, zeros, (jnp.arange(grad_accum), micro_batches(batch, grad_accum)))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, (loss, metrics, grads))

    new_state = dict(state)
    # Skipped (parameters and state unchanged) unless loss and norm are finite.
    new_state["params"], new_state["opt_state"], grad_norm, finite = apply_update(
        grads, state["opt_state"], params, loss)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    if state["ema"] is not None:
      # Warm-up (as diffusers' EMAModel): a young EMA follows the weights
      # closely instead of averaging in the random initialisation.
      step = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                         state["ema"], new_state["params"])
      new_state["ema"] = keep(ema, state["ema"])
    new_state["step"] = state["step"] + 1
    new_state["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    new_state["nonfinite_total"] = state["nonfinite_total"] + (~finite).astype(jnp.int32)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   skipped=(~finite).astype(jnp.float32),
                   nonfinite_in_a_row=new_state["nonfinite_in_a_row"])
    return new_state, metrics

  return train_step


class NonFiniteError(RuntimeError):
  pass


def check_nonfinite(state_row: int, limit: int, step: int, ckpt_dir: Path) -> None:
  if limit > 0 and state_row >= limit:
    raise NonFiniteError(
        f"{state_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
        f"and were skipped; stopping. The last good checkpoint in {ckpt_dir} is intact. "
        "Lower optim.lr, enable optim.grad_clip, or check the data; then rerun the same "
        "command to resume from it.")


# ----------------------------------------------------------------------------
# Checkpoints.

def make_checkpoint_manager(ckpt_dir: Path, train_cfg: ml_collections.ConfigDict):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_cfg.keep_last or None,
      keep_period=train_cfg.keep_every or None,
      enable_async_checkpointing=train_cfg.async_checkpoints,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(ckpt_dir.absolute(), options=options,
                               item_names=("state", "data"))


def save_checkpoint(mngr, step: int, state: dict, data_iter, *, force: bool = False) -> bool:
  import grain
  import orbax.checkpoint as ocp
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def _saved_by_other_process_count(mngr, step: int) -> bool:
  """Grain saves one iterator state per process (process_P-of-N.json)."""
  data = mngr.directory / str(step) / "data"
  mine = data / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return data.exists() and not mine.exists() and any(data.glob("process_*-of-*.json"))


def restore_checkpoint(mngr, abstract_state, data_iter, *, log=logging.info,
                       reposition: Callable[[int], None] | None = None):
  """Restores the newest readable checkpoint; returns (state, step) or (None, 0).

  A checkpoint that fails to load (truncated, corrupt) is reported and the
  one before it is tried, so a crash during a save never loses the run.
  A checkpoint written by a different number of processes (resuming on a
  different number of hosts) has no iterator state for this process: the
  train state is restored and ``reposition(step)`` puts the data iterator
  where ``step`` steps leave it.
  """
  import grain
  import orbax.checkpoint as ocp
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      if reposition is not None and _saved_by_other_process_count(mngr, step):
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        reposition(step)
        log(f"Resumed from the checkpoint at step {step} in {mngr.directory}, saved by a "
            f"different number of processes (now {jax.process_count()}); data position "
            "recomputed from the step")
        return restored["state"], step
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      log(f"Resumed from the checkpoint at step {step} in {mngr.directory}")
      return restored["state"], step
    except Exception as e:  # orbax/tensorstore raise many kinds for bad files
      log(f"WARNING: checkpoint at step {step} in {mngr.directory} cannot be read "
          f"({type(e).__name__}: {str(e)[:300]}); trying the previous one")
  return None, 0


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def count_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))

