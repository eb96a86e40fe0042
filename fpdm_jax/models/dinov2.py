"""DINOv2 (facebook/dinov2-*) as a Flax NNX module, numerically equal to transformers.

FPDM feeds the frozen DINOv2-large patch tokens of the source image (resized to
512x512) to the UNet's cross-attention, so the position embeddings (trained on
a 37x37 grid) must be resized exactly the way transformers does it: torch's
bicubic interpolation (``align_corners=False``, Keys kernel with a = -0.75,
border pixels replicated). ``jax.image.resize`` uses a = -0.5 and antialiases
when shrinking, which would shift every token, so ``bicubic_resize_like_torch``
rebuilds torch's kernel as two small interpolation matrices.

Parameter names mirror the PyTorch module tree (``encoder.layer.3.attention
.q_proj.kernel``) so the importer is a rename table, not a translation.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from fpdm_jax.models import dense
from fpdm_jax.models.attention import dot_product_attention
from fpdm_jax.models.normalization import LayerNorm

Dtype = Any

ACTIVATIONS = {
    # transformers' "gelu" is the exact erf GELU, not the tanh approximation.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------
# torch-equivalent bicubic resize.

def _cubic_weights(t: np.ndarray, a) -> np.ndarray:
  """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 (torch's
  ``get_cubic_upsample_coefficients``, evaluated in t's dtype like torch)."""
  one, two = t.dtype.type(1), t.dtype.type(2)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, *, a: float = -0.75,
                   align_corners: bool = False, scale: float | None = None) -> np.ndarray:
  """``[out_size, in_size]`` matrix M with ``M @ x`` = torch's 1-D bicubic resize.

  Follows ``aten/src/ATen/native/UpSample.h`` step by step in float32 (torch's
  arithmetic for float32 tensors; doing it in float64 moves results by ~1e-5):
  source coordinate ``(i + 0.5) * in/out - 0.5`` (not clamped at 0 for cubic),
  four taps around its floor, tap indices clamped to the border. ``scale`` is
  torch's ``scale_factor`` when the caller passed one instead of a size.
  """
  f32 = np.float32
  dst = np.arange(out_size).astype(f32)
  if align_corners:
    ratio = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
    src = dst * ratio
  else:
    ratio = f32(1) / f32(scale) if scale else f32(in_size) / f32(out_size)
    src = ratio * (dst + f32(0.5)) - f32(0.5)
  base = np.minimum(np.floor(src), f32(in_size - 1))
  t = np.clip(src - base, f32(0), f32(1))
  w = _cubic_weights(t.astype(f32), f32(a)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(m, (rows, idx), w[:, tap])
  return m.astype(np.float32)


def bicubic_resize_like_torch(x: jax.Array, size: tuple[int, int], *,
                              align_corners: bool = False) -> jax.Array:
  """Resizes ``[..., H, W, C]`` like ``F.interpolate(mode="bicubic", antialias=False)``.

  Shapes are static, so the matrices are numpy constants at trace time.
  """
  h, w = x.shape[-3], x.shape[-2]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(bicubic_matrix(h, size[0], align_corners=align_corners))
  mw = jnp.asarray(bicubic_matrix(w, size[1], align_corners=align_corners))
  out = jnp.einsum("ih,...hwc->...iwc", mh, x.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("jw,...iwc->...ijc", mw, out, precision=jax.lax.Precision.HIGHEST)
  return out.astype(x.dtype)


def interpolate_patch_positions(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """``[N*N, D]`` square position table -> ``[gh*gw, D]`` (row-major), in float32."""
  n = int(round(pos.shape[0] ** 0.5))
  if n * n != pos.shape[0]:
    raise ValueError(f"{pos.shape[0]} patch positions do not form a square grid")
  table = pos.astype(jnp.float32).reshape(n, n, pos.shape[-1])
  return bicubic_resize_like_torch(table, grid).reshape(grid[0] * grid[1], pos.shape[-1])


# ----------------------------------------------------------------------------
# Config.

@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Fields and defaults as transformers' ``Dinov2Config`` (defaults = dinov2-base)."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  drop_path_rate: float = 0.0
  use_swiglu_ffn: bool = False
  use_mask_token: bool = True
  # Ours: rematerialise each encoder layer in the backward pass.
  remat: bool = False

  @property
  def mlp_hidden_size(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:  # two thirds, rounded up to a multiple of 8
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  @classmethod
  def large(cls, **kw) -> "Dinov2Config":
    """facebook/dinov2-large: the FPDM source encoder."""
    return cls(**{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         image_size=518), **kw})

  @classmethod
  def base(cls, **kw) -> "Dinov2Config":
    return cls(**{**dict(image_size=518), **kw})

  @classmethod
  def tiny(cls, **kw) -> "Dinov2Config":
    """For tests: 2x2 patch grid, 2 layers."""
    return cls(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=14), **kw})

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any], **overrides) -> "Dinov2Config":
    """From a Hugging Face ``config.json`` of model_type "dinov2"."""
    model_type = config.get("model_type")
    if model_type not in (None, "dinov2"):
      raise ValueError(f"config.json has model_type {model_type!r}, expected 'dinov2'")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if config.get(key, 0.0):
        raise ValueError(f"{key}={config[key]} is not supported (only 0.0, as every "
                         "released DINOv2 checkpoint uses)")
    for key in ("image_size", "patch_size"):
      if isinstance(config.get(key), (list, tuple)):
        a, b = config[key]
        if a != b:
          raise ValueError(f"non-square {key} {config[key]} is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in config.items() if k in names}
    for key in ("image_size", "patch_size"):
      if isinstance(kw.get(key), (list, tuple)):
        kw[key] = int(kw[key][0])
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "remat"}
    out.update(model_type="dinov2", architectures=["Dinov2Model"],
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return out


@struct.dataclass
class Dinov2Output:
  last_hidden_state: jax.Array  # [B, 1 + patches, D], after the final layernorm
  pooler_output: jax.Array      # [B, D], the CLS token of last_hidden_state


# ----------------------------------------------------------------------------
# Modules.

def _layer_norm(cfg, dtype, param_dtype, rngs):
  # Two-pass variance: the one-pass E[x^2]-E[x]^2 loses digits on the large
  # activations of real ViT checkpoints and breaks 1e-4 parity with torch.
  # models/normalization.LayerNorm: nnx's numerics, a faster gradient on CPU.
  return LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)


