"""fpdm_jax/native/layer_norm.cc: the native LayerNorm computes torch's
nn.LayerNorm forward and all three gradients (to float32 summation order)
for every build this CPU can run, the same bits on every call whatever
thread ran a chunk, and ``models.normalization`` takes it exactly where it
is meant to.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fpdm_jax.models import dense, native, native_layer_norm, normalization
from tests import native_fixture

native_fixture.require_library()
one_cpu_device = native_fixture.one_cpu_device

BUILDS = native.builds()
_build_id = lambda p: os.path.basename(p).split(".")[0]  # noqa: E731

# (shape, mean offset). Rows per chunk are 2^14 / C: 1100 x 32 is three
# chunks, the last one short, and 1100 x 256 (69 chunks) is large enough for
# the pool's threads; C = 33 and 20 leave a tail after the vectors, 768 is
# the fusion embedding's width.
CASES = [
    ((2, 550, 32), 0.0),
    ((1100, 256), 3.0),
    ((3, 7, 33), 30.0),
    ((4, 20), 0.0),
    ((2, 3, 768), 1.0),
]


def _torch_reference(x, scale, bias, dy):
  tx = torch.tensor(x, requires_grad=True)
  ts, tb = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
  y = torch.nn.functional.layer_norm(tx, (x.shape[-1],), ts, tb, 1e-5)
  y.backward(torch.from_numpy(dy))
  return y.detach().numpy(), tx.grad.numpy(), ts.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("build", BUILDS, ids=_build_id)
@pytest.mark.parametrize("shape,offset", CASES, ids=lambda c: str(c))
def test_matches_torch_and_repeats_its_bits(build, shape, offset, monkeypatch):
  monkeypatch.setattr(native, "library", lambda: build)
  rng = np.random.default_rng(shape[-1])
  x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
  scale, bias = rng.standard_normal((2, shape[-1])).astype(np.float32)
  dy = rng.standard_normal(shape).astype(np.float32)

  # A fresh function per build: jit caches traces by function.
  def forward_and_vjp(x, scale, bias):
    f = lambda *a: normalization.layer_norm(*a, 1e-5, native=True)
    y, vjp = jax.vjp(f, x, scale, bias)
    return (y, *vjp(jnp.asarray(dy)))

  call = jax.jit(forward_and_vjp)
  jaxpr = str(jax.make_jaxpr(call)(x, scale, bias))
  for part in ("forward", "backward"):
    assert f"target_name={native.target_prefix()}_layer_norm_{part}\n" in jaxpr
  got = call(x, scale, bias)
  for name, g, want in zip(("y", "dx", "d_scale", "d_bias"), got,
                           _torch_reference(x, scale, bias, dy)):
    assert g.shape == want.shape and g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, want, atol=2e-5 * float(np.abs(want).max()), err_msg=name)
  # Partial sums are added in chunk order: the same bits every time.
  for g, again in zip(got, call(x, scale, bias)):
    np.testing.assert_array_equal(again, g)


def test_the_module_takes_it_where_it_should(monkeypatch):
  """The LayerNorm module runs the native calls in a one-device CPU process,
  the XLA ops with ``FPDM_NATIVE_LAYER_NORM=0`` or several devices, and both
  give the same values."""
  m = normalization.LayerNorm(24)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 24)), jnp.float32)
  target = f"{native.target_prefix()}_layer_norm_forward"

  def run():
    graphdef, params = nnx.split(m)
    f = jax.jit(lambda p, x: jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 3),
                                      argnums=(0, 1))(p, x))
    return target in f.lower(params, x).as_text(), f(params, x)

  used, native_grads = run()
  assert used
  monkeypatch.setenv(native_layer_norm.OPT_OUT, "0")
  used, xla_grads = run()
  assert not used
  monkeypatch.delenv(native_layer_norm.OPT_OUT)
  monkeypatch.setattr(dense, "single_cpu_device", lambda: False)
  assert not run()[0]
  for a, b in zip(jax.tree.leaves(native_grads), jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_compute(monkeypatch):
  with pytest.raises(ValueError, match="float32 only"):
    native_layer_norm.forward(jnp.zeros((2, 8), jnp.bfloat16), jnp.ones(8), jnp.zeros(8), 1e-5)
  monkeypatch.setattr(native, "library", lambda: None)
  with pytest.raises(RuntimeError, match="no native build is loaded"):
    normalization.layer_norm(jnp.zeros((2, 8)), jnp.ones(8), jnp.zeros(8), 1e-5, native=True)
  # Asked for nothing in particular, it falls back to the XLA ops.
  np.testing.assert_allclose(
      normalization.layer_norm(jnp.arange(8.0)[None], jnp.ones(8), jnp.zeros(8), 1e-5),
      normalization.layer_norm(jnp.arange(8.0)[None], jnp.ones(8), jnp.zeros(8), 1e-5,
                               native=False), rtol=1e-6)
