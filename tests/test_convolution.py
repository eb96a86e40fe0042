"""The model convolution's CPU rules: per-tap kernel gradients at batch 1,
space-to-depth input gradients of thin stride-2 convs, tap-sum forwards of
RGB-input convs at large image sizes, Winograd convolutions of wide 3x3 ones.

The values must be what autodiff of ``lax.conv_general_dilated`` gives (to
float32 summation order), and each rule must really be the one taken where it
is meant to be, or these tests would compare XLA with itself.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from fpdm_jax.models import convolution, diffusers_blocks

NHWC = ("NHWC", "HWIO", "NHWC")


def _tap_matmuls(f, *args) -> int:
  """How many dot_generals the gradient of ``f`` contains (a conv has none)."""
  return str(jax.make_jaxpr(jax.grad(f))(*args)).count("dot_general")


def _dilated_convs(f, *args) -> int:
  """How many zero-dilated-input convolutions (XLA's stride-2 input gradient)
  the gradient of ``f`` contains."""
  return str(jax.make_jaxpr(jax.grad(f))(*args)).count("lhs_dilation=(2, 2)")


def _loss(conv, x, w, stride, padding, dn):
  y = conv(x, w, (stride, stride), padding, dimension_numbers=dn)
  return jnp.sum(jnp.sin(y))  # a non-constant cotangent


def _assert_gradients_match_lax(x, w, stride, padding, dn):
  """Input and kernel gradients of the model conv against autodiff of lax's,
  to float32 summation order; returns the model conv's (input, kernel)."""
  grad = jax.grad(_loss, argnums=(1, 2))
  want = grad(lax.conv_general_dilated, x, w, stride, padding, dn)
  got = jax.jit(grad, static_argnums=(0, 3, 4, 5))(
      convolution.conv_general_dilated, x, w, stride, padding, dn)
  for g, r, name in zip(got, want, ("input", "kernel")):
    np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()), err_msg=name)
  return got


@pytest.mark.parametrize("kernel,stride,padding,channels", [
    (3, 1, ((1, 1), (1, 1)), (16, 6)),   # ResnetBlock2D
    (3, 2, ((1, 1), (1, 1)), (16, 6)),   # Downsample2D / pose embedding
    (3, 2, ((0, 1), (0, 1)), (8, 6)),    # VAE encoder's asymmetric downsample
    (1, 1, ((0, 0), (0, 0)), (16, 6)),   # conv_shortcut
    (2, 1, ((1, 0), (0, 1)), (3, 5)),    # even kernel, uneven padding, RGB input
])
def test_batch1_gradients_match_autodiff_of_lax_conv(kernel, stride, padding, channels):
  cin, cout = channels
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(1, 9, 7, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

  want_y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
  got_y = convolution.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
  np.testing.assert_array_equal(got_y, want_y)  # the forward is lax's own

  got = _assert_gradients_match_lax(x, w, stride, padding, dn)
  assert got[1].dtype == w.dtype
  assert _tap_matmuls(lambda w: _loss(convolution.conv_general_dilated, x, w, stride, padding,
                                      dn), w) == kernel ** 2
  assert _tap_matmuls(lambda w: _loss(lax.conv_general_dilated, x, w, stride, padding, dn),
                      w) == 0


@pytest.mark.parametrize("kernel,size,padding", [
    (3, (16, 16), ((1, 1), (1, 1))),   # pose embedding / Downsample2D
    (3, (9, 7), ((0, 1), (0, 1))),     # VAE encoder's asymmetric downsample, odd sizes
    (2, (9, 8), ((0, 0), (1, 0))),     # even kernel: the last row is cropped
    (4, (10, 10), ((1, 2), (2, 1))),
    (1, (7, 6), ((0, 0), (0, 0))),     # strided 1x1
])
def test_space_to_depth_matches_the_stride2_conv(kernel, size, padding):
  rng = np.random.default_rng(kernel)
  x = jnp.asarray(rng.normal(size=(2, *size, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 8, 5)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  want = lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=dn)
  got = convolution.space_to_depth_conv(x, w, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()))

  # The model conv at batch 2 takes its input gradient this way; the kernel
  # gradient stays XLA's (no per-tap matmuls).
  _assert_gradients_match_lax(x, w, 2, padding, dn)
  assert _dilated_convs(lambda x: _loss(convolution.conv_general_dilated, x, w, 2, padding, dn),
                        x) == 0
  assert _dilated_convs(lambda x: _loss(lax.conv_general_dilated, x, w, 2, padding, dn), x) == 1
  assert _tap_matmuls(lambda w: _loss(convolution.conv_general_dilated, x, w, 2, padding, dn),
                      w) == 0


def _forward_convs(f, *args) -> int:
  """How many convolutions the forward of ``f`` contains."""
  return str(jax.make_jaxpr(f)(*args)).count("conv_general_dilated")


@pytest.mark.parametrize("size,stride,channels,padding", [
    ((64, 64), 1, (3, 8), ((1, 1), (1, 1))),    # small pose embedding conv_in
    ((64, 66), 1, (3, 16), ((1, 1), (1, 1))),   # FPDM's, non-square
    ((129, 130), 2, (4, 32), ((0, 1), (1, 0))),  # strided, uneven padding
])
def test_tap_sum_forward_matches_lax_conv(size, stride, channels, padding):
  cin, cout = channels
  rng = np.random.default_rng(cout)
  x = jnp.asarray(rng.normal(size=(2, *size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  conv = lambda f, x, w: f(x, w, (stride, stride), padding, dimension_numbers=dn)  # noqa: E731

  want = conv(lax.conv_general_dilated, x, w)
  got = jax.jit(conv, static_argnums=0)(convolution.conv_general_dilated, x, w)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()))
  assert _forward_convs(lambda x: conv(convolution.conv_general_dilated, x, w), x) == 0

  # Its gradients are the convolution's own.
  got = _assert_gradients_match_lax(x, w, stride, padding, dn)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3, 8),     # too few pixels
                                   (2, 64, 64, 8, 8),     # too many input channels
                                   (2, 64, 64, 3, 64)])   # too many output channels