class Dinov2PatchEmbeddings(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    p = cfg.patch_size
    self.projection = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=(p, p),
                               strides=(p, p), padding="VALID", dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images):
    x = self.projection(images)
    return x.reshape(x.shape[0], -1, x.shape[-1]), x.shape[1:3]


class Dinov2Embeddings(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    self.cfg, self.dtype = cfg, dtype
    init = jax.nn.initializers.truncated_normal(0.02)
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), param_dtype))
    # Only used for masked-image pre-training, but present in every checkpoint.
    self.mask_token = (nnx.Param(jnp.zeros((1, cfg.hidden_size), param_dtype))
                       if cfg.use_mask_token else None)
    self.position_embeddings = nnx.Param(
        init(rngs.params(), (1, num_patches + 1, cfg.hidden_size), param_dtype))
    self.patch_embeddings = Dinov2PatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype,
                                                  rngs=rngs)

  def position_table(self, grid: tuple[int, int]) -> jax.Array:
    """``[1, 1 + gh*gw, D]`` position embeddings for a patch grid (interpolated
    in float32 like transformers when the grid is not the trained one)."""
    pos = self.position_embeddings[...]
    n = int(round((pos.shape[1] - 1) ** 0.5))
    if tuple(grid) == (n, n):
      return pos
    patch = interpolate_patch_positions(pos[0, 1:], grid).astype(pos.dtype)
    return jnp.concatenate([pos[:, :1], patch[None]], axis=1)

  def __call__(self, images, bool_masked_pos=None):
    x, grid = self.patch_embeddings(images.astype(self.dtype))
    if bool_masked_pos is not None:
      if self.mask_token is None:
        raise ValueError("bool_masked_pos needs a config with use_mask_token=True")
      mask = bool_masked_pos[..., None].astype(x.dtype)
      x = x * (1 - mask) + self.mask_token[...].astype(x.dtype)[None] * mask
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_table(grid).astype(x.dtype)


