"""fpdm_jax/native/, the native forward and kernel gradient of thin
convolutions and the native Winograd convolution: what ``lax.conv_general_dilated`` and its autodiff give (to
float32 summation order) for every build this CPU can run, the same bits on
every call, taken by the model convolution exactly where they are meant to
be, and still there when a step is loaded from JAX's persistent compilation
cache.
"""
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fpdm_jax.models import convolution, dense, native
from fpdm_jax.models import native_conv, winograd
from tests import native_fixture

NHWC = ("NHWC", "HWIO", "NHWC")

native_fixture.require_library()
one_cpu_device = native_fixture.one_cpu_device


def _lax_kernel_gradient(x, dy, kernel_shape, strides, padding):
  conv = lambda w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)  # noqa: E731
  return jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))[1](dy)[0]


def _native_calls(f, *args, kind="kernel_gradient", argnums=0) -> int:
  """Custom calls to a native call (``kind``) in the jaxpr of ``jax.grad(f)``."""
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=argnums))(*args))
  return len(re.findall(rf"target_name=fpdm_native\w*_conv_{kind}\n", jaxpr))


# (batch, (height, width), C_in, C_out, kernel, stride, padding). The block
# sizes are 8 to 64 output channels by 1 to 16 input channels, so these cover
# full blocks and left-over input channels; rows (batch * output height) below
# and above the 16 chunks; zero-padding rows and columns on every side.
CASES = [
    (2, (9, 7), 3, 8, 3, 1, ((1, 1), (1, 1))),      # RGB input, odd sizes
    (2, (16, 16), 20, 16, 3, 2, ((1, 1), (1, 1))),  # stride 2, 20 = 16 + 4 input channels
    (1, (9, 8), 8, 24, 3, 2, ((0, 1), (0, 1))),     # VAE's asymmetric downsample, 24 = 3 x 8
    (3, (5, 6), 33, 64, 1, 1, ((0, 0), (0, 0))),    # 1x1 shortcut, 33 input channels
    (2, (7, 7), 5, 32, 2, 1, ((1, 0), (0, 1))),     # even kernel, uneven padding
    (4, (24, 20), 16, 96, 3, 1, ((1, 1), (1, 1))),  # 96 rows in 16 chunks
    (1, (6, 10), 96, 40, 3, 1, ((2, 0), (0, 2))),   # wide input, padding on one side only
    (5, (7, 6), 8, 16, 3, 1, ((1, 1), (1, 1))),     # 35 rows: chunks that span two images
]


BUILDS = native.builds()
_build_id = lambda p: os.path.basename(p).split(".")[0]  # noqa: E731
_case_id = lambda c: f"b{c[0]}-{c[2]}to{c[3]}-k{c[4]}s{c[5]}"  # noqa: E731


@pytest.mark.parametrize("build", BUILDS, ids=_build_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_gradient_matches_autodiff_of_lax(build, case, monkeypatch):
  monkeypatch.setattr(native, "library", lambda: build)
  b, size, cin, cout, k, s, padding = case
  rng = np.random.default_rng(cin * 100 + cout)
  x = jnp.asarray(rng.normal(size=(b, *size, cin)), jnp.float32)
  w_shape = (k, k, cin, cout)
  out = lax.conv_general_dilated(x, jnp.zeros(w_shape), (s, s), padding, dimension_numbers=NHWC)
  dy = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  want = _lax_kernel_gradient(x, dy, w_shape, (s, s), padding)
  # A fresh function per build: jit caches traces by function.
  call = jax.jit(lambda x, dy: native_conv.kernel_gradient(x, dy, w_shape, (s, s), padding))
  assert f"target_name={native.target_prefix()}_conv_kernel_gradient\n" in str(
      jax.make_jaxpr(call)(x, dy))
  got = call(x, dy)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))
  # Chunks are summed in a fixed order: the same bits every time.
  np.testing.assert_array_equal(call(x, dy), got)


