"""fpdm_jax's XLA:CPU flags: added to XLA_FLAGS at import, and read by XLA."""
import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fpdm_jax import xla_cpu_flags

FLAG = "xla_cpu_experimental_ynn_fusion_type"
REGION = "xla_cpu_copy_insertion_use_region_analysis"


def test_with_defaults_appends_missing_flags_and_keeps_the_users():
  assert xla_cpu_flags.with_defaults("").split() == [f"--{FLAG}=-individual_convolution",
                                                      f"--{REGION}=true"]
  mine = f"--xla_force_host_platform_device_count=8 --{FLAG}=individual_dot"
  assert xla_cpu_flags.with_defaults(mine) == mine
  once = xla_cpu_flags.with_defaults("--xla_force_host_platform_device_count=8")
  assert once.split() == ["--xla_force_host_platform_device_count=8",
                          f"--{FLAG}=-individual_convolution"]
  assert xla_cpu_flags.with_defaults(once) == once
  # Taking them out again (what benchmarks.convolution's "XLA default" child needs).
  assert xla_cpu_flags.without_defaults(once) == "--xla_force_host_platform_device_count=8"
  assert xla_cpu_flags.without_defaults(xla_cpu_flags.with_defaults("")) == ""
  # Region analysis only without several forced host devices (the last setting counts).
  assert f"--{REGION}=true" in xla_cpu_flags.with_defaults(
      "--xla_force_host_platform_device_count=8 --xla_force_host_platform_device_count=1")
  assert REGION not in xla_cpu_flags.with_defaults("--xla_force_host_platform_device_count=2")


# A one-device process: fpdm_jax's own train step (AdamW, clip, donated state)
# over a small MLP, compiled and run 3 steps; prints XLA_FLAGS, the compiled
# step's copy count and the losses.
_ONE_DEVICE_STEP = """
import json, os, re
import fpdm_jax
import jax, jax.numpy as jnp, ml_collections
from fpdm_jax.trainers import common
tx = common.make_optimizer(ml_collections.ConfigDict(dict(
    name="adamw", lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0,
    warmup_steps=0, schedule="constant")), num_steps=100)
keys = jax.random.split(jax.random.key(0), 6)
params = {f"w{i}": 0.3 * jax.random.normal(k, (32, 32)) for i, k in enumerate(keys)}
def loss_fn(p, frozen, batch, rng):
  h = batch["x"]
  for w in p.values():
    h = jnp.tanh(h @ w)
  return jnp.mean((h - 0.5) ** 2), {}
state = common.init_state(params, tx, seed=0, ema=False)
batch = {"x": jnp.linspace(-1, 1, 4 * 32).reshape(4, 32)}
step = jax.jit(common.make_train_step(loss_fn, tx), donate_argnums=(0,))
compiled = step.lower(state, {}, batch).compile()
losses = []
for _ in range(3):
  state, metrics = compiled(state, {}, batch)
  losses.append(float(metrics["loss"]).hex())
print(json.dumps({"xla_flags": os.environ["XLA_FLAGS"], "losses": losses,
                  "copies": len(re.findall(r"\\bcopy\\(", compiled.as_text()))}))
"""


def _one_device_step(xla_flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != xla_cpu_flags.ENV_OPT_OUT}
  env["XLA_FLAGS"] = xla_flags
  # optax's update, whose moments XLA copied: the native one (trainers.adamw)
  # updates them in place in one call, with or without region analysis.
  env["FPDM_NATIVE_ADAMW"] = "0"
  out = subprocess.run([sys.executable, "-c", _ONE_DEVICE_STEP], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_one_device_region_analysis_removes_the_optimizer_copies_and_keeps_the_losses():
  """Without region analysis XLA:CPU copies the donated Adam moments before
  the step overwrites them; fpdm_jax's one-device default removes those copies
  and changes no bit of the losses. A user's own setting wins."""
  ours = _one_device_step("")
  theirs = _one_device_step(f"--{REGION}=false")
  assert f"--{REGION}=true" in ours["xla_flags"].split()
  assert f"--{REGION}=false" in theirs["xla_flags"].split()
  assert f"--{REGION}=true" not in theirs["xla_flags"].split()
  # 6 kernels x (mu, nu) and more are copied without it (14 seen), at most one with it.
  assert theirs["copies"] >= 12 and ours["copies"] <= 1, (ours["copies"], theirs["copies"])
  assert ours["losses"] == theirs["losses"]


def test_opt_out_words(monkeypatch):
  for value, off in (("0", True), ("off", True), (" False ", True), ("no", True),
                     ("1", False), ("on", False), ("", False)):
    monkeypatch.setenv("FPDM_TEST_SWITCH", value)
    assert xla_cpu_flags.opted_out("FPDM_TEST_SWITCH") is off, value
  monkeypatch.delenv("FPDM_TEST_SWITCH")
  assert xla_cpu_flags.opted_out("FPDM_TEST_SWITCH") is False
  monkeypatch.setenv("FPDM_TEST_SWITCH", "maybe")
  with pytest.raises(ValueError, match="FPDM_TEST_SWITCH='maybe'"):
    xla_cpu_flags.opted_out("FPDM_TEST_SWITCH")


def test_import_added_the_flag_and_xla_keeps_convolutions_out_of_ynnpack():
  """The flag reached XLA: the kernel gradient of a conv is XLA's own
  convolution, not a YNNPACK fusion (which is what jaxlib 0.10 does by default,
  at 5-11 GFLOP/s for such gradients)."""
  assert f"--{FLAG}=-individual_convolution" in os.environ["XLA_FLAGS"].split()

  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return 0.5 * jnp.sum(y ** 2)

  # Big enough for YNNPACK's cost model to take it when the flag is missing
  # (at 16x16x16 it leaves even the default to XLA).
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 32, 32, 64)).astype(np.float32)
  w = (rng.standard_normal((3, 3, 64, 64)) * 0.05).astype(np.float32)
  grad_fn = jax.jit(jax.grad(loss, argnums=1))
  hlo = grad_fn.lower(x, w).compile().as_text()
  bodies = dict(re.findall(r"^%?(\S+) \(.*?\{\n(.*?)\n\}", hlo, re.S | re.M))
  ynn_calls = re.findall(r'calls=%(\S+?),.*"kind":"__ynn_fusion"', hlo)
  assert "convolution(" in hlo
  assert not [c for c in ynn_calls if "convolution(" in bodies.get(c, "")]
  # And the gradient is still right: one float64 matmul per kernel tap.
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = [xp[:, i:i + 32, j:j + 32, :] for i in range(3) for j in range(3)]
  y = sum(win @ tap for win, tap in zip(windows, w.astype(np.float64).reshape(9, 64, 64)))
  want = np.stack([np.einsum("bhwc,bhwd->cd", win, y) for win in windows]).reshape(w.shape)
  np.testing.assert_allclose(np.asarray(grad_fn(x, w)), want, rtol=1e-4, atol=1e-2)


def test_apply_after_jax_started_warns_and_leaves_xla_flags(monkeypatch, caplog):
  jax.devices()  # the backend exists
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with caplog.at_level(logging.WARNING, logger="fpdm_jax.xla_cpu_flags"):
    assert not xla_cpu_flags.apply()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  assert "Import fpdm_jax first" in caplog.text
  monkeypatch.setenv(xla_cpu_flags.ENV_OPT_OUT, "0")
  caplog.clear()
  assert not xla_cpu_flags.apply()
  assert not caplog.text
