"""UNet2DConditionModel (Stable Diffusion 1.x / 2.x) with FPDM's additions, NHWC.

Numerically the diffusers model of the same config (parity tests in
``tests/test_models_unet.py``). With ``config.fpdm`` the UNet also owns

* ``pose_embedding`` (``PoseEmbedding``): target-pose image -> features added
  to the ``conv_in`` output;
* ``class_embedding`` (``ClassEmbeddingMLP``): fusion embedding -> vector
  added to the time embedding.

``__call__`` takes their *outputs* (``pose_features``, ``class_embedding``) so
condition dropout and classifier-free guidance can zero them per sample;
``embed_conditions`` computes them.

A note on a diffusers naming accident kept for config compatibility:
``attention_head_dim`` in SD configs is the number of attention *heads* per
block (SD 2.1: 5, 10, 20, 20 heads of 64 channels).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fpdm_jax.models.conditioning import ClassEmbeddingMLP, PoseEmbedding
from fpdm_jax.models.diffusers_blocks import (
    Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D,
    conv2d, group_norm, timestep_embedding)

log = logging.getLogger(__name__)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options SD 1.x / 2.x leave at these values; anything else is a
# model this implementation does not build.
_FIXED_DIFFUSERS_OPTIONS: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dropout": 0.0,
    "act_fn": "silu",
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "num_attention_heads": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "reverse_transformer_layers_per_block": None,
    "addition_embed_type_num_heads": 64,
}

# Written by our exporter next to the diffusers keys; diffusers ignores
# config keys that start with "_".
FPDM_CONFIG_KEY = "_fpdm_additions"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of an SD-style UNet (the diffusers config keys SD uses), plus FPDM's switch."""
  sample_size: int = 96
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  # Number of heads per block (diffusers' name), an int for all blocks or one per block.
  attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20)
  cross_attention_dim: int = 1024
  transformer_layers_per_block: int = 1
  use_linear_projection: bool = True
  upcast_attention: bool = True
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  # FPDM additions (owned by the UNet when fpdm=True).
  fpdm: bool = False
  class_embed_input_dim: int = 768
  class_embed_dropout: float = 0.2
  pose_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
  pose_conditioning_channels: int = 3

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                 ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
      if len(types) != n:
        raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {n}")
      bad = [t for t in types if t not in allowed]
      if bad:
        raise ValueError(f"unsupported {name} {bad}: only {allowed} (SD 1.x/2.x) are implemented")
    if isinstance(self.attention_head_dim, Sequence) and len(self.attention_head_dim) != n:
      raise ValueError(f"attention_head_dim has {len(self.attention_head_dim)} entries, expected {n}")
    for c, h in zip(self.block_out_channels, self.heads):
      if c % h:
        raise ValueError(f"block width {c} is not divisible by {h} attention heads")

  @property
  def heads(self) -> tuple[int, ...]:
    h = self.attention_head_dim
    return tuple(h) if isinstance(h, Sequence) else (h,) * len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @classmethod
  def from_diffusers_dict(cls, config: Mapping[str, Any], **overrides) -> UNetConfig:
    """From a diffusers ``unet/config.json``; raises on options SD does not use."""
    config = dict(config)
    unsupported = []
    for key, expected in _FIXED_DIFFUSERS_OPTIONS.items():
      if key in config and config[key] != expected:
        if key == "only_cross_attention" and isinstance(config[key], list) and not any(config[key]):
          continue
        if key == "mid_block_only_cross_attention" and config[key] is False:
          continue
        unsupported.append(f"{key}={config[key]!r} (supported: {expected!r})")
    tlpb = config.get("transformer_layers_per_block", 1)
    if not isinstance(tlpb, int):
      if len(set(tlpb)) != 1 or not isinstance(tlpb[0], int):
        unsupported.append(f"transformer_layers_per_block={tlpb!r} (supported: one int)")
      else:
        config["transformer_layers_per_block"] = tlpb[0]
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
      if len(set(lpb)) != 1:
        unsupported.append(f"layers_per_block={lpb!r} (supported: one int)")
      else:
        config["layers_per_block"] = lpb[0]
    if isinstance(config.get("cross_attention_dim"), (list, tuple)):
      unsupported.append(f"cross_attention_dim={config['cross_attention_dim']!r} (supported: one int)")
    for name in ("down_block_types", "up_block_types"):
      allowed = DOWN_BLOCK_TYPES if name.startswith("down") else UP_BLOCK_TYPES
      bad = [t for t in config.get(name, ()) if t not in allowed]
      if bad:
        unsupported.append(f"{name} containing {bad} (supported: {allowed})")
    if unsupported:
      raise ValueError("UNet config uses options this implementation does not support "
                       "(it builds SD 1.x/2.x UNets): " + "; ".join(unsupported))
    fields = {f.name for f in dataclasses.fields(cls)}
    known = fields | set(_FIXED_DIFFUSERS_OPTIONS)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
      log.warning("ignoring UNet config keys %s", unknown)
    kwargs = {k: v for k, v in config.items() if k in fields}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
      if k in kwargs:
        kwargs[k] = tuple(kwargs[k])
    if isinstance(kwargs.get("attention_head_dim"), list):
      kwargs["attention_head_dim"] = tuple(kwargs["attention_head_dim"])
    fpdm = config.get(FPDM_CONFIG_KEY)
    if fpdm:
      kwargs.update(fpdm=True, class_embed_input_dim=fpdm["class_embed_input_dim"],
                    class_embed_dropout=fpdm.get("class_embed_dropout", 0.2),
                    pose_embedding_channels=tuple(fpdm["pose_embedding_channels"]),
                    pose_conditioning_channels=fpdm["pose_conditioning_channels"])
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers_dict(self) -> dict[str, Any]:
    """The ``config.json`` diffusers' ``UNet2DConditionModel.from_pretrained`` reads."""
    out = {k: v for k, v in _FIXED_DIFFUSERS_OPTIONS.items()}
    for f in dataclasses.fields(self):
      if f.name in ("fpdm", "class_embed_input_dim", "class_embed_dropout",
                    "pose_embedding_channels", "pose_conditioning_channels"):
        continue
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    out["_class_name"] = "UNet2DConditionModel"
    if self.fpdm:
      out[FPDM_CONFIG_KEY] = {
          "class_embed_input_dim": self.class_embed_input_dim,
          "class_embed_dropout": self.class_embed_dropout,
          "pose_embedding_channels": list(self.pose_embedding_channels),
          "pose_conditioning_channels": self.pose_conditioning_channels,
          "note": ("pose_embedding.* is diffusers' ControlNetConditioningEmbedding, added to "
                   "conv_in's output; class_embedding.{0,3}.* is Sequential(Linear, GELU, "
                   "Dropout, Linear, Dropout) on the fusion embedding, added to the time "
                   "embedding."),
      }
    return out