@pytest.mark.parametrize("build", BUILDS, ids=_build_id)
@pytest.mark.parametrize("case", [c for c in CASES if c[3] % 8 == 0], ids=_case_id)
def test_forward_and_input_gradient_match_lax(build, case, monkeypatch):
  monkeypatch.setattr(native, "library", lambda: build)
  b, size, cin, cout, k, s, padding = case
  rng = np.random.default_rng(cin * 100 + cout + 1)
  x = jnp.asarray(rng.normal(size=(b, *size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  want = lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=NHWC)
  call = jax.jit(lambda x, w: native_conv.forward(x, w, want.shape[1:3], (s, s), padding))
  assert f"target_name={native.target_prefix()}_conv_forward\n" in str(jax.make_jaxpr(call)(x, w))
  got = call(x, w)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))
  np.testing.assert_array_equal(call(x, w), got)  # rows are independent: same bits
  if s == 1 and cin % 8 == 0 and padding[0][0] < k and padding[1][0] < k:
    dy = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    conv = lambda x: lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)  # noqa: E731
    want_dx = jax.vjp(conv, x)[1](dy)[0]
    got_dx = jax.jit(lambda dy, w: native_conv.input_gradient(dy, w, x.shape, padding))(dy, w)
    np.testing.assert_allclose(got_dx, want_dx, atol=2e-5 * float(jnp.abs(want_dx).max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_model_conv_takes_them_and_matches_lax(stride):
  """The model convolution's forward and kernel gradient are the custom calls
  at batch 8 and batch 1 (where the kernel gradient replaces the per-tap
  matmuls); a stride-1 input gradient is the native forward too, a stride-2
  one stays the space-to-depth rule's."""
  rng = np.random.default_rng(stride)
  for batch in (8, 1):
    # 8 input channels: with 16 on both sides the kernel gradient is Winograd's.
    x = jnp.asarray(rng.normal(size=(batch, 12, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 8, 32)) * 0.1, jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(conv, x, w):
      return jnp.sum(jnp.sin(conv(x, w, (stride, stride), pad, dimension_numbers=NHWC)))

    want = jax.grad(loss, argnums=(1, 2))(lax.conv_general_dilated, x, w)
    got = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(
        convolution.conv_general_dilated, x, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))
    ours = lambda x, w: loss(convolution.conv_general_dilated, x, w)  # noqa: E731
    assert _native_calls(ours, x, w, argnums=1) == 1
    # One forward (in the forward pass), plus the input gradient at stride 1.
    assert _native_calls(ours, x, w, kind="forward") == (2 if stride == 1 else 1)
    assert str(jax.make_jaxpr(jax.grad(ours, argnums=1))(x, w)).count("dot_general") == 0


@pytest.mark.parametrize("case", ["8 devices", "bfloat16", "C_out 12", "128 -> 128", "5x5",
                                  "switched off", "all rules off"])
def test_not_taken_where_they_do_not_apply(case, monkeypatch):
  """Sharded processes (a custom call is not partitioned), other dtypes, output
  channels that are not a multiple of 8, no thin side, kernels over 3x3 and
  the switches keep XLA's convolutions."""
  cin, cout, k, dtype = 16, 16, 3, jnp.float32
  if case == "8 devices":
    monkeypatch.setattr(dense, "single_cpu_device", lambda: False)
  elif case == "bfloat16":
    dtype = jnp.bfloat16
  elif case == "C_out 12":
    cout = 12
  elif case == "128 -> 128":
    cin = cout = 128
  elif case == "5x5":
    k = 5
  elif case == "switched off":
    monkeypatch.setenv(native_conv.KERNEL_GRADIENT_OPT_OUT, "0")
    monkeypatch.setenv(native_conv.FORWARD_OPT_OUT, "0")
  else:
    monkeypatch.setenv(convolution.ENV_OPT_OUT, "0")
  x = jnp.ones((2, 8, 8, cin), dtype)
  w = jnp.ones((k, k, cin, cout), dtype)
  loss = lambda x, w: convolution.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), ((k // 2, k // 2),) * 2, dimension_numbers=NHWC).astype(jnp.float32).sum()
  assert _native_calls(loss, x, w, argnums=(0, 1)) == 0
  assert _native_calls(loss, x, w, argnums=(0, 1), kind="forward") == 0


def test_rejects_what_they_cannot_compute():
  x, dy = jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 12))
  with pytest.raises(ValueError, match="C_out % 8"):
    native_conv.kernel_gradient(x, dy, (3, 3, 3, 12), (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="float32"):
    native_conv.forward(x.astype(jnp.bfloat16), jnp.ones((3, 3, 3, 8)), (4, 4), (1, 1),
                   ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="multiples of 8"):
    native_conv.winograd_forward(jnp.ones((1, 4, 4, 12)), jnp.ones((16, 12, 16)), (4, 4),
                                 ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="float32"):
    native_conv.winograd_forward(jnp.ones((1, 4, 4, 8), jnp.bfloat16), jnp.ones((16, 8, 8)),
                                 (4, 4), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="channels % 8"):
    native_conv.winograd_kernel_gradient(jnp.ones((1, 4, 4, 12)), jnp.ones((1, 4, 4, 16)),
                                         ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="tile 2 or 4"):
    native_conv.winograd_kernel_gradient(jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4, 4, 8)),
                                         ((1, 1), (1, 1)), tile=3)
  with pytest.raises(ValueError, match="tile 2 or 4"):
    winograd.kernel_transform(jnp.ones((3, 3, 8, 8)), 6)
  with pytest.raises(ValueError, match="16 or 36"):
    native_conv.winograd_forward(jnp.ones((1, 4, 4, 8)), jnp.ones((64, 8, 8)), (4, 4),
                                 ((1, 1), (1, 1)))


