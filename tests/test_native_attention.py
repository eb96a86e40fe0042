"""fpdm_jax/native/attention.cc, the native softmax attention: the forward,
probabilities and gradients that XLA's attention and its autodiff give (to
float32 summation order) for every build this CPU can run and for the
portable build other machines get, the same bits on every call, and taken by
``models.attention`` exactly where it is meant to be.
"""
import glob
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpdm_jax.models import attention, dense, native, native_attention
from tests import native_fixture

native_fixture.require_library()
one_cpu_device = native_fixture.one_cpu_device


# (heads G, queries T, keys S, head size D): tiles of 6 rows and 16-64 keys,
# so these cover partial tiles on both sides, fewer rows than one tile,
# several query blocks per head (BlockRows), and key counts that are not
# whole vectors.
CASES = [
    (2, 40, 24, 32),
    (1, 5, 3, 16),
    (3, 100, 64, 16),
    (2, 64, 197, 64),
    (1, 257, 300, 32),
]
_case_id = lambda c: "G{}-T{}-S{}-D{}".format(*c)  # noqa: E731


def _operands(g, t, s, d, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.normal(size=(g, n, d)), jnp.float32) for n in (t, s, s, t))
  return q * d ** -0.5 * 3, k, v, do  # logits of a few units: a peaked softmax


def _reference(q, k, v):
  """softmax(q k^T) v by XLA, from jax.nn (heads-major [G, T, D] -> [1, T, G, D])."""
  bthd = lambda x: jnp.swapaxes(x, 0, 1)[None]  # noqa: E731
  out = jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), scale=1.0)
  return jnp.swapaxes(out[0], 0, 1)


def _close(got, want, what, rtol=2e-5):
  np.testing.assert_allclose(got, want, atol=rtol * float(jnp.abs(want).max()), err_msg=what)


@pytest.fixture(params=native.builds(), ids=lambda p: os.path.basename(p).split(".")[0])
def build(request, monkeypatch):
  monkeypatch.setattr(native, "library", lambda: request.param)
  return request.param


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_probabilities_match_xla(build, case):
  q, k, v, _ = _operands(*case)
  want = _reference(q, k, v)
  _close(jax.jit(native_attention.forward)(q, k, v), want, "o")
  o, p = jax.jit(native_attention.forward_with_probabilities)(q, k, v)
  _close(o, want, "o with probabilities")
  s = case[2]
  assert p.shape == (case[0], case[1], native_attention.probability_stride(s))
  _close(p[..., :s], jax.nn.softmax(jnp.einsum("gqd,gkd->gqk", q, k), -1), "p", rtol=1e-5)
  np.testing.assert_array_equal(p[..., s:], 0.0)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_autodiff_of_xla(build, case):
  q, k, v, do = _operands(*case)
  ours = jax.jit(lambda q, k, v, do: jax.vjp(
      lambda q, k, v: attention._attention(q, k, v, None), q, k, v)[1](do))
  want = jax.vjp(_reference, q, k, v)[1](do)
  got = ours(q, k, v, do)
  for g, w, name in zip(got, want, ("dq", "dk", "dv")):
    _close(g, w, name)
  # Every call computes the same bits (row and key blocks never race).
  for g, again in zip(got, ours(q, k, v, do)):
    np.testing.assert_array_equal(g, again)


def _targets(f, *args) -> list[str]:
  return re.findall(r"target_name=fpdm_native\w*_attention_(\w+)\n", str(jax.make_jaxpr(f)(*args)))


def _model_attention(q, k, v, mask=None):
  """models.attention's public entry point on [B, T, N, D] arrays."""
  return attention.dot_product_attention(q, k, v, mask=mask)


def test_model_attention_takes_it_forward_and_backward():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 16)), jnp.float32) for _ in range(3))
  assert _targets(_model_attention, q, k, v) == ["forward"]
  grad = jax.grad(lambda q, k, v: _model_attention(q, k, v).sum(), argnums=(0, 1, 2))
  assert sorted(_targets(grad, q, k, v)) == ["backward_keys", "backward_queries", "forward_p"]


