"""The building blocks of diffusers' UNet2DConditionModel and AutoencoderKL.

Each class mirrors one diffusers class (same attribute names, same defaults
as Stable Diffusion uses them) so the importers are a mechanical rename; the
few renames are listed in ``fpdm_jax/importers/unet.py``. Layout is NHWC.

Precision: parameters are float32, ``dtype`` is the compute dtype. Group and
layer norms reduce in float32 whatever ``dtype`` is, and attention can upcast
its logits (``upcast``), which SD 2.1 needs in half precision.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax.models import convolution, dense
from fpdm_jax.models.attention import dot_product_attention
from fpdm_jax.models.normalization import GroupNorm, LayerNorm

Dtype = jnp.dtype


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

  Returns float32 ``[B, dim]``; ``flip_sin_to_cos`` puts cos first (SD does).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def conv2d(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding=None,
           use_bias: bool = True, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A PyTorch-style ``Conv2d``: explicit symmetric padding ``kernel // 2``.

  Flax's ``"SAME"`` pads stride-2 convolutions asymmetrically ((0, 1) on even
  sizes), which is not what ``nn.Conv2d(padding=1, stride=2)`` does. The
  convolution is ``models.convolution``'s (two of its gradients and the
  forward of thin RGB-input convs are computed differently on the CPU, where
  XLA's are slow).
  """
  if padding is None:
    padding = kernel // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
                  padding=padding, use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32, conv_general_dilated=convolution.conv_general_dilated,
                  rngs=rngs)