def _winograd_calls(f, *args, argnums=0, kind="forward") -> int:
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=argnums))(*args))
  return len(re.findall(rf"target_name=fpdm_native\w*_winograd_{kind}\n", jaxpr))


# (batch, (height, width), C_in, C_out, padding). Input vectors of 16 and 8
# channels (24), output blocks of 64, 32, 16 and 8 (40); output sizes that
# leave part tiles of both sizes; padding 0-2 on one side; 480 2x2 tiles in 3
# chunks; the kernel gradient's tile ranges and groups of positions.
WINOGRAD_CASES = [
    (2, (7, 9), 16, 24, ((1, 1), (1, 1))),
    (1, (8, 8), 16, 16, ((2, 0), (0, 2))),
    (3, (5, 6), 32, 64, ((0, 0), (1, 1))),
    (2, (8, 8), 256, 128, ((1, 1), (1, 1))),
    (4, (24, 20), 16, 96, ((1, 1), (1, 1))),
    (2, (6, 5), 24, 40, ((1, 1), (1, 1))),
    # 3960 2x2 tiles, 1012 4x4: 15 and 3 kernel-gradient tile ranges.
    (2, (88, 90), 16, 16, ((1, 1), (1, 1))),
    (1, (6, 6), 96, 160, ((1, 1), (1, 1))),   # kernel-gradient positions 4 x 4 and 9 x 4
    (1, (5, 4), 256, 256, ((1, 1), (1, 1))),  # and 16 x 1 and 36 x 1
]


