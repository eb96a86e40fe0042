"""LPIPS (AlexNet trunk, version 0.1) as a Flax NNX module.

Reproduces ``lpips.LPIPS(net="alex", version="0.1")(x, y, normalize=True)``,
the perceptual distance every pose-transfer paper reports:

1. ``[0, 1]`` inputs -> ``[-1, 1]`` (``normalize=True``), then lpips'
   ``ScalingLayer``: ``(x - shift) / scale`` with shift ``[-.030, -.088, -.188]``
   and scale ``[.458, .448, .450]`` (the ImageNet statistics expressed in
   ``[-1, 1]``).
2. The five ReLU outputs of torchvision AlexNet's ``features`` (after the convs
   ``features.0/3/6/8/10``; max-pools before the second and third conv).
3. Each feature map is divided by its channel L2 norm plus ``1e-10`` (lpips'
   ``normalize_tensor``), the squared difference goes through that layer's 1x1
   conv head ``lin{k}`` (no bias, the learned perceptual weights), is
   averaged over space, and the five layers are summed.

Parameter names are ``features_{i}`` (torchvision's ``features.{i}``) and
``lin{k}`` (lpips' ``lin{k}.model.1``); ``fpdm_jax.importers.lpips`` maps them.
Convolutions use ``Precision.HIGHEST`` so TPU numbers equal CPU/GPU ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
# torchvision alexnet().features indices of the five convs: (in, out, kernel, stride, pad).
ALEXNET_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1),
                 8: (384, 256, 3, 1, 1), 10: (256, 256, 3, 1, 1)}


def _max_pool_3x3_s2(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def normalize_tensor(x, eps: float = 1e-10):
  """lpips.normalize_tensor: unit L2 norm over channels (eps added to the norm)."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


class LPIPS(nnx.Module):
  """``lpips(x, y)`` on ``[B, H, W, 3]`` images -> ``[B]`` distances.

  Args:
    normalize: inputs are in ``[0, 1]`` (the protocol) and are mapped to
      ``[-1, 1]``; set False for inputs already in ``[-1, 1]``.
  """

  def __init__(self, *, normalize: bool = True, precision=jax.lax.Precision.HIGHEST,
               rngs: nnx.Rngs):
    self.normalize = normalize
    for i, (cin, cout, k, s, p) in ALEXNET_CONVS.items():
      setattr(self, f"features_{i}", nnx.Conv(cin, cout, (k, k), strides=(s, s),
                                              padding=((p, p), (p, p)),
                                              precision=precision, rngs=rngs))
    for k, c in enumerate(CHANNELS):
      setattr(self, f"lin{k}", nnx.Conv(c, 1, (1, 1), use_bias=False, precision=precision,
                                        rngs=rngs))

  def scale_input(self, x):
    x = x.astype(jnp.float32)
    if self.normalize:
      x = 2 * x - 1
    return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)

  def alexnet_features(self, x) -> list[jax.Array]:
    """relu1..relu5 of the AlexNet trunk (lpips' ``pretrained_networks.alexnet``)."""
    h1 = jax.nn.relu(self.features_0(x))
    h2 = jax.nn.relu(self.features_3(_max_pool_3x3_s2(h1)))
    h3 = jax.nn.relu(self.features_6(_max_pool_3x3_s2(h2)))
    h4 = jax.nn.relu(self.features_8(h3))
    h5 = jax.nn.relu(self.features_10(h4))
    return [h1, h2, h3, h4, h5]

  def per_layer(self, x, y) -> list[jax.Array]:
    """The five spatially averaged layer terms, each ``[B]`` (lpips' retPerLayer)."""
    if x.shape != y.shape:
      raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    # One trunk pass over both images: half the kernel launches.
    feats = self.alexnet_features(self.scale_input(jnp.concatenate([x, y], axis=0)))
    b = x.shape[0]
    out = []
    for k, f in enumerate(feats):
      d = (normalize_tensor(f[:b]) - normalize_tensor(f[b:])) ** 2
      out.append(jnp.mean(getattr(self, f"lin{k}")(d), axis=(1, 2, 3)))
    return out

  def __call__(self, x, y) -> jax.Array:
    res = self.per_layer(x, y)
    val = res[0]
    for r in res[1:]:
      val = val + r
    return val