def linear(in_f: int, out_f: int, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
  return dense.linear(in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> GroupNorm:
  # Ours, not nnx.GroupNorm: same parameters and numerics, reductions XLA:CPU
  # runs several times faster (models/normalization.py).
  return GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype,
                   param_dtype=jnp.float32, rngs=rngs)


def layer_norm(dim: int, eps: float = 1e-5, *, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> LayerNorm:
  # Ours, not nnx.LayerNorm: same parameters and numerics, a gradient
  # XLA:CPU runs several times faster (models/normalization.py).
  return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class TimestepEmbedding(nnx.Module):
  """``linear_1 -> SiLU -> linear_2`` on the sinusoidal embedding."""

  def __init__(self, in_dim: int, time_embed_dim: int, *, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.linear_1 = linear(in_dim, time_embed_dim, dtype=dtype, rngs=rngs)
    self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv twice, time embedding added between, 1x1 shortcut when widths differ."""

  def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
               groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.output_scale_factor = output_scale_factor
    self.norm1 = group_norm(in_channels, groups, eps, dtype=dtype, rngs=rngs)
    self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.time_emb_proj = (linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                          if temb_channels is not None else None)
    self.norm2 = group_norm(out_channels, groups, eps, dtype=dtype, rngs=rngs)
    self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. ``padding=1`` (UNet) pads both sides; ``padding=0`` (VAE)
  pads only right and bottom by one, as diffusers does."""

  def __init__(self, channels: int, *, padding: int = 1, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
    if padding not in (0, 1):
      raise ValueError(f"Downsample2D supports padding 0 or 1, got {padding}")
    self.conv = conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: Sequence[int] | None = None) -> jax.Array:
  """``F.interpolate(mode="nearest")``: x2, or to ``output_size`` (H, W)."""
  if output_size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  out_h, out_w = output_size
  in_h, in_w = x.shape[1], x.shape[2]
  if (out_h, out_w) == (2 * in_h, 2 * in_w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  # PyTorch's legacy nearest: src = floor(dst * in / out).
  rows = jnp.minimum(jnp.floor(jnp.arange(out_h) * (in_h / out_h)).astype(jnp.int32), in_h - 1)
  cols = jnp.minimum(jnp.floor(jnp.arange(out_w) * (in_w / out_w)).astype(jnp.int32), in_w - 1)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Nearest x2 (or to the skip connection's size) then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, output_size: Sequence[int] | None = None) -> jax.Array:
    return self.conv(upsample_nearest(x, output_size))


class Attention(nnx.Module):
  """diffusers' ``Attention`` for the two ways SD uses it.

  * in transformer blocks: ``[B, T, C]`` in, no q/k/v bias, optional
    cross-attention context;
  * in the VAE mid block: NHWC in, a GroupNorm first (``norm_num_groups``),
    biases, and a residual connection.
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None, bias: bool = False,
               upcast: bool = False, norm_num_groups: int | None = None, eps: float = 1e-5,
               residual_connection: bool = False, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    inner = heads * dim_head
    context_dim = cross_attention_dim or query_dim
    self.heads, self.dim_head = heads, dim_head
    self.upcast = upcast
    self.residual_connection = residual_connection
    self.group_norm = (group_norm(query_dim, norm_num_groups, eps, dtype=dtype, rngs=rngs)
                       if norm_num_groups is not None else None)
    self.to_q = linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    self.to_k = linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    self.to_v = linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    self.to_out = linear(inner, query_dim, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    spatial = x.ndim == 4
    residual = x
    if spatial:
      b, h, w, c = x.shape
      x = x.reshape(b, h * w, c)
    if self.group_norm is not None:
      x = self.group_norm(x)
    context = x if context is None else context
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = dot_product_attention(q, k, v, upcast=self.upcast)
    out = self.to_out(out.reshape(out.shape[0], out.shape[1], self.heads * self.dim_head))
    if spatial:
      out = out.reshape(b, h, w, c)
    if self.residual_connection:
      out = out + residual
    return out


class FeedForward(nnx.Module):
  """GEGLU feed-forward: ``proj_in`` (= diffusers ``net.0.proj``) to 2x inner,
  ``value * gelu(gate)`` (exact erf GELU), ``proj_out`` (= ``net.2``)."""

  def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    inner = dim * mult
    self.proj_in = linear(dim, 2 * inner, dtype=dtype, rngs=rngs)
    self.proj_out = linear(inner, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN self-attention, cross-attention, GEGLU feed-forward, each residual."""

  def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int,
               upcast: bool = False, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast,
                           dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn2 = Attention(dim, heads=heads, dim_head=dim_head,
                           cross_attention_dim=cross_attention_dim, upcast=upcast,
                           dtype=dtype, rngs=rngs)
    self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm, ``proj_in`` (Linear when ``use_linear_projection`` as in SD 2.x,
  else a 1x1 conv as in SD 1.x), transformer blocks over the H*W tokens,
  ``proj_out``, residual."""

  def __init__(self, in_channels: int, *, heads: int, dim_head: int, cross_attention_dim: int,
               norm_num_groups: int = 32, use_linear_projection: bool = False,
               upcast: bool = False, num_layers: int = 1, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    inner = heads * dim_head
    self.use_linear_projection = use_linear_projection
    self.norm = group_norm(in_channels, norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
    if use_linear_projection:
      self.proj_in = linear(in_channels, inner, dtype=dtype, rngs=rngs)
      self.proj_out = linear(inner, in_channels, dtype=dtype, rngs=rngs)
    else:
      self.proj_in = conv2d(in_channels, inner, 1, dtype=dtype, rngs=rngs)
      self.proj_out = conv2d(inner, in_channels, 1, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, dim_head=dim_head,
                              cross_attention_dim=cross_attention_dim, upcast=upcast,
                              dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    residual = x
    x = self.norm(x)
    # On NHWC a 1x1 conv and a Linear on the channel axis are the same
    # computation; both are kept so checkpoints map one to one.
    x = self.proj_in(x)
    x = x.reshape(b, h * w, x.shape[-1])
    for block in self.transformer_blocks:
      x = block(x, context)
    x = self.proj_out(x.reshape(b, h, w, x.shape[-1]))
    return x + residual