@pytest.mark.parametrize("build", BUILDS, ids=_build_id)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: f"b{c[0]}-{c[2]}to{c[3]}-{c[4]}")
def test_winograd_forward_and_gradients_match_lax(build, case, monkeypatch):
  """Forward and input gradient as F(2x2, 3x3) and F(4x4, 3x3), and the
  kernel gradient, against lax at precision highest: to 2e-5 of the largest
  value for F(2x2) (Winograd's transforms add a few float32 roundings:
  measured 3e-7-2e-6), 5e-5 for F(4x4), whose transforms scale by up to 8
  and 1/24 (measured 1e-6-1e-5); the same bits on every call."""
  monkeypatch.setattr(native, "library", lambda: build)
  b, size, cin, cout, padding = case
  rng = np.random.default_rng(cin * 100 + cout + 2)
  x = jnp.asarray(rng.normal(size=(b, *size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
  conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), padding, dimension_numbers=NHWC, precision="highest")
  want, vjp = jax.vjp(conv, x, w)
  dy = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  want_dx, want_dw = vjp(dy)
  for tile, tolerance in ((2, 2e-5), (4, 5e-5)):
    call = jax.jit(lambda x, w: native_conv.winograd_forward(
        x, winograd.kernel_transform(w, tile), want.shape[1:3], padding))
    assert f"target_name={native.target_prefix()}_winograd_forward\n" in str(
        jax.make_jaxpr(call)(x, w))
    got = call(x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=tolerance * float(jnp.abs(want).max()),
                               err_msg=f"F({tile}x{tile}, 3x3) forward")
    np.testing.assert_array_equal(call(x, w), got)  # chunks are independent: same bits
    got_dx = jax.jit(lambda dy, w: native_conv.winograd_input_gradient(
        dy, w, x.shape, padding, tile))(dy, w)
    np.testing.assert_allclose(got_dx, want_dx, atol=tolerance * float(jnp.abs(want_dx).max()),
                               err_msg=f"F({tile}x{tile}, 3x3) input gradient")
  for tile, tolerance in ((2, 2e-5), (4, 5e-5)):
    kernel_gradient = jax.jit(lambda x, dy: native_conv.winograd_kernel_gradient(
        x, dy, padding, tile))
    got_dw = kernel_gradient(x, dy)
    assert got_dw.shape == w.shape and got_dw.dtype == jnp.float32
    np.testing.assert_allclose(got_dw, want_dw, atol=tolerance * float(jnp.abs(want_dw).max()),
                               err_msg=f"F(3x3, {tile}x{tile}) kernel gradient")
    # Partial sums per tile range, summed in order: the same bits.
    np.testing.assert_array_equal(kernel_gradient(x, dy), got_dw)


@pytest.mark.parametrize("case", ["512 tiles", "XLA's Winograd shape", "batch 1", "batch 1, 32x32",
                                  "8 channels", "stride 2", "switched off",
                                  "kernel gradient switched off", "4x4 tiles switched off"])
def test_model_conv_takes_winograd_where_it_should(case, monkeypatch):
  """Forward and input gradient are native Winograd from 512 2x2 tiles
  (16 channels and more) and where XLA-op Winograd would be used, as
  F(4x4, 3x3) from 64 4x4 tiles (then below 512 2x2 tiles too); the kernel
  gradient is native Winograd at any number of tiles. Gradients match lax's
  either way."""
  batch, size, cin, cout, stride, taken, kernel_gradient_taken = 8, 16, 16, 16, 1, True, True
  tile = 4
  if case == "XLA's Winograd shape":
    size, cin, cout, tile = 8, 256, 256, 2  # 32 4x4 tiles
  elif case == "4x4 tiles switched off":
    monkeypatch.setenv(convolution.WINOGRAD_4X4_OPT_OUT, "0")
    tile = 2
  elif case == "batch 1":
    batch, taken, tile = 1, False, 2  # 16 4x4 tiles
  elif case == "batch 1, 32x32":
    batch, size = 1, 32  # 256 2x2 tiles, 64 4x4 tiles
  elif case == "8 channels":
    cin = cout = 8
    taken = kernel_gradient_taken = False
  elif case == "stride 2":
    stride, taken, kernel_gradient_taken = 2, False, False
  elif case == "switched off":
    monkeypatch.setenv(native_conv.WINOGRAD_OPT_OUT, "0")
    taken = kernel_gradient_taken = False
  elif case == "kernel gradient switched off":
    monkeypatch.setenv(native_conv.WINOGRAD_KERNEL_GRADIENT_OPT_OUT, "0")
    kernel_gradient_taken = False
  rng = np.random.default_rng(cin)
  x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
  pad = ((1, 1), (1, 1))

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, (stride, stride), pad, dimension_numbers=NHWC)))

  ours = lambda x, w: loss(convolution.conv_general_dilated, x, w)  # noqa: E731
  assert _winograd_calls(ours, x, w, argnums=(0, 1)) == (2 if taken else 0)
  if taken:  # the transformed kernels' shape says which
    transforms = re.findall(r"f32\[(16|36),(\d+),(\d+)\]", str(
        jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, w)))
    assert {int(k) for k, _, _ in transforms} == {(tile + 2) ** 2}
  if kernel_gradient_taken:  # F(3x3, 4x4) where the forward is F(4x4, 3x3) here
    assert re.findall(r"\('tile', np.int64\((\d)\)\)", str(
        jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, w))) == [str(tile)]
  assert (_winograd_calls(ours, x, w, argnums=(0, 1), kind="kernel_gradient")
          == (1 if kernel_gradient_taken else 0))
  if not (taken or kernel_gradient_taken):
    return
  want = jax.grad(loss, argnums=(1, 2))(
      lambda *a, **k: lax.conv_general_dilated(*a, **k, precision="highest"), x, w)
  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((2, 0), (0, 2))], ids=["same", "one-sided"])
