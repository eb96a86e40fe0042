"""CLIP vision tower + visual projection as a Flax NNX module.

Stage 1 of FPDM trains ONE CLIP ViT-L/14 image encoder (its 768-d
``image_embeds``) on source, pose and target images; stage 2 may use its
patch tokens as the source condition. The module equals transformers'
``CLIPVisionModelWithProjection`` numerically, so published checkpoints
(openai/clip-vit-large-patch14) load through ``fpdm_jax.importers.clip`` and
trained weights export back to a folder transformers can open.

Parameter names mirror the PyTorch tree (``vision_model.encoder.layers.3
.self_attn.q_proj.kernel``), except the PyTorch typo ``pre_layrnorm`` which is
spelled ``pre_layernorm`` here and renamed by the importer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fpdm_jax.models import dense
from fpdm_jax.models.attention import dot_product_attention
from fpdm_jax.models.dinov2 import activation, interpolate_patch_positions, run_layers
from fpdm_jax.models.normalization import LayerNorm

Dtype = Any

# CLIP's image normalisation (what the inputs of this module must already have).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Fields and defaults as transformers' ``CLIPVisionConfig`` (defaults = ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # Ours: rematerialise each encoder layer in the backward pass.
  remat: bool = False

  @classmethod
  def vit_l14(cls, **kw) -> "CLIPVisionConfig":
    """openai/clip-vit-large-patch14 (the FPDM stage-1 encoder)."""
    return cls(**{**dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, patch_size=14, image_size=224,
                         projection_dim=768), **kw})

  @classmethod
  def vit_b16(cls, **kw) -> "CLIPVisionConfig":
    """openai/clip-vit-base-patch16."""
    return cls(**{**dict(patch_size=16, projection_dim=512), **kw})

  @classmethod
  def tiny(cls, **kw) -> "CLIPVisionConfig":
    """For tests: 2x2 patch grid, 2 layers."""
    return cls(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=28, patch_size=14,
                         projection_dim=16), **kw})

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any], **overrides) -> "CLIPVisionConfig":
    """From a ``CLIPConfig`` json (model_type "clip") or a ``CLIPVisionConfig`` one.

    In a full CLIPConfig the projection width is the TOP-LEVEL
    ``projection_dim`` (``vision_config.projection_dim`` is often a stale 512
    default), because that is what ``CLIPModel.visual_projection`` uses.
    """
    model_type = config.get("model_type")
    if "vision_config" in config or "vision_config_dict" in config or model_type == "clip":
      # Older Hub configs (openai/clip-vit-large-patch14) also carry
      # ``vision_config_dict``, whose values transformers lets win.
      vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
      if "projection_dim" in config:
        vision["projection_dim"] = config["projection_dim"]
    elif model_type in (None, "clip_vision_model"):
      vision = dict(config)
    else:
      raise ValueError(f"config.json has model_type {model_type!r}, expected 'clip' "
                       "or 'clip_vision_model'")
    if vision.get("attention_dropout", 0.0):
      raise ValueError(f"attention_dropout={vision['attention_dropout']} is not supported "
                       "(only 0.0, as every released CLIP checkpoint uses)")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vision.items() if k in names}
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """A ``CLIPVisionConfig`` json for ``CLIPVisionModelWithProjection``."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "remat"}
    out.update(model_type="clip_vision_model", architectures=["CLIPVisionModelWithProjection"],
               attention_dropout=0.0)
    return out


@struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array  # [B, 1 + patches, D], encoder output (no final norm)
  pooler_output: jax.Array      # [B, D], post_layernorm(CLS)
  image_embeds: jax.Array       # [B, projection_dim], visual_projection(pooler_output)