# stabilityai/stable-diffusion-2-1 unet/config.json (the keys that matter).
SD21_UNET_DIFFUSERS_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD21_UNET_CONFIG = UNetConfig.from_diffusers_dict(SD21_UNET_DIFFUSERS_CONFIG)
FPDM_UNET_CONFIG = dataclasses.replace(SD21_UNET_CONFIG, fpdm=True)

# For tests: two levels, per-block heads, SD-2 style attention.
TINY_UNET_CONFIG = UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
    attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, upcast_attention=True,
    class_embed_input_dim=24, pose_embedding_channels=(4, 8, 8, 16))


class UNetDownBlock(nnx.Module):
  """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without)."""

  def __init__(self, in_ch: int, out_ch: int, *, cfg: UNetConfig, heads: int,
               cross_attention: bool, add_downsample: bool, dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=cfg.time_embed_dim,
                      groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        for i in range(cfg.layers_per_block)])
    self.attentions = nnx.List([
        _transformer(out_ch, heads, cfg, dtype, rngs) for _ in range(cfg.layers_per_block)
    ]) if cross_attention else None
    self.downsampler = (Downsample2D(out_ch, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)
                        if add_downsample else None)

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsampler is not None:
      x = self.downsampler(x)
      skips.append(x)
    return x, tuple(skips)


class UNetUpBlock(nnx.Module):
  """``CrossAttnUpBlock2D`` (with ``attentions``) or ``UpBlock2D`` (without)."""

  def __init__(self, in_ch: int, prev_out_ch: int, out_ch: int, *, cfg: UNetConfig, heads: int,
               cross_attention: bool, add_upsample: bool, dtype, rngs: nnx.Rngs):
    n = cfg.layers_per_block + 1
    resnets = []
    for i in range(n):
      skip_ch = in_ch if i == n - 1 else out_ch
      res_in = prev_out_ch if i == 0 else out_ch
      resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb_channels=cfg.time_embed_dim,
                                   groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                   dtype=dtype, rngs=rngs))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([
        _transformer(out_ch, heads, cfg, dtype, rngs) for _ in range(n)
    ]) if cross_attention else None
    self.upsampler = Upsample2D(out_ch, dtype=dtype, rngs=rngs) if add_upsample else None

  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsampler is not None:
      x = self.upsampler(x, upsample_size)
    return x


