"""Stage 1 of FPDM: the fusion embedding of (source image, target pose).

One CLIP image encoder with shared weights embeds the source photo, the
rendered target pose and the target photo; the Combiner (the CLIP4Cir
design) fuses the first two into ``f``, trained so that ``f`` retrieves the
target's embedding. Stage 2 conditions the UNet on ``f``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax.models import dense
from fpdm_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from fpdm_jax.models.normalization import LayerNorm


def _keys(rngs, n):
  if rngs is None:
    return [None] * n
  if isinstance(rngs, nnx.Rngs):
    return [rngs.dropout() for _ in range(n)]
  return list(jax.random.split(rngs, n))


class Combiner(nnx.Module):
  """CLIP4Cir's combiner with FPDM's sizes (all hidden widths = embed dim).

  ``out = W_o h + lam * x_pose + (1 - lam) * x_img``: the learned scalar
  ``lam`` mixes the two raw embeddings, so at initialisation the fusion
  embedding is already close to a blend of pose and appearance.
  """

  def __init__(self, dim: int = 768, *, dropout: float = 0.5, dtype=jnp.float32,
               rngs: nnx.Rngs):
    lin = lambda i, o: dense.linear(i, o, dtype=dtype, rngs=rngs)
    self.pose_projection = lin(dim, dim)
    self.image_projection = lin(dim, dim)
    self.combiner_layer = lin(2 * dim, dim)
    self.dynamic_scalar_1 = lin(2 * dim, dim)
    self.dynamic_scalar_2 = lin(dim, 1)
    self.output_layer = lin(dim, dim)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_img: jax.Array, x_pose: jax.Array, *, deterministic: bool = True,
               rngs=None) -> jax.Array:
    """Returns the L2-normalised fusion embedding ``f`` [B, dim]."""
    k = _keys(None if deterministic else rngs, 4)
    drop = lambda x, key: self.dropout(x, deterministic=deterministic, rngs=key)
    p = drop(jax.nn.relu(self.pose_projection(x_pose)), k[0])
    q = drop(jax.nn.relu(self.image_projection(x_img)), k[1])
    r = jnp.concatenate([p, q], axis=-1)
    h = drop(jax.nn.relu(self.combiner_layer(r)), k[2])
    lam = jax.nn.sigmoid(self.dynamic_scalar_2(drop(jax.nn.relu(self.dynamic_scalar_1(r)), k[3])))
    out = self.output_layer(h) + lam * x_pose + (1.0 - lam) * x_img
    out = out.astype(jnp.float32)
    return out / jnp.linalg.norm(out, axis=-1, keepdims=True).clip(1e-12)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  clip: CLIPVisionConfig
  dropout: float = 0.5


class FusionModel(nnx.Module):
  """The shared CLIP encoder ``E`` plus the Combiner."""

  def __init__(self, config: FusionConfig, *, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    self.config = config
    clip_cfg = dataclasses.replace(config.clip, remat=remat) if remat else config.clip
    self.encoder = CLIPVisionModelWithProjection(clip_cfg, dtype=dtype, rngs=rngs)
    self.combiner = Combiner(config.clip.projection_dim, dropout=config.dropout,
                             dtype=dtype, rngs=rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """E(images): CLIP ``image_embeds`` [B, D] (not normalised), float32."""
    return self.encoder(images).image_embeds.astype(jnp.float32)

  def __call__(self, source: jax.Array, pose: jax.Array, *, deterministic: bool = True,
               rngs=None) -> jax.Array:
    """f(source, pose): the fusion embedding stage 2 conditions on."""
    b = source.shape[0]
    e = self.embed(jnp.concatenate([source, pose], 0))
    return self.combiner(e[:b], e[b:], deterministic=deterministic, rngs=rngs)


class SourceProjection(nnx.Module):
  """Source-encoder patch tokens -> the UNet's cross-attention context.

  Linear(in->768), GELU, Dropout, LayerNorm(768), Linear(768->context), Dropout.
  """

  def __init__(self, in_dim: int = 1024, context_dim: int = 1024, hidden: int = 768, *,
               dropout: float = 0.2, dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = dense.linear(in_dim, hidden, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(hidden, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.linear_2 = dense.linear(hidden, context_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True, rngs=None) -> jax.Array:
    k = _keys(None if deterministic else rngs, 2)
    x = jax.nn.gelu(self.linear_1(tokens), approximate=False)
    x = self.dropout(x, deterministic=deterministic, rngs=k[0])
    x = self.linear_2(self.norm(x))
    return self.dropout(x, deterministic=deterministic, rngs=k[1])
