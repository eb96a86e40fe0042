"""Our GroupNorm and LayerNorm compute torch's, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fpdm_jax.models.normalization import GroupNorm, LayerNorm


def _case(shape, groups, offset):
  rng = np.random.default_rng(0)
  # A large mean (offset) is where a one-pass variance would lose digits.
  x = (rng.normal(size=shape) + offset).astype(np.float32)
  scale = rng.normal(size=shape[-1]).astype(np.float32)
  bias = rng.normal(size=shape[-1]).astype(np.float32)
  weights = rng.normal(size=shape).astype(np.float32)
  return x, scale, bias, weights


def _module(channels, groups, scale, bias, dtype=jnp.float32):
  m = GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=dtype)
  m.scale.set_value(jnp.asarray(scale))
  m.bias.set_value(jnp.asarray(bias))
  return m


@pytest.mark.parametrize("shape,groups,offset", [
    ((2, 6, 5, 32), 8, 0.0),    # NHWC, 4 channels per group
    ((3, 4, 4, 16), 16, 0.0),   # one channel per group
    ((2, 12, 24), 4, 30.0),     # [B, T, C] (the VAE attention's input), large mean
])
def test_matches_torch_forward_and_gradients(shape, groups, offset):
  x, scale, bias, weights = _case(shape, groups, offset)
  m = _module(shape[-1], groups, scale, bias)
  graphdef, params = nnx.split(m)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)) * weights)

  y = m(jnp.asarray(x))
  (dparams, dx) = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))

  # torch is channels-first: move C to axis 1.
  perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
  back = np.argsort(perm)
  tx = torch.tensor(x.transpose(perm), requires_grad=True)
  tm = torch.nn.GroupNorm(groups, shape[-1], eps=1e-6)
  with torch.no_grad():
    tm.weight.copy_(torch.from_numpy(scale))
    tm.bias.copy_(torch.from_numpy(bias))
  ty = tm(tx)
  (torch.sin(ty) * torch.from_numpy(weights.transpose(perm))).sum().backward()

  np.testing.assert_allclose(y, ty.detach().numpy().transpose(back), rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(dx, tx.grad.numpy().transpose(back), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["scale"].get_value(), tm.weight.grad.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["bias"].get_value(), tm.bias.grad.numpy(),
                             rtol=1e-4, atol=1e-4)


def _check_bfloat16_as_nnx(ours, ref, x, scale, bias):
  """``ours`` and nnx's ``ref`` (both bfloat16 compute) given the same
  parameters agree on ``x``; ours returns bfloat16 and a finite bfloat16
  input gradient."""
  for m in (ours, ref):
    m.scale.set_value(jnp.asarray(scale))
    m.bias.set_value(jnp.asarray(bias))
  xb = jnp.asarray(x, jnp.bfloat16)
  y = ours(xb)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref(xb), np.float32),
                             rtol=2e-2, atol=2e-2)
  dx = jax.grad(lambda x: jnp.sum(ours(x).astype(jnp.float32) ** 2))(xb)
  assert dx.dtype == jnp.bfloat16 and bool(jnp.isfinite(dx.astype(jnp.float32)).all())


def test_matches_nnx_group_norm_in_bfloat16():
  """Statistics in float32, output in the compute dtype, as nnx.GroupNorm."""
  x, scale, bias, _ = _case((2, 8, 8, 32), 8, 3.0)
  _check_bfloat16_as_nnx(
      GroupNorm(32, num_groups=8, epsilon=1e-6, dtype=jnp.bfloat16),
      nnx.GroupNorm(32, num_groups=8, epsilon=1e-6, dtype=jnp.bfloat16,
                    use_fast_variance=False, rngs=nnx.Rngs(0)),
      x, scale, bias)


def test_rejects_wrong_channel_count():
  with pytest.raises(ValueError, match="do not split"):
    GroupNorm(30, num_groups=8)
  with pytest.raises(ValueError, match="expects 32 channels"):
    GroupNorm(32, num_groups=8)(jnp.zeros((1, 4, 4, 16)))


@pytest.mark.parametrize("shape,offset", [
    ((2, 12, 24), 0.0),      # [B, T, C]
    ((1, 64, 16), 30.0),     # batch 1 (the UNet step's), large mean
    ((5, 48), 3.0),          # [B, C] (the fusion head's)
])
def test_layer_norm_matches_torch_forward_and_gradients(shape, offset):
  x, scale, bias, weights = _case(shape, 1, offset)
  m = LayerNorm(shape[-1], epsilon=1e-5)
  m.scale.set_value(jnp.asarray(scale))
  m.bias.set_value(jnp.asarray(bias))
  graphdef, params = nnx.split(m)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)) * weights)

  y = m(jnp.asarray(x))
  (dparams, dx) = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))

  tx = torch.tensor(x, requires_grad=True)
  tm = torch.nn.LayerNorm(shape[-1], eps=1e-5)
  with torch.no_grad():
    tm.weight.copy_(torch.from_numpy(scale))
    tm.bias.copy_(torch.from_numpy(bias))
  (torch.sin(tm(tx)) * torch.from_numpy(weights)).sum().backward()

  np.testing.assert_allclose(y, tm(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["scale"].get_value(), tm.weight.grad.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["bias"].get_value(), tm.bias.grad.numpy(),
                             rtol=1e-4, atol=1e-4)


def test_layer_norm_as_nnx_in_bfloat16_and_in_its_use_of_keys():
  """bfloat16 in and out with float32 statistics, as nnx.LayerNorm; and it draws
  the keys nnx's draws, so layers built after it keep their weights."""
  x, scale, bias, _ = _case((2, 8, 32), 1, 3.0)
  _check_bfloat16_as_nnx(
      LayerNorm(32, dtype=jnp.bfloat16),
      nnx.LayerNorm(32, dtype=jnp.bfloat16, use_fast_variance=False, rngs=nnx.Rngs(0)),
      x, scale, bias)

  after = []
  for build in (lambda r: LayerNorm(8, rngs=r), lambda r: nnx.LayerNorm(8, rngs=r)):
    rngs = nnx.Rngs(3)
    build(rngs)
    after.append(nnx.Linear(4, 4, rngs=rngs).kernel.get_value())
  np.testing.assert_array_equal(after[0], after[1])


def test_layer_norm_rejects_wrong_feature_count():
  with pytest.raises(ValueError, match="expects 32 features"):
    LayerNorm(32)(jnp.zeros((1, 4, 16)))
