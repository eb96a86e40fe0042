"""Both attention paths compute the same thing."""
import jax
import jax.numpy as jnp
import numpy as np

from fpdm_jax.models import attention


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
