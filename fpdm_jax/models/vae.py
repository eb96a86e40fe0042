"""AutoencoderKL (the Stable Diffusion VAE), NHWC.

``encode`` returns a ``DiagonalGaussian`` over latents; ``decode`` maps
latents back to images in [-1, 1]. Diffusion runs on
``latents * scaling_factor`` (0.18215 for SD 1.x/2.x): ``encode_to_latents``
and ``decode_from_latents`` do the scaling. Parity with diffusers'
``AutoencoderKL`` is pinned by ``tests/test_models_vae.py``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fpdm_jax.models.diffusers_blocks import (
    Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm)

log = logging.getLogger(__name__)

_FIXED_DIFFUSERS_OPTIONS: dict[str, Any] = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 768
  scaling_factor: float = 0.18215
  force_upcast: bool = True

  @classmethod
  def from_diffusers_dict(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
    """From a diffusers ``vae/config.json``; raises on options the SD VAE does not use."""
    unsupported = [f"{k}={config[k]!r} (supported: {v!r})"
                   for k, v in _FIXED_DIFFUSERS_OPTIONS.items() if k in config and config[k] != v]
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
      bad = [t for t in config.get(name, ()) if t != allowed]
      if bad:
        unsupported.append(f"{name} containing {bad} (supported: {allowed})")
    n = len(config.get("block_out_channels", cls.block_out_channels))
    for name in ("down_block_types", "up_block_types"):
      if name in config and len(config[name]) != n:
        unsupported.append(f"{name} has {len(config[name])} entries for {n} block_out_channels")
    if unsupported:
      raise ValueError("VAE config uses options this implementation does not support "
                       "(it builds the SD AutoencoderKL): " + "; ".join(unsupported))
    fields = {f.name for f in dataclasses.fields(cls)}
    known = fields | set(_FIXED_DIFFUSERS_OPTIONS) | {"down_block_types", "up_block_types"}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
      log.warning("ignoring VAE config keys %s", unknown)
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    if kwargs.get("scaling_factor") is None:
      kwargs.pop("scaling_factor", None)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers_dict(self) -> dict[str, Any]:
    out = dict(_FIXED_DIFFUSERS_OPTIONS)
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    n = len(self.block_out_channels)
    out["down_block_types"] = ["DownEncoderBlock2D"] * n
    out["up_block_types"] = ["UpDecoderBlock2D"] * n
    out["_class_name"] = "AutoencoderKL"
    return out


# stabilityai/stable-diffusion-2-1 vae/config.json.
SD_VAE_DIFFUSERS_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
SD_VAE_CONFIG = VAEConfig.from_diffusers_dict(SD_VAE_DIFFUSERS_CONFIG)
TINY_VAE_CONFIG = VAEConfig(block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8, sample_size=32)


@struct.dataclass
class DiagonalGaussian:
  """The posterior ``N(mean, exp(logvar))`` over latents (NHWC); a pytree."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
    return (self.mean.astype(jnp.float32) + self.std.astype(jnp.float32) * eps).astype(self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL to N(0, I), summed over latent dims, per sample."""
    m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(m ** 2 + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


class VAEMidBlock(nnx.Module):
  """``UNetMidBlock2D``: resnet, single-head spatial self-attention, resnet."""

  def __init__(self, ch: int, groups: int, *, dtype, rngs: nnx.Rngs):
    make = lambda: ResnetBlock2D(ch, ch, temb_channels=None, groups=groups, eps=1e-6,
                                 dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([make(), make()])
    self.attentions = nnx.List([Attention(
        ch, heads=1, dim_head=ch, bias=True, upcast=True, norm_num_groups=groups, eps=1e-6,
        residual_connection=True, dtype=dtype, rngs=rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class EncoderBlock(nnx.Module):
  """``DownEncoderBlock2D``: resnets, then a right/bottom-padded stride-2 conv."""

  def __init__(self, in_ch, out_ch, *, layers, groups, add_downsample, dtype, rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups,
                      eps=1e-6, dtype=dtype, rngs=rngs) for i in range(layers)])
    self.downsampler = (Downsample2D(out_ch, padding=0, dtype=dtype, rngs=rngs)
                        if add_downsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsampler(x) if self.downsampler is not None else x


class DecoderBlock(nnx.Module):
  """``UpDecoderBlock2D``: resnets, then nearest x2 and a conv."""

  def __init__(self, in_ch, out_ch, *, layers, groups, add_upsample, dtype, rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups,
                      eps=1e-6, dtype=dtype, rngs=rngs) for i in range(layers)])
    self.upsampler = Upsample2D(out_ch, dtype=dtype, rngs=rngs) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsampler(x) if self.upsampler is not None else x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv2d(cfg.in_channels, chans[0], 3, dtype=dtype, rngs=rngs)
    blocks, out_ch = [], chans[0]
    for i in range(len(chans)):
      in_ch, out_ch = out_ch, chans[i]
      blocks.append(EncoderBlock(in_ch, out_ch, layers=cfg.layers_per_block, groups=g,
                                 add_downsample=i < len(chans) - 1, dtype=dtype, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = VAEMidBlock(chans[-1], g, dtype=dtype, rngs=rngs)
    self.conv_norm_out = group_norm(chans[-1], g, 1e-6, dtype=dtype, rngs=rngs)
    self.conv_out = conv2d(chans[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv2d(cfg.latent_channels, chans[-1], 3, dtype=dtype, rngs=rngs)
    self.mid_block = VAEMidBlock(chans[-1], g, dtype=dtype, rngs=rngs)
    rev = chans[::-1]
    blocks, out_ch = [], rev[0]
    for i in range(len(rev)):
      prev, out_ch = out_ch, rev[i]
      blocks.append(DecoderBlock(prev, out_ch, layers=cfg.layers_per_block + 1, groups=g,
                                 add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = group_norm(chans[0], g, 1e-6, dtype=dtype, rngs=rngs)
    self.conv_out = conv2d(chans[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z):
    x = self.conv_in(z)
    x = self.mid_block(x)
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """SD's KL autoencoder; images NHWC in [-1, 1], latents NHWC (1/8 resolution for SD)."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    lc = config.latent_channels
    self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
    self.quant_conv = conv2d(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = conv2d(lc, lc, 1, dtype=dtype, rngs=rngs)

  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype)))

  def encode_to_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Scaled latents for diffusion: a posterior sample (``rng``) or its mean."""
    posterior = self.encode(images)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return z * self.scaling_factor

  def decode_from_latents(self, latents: jax.Array) -> jax.Array:
    return self.decode(latents / self.scaling_factor)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    posterior = self.encode(images)
    return self.decode(posterior.mode() if rng is None else posterior.sample(rng))
