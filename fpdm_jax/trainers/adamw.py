"""The optimiser: optax's AdamW (after an optional global-norm clip), and its
whole update as one native pass on the CPU.

``AdamW`` works as an optax ``GradientTransformation`` (``init``/``update``
are optax's chain's, and so is the state: checkpoints, shardings and
``optax.tree_map_params`` see nothing new) that also knows its numbers, so
``make_train_step`` can ask it for the whole step with ``apply``: norm,
clip, moments, weight decay, learning rate, the new parameters, and the
skip of a non-finite step.

Why: XLA:CPU runs optax's update as about six fusions per parameter array
(the moments and the parameters each re-read the gradient), 3,000 fusions
for the medium benchmark UNet's 516 arrays: 36-44 ms for its 19.4M
parameters, where one pass reading parameters, gradients and both moments
and writing three of them moves 0.55 GB, ~11 ms at this machine's ~50 GB/s.
fpdm_jax/native/adamw.cc is that pass, over all arrays in one call, in
place (the update alone: 44 -> 24 ms; the medium UNet's batch-1 train step
1.07x, batch 8 unchanged: benchmarks/README.md, finding 27). The global norm stays
XLA's, whose per-array sums run while the backward pass is still making
other gradients. Where the call cannot run (no native build, several
devices, a dtype other than float32, ``FPDM_NATIVE_ADAMW=0``) ``apply`` runs
optax's update: the same maths in the same order of operations, so the two
agree to float32 rounding (fused multiply-adds, the clip's division).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpdm_jax import xla_cpu_flags

OPT_OUT = "FPDM_NATIVE_ADAMW"


def apply_optax(tx: optax.GradientTransformation, grads, opt_state, params, loss):
  """(new params, new optimiser state, gradient norm, finite) for any optax
  transformation; a step whose loss or gradient norm is not finite changes
  neither the parameters nor the state."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), grad_norm, finite


@dataclasses.dataclass(frozen=True)
class AdamW:
  """optax.adamw(learning_rate, b1, b2, eps, weight_decay), after
  optax.clip_by_global_norm(grad_clip) if grad_clip > 0."""
  learning_rate: Callable[[Any], Any]  # an optax schedule
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float = 0.0

  @functools.cached_property
  def chain(self) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []
    parts.append(optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                             weight_decay=self.weight_decay))
    return optax.chain(*parts)

  def init(self, params):
    return self.chain.init(params)

  def update(self, updates, state, params=None):
    return self.chain.update(updates, state, params)

  def apply(self, grads, opt_state, params, loss):
    """``apply_optax(self, ...)``, as one native call where it can run."""
    if _native(params, grads, opt_state):
      return self._apply_native(grads, opt_state, params, loss)
    return apply_optax(self.chain, grads, opt_state, params, loss)

  def _apply_native(self, grads, opt_state, params, loss):
    from fpdm_jax.models import native
    # The chain's state: ([clip's EmptyState], (ScaleByAdamState, weight
    # decay's EmptyState, ScaleByScheduleState)).
    adam, decay, schedule = opt_state[-1]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The scalars as optax computes them (optax.tree.bias_correction,
    # scale_by_learning_rate's -1 * learning_rate(count)).
    count_inc = optax.safe_increment(adam.count)
    scalars = (jnp.asarray(loss, jnp.float32), grad_norm,
               jnp.asarray(-1 * self.learning_rate(schedule.count), jnp.float32),
               (1 - self.b1 ** count_inc).astype(jnp.float32),
               (1 - self.b2 ** count_inc).astype(jnp.float32))
    p, treedef = jax.tree.flatten(params)
    g, m, v = (treedef.flatten_up_to(t) for t in (grads, adam.mu, adam.nu))
    n = len(p)
    call = jax.ffi.ffi_call(
        native.target_prefix() + "_adamw",
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in p + m + v),
        # params -> params, mu -> mu, nu -> nu (after the scalars and the
        # grads): in place when the state is donated.
        input_output_aliases={len(scalars) + k + (k >= n) * n: k for k in range(3 * n)},
        vmap_method="sequential")
    new = call(*scalars, *p, *g, *m, *v,
               one_minus_b1=np.float32(1 - self.b1), b1=np.float32(self.b1),
               one_minus_b2=np.float32(1 - self.b2), b2=np.float32(self.b2),
               eps=np.float32(self.eps), weight_decay=np.float32(self.weight_decay),
               max_norm=np.float32(self.grad_clip))
    unflatten = lambda leaves: jax.tree.unflatten(treedef, leaves)
    counted = lambda count: jnp.where(finite, optax.safe_increment(count), count)
    new_adam = adam._replace(count=counted(adam.count), mu=unflatten(new[n:2 * n]),
                             nu=unflatten(new[2 * n:]))
    new_opt = (*opt_state[:-1], (new_adam, decay, schedule._replace(count=counted(schedule.count))))
    return unflatten(new[:n]), new_opt, grad_norm, finite


def _native(params, grads, opt_state) -> bool:
  """Whether adamw.cc runs this update: built and not switched off, one CPU
  device (a custom call is not partitioned: sharded, XLA would gather every
  parameter), float32 parameters, gradients and moments."""
  from fpdm_jax.models import dense, native
  leaves = jax.tree.leaves((params, grads, opt_state[-1][0].mu, opt_state[-1][0].nu))
  return (bool(leaves) and all(x.dtype == jnp.float32 for x in leaves)
          and dense.single_cpu_device() and not xla_cpu_flags.opted_out(OPT_OUT)
          and native.target_prefix() is not None)