def test_tap_sum_forward_only_where_it_is_faster(shape):
  b, h, wd, cin, cout = shape
  x = jnp.ones((b, h, wd, cin))
  w = jnp.ones((3, 3, cin, cout))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  assert _forward_convs(lambda x: convolution.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn), x) == 1


def test_tap_sum_forward_in_bfloat16():
  """Accumulated in float32, returned in the input's dtype, as lax's is."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 64, 64, 3)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 16)), jnp.bfloat16)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  got = convolution.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
  want = lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1),
                                  ((1, 1), (1, 1)), dimension_numbers=dn)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.02 * float(abs(want).max()))


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
  """Mixed precision: the kernel gradient is accumulated in float32 and comes
  back in the kernel's dtype, as lax's does."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.bfloat16)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  pad = ((1, 1), (1, 1))
  got = jax.grad(lambda w: _loss(convolution.conv_general_dilated, x, w, 1, pad, dn))(w)
  want = jax.grad(lambda w: _loss(lax.conv_general_dilated, x.astype(jnp.float32), w, 1, pad,
                                  dn))(w.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05 * float(abs(want).max()))


@pytest.mark.parametrize("case", ["batch 2", "batch 2, stride 2, 64 channels", "grouped",
                                  "dilated", "SAME padding", "5x5 kernel"])
