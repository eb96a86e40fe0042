"""trainers.adamw: the optimiser ``make_optimizer`` builds, its state exactly
optax's, and its update through fpdm_jax/native/adamw.cc agreeing with
optax's own step by step (clip on and off, weight decay, a warm-up
schedule, skipped non-finite steps, arrays that straddle the call's
chunks), in place when the state is donated, and optax's where the native
call must not run."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fpdm_jax.models import native
from fpdm_jax.trainers import adamw, common
from tests import native_fixture

native_fixture.require_library()
one_cpu_device = native_fixture.one_cpu_device


def _optim(**overrides):
  base = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
              grad_clip=1.0, warmup_steps=2, schedule="cosine", decay_factor=0.1,
              decay_steps=())
  return common.make_optimizer(ml_collections.ConfigDict({**base, **overrides}), num_steps=50)


def _params(rng):
  # 70,001 floats straddle the call's 32,768-float chunks; a scalar and an
  # empty array are arrays too.
  return {"conv": {"kernel": rng.standard_normal((3, 3, 4, 8)), "bias": rng.standard_normal(8)},
          "big": rng.standard_normal(70_001), "scale": rng.standard_normal(()),
          "empty": np.zeros((0, 3))}


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _native_in(fn, *args) -> bool:
  # A new function each time: jax.jit would reuse an earlier trace of fn.
  traced = jax.jit(lambda *a: fn(*a)).lower(*args)
  return f"{native.target_prefix()}_adamw" in traced.as_text()


@pytest.mark.parametrize("overrides", [{}, {"grad_clip": 0.0}, {"weight_decay": 0.0}],
                         ids=["clip-decay", "no-clip", "no-decay"])
def test_native_update_follows_optax(overrides):
  tx = _optim(**overrides)
  rng = np.random.default_rng(0)
  params = _f32(_params(rng))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(tx.chain.init(params))
  native_step = jax.jit(tx.apply)
  optax_step = jax.jit(lambda g, s, p, loss: adamw.apply_optax(tx.chain, g, s, p, loss))
  ours, theirs = (params, tx.init(params)), (params, tx.init(params))
  assert _native_in(tx.apply, params, tx.init(params), params, jnp.float32(1))
  # Gradient norms far above and far below the clip, and two skipped steps:
  # a NaN loss, then an infinite gradient.
  for step, (scale, loss) in enumerate([(3.0, 1.0), (1e-3, 1.0), (3.0, np.nan), (1e-3, 2.0),
                                        (1.0, 1.0), (3.0, 1.0)]):
    grads = _f32(jax.tree.map(lambda x: rng.standard_normal(np.shape(x)) * scale, params))
    if step == 4:
      grads["big"] = grads["big"].at[7].set(jnp.inf)
    loss = jnp.float32(loss)
    *ours, norm, finite = native_step(grads, ours[1], ours[0], loss)
    *theirs, want_norm, want_finite = optax_step(grads, theirs[1], theirs[0], loss)
    assert bool(finite) == bool(want_finite) == (step not in (2, 4))
    np.testing.assert_allclose(norm, want_norm, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9, err_msg=f"step {step}")
  counts = [x for x in jax.tree.leaves(ours[1]) if x.dtype == jnp.int32]
  assert [int(c) for c in counts] == [4, 4]  # the skipped steps did not count


def test_skipped_step_changes_nothing():
  tx = _optim()
  rng = np.random.default_rng(1)
  params = _f32(_params(rng))
  state = tx.init(params)
  grads = _f32(jax.tree.map(lambda x: rng.standard_normal(np.shape(x)), params))
  params, state, _, _ = jax.jit(tx.apply)(grads, state, params, jnp.float32(1))
  new_params, new_state, _, finite = jax.jit(tx.apply)(grads, state, params, jnp.float32(np.inf))
  assert not bool(finite)
  for got, want in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(got, want)


def test_outputs_alias_inputs_and_donation_changes_no_bit():
  """The call's outputs alias params, mu and nu (in place when the state is
  donated; not donated, XLA copies first): the same bits either way."""
  tx = _optim()
  rng = np.random.default_rng(2)
  params = _f32(_params(rng))
  grads = _f32(jax.tree.map(lambda x: rng.standard_normal(np.shape(x)), params))
  step = lambda p, s, g: tx.apply(g, s, p, jnp.float32(1))[:2]  # noqa: E731
  text = jax.jit(step).lower(params, tx.init(params), grads).as_text()
  call = next(line for line in text.splitlines() if "_adamw" in line)
  aliases = {int(out): int(operand) for out, operand in re.findall(
      r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", call)}
  n = len(jax.tree.leaves(params))  # operands: 5 scalars, params, grads, mu, nu
  assert aliases == {k: 5 + k + (k >= n) * n for k in range(3 * n)}
  want = jax.jit(step)(params, tx.init(params), grads)
  got = jax.jit(step, donate_argnums=(0, 1))(jax.tree.map(jnp.copy, params), tx.init(params),
                                             grads)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_train_step_uses_it_and_falls_back_to_optax(monkeypatch):
  tx = _optim()
  rng = np.random.default_rng(3)
  params = _f32({"w": rng.standard_normal((5, 3))})
  batch = {"x": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}
  loss_fn = lambda p, f, b, r: (jnp.mean((b["x"] @ p["w"]) ** 2), {})  # noqa: E731
  state = common.init_state(params, tx, seed=0, ema=True)
  step = common.make_train_step(loss_fn, tx, ema_decay=0.9)
  assert _native_in(step, state, {}, batch)
  new, metrics = jax.jit(step)(state, {}, batch)
  monkeypatch.setenv(adamw.OPT_OUT, "0")
  step = common.make_train_step(loss_fn, tx, ema_decay=0.9)
  assert not _native_in(step, state, {}, batch)
  want, want_metrics = jax.jit(step)(state, {}, batch)
  np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-6)
  monkeypatch.delenv(adamw.OPT_OUT)
  # bfloat16 parameters: optax's update.
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert not _native_in(tx.apply, half, tx.init(half), half, jnp.float32(1))


def test_several_devices_keep_optax(monkeypatch):
  from fpdm_jax.models import dense
  monkeypatch.setattr(dense, "single_cpu_device", lambda: False)
  tx = _optim()
  params = _f32({"w": np.ones((4, 4))})
  assert not _native_in(tx.apply, params, tx.init(params), params, jnp.float32(1))