class UNetMidBlock(nnx.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

  def __init__(self, ch: int, *, cfg: UNetConfig, heads: int, dtype, rngs: nnx.Rngs):
    make_resnet = lambda: ResnetBlock2D(
        ch, ch, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
        output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([make_resnet()])
    self.attentions = nnx.List([_transformer(ch, heads, cfg, dtype, rngs)])
    self.resnets.append(make_resnet())

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


def _transformer(ch: int, heads: int, cfg: UNetConfig, dtype, rngs) -> Transformer2DModel:
  return Transformer2DModel(
      ch, heads=heads, dim_head=ch // heads, cross_attention_dim=cfg.cross_attention_dim,
      norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
      upcast=cfg.upcast_attention, num_layers=cfg.transformer_layers_per_block,
      dtype=dtype, rngs=rngs)


class UNet2DConditionModel(nnx.Module):
  """The SD UNet; ``dtype`` is the compute dtype, ``remat`` checkpoints every block."""

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    cfg = self.config = config
    self.dtype = dtype
    self.remat = remat
    chans = cfg.block_out_channels
    heads = cfg.heads
    self.conv_in = conv2d(cfg.in_channels, chans[0], 3, dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(chans[0], cfg.time_embed_dim, dtype=dtype, rngs=rngs)

    down = []
    out_ch = chans[0]
    for i, kind in enumerate(cfg.down_block_types):
      in_ch, out_ch = out_ch, chans[i]
      down.append(UNetDownBlock(in_ch, out_ch, cfg=cfg, heads=heads[i],
                                cross_attention=kind == "CrossAttnDownBlock2D",
                                add_downsample=i < len(chans) - 1, dtype=dtype, rngs=rngs))
    self.down_blocks = nnx.List(down)
    self.mid_block = UNetMidBlock(chans[-1], cfg=cfg, heads=heads[-1], dtype=dtype, rngs=rngs)

    up = []
    rev_chans, rev_heads = chans[::-1], heads[::-1]
    out_ch = rev_chans[0]
    for i, kind in enumerate(cfg.up_block_types):
      prev_out, out_ch = out_ch, rev_chans[i]
      in_ch = rev_chans[min(i + 1, len(chans) - 1)]
      up.append(UNetUpBlock(in_ch, prev_out, out_ch, cfg=cfg, heads=rev_heads[i],
                            cross_attention=kind == "CrossAttnUpBlock2D",
                            add_upsample=i < len(chans) - 1, dtype=dtype, rngs=rngs))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = group_norm(chans[0], cfg.norm_num_groups, cfg.norm_eps,
                                    dtype=dtype, rngs=rngs)
    self.conv_out = conv2d(chans[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    if cfg.fpdm:
      self.pose_embedding = PoseEmbedding(
          chans[0], in_channels=cfg.pose_conditioning_channels,
          channels=cfg.pose_embedding_channels, dtype=dtype, rngs=rngs)
      self.class_embedding = ClassEmbeddingMLP(
          cfg.class_embed_input_dim, cfg.time_embed_dim, dropout=cfg.class_embed_dropout,
          dtype=dtype, rngs=rngs)
    else:
      self.pose_embedding = None
      self.class_embedding = None

  def embed_conditions(self, pose_image: jax.Array | None = None,
                       fusion_embedding: jax.Array | None = None, *,
                       deterministic: bool = True, rngs=None):
    """FPDM's condition branches: (pose features for ``pose_features``,
    vector for ``class_embedding``); None where the input is None."""
    if self.pose_embedding is None:
      raise ValueError("this UNet was built without the FPDM additions (config.fpdm=False)")
    pose = None if pose_image is None else self.pose_embedding(pose_image.astype(self.dtype))
    cls = None if fusion_embedding is None else self.class_embedding(
        fusion_embedding.astype(self.dtype), deterministic=deterministic, rngs=rngs)
    return pose, cls

  def _run(self, block, *args, **static):
    """Calls ``block``; under ``remat`` its activations are recomputed in the backward pass."""
    if not self.remat:
      return block(*args, **static)
    return nnx.remat(lambda b, *a: b(*a, **static))(block, *args)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               *, pose_features: jax.Array | None = None,
               class_embedding: jax.Array | None = None) -> jax.Array:
    """Predicts noise (or v) for NHWC latents.

    Args:
      sample: ``[B, H, W, in_channels]``.
      timesteps: ``[B]`` or a scalar (int or float).
      encoder_hidden_states: ``[B, T, cross_attention_dim]``.
      pose_features: ``[B, H, W, block_out_channels[0]]``, added to ``conv_in``'s output.
      class_embedding: ``[B, time_embed_dim]``, added to the time embedding.
    """
    cfg = self.config
    dtype = self.dtype
    batch = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t = timestep_embedding(timesteps, cfg.block_out_channels[0],
                           flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb = self.time_embedding(t.astype(dtype))
    if class_embedding is not None:
      temb = temb + class_embedding.astype(temb.dtype)
    context = encoder_hidden_states.astype(dtype)

    x = self.conv_in(sample.astype(dtype))
    if pose_features is not None:
      x = x + pose_features.astype(x.dtype)

    skips = [x]
    for block in self.down_blocks:
      x, res = self._run(block, x, temb, context)
      skips.extend(res)

    x = self._run(self.mid_block, x, temb, context)

    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      res, skips = tuple(skips[-n:]), skips[:-n]
      # Up to the size of the next skip connection, which is not 2x when a
      # latent side is not divisible by 2**num_upsamplers (e.g. 44 for 352 px).
      size = tuple(skips[-1].shape[1:3]) if block.upsampler is not None else None
      x = self._run(block, x, res, temb, context, upsample_size=size)

    x = jax.nn.silu(self.conv_norm_out(x))
    return self.conv_out(x)