@pytest.mark.parametrize("case", ["mask", "head size 8", "bfloat16", "sharded", "switched off"])
def test_not_taken_where_it_does_not_apply(case, monkeypatch):
  d = 8 if case == "head size 8" else 16
  dtype = jnp.bfloat16 if case == "bfloat16" else jnp.float32
  q = k = v = jnp.ones((1, 12, 2, d), dtype)
  mask = jnp.ones((1, 1, 12, 12), bool) if case == "mask" else None
  if case == "sharded":
    monkeypatch.setattr(dense, "single_cpu_device", lambda: False)
  if case == "switched off":
    monkeypatch.setenv(native_attention.OPT_OUT, "0")
  assert _targets(lambda q, k, v: _model_attention(q, k, v, mask), q, k, v) == []
  grad = jax.grad(lambda q: _model_attention(q, k, v, mask).astype(jnp.float32).sum())
  assert _targets(grad, q) == []


def test_rejects_what_it_cannot_compute():
  with pytest.raises(ValueError, match="multiple of 16"):
    native_attention.forward(*(jnp.ones((1, 4, 8)),) * 3)
  with pytest.raises(ValueError, match="float32"):
    native_attention.forward(*(jnp.ones((1, 4, 16), jnp.bfloat16),) * 3)


def _include_dir():
  import jaxlib
  path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  return path if os.path.isfile(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
  """The build setup.py makes on machines that are not x86 (aarch64, say):
  no -march, the vector types lowered to whatever the baseline ISA has.
  Compiled here for this machine's baseline, to run its code paths."""
  if not shutil.which("g++") or _include_dir() is None:
    pytest.skip("needs g++ and jaxlib's FFI headers")
  out = tmp_path_factory.mktemp("portable") / "_native_portable.so"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # Every source setup.py compiles into the library (block_pool.c is its own).
  sources = sorted(os.path.relpath(p, root)
                   for p in glob.glob(os.path.join(root, "fpdm_jax", "native", "*.cc")))
  subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
                  "-Wno-psabi", "-Wno-attributes", "-w", f"-I{_include_dir()}", *sources,
                  "-o", str(out)], cwd=root, check=True, timeout=300)
  return str(out)


def test_portable_build_matches_xla(portable_build, monkeypatch):
  """Attention, the native convolutions and AdamW through the portable build."""
  monkeypatch.setattr(native, "library", lambda: portable_build)
  assert native.target_prefix() == "fpdm_native_portable"
  q, k, v, do = _operands(2, 40, 24, 32)
  got = jax.jit(lambda q, k, v, do: jax.vjp(
      lambda q, k, v: attention._attention(q, k, v, None), q, k, v)[1](do))(q, k, v, do)
  for g, w, name in zip(got, jax.vjp(_reference, q, k, v)[1](do), ("dq", "dk", "dv")):
    _close(g, w, name)

  from jax import lax

  from fpdm_jax.models import native_conv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 24)), jnp.float32)
  pad = ((1, 1), (1, 1))
  conv = lambda x, w, strides=(2, 2): lax.conv_general_dilated(  # noqa: E731
      x, w, strides, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = conv(x, w)
  _close(jax.jit(lambda x, w: native_conv.forward(x, w, y.shape[1:3], (2, 2), pad))(x, w), y,
         "conv forward")
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  want_dw = jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]
  _close(jax.jit(lambda x, dy: native_conv.kernel_gradient(x, dy, w.shape, (2, 2), pad))(x, dy),
         want_dw, "conv kernel gradient")

  from fpdm_jax.models import winograd
  y1 = conv(x, w, (1, 1))
  dy1 = jnp.asarray(rng.normal(size=y1.shape), jnp.float32)
  for tile in (2, 4):
    _close(jax.jit(lambda x, w: native_conv.winograd_forward(
        x, winograd.kernel_transform(w, tile), y1.shape[1:3], pad))(x, w), y1,
        f"Winograd forward, tile {tile}")
    _close(jax.jit(lambda x, dy: native_conv.winograd_kernel_gradient(x, dy, pad, tile))(x, dy1),
           jax.vjp(lambda w: conv(x, w, (1, 1)), w)[1](dy1)[0],
           f"Winograd kernel gradient, tile {tile}")

  import ml_collections

  from fpdm_jax.trainers import adamw, common
  tx = common.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0,
      warmup_steps=0, schedule="constant")), num_steps=10)
  params = {"w": w, "big": jnp.asarray(rng.normal(size=40_000), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  text = jax.jit(tx.apply).lower(grads, tx.init(params), params, jnp.float32(1)).as_text()
  assert "fpdm_native_portable_adamw" in text
  got = jax.jit(tx.apply)(grads, tx.init(params), params, jnp.float32(1))[0]
  want = adamw.apply_optax(tx.chain, grads, tx.init(params), params, jnp.float32(1))[0]
  for name in params:
    _close(got[name], want[name], f"AdamW {name}")