class Dinov2Attention(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    self.heads = cfg.num_attention_heads
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense.linear(d, d, use_bias=cfg.qkv_bias, **kw)
    self.k_proj = dense.linear(d, d, use_bias=cfg.qkv_bias, **kw)
    self.v_proj = dense.linear(d, d, use_bias=cfg.qkv_bias, **kw)
    self.o_proj = dense.linear(d, d, **kw)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)))
    return self.o_proj(out.reshape(b, t, d))


class Dinov2MLP(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = activation(cfg.hidden_act)
    self.fc1 = dense.linear(cfg.hidden_size, cfg.mlp_hidden_size, **kw)
    self.fc2 = dense.linear(cfg.mlp_hidden_size, cfg.hidden_size, **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Dinov2SwiGLUFFN(nnx.Module):
  """dinov2-giant's feed-forward; checkpoints store gate and up fused as ``weights_in``."""

  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense.linear(cfg.hidden_size, cfg.mlp_hidden_size, **kw)
    self.up_proj = dense.linear(cfg.hidden_size, cfg.mlp_hidden_size, **kw)
    self.down_proj = dense.linear(cfg.mlp_hidden_size, cfg.hidden_size, **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Dinov2LayerScale(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, param_dtype):
    self.lambda1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, param_dtype))

  def __call__(self, x):
    return x * self.lambda1[...].astype(x.dtype)


class Dinov2Layer(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.attention = Dinov2Attention(cfg, **kw)
    self.layer_scale1 = Dinov2LayerScale(cfg, param_dtype=param_dtype)
    self.norm2 = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.mlp = (Dinov2SwiGLUFFN if cfg.use_swiglu_ffn else Dinov2MLP)(cfg, **kw)
    self.layer_scale2 = Dinov2LayerScale(cfg, param_dtype=param_dtype)
    # Stochastic depth = per-sample dropout of the whole residual branch.
    self.drop_path = (nnx.Dropout(cfg.drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
                      if cfg.drop_path_rate > 0 else None)

  def _drop(self, x):
    return x if self.drop_path is None else self.drop_path(x)

  def __call__(self, x):
    x = x + self._drop(self.layer_scale1(self.attention(self.norm1(x))))
    return x + self._drop(self.layer_scale2(self.mlp(self.norm2(x))))


def run_layers(layers, x, remat: bool):
  """Applies encoder layers in order, optionally rematerialising each one."""
  for layer in layers:
    x = nnx.remat(lambda m, h: m(h))(layer, x) if remat else layer(x)
  return x


class Dinov2Encoder(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
    self.remat = cfg.remat
    self.layer = nnx.List([Dinov2Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                           for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x):
    return run_layers(self.layer, x, self.remat)


class Dinov2Model(nnx.Module):
  """DINOv2 backbone; input NHWC images, ImageNet-normalised, any size whose
  sides are multiples of the patch size (position embeddings are resized)."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Dinov2Embeddings(cfg, **kw)
    self.encoder = Dinov2Encoder(cfg, **kw)
    self.layernorm = _layer_norm(cfg, dtype, param_dtype, rngs)

  def __call__(self, images: jax.Array, bool_masked_pos: jax.Array | None = None) -> Dinov2Output:
    if images.ndim != 4 or images.shape[-1] != self.config.num_channels:
      raise ValueError(f"expected NHWC images with {self.config.num_channels} channels, "
                       f"got shape {images.shape}")
    x = self.embeddings(images, bool_masked_pos)
    x = self.layernorm(self.encoder(x))
    return Dinov2Output(last_hidden_state=x, pooler_output=x[:, 0])
