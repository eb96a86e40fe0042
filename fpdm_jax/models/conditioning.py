"""FPDM's conditioning modules around the SD UNet.

* ``PoseEmbedding``: the ControlNet conditioning embedding (diffusers'
  ``ControlNetConditioningEmbedding``) that maps the rendered target-pose
  image at full resolution to ``block_out_channels[0]`` channels at 1/8
  resolution; the UNet adds it to its ``conv_in`` output. Its last conv is
  zero-initialised so a fresh FPDM UNet starts as the plain SD UNet.
* ``ClassEmbeddingMLP``: maps the 768-d fusion embedding to the time-embedding
  width; the UNet adds it to the time embedding.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax.models.diffusers_blocks import conv2d, linear


class PoseEmbedding(nnx.Module):
  """conv3x3(3->16) SiLU; per (16->32, 32->96, 96->256): conv3x3 same width +
  SiLU, conv3x3 stride 2 + SiLU; zero-initialised conv3x3 (256->out).

  Parameter names follow diffusers (``conv_in``, ``blocks.0..5``, ``conv_out``).
  Input NHWC ``[B, H, W, 3]``, output ``[B, H/8, W/8, out_channels]``.
  """

  def __init__(self, out_channels: int = 320, *, in_channels: int = 3,
               channels: Sequence[int] = (16, 32, 96, 256), dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv_in = conv2d(in_channels, channels[0], 3, dtype=dtype, rngs=rngs)
    blocks = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
      blocks.append(conv2d(c_in, c_in, 3, dtype=dtype, rngs=rngs))
      blocks.append(conv2d(c_in, c_out, 3, stride=2, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.conv_out = conv2d(channels[-1], out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_out.kernel.set_value(jnp.zeros_like(self.conv_out.kernel.get_value()))
    self.conv_out.bias.set_value(jnp.zeros_like(self.conv_out.bias.get_value()))

  def __call__(self, pose_image: jax.Array) -> jax.Array:
    x = jax.nn.silu(self.conv_in(pose_image))
    for conv in self.blocks:
      x = jax.nn.silu(conv(x))
    return self.conv_out(x)


class ClassEmbeddingMLP(nnx.Module):
  """Linear(768->768), GELU (exact), Dropout(0.2), Linear(768->time_embed_dim), Dropout(0.2).

  Exported as ``class_embedding.0.*`` / ``class_embedding.3.*``: the layout of
  the ``torch.nn.Sequential`` that FPDM assigns to diffusers'
  ``unet.class_embedding``.
  """

  def __init__(self, in_dim: int = 768, out_dim: int = 1280, *, dropout: float = 0.2,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = linear(in_dim, in_dim, dtype=dtype, rngs=rngs)
    self.linear_2 = linear(in_dim, out_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``deterministic=False`` needs ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` stream or a key)."""
    if not deterministic and isinstance(rngs, jax.Array):
      k1, k2 = jax.random.split(rngs)
    else:
      k1 = k2 = rngs
    x = jax.nn.gelu(self.linear_1(x), approximate=False)
    x = self.dropout(x, deterministic=deterministic, rngs=k1)
    return self.dropout(self.linear_2(x), deterministic=deterministic, rngs=k2)
