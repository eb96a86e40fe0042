"""FPDM's sampler: one jitted ``lax.fori_loop`` with three-way guidance.

Per step the UNet sees the three condition sets batched together:

  e_u: no pose, no source tokens, no fusion (all zeros)
  e_s: pose + source tokens, no fusion
  e_f: pose + source tokens + fusion
  e = e_u + g (e_s - e_u) + g (e_f - e_s)

With ``g <= 1`` only the fully conditioned branch runs. A dropped condition
is a zeroed branch OUTPUT (pose features, cross-attention context, class
embedding): exactly what condition dropout does in training.

Every image has its own PRNG key (from the seed, the pair index and the
image index), drawn per sample, so a given pair gives the same image whatever
the batch size or device count.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax import schedulers


@dataclasses.dataclass(frozen=True)
class Conditions:
  pose: jax.Array     # [B, h, w, C0]  added after conv_in
  context: jax.Array  # [B, T, D]      cross-attention context
  fusion: jax.Array   # [B, time_dim]  added to the time embedding


jax.tree_util.register_dataclass(Conditions, data_fields=["pose", "context", "fusion"],
                                 meta_fields=[])


def sample_keys(seed: int, pair_index: jax.Array, image_index: int | jax.Array = 0) -> jax.Array:
  """One key per (seed, pair, image): independent of batching."""
  base = jax.random.PRNGKey(seed)
  keys = jax.vmap(lambda p: jax.random.fold_in(base, p))(jnp.asarray(pair_index, jnp.uint32))
  return jax.vmap(lambda k: jax.random.fold_in(k, image_index))(keys)


def guided_prediction(unet, x, t, cond: Conditions, guidance: float) -> jax.Array:
  """The UNet's prediction under FPDM's three-way guidance."""
  if guidance <= 1.0:
    return unet(x, t, cond.context, pose_features=cond.pose, class_embedding=cond.fusion)
  zeros = jax.tree.map(jnp.zeros_like, cond)
  x3 = jnp.concatenate([x, x, x])
  pose = jnp.concatenate([zeros.pose, cond.pose, cond.pose])
  ctx = jnp.concatenate([zeros.context, cond.context, cond.context])
  fus = jnp.concatenate([zeros.fusion, zeros.fusion, cond.fusion])
  out = unet(x3, t, ctx, pose_features=pose, class_embedding=fus)
  e_u, e_s, e_f = jnp.split(out, 3)
  return e_u + guidance * (e_s - e_u) + guidance * (e_f - e_s)


def sample(unet, cond: Conditions, keys: jax.Array, schedule: schedulers.Schedule, *,
           shape: tuple[int, ...], guidance: float, decode: Any = None) -> jax.Array:
  """Draws x_T per key, runs the schedule, decodes (None: pixel space).

  Args:
    keys: [B, 2] per-sample keys (``sample_keys``).
    shape: per-sample (h, w, c) of the diffusion space.
  """
  x = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
  state = schedulers.init_state(schedule, x)
  # The UNet is rebuilt inside the loop body, with fresh Variables
  # (copy=True), from its split state: NNX transforms in its blocks (nnx.remat
  # under model.remat) refuse to update Variables created outside the trace
  # they run in, which the loop body's trace is.
  graphdef, weights = nnx.split(unet)

  def body(i, carry):
    x, state = carry
    t = schedule.timesteps[i]  # scalar: the UNet broadcasts it over every branch
    net = nnx.merge(graphdef, weights, copy=True)
    eps = guided_prediction(net, x, t, cond, guidance).astype(jnp.float32)
    noise = None
    if schedule.stochastic:
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), shape))(keys)
    return schedulers.sampler_step(schedule, state, i, eps, x, noise=noise)

  x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, state))
  return decode(x) if decode is not None else x
