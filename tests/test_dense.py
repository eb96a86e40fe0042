"""The dense layer's CPU kernel gradient computes what autodiff of lax computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from fpdm_jax.models import clip, convolution, dense, diffusers_blocks

PLAIN = (((2,), (0,)), ((), ()))


@pytest.fixture(autouse=True)
def one_cpu_device(monkeypatch):
  """The suite simulates 8 CPU devices; the rule is for one-device processes."""
  monkeypatch.setattr(dense, "single_cpu_device", lambda: True)


def _barriers(fn, *args) -> int:
  """optimization_barrier equations in the jaxpr of ``jax.grad(fn)``: the
  custom kernel gradient has one, autodiff of lax.dot_general none."""
  jaxpr = jax.make_jaxpr(jax.grad(fn))(*args)
  return str(jaxpr).count("optimization_barrier")


@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 8)])
def test_gradients_match_autodiff_of_lax(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  dn = (((x.ndim - 1,), (0,)), ((), ()))
  weights = jnp.asarray(rng.normal(size=shape[:-1] + (6,)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, dn)) * weights)  # noqa: E731
  want = jax.grad(loss(lax.dot_general), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(dense.dot_general), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    assert np.abs(np.asarray(r)).max() > 1e-2
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dense.dot_general(x, w, dn), lax.dot_general(x, w, dn))
  assert _barriers(lambda w: loss(dense.dot_general)(x, w), w) == 1


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)
  got = jax.grad(lambda w: dense.dot_general(x, w, PLAIN).astype(jnp.float32).sum())(w)
  want = jax.grad(lambda w: lax.dot_general(x.astype(jnp.float32), w, PLAIN).sum())(
      w.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.02 * float(abs(want).max()))


def test_other_dots_and_the_switch_take_lax(monkeypatch):
  """A batched dot or a transposed kernel is not the dense layer's: lax's path.
  ``FPDM_CONV_CPU_GRADIENTS=0`` turns the rule off."""
  x, w = jnp.ones((2, 3, 8)), jnp.ones((8, 4))
  loss = lambda w: dense.dot_general(x, w, PLAIN).sum()  # noqa: E731
  assert _barriers(loss, w) == 1
  batched = lambda y: dense.dot_general(x, y, (((2,), (1,)), ((0,), (0,)))).sum()  # noqa: E731
  assert _barriers(batched, jnp.ones((2, 8, 4))) == 0
  transposed = lambda y: dense.dot_general(x, y, (((2,), (1,)), ((), ()))).sum()  # noqa: E731
  assert _barriers(transposed, jnp.ones((4, 8))) == 0
  monkeypatch.setenv(convolution.ENV_OPT_OUT, "0")
  assert _barriers(loss, w) == 0


def test_model_linears_use_it():
  """The UNet's, CLIP's (and through them the fusion model's) dense layers."""
  config = clip.CLIPVisionConfig(hidden_size=8, num_attention_heads=2)
  layers = [diffusers_blocks.linear(8, 4, rngs=nnx.Rngs(0)),
            clip.CLIPAttention(config, dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=nnx.Rngs(0)).q_proj]
  for layer in layers:
    graphdef, params = nnx.split(layer)
    assert _barriers(lambda p: nnx.merge(graphdef, p)(jnp.ones((2, 3, 8))).sum(), params) == 1


def test_off_with_several_devices(monkeypatch):
  monkeypatch.undo()  # the suite's 8 simulated CPU devices
  assert not dense.single_cpu_device()
  x, w = jnp.ones((2, 3, 8)), jnp.ones((8, 4))
  assert _barriers(lambda w: dense.dot_general(x, w, PLAIN).sum(), w) == 0
