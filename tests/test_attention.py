"""Both attention paths compute the same thing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpdm_jax.models import attention, dense


def test_cpu_path_matches_jax_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 4, 8)), jnp.float32) for _ in range(3))
  k, v = k[:, :9], v[:, :9]  # cross-attention: different key length
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  got = attention._heads_major_attention(q, k, v, None)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), want, atol=1e-5)
  mask = jnp.asarray(rng.random((2, 1, 17, 9)) > 0.3)
  np.testing.assert_allclose(attention._heads_major_attention(q, k, v, mask),
                             jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-5)
  # bfloat16 with float32 softmax stays close to float32.
  bf = attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), upcast=False)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), want, atol=5e-2)


@pytest.mark.parametrize("queries", [17, attention.TRANSPOSED_FORM_MIN_QUERIES + 3])
def test_cpu_path_gradients_match_autodiff_of_the_reference(queries, monkeypatch):
  """The CPU path's hand-written backward against jax.nn.dot_product_attention's
  autodiff: cross-attention (keys shorter than queries), with and without a
  mask, several heads; below and above the query count where dK and dV switch
  to their transposed form."""
  monkeypatch.setattr(dense, "single_cpu_device", lambda: True)  # the suite has 8 devices
  jax.clear_caches()  # the backward's trace is cached with the form it picked
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, queries, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 9, 3, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, queries, 9)) > 0.3).at[..., 0].set(True)
  w = jnp.asarray(rng.normal(size=(2, queries, 3, 8)), jnp.float32)
  for m in (None, mask):
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, m)) * w)
    want = jax.grad(loss(lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, mask=m, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    grad = jax.grad(loss(attention._heads_major_attention), argnums=(0, 1, 2))
    transposed = queries >= attention.TRANSPOSED_FORM_MIN_QUERIES
    assert str(jax.make_jaxpr(grad)(q, k, v)).count("optimization_barrier") == 2 * transposed
    got = jax.jit(grad)(q, k, v)
    for g, r in zip(got, want):
      assert np.abs(np.asarray(r)).max() > 1e-3
      np.testing.assert_allclose(g, r, atol=1e-5)