def test_benchmarks_count_native_calls_as_xla_counts_the_conv(padding):
  """The roofline's FLOPs (``benchmarks.common.native_conv_flops``) count
  each native call, Winograd or direct, as XLA's cost analysis counts the
  lax convolution or kernel gradient it replaces."""
  from benchmarks import common

  def xla_flops(f, *args):
    ca = jax.jit(f).lower(*args).compile().cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])

  def native_flops(f, *args):
    return common.native_conv_flops(jax.jit(f).lower(*args).compile().as_text())

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 24)), jnp.float32)
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)  # noqa: E731
  y = conv(x, w)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  forward = xla_flops(conv, x, w)
  kernel_gradient = xla_flops(lambda x, dy: _lax_kernel_gradient(x, dy, w.shape, (1, 1), padding),
                              x, dy)
  assert forward > 0 and kernel_gradient > 0
  for tile in (2, 4):
    assert native_flops(lambda x, w: native_conv.winograd_forward(
        x, winograd.kernel_transform(w, tile), y.shape[1:3], padding), x, w) == pytest.approx(
            forward)
    assert native_flops(lambda x, dy: native_conv.winograd_kernel_gradient(
        x, dy, padding, tile), x, dy) == pytest.approx(kernel_gradient)
  assert native_flops(lambda x, w: native_conv.forward(x, w, y.shape[1:3], (1, 1), padding),
                      x, w) == pytest.approx(forward)
  assert native_flops(lambda x, dy: native_conv.kernel_gradient(x, dy, w.shape, (1, 1), padding),
                      x, dy) == pytest.approx(kernel_gradient)


SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from fpdm_jax.models import convolution
    assert jax.device_count() == 1
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 8, 16)), jnp.float32)
    loss = lambda w: jnp.sum(jnp.sin(convolution.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))
    assert "_kernel_gradient" in str(jax.make_jaxpr(jax.grad(loss))(w))
    np.save(sys.argv[2], np.asarray(jax.jit(jax.grad(loss))(w)))
""")


def test_a_cached_executable_finds_the_custom_call(tmp_path):
  """The second process loads the step the first compiled into the persistent
  cache: the custom call must be registered by then, and give the same bits."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
  cache = tmp_path / "cache"
  for run in ("first", "second"):
    subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(tmp_path / f"{run}.npy")],
                   env=env, check=True, timeout=300)
  assert any(cache.iterdir())
  np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), np.load(tmp_path / "second.npy"))