def _layer_norm(cfg, dtype, param_dtype, rngs):
  # Two-pass variance, as torch computes it (see dinov2._layer_norm).
  return LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.cfg, self.dtype = cfg, dtype
    d, p = cfg.hidden_size, cfg.patch_size
    num_positions = (cfg.image_size // p) ** 2 + 1
    self.class_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (d,), param_dtype) * d ** -0.5)
    self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    # A table rather than nnx.Embed: positions are always all rows, in order.
    self.position_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (num_positions, d), param_dtype) * 0.02)

  def __call__(self, images, interpolate_pos_encoding: bool = False):
    h, w = images.shape[1:3]
    size = self.cfg.image_size
    if not interpolate_pos_encoding and (h, w) != (size, size):
      raise ValueError(f"input image size ({h}*{w}) doesn't match model ({size}*{size}); "
                       "pass interpolate_pos_encoding=True to resize the position embeddings")
    x = self.patch_embedding(images.astype(self.dtype))
    grid = x.shape[1:3]
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.position_embedding[...]
    n = int(round((pos.shape[0] - 1) ** 0.5))
    if tuple(grid) != (n, n):
      patch = interpolate_patch_positions(pos[1:], grid).astype(pos.dtype)
      pos = jnp.concatenate([pos[:1], patch], axis=0)
    return add_to_every_row(x, pos.astype(x.dtype))


@jax.custom_vjp
def add_to_every_row(x: jax.Array, table: jax.Array) -> jax.Array:
  """``x + table[None]`` for ``x`` of ``[B, *table.shape]``, with the table's
  gradient, the sum of ``B`` output gradients, as a matrix-vector product.

  Why: XLA:CPU's reduction over a short leading axis with a long kept one is
  far off memory speed: summing [24, 197, 256] over its first axis (the
  stage-1 step's position-table gradient, 3 x 8 images) took 7.6 ms alone and
  10.5 ms in the step, ``ones[24] @ g[24, 50432]`` 0.2 ms (benchmarks/README.md,
  finding 28). Any backend runs the dot well; ``Precision.HIGHEST`` keeps
  accelerators from rounding its operands to bfloat16.
  """
  return x + table[None]


def _add_to_every_row_fwd(x, table):
  return x + table[None], None


def _add_to_every_row_bwd(_, g):
  rows = g.reshape(g.shape[0], -1)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  total = jnp.matmul(ones, rows, precision=jax.lax.Precision.HIGHEST)
  return g, total.reshape(g.shape[1:])


add_to_every_row.defvjp(_add_to_every_row_fwd, _add_to_every_row_bwd)


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.heads = cfg.num_attention_heads
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense.linear(d, d, **kw)
    self.k_proj = dense.linear(d, d, **kw)
    self.v_proj = dense.linear(d, d, **kw)
    self.out_proj = dense.linear(d, d, **kw)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)))
    return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = activation(cfg.hidden_act)
    self.fc1 = dense.linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.fc2 = dense.linear(cfg.intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.self_attn = CLIPAttention(cfg, **kw)
    self.layer_norm2 = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.mlp = CLIPMLP(cfg, **kw)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.remat = cfg.remat
    self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x):
    return run_layers(self.layers, x, self.remat)


class CLIPVisionTransformer(nnx.Module):
  """transformers' ``CLIPVisionModel.vision_model``."""

  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
    self.pre_layernorm = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.encoder = CLIPEncoder(cfg, **kw)
    self.post_layernorm = _layer_norm(cfg, dtype, param_dtype, rngs)

  def __call__(self, images, interpolate_pos_encoding: bool = False):
    x = self.pre_layernorm(self.embeddings(images, interpolate_pos_encoding))
    x = self.encoder(x)
    return x, self.post_layernorm(x[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
  """CLIP image encoder; input NHWC images already CLIP-normalised
  (``CLIP_MEAN`` / ``CLIP_STD``), ``config.image_size`` square unless
  ``interpolate_pos_encoding``."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = cfg
    self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.visual_projection = dense.linear(cfg.hidden_size, cfg.projection_dim, use_bias=False,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: jax.Array, *, interpolate_pos_encoding: bool = False
               ) -> CLIPVisionOutput:
    if images.ndim != 4 or images.shape[-1] != self.config.num_channels:
      raise ValueError(f"expected NHWC images with {self.config.num_channels} channels, "
                       f"got shape {images.shape}")
    last, pooled = self.vision_model(images, interpolate_pos_encoding)
    return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled,
                            image_embeds=self.visual_projection(pooled))