def test_other_convolutions_are_lax_unchanged(case):
  """Batch > 1 (where XLA's own kernel gradient is faster), stride 2 from 64
  input channels (where XLA's input gradient is), grouped, dilated,
  string-padded and larger-than-3x3 convs take lax's path: same values, no
  per-tap matmuls, XLA's own input gradient."""
  rng = np.random.default_rng(0)
  batch = 1 if case in ("grouped", "dilated", "SAME padding", "5x5 kernel") else 2
  size = 5 if case == "5x5 kernel" else 3
  groups = 2 if case == "grouped" else 1
  cin = 64 if "64 channels" in case else 16
  stride = 2 if "stride 2" in case else 1
  x = jnp.asarray(rng.normal(size=(batch, 8, 8, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(size, size, cin // groups, 4)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  kwargs = dict(padding=((1, 1), (1, 1)), feature_group_count=groups)
  if case == "dilated":
    kwargs.update(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))
  if case == "SAME padding":
    kwargs.update(padding="SAME")

  def conv(conv_fn, x, w):
    return conv_fn(x, w, (stride, stride), dimension_numbers=dn, **kwargs)

  np.testing.assert_array_equal(conv(convolution.conv_general_dilated, x, w),
                                conv(lax.conv_general_dilated, x, w))
  ours = lambda x, w: conv(convolution.conv_general_dilated, x, w).sum()  # noqa: E731
  assert _tap_matmuls(lambda w: ours(x, w), w) == 0
  assert _dilated_convs(lambda x: ours(x, w), x) == (1 if stride == 2 else 0)


def test_environment_switch_turns_all_rules_off(monkeypatch):
  monkeypatch.setenv(convolution.ENV_OPT_OUT, "off")
  x = jnp.ones((1, 8, 8, 16))
  w = jnp.ones((3, 3, 16, 4))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

  def loss(x, w):
    return convolution.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=dn).sum()

  assert _tap_matmuls(lambda w: loss(x, w), w) == 0
  assert _dilated_convs(lambda x: loss(x, w), x) == 1
  rgb, w_rgb = jnp.ones((1, 64, 64, 3)), jnp.ones((3, 3, 3, 8))
  rgb_conv = lambda x: convolution.conv_general_dilated(  # noqa: E731
      x, w_rgb, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
  # A fresh lambda per trace: make_jaxpr caches by function, and the switch is
  # read at trace time.
  assert _forward_convs(lambda x: rgb_conv(x), rgb) == 1
  jax.jvp(lambda x: loss(x, w), (x,), (x,))  # plain lax: forward mode works
  monkeypatch.setenv(convolution.ENV_OPT_OUT, "1")
  assert _tap_matmuls(lambda w: loss(x, w), w) == 9
  assert _dilated_convs(lambda x: loss(x, w), x) == 0
  assert _forward_convs(lambda x: rgb_conv(x), rgb) == 0


def test_model_convs_use_it():
  """``diffusers_blocks.conv2d`` (every UNet, VAE and pose-embedding conv)
  goes through it: its batch-1 kernel gradient is nine matmuls."""
  conv = diffusers_blocks.conv2d(16, 8, 3, stride=2, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 8, 8, 16))
  graphdef, params = nnx.split(conv)
  assert _tap_matmuls(lambda p: nnx.merge(graphdef, p)(x).sum(), params) == 9


@pytest.mark.parametrize("size,padding", [
    ((8, 8), ((1, 1), (1, 1))),     # the UNet's resnets
    ((9, 7), ((1, 1), (1, 1))),     # odd output sizes: computed larger and cut
    ((8, 10), ((0, 0), (0, 0))),    # VALID
    ((7, 8), ((2, 0), (1, 2))),     # uneven padding
])
def test_winograd_matches_autodiff_of_lax_conv(size, padding):
  """F(2x2, 3x3)'s forward and (autodiff) gradients against lax's direct
  convolution, to a few float32 roundings of the largest value."""
  from fpdm_jax.models import winograd
  rng = np.random.default_rng(size[0] * size[1])
  x = jnp.asarray(rng.normal(size=(2, *size, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 12, 8)), jnp.float32)

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w)))

  direct = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), padding, dimension_numbers=NHWC, precision="highest")
  ours = lambda x, w: winograd.conv3x3(x, w, padding)  # noqa: E731
  want, got = direct(x, w), jax.jit(ours)(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
  for g, r, name in zip(jax.jit(jax.grad(lambda x, w: loss(ours, x, w), (0, 1)))(x, w),
                        jax.grad(lambda x, w: loss(direct, x, w), (0, 1))(x, w),
                        ("input", "kernel")):
    np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()), rtol=0, err_msg=name)


@pytest.mark.parametrize("shape,stride,taken", [
    ((8, 8, 8, 256, 256), 1, True),    # the medium UNet's 8x8 level at batch 8
    ((8, 8, 8, 512, 256), 1, True),    # its up block's concatenated input
    ((1, 8, 8, 256, 256), 1, False),   # batch 1: too few tiles for the matmuls
    ((8, 16, 16, 128, 128), 1, False), # too few channels
    ((8, 8, 8, 256, 256), 2, False),   # stride 2
])
def test_winograd_only_where_it_is_faster(shape, stride, taken, monkeypatch):
  b, h, wd, cin, cout = shape
  x, w = jnp.zeros((b, h, wd, cin)), jnp.zeros((3, 3, cin, cout))
  # A fresh lambda per trace: the switch is read at trace time.
  conv = lambda: lambda x, w: convolution.conv_general_dilated(  # noqa: E731
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC)
  assert _forward_convs(conv(), x, w) == (0 if taken else 1)
  if taken:
    monkeypatch.setenv(convolution.WINOGRAD_OPT_OUT, "0")
    assert _forward_convs(conv(), x, w) == 1
