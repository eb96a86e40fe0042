"""Stage 2: conditional latent diffusion with FPDM's three conditions.

Trainable: the UNet (with its pose embedding and class-embedding MLP) and
the source-token projection. Frozen, run inside the step: the VAE (unless
``model.latent=False``: pixel space, for the embedded synthetic default),
the source encoder and the stage-1 fusion model.

Per step: encode the target, take the fusion embedding of (source, target
pose), the source tokens and the pose features; drop each condition per
sample with probability ``diffusion.cond_drop_prob`` (zeroing the branch
output, as the sampler's unconditional branches do); add offset noise; and
regress the scheduler's ``prediction_type`` target.

With ``data.cached_features`` the frozen networks' outputs come from a cache
written once by ``python -m data_prep.cache_features`` (``feature_cache``)
and the step runs only the trainable networks; evaluation and sampling still
run the frozen ones on images.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax import (feature_cache, input_pipeline, losses, sampling, schedulers, sharding,
                      visualize)
from fpdm_jax.importers import dinov2 as dinov2_importer
from fpdm_jax.importers import hf_folder
from fpdm_jax.importers import unet as unet_importer
from fpdm_jax.importers import vae as vae_importer
from fpdm_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from fpdm_jax.models.dinov2 import Dinov2Config, Dinov2Model
from fpdm_jax.models.fusion import SourceProjection
from fpdm_jax.models.unet import SD21_UNET_CONFIG, UNet2DConditionModel, UNetConfig
from fpdm_jax.models.vae import DiagonalGaussian
from fpdm_jax.trainers import common
from fpdm_jax.trainers.stage1 import load_fusion_model


class Trainable(nnx.Module):
  def __init__(self, unet: UNet2DConditionModel, source_projection: SourceProjection):
    self.unet = unet
    self.source_projection = source_projection


class Frozen(nnx.Module):
  """The frozen networks; ``source_encoder`` None means the fusion model's CLIP."""

  def __init__(self, fusion, source_encoder, vae):
    self.fusion = fusion
    self.source_encoder = source_encoder
    self.vae = vae


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/f, W/f, C f^2]: pixel space at a latent-like resolution.

  The synthetic default diffuses pixels (no pretrained VAE), but a UNet at
  full resolution is too slow on a CPU; folding f x f pixel blocks into
  channels gives it the VAE's spatial downsampling without its weights.
  """
  if f == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
  if f == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c // (f * f))


def offset_noise(key, batch_size: int, channels: int, fold: int = 1) -> jax.Array:
  """[B, 1, 1, C]: one normal draw per image and colour (the noise offset).

  In pixel space folded ``fold`` x ``fold`` into channels, the fold^2
  channels of one colour share a draw: an offset per folded channel would be
  a fixed fold x fold pattern in the image, which the model learns to paint,
  not the brightness shift the offset is for.
  """
  if fold == 1:
    return jax.random.normal(key, (batch_size, 1, 1, channels))
  per_colour = jax.random.normal(key, (batch_size, 1, 1, channels // (fold * fold)))
  return jnp.tile(per_colour, (1, 1, 1, fold * fold))  # space_to_depth: colour fastest


# ----------------------------------------------------------------------------
# Building the networks from the config.

def scheduler_config(diffusion_cfg) -> schedulers.SchedulerConfig:
  """SD 2.1's scheduler ("sd21") or a diffusers scheduler_config.json, then
  ``diffusion.scheduler_overrides`` (e.g. prediction_type)."""
  if diffusion_cfg.scheduler == "sd21":
    cfg = schedulers.SD21_SCHEDULER
  else:
    path = Path(diffusion_cfg.scheduler)
    if path.is_dir():
      path = path / "scheduler" / "scheduler_config.json" if (path / "scheduler").is_dir() \
          else path / "scheduler_config.json"
    if not path.is_file():
      raise FileNotFoundError(f"diffusion.scheduler={diffusion_cfg.scheduler!r}: no "
                              "scheduler_config.json there (use 'sd21' for SD 2.1's)")
    cfg = schedulers.SchedulerConfig.from_diffusers_dict(json.loads(path.read_text()))
  overrides = dict(diffusion_cfg.scheduler_overrides)
  return dataclasses.replace(cfg, **overrides) if overrides else cfg


def build_source_encoder(enc_cfg, fusion, dt, seed: int):
  """Returns (encoder or None for the fusion model's CLIP, token dim, view)."""
  size = (enc_cfg.image_size, enc_cfg.image_size)
  if enc_cfg.kind == "stage1":
    clip = fusion.config.clip
    return None, clip.hidden_size, ("source_image", (clip.image_size,) * 2, "clip")
  if enc_cfg.kind == "dinov2":
    if enc_cfg.path:
      enc = dinov2_importer.load_dinov2(enc_cfg.path, dtype=dt)
    else:
      cfg = Dinov2Config.large() if enc_cfg.preset == "large" else Dinov2Config.tiny(
          **dict(enc_cfg.overrides))
      enc = Dinov2Model(cfg, dtype=dt, rngs=nnx.Rngs(seed))
    return enc, enc.config.hidden_size, ("source_image", size, "imagenet")
  if enc_cfg.kind == "clip":
    from fpdm_jax.importers import clip as clip_importer
    if enc_cfg.path:
      enc = clip_importer.load_clip_vision(enc_cfg.path, dtype=dt)
    else:
      enc = CLIPVisionModelWithProjection(CLIPVisionConfig.tiny(**dict(enc_cfg.overrides)),
                                          dtype=dt, rngs=nnx.Rngs(seed))
    return enc, enc.config.hidden_size, ("source_image", size, "clip")
  raise ValueError(f"model.source_encoder.kind={enc_cfg.kind!r}: stage1, dinov2 or clip")


def unet_config(model_cfg, fusion_dim: int) -> UNetConfig:
  base = SD21_UNET_CONFIG if model_cfg.unet_preset == "sd21" else UNetConfig()
  kw = dict(model_cfg.unet_overrides)
  for key in ("block_out_channels", "attention_head_dim", "down_block_types",
              "up_block_types", "pose_embedding_channels"):
    if key in kw and isinstance(kw[key], list):
      kw[key] = tuple(kw[key])
  kw.update(fpdm=True, class_embed_input_dim=fusion_dim)
  if not model_cfg.latent:
    c = 3 * model_cfg.pixel_unshuffle ** 2
    kw.update(in_channels=c, out_channels=c)
  return dataclasses.replace(base, **kw)


def build_frozen(config, *, fusion=None, vae=None):
  """(Frozen, views, source token dim): the frozen networks and the views they
  (and the trainable pose embedding) read. The feature-cache writer needs
  only these, not the UNet."""
  m = config.model
  dt = common.dtype(m.dtype)
  if fusion is None:
    if not config.fusion.path:
      raise FileNotFoundError("fusion.path is empty: set it to the stage-1 export, e.g. "
                              "--config.fusion.path=runs/stage1/fusion_model")
    fusion = load_fusion_model(config.fusion.path, dtype=dt)
  encoder, token_dim, source_view = build_source_encoder(m.source_encoder, fusion, dt, config.seed)
  if not m.latent:
    vae = None
  elif vae is None:
    if not m.vae_path:
      raise FileNotFoundError("model.latent=True needs model.vae_path (an SD pipeline "
                              "folder or its vae/), or set model.latent=False")
    vae = vae_importer.load_vae(m.vae_path, dtype=dt)
  h, w = m.image_size
  clip_size = (fusion.config.clip.image_size,) * 2
  views = {"target": ("target_image", (h, w), "symmetric"),
           "target_pose": ("target_pose_image", (h, w), "unit"),
           "source_clip": ("source_image", clip_size, "clip"),
           "pose_clip": ("target_pose_image", clip_size, "clip")}
  if encoder is not None:
    views["source_enc"] = source_view
  return Frozen(fusion, encoder, vae), views, token_dim


def build(config, *, fusion=None, vae=None):
  """(Trainable, Frozen, views) for a stage-2 config.

  ``fusion`` / ``vae``: networks to use instead of loading ``fusion.path`` /
  ``model.vae_path`` (``fpdm_jax.plan`` passes ones built under
  ``nnx.eval_shape``, so planning needs no weights).
  """
  m = config.model
  dt = common.dtype(m.dtype)
  frozen, views, token_dim = build_frozen(config, fusion=fusion, vae=vae)
  fusion_dim = frozen.fusion.config.clip.projection_dim
  ucfg = unet_config(m, fusion_dim)
  if m.unet_path:
    unet = unet_importer.load_unet(m.unet_path, fpdm=True, dtype=dt, remat=m.remat,
                                   seed=config.seed, class_embed_input_dim=fusion_dim)
  else:
    unet = UNet2DConditionModel(ucfg, dtype=dt, remat=m.remat, rngs=nnx.Rngs(config.seed))
  projection = SourceProjection(token_dim, unet.config.cross_attention_dim,
                                hidden=m.projection_hidden, dropout=m.projection_dropout,
                                dtype=dt, rngs=nnx.Rngs(config.seed + 1))
  return Trainable(unet, projection), frozen, views


def frozen_outputs(nets: Frozen, batch, *, encode_target: bool) -> dict:
  """What the frozen networks make of a normalised batch: the source tokens,
  the fusion embedding f(source, target pose) and (``encode_target``, latent
  space) the target's VAE posterior. Exactly what the feature cache stores,
  so a cached run and an image run feed the same numbers to the same code.
  """
  out = {"fusion": nets.fusion(batch["source_clip"], batch["pose_clip"])}
  if nets.source_encoder is None:
    out["tokens"] = nets.fusion.encoder(batch["source_clip"]).last_hidden_state
  else:
    out["tokens"] = nets.source_encoder(batch["source_enc"]).last_hidden_state
  if encode_target and nets.vae is not None:
    posterior = nets.vae.encode(batch["target"])
    out["latent_mean"], out["latent_logvar"] = posterior.mean, posterior.logvar
  return jax.lax.stop_gradient(out)


# ----------------------------------------------------------------------------
# The stage.

class DiffusionStage:
  """What the shared loop needs to train stage 2."""

  def __init__(self, config, mesh, networks=None):
    """``networks``: ``build``'s (trainable, frozen, views), when already built."""
    self.config, self.mesh = config, mesh
    self.trainable, frozen, self.views = networks if networks is not None else build(config)
    self.frozen_def = common.ModelDef(frozen)
    self._frozen = common.pure_params(frozen)
    self.sched_cfg = scheduler_config(config.diffusion)
    self.table = jnp.asarray(schedulers.alphas_cumprod(self.sched_cfg))
    self.latent = config.model.latent
    h, w = config.model.image_size
    if self.latent:
      f = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
      self.shape = (h // f, w // f, frozen.vae.config.latent_channels)
    else:
      f = config.model.pixel_unshuffle
      if h % f or w % f:
        raise ValueError(f"model.image_size {h}x{w} is not divisible by "
                         f"model.pixel_unshuffle={f}")
      self.shape = (h // f, w // f, 3 * f * f)
    self.scaling_factor = frozen.vae.scaling_factor if self.latent else None
    self._sample_fn = None
    self._image_batch = None

  def frozen_params(self):
    return self._frozen

  def conditions(self, model: Trainable, nets: Frozen, batch, *, deterministic: bool,
                 rng=None) -> sampling.Conditions:
    out = frozen_outputs(nets, batch, encode_target=False)
    return self.trainable_conditions(model, out["tokens"], out["fusion"], batch["target_pose"],
                                     deterministic=deterministic, rng=rng)

  def trainable_conditions(self, model: Trainable, tokens, f, pose_image, *,
                           deterministic: bool, rng=None) -> sampling.Conditions:
    """The trainable branches on the frozen networks' outputs (and the pose image)."""
    k1, k2 = (None, None) if rng is None else jax.random.split(rng)
    context = model.source_projection(tokens, deterministic=deterministic, rngs=k1)
    pose, fusion = model.unet.embed_conditions(pose_image, f,
                                               deterministic=deterministic, rngs=k2)
    return sampling.Conditions(pose, context, fusion)

  def decode(self, nets: Frozen):
    if self.latent:
      return nets.vae.decode_from_latents
    return lambda x: depth_to_space(x, self.config.model.pixel_unshuffle)

  def loss_fn(self, model: Trainable, frozen, batch, rng):
    """The loss of an image batch, or of a feature-cache batch (training with
    ``data.cached_features``), which carries what the frozen networks would
    compute, so they do not run. Both continue in ``loss_from_features``
    with the same keys: the same RNG gives the same loss."""
    k_lat = jax.random.split(rng, 6)[0]
    if feature_cache.is_cached_batch(batch):
      batch = input_pipeline.normalise(batch, {k: v for k, v in self.views.items() if k in batch})
      features = batch
    else:
      batch = input_pipeline.normalise(batch, self.views)
      features = frozen_outputs(self.frozen_def(frozen), batch, encode_target=True)
    x0 = self.target_x0(features, batch, k_lat)
    return self.loss_from_features(model, x0, features["tokens"], features["fusion"],
                                   batch["target_pose"], rng)

  def target_x0(self, features, batch, rng) -> jax.Array:
    """The clean sample to diffuse: a draw from the target's VAE posterior,
    scaled (``AutoencoderKL.encode_to_latents``), or the folded pixels."""
    if not self.latent:
      return space_to_depth(batch["target"], self.config.model.pixel_unshuffle)
    posterior = DiagonalGaussian(features["latent_mean"], features["latent_logvar"])
    return posterior.sample(rng) * self.scaling_factor

  def loss_from_features(self, model: Trainable, x0, tokens, f, pose_image, rng):
    """The loss from x0, the source tokens, the fusion embedding and the
    normalised target pose image; ``rng`` is the step's key, as ``loss_fn``'s."""
    d = self.config.diffusion
    _, k_cond, k_drop, k_noise, k_off, k_t = jax.random.split(rng, 6)
    x0 = x0.astype(jnp.float32)
    b = x0.shape[0]
    cond = self.trainable_conditions(model, tokens, f, pose_image, deterministic=False,
                                     rng=k_cond)
    # Classifier-free guidance: drop each condition independently.
    n_draws = b if d.cond_drop_per_sample else 1
    keep = jax.random.bernoulli(k_drop, 1.0 - d.cond_drop_prob, (3, n_draws))
    keep = jnp.broadcast_to(keep, (3, b)).astype(jnp.float32)
    cond = sampling.Conditions(cond.pose * keep[0][:, None, None, None],
                               cond.context * keep[1][:, None, None],
                               cond.fusion * keep[2][:, None])
    noise = jax.random.normal(k_noise, x0.shape)
    if d.noise_offset:
      fold = 1 if self.latent else self.config.model.pixel_unshuffle
      noise = noise + d.noise_offset * offset_noise(k_off, b, x0.shape[-1], fold)
    t = jax.random.randint(k_t, (b,), 0, self.sched_cfg.num_train_timesteps)
    xt = schedulers.add_noise(self.table, x0, noise, t)
    pred = model.unet(xt, t, cond.context, pose_features=cond.pose, class_embedding=cond.fusion)
    target = schedulers.training_target(self.sched_cfg, x0, noise, t)
    weight = schedulers.min_snr_weight(self.sched_cfg, t, d.min_snr_gamma) \
        if d.min_snr_gamma > 0 else None
    loss = losses.diffusion_mse(pred, target, weight)
    return loss, {"mse": losses.diffusion_mse(pred, target),
                  "dropped_pose": 1 - keep[0].mean(), "dropped_source": 1 - keep[1].mean(),
                  "dropped_fusion": 1 - keep[2].mean()}

  # -- sampling -------------------------------------------------------------
  def params_for_sampling(self, state):
    return state["ema"] if state["ema"] is not None else state["params"]

  def sample_fn(self, model_def):
    """jitted (params, frozen, batch, keys) -> images in [-1, 1]."""
    if self._sample_fn is None:
      s = self.config.sample
      schedule = schedulers.make_sampler_schedule(s.kind, self.sched_cfg, s.steps)

      def run(params, frozen, batch, keys):
        model, nets = model_def(params), self.frozen_def(frozen)
        batch = input_pipeline.normalise(batch, self.views)
        cond = self.conditions(model, nets, batch, deterministic=True)
        out = sampling.sample(model.unet, cond, keys, schedule, shape=self.shape,
                              guidance=s.guidance, decode=self.decode(nets))
        return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)
      self._sample_fn = jax.jit(run)
    return self._sample_fn

  def evaluate(self, state, frozen, model_def) -> dict:
    """Validation loss on a few test batches at fixed noise (cheap, comparable)."""
    from fpdm_jax.trainers.loop import make_loader
    loss_fn = jax.jit(lambda p, f, b, r: self.loss_fn(model_def(p), f, b, r)[0])
    params = self.params_for_sampling(state)
    values = []
    loader = make_loader(self.config, self.views, self.config.data.eval_split, train=False)
    for i, local in enumerate(loader):
      if i >= max(1, self.config.eval.max_batches or 4):
        break
      if local["target"].shape[0] != self.config.eval.batch_size // jax.process_count():
        break
      batch = sharding.global_batch(local, self.mesh)
      values.append(float(loss_fn(params, frozen, batch, jax.random.PRNGKey(i))))
    return {"loss": float(np.mean(values))} if values else {}

  def report_images(self, state, frozen, model_def, step) -> dict:
    """A grid of (source | target pose | generated | ground truth) on test pairs.

    Every process loads its share of the pairs; the images are gathered whole
    on every process (only process 0's writer writes them).
    """
    from fpdm_jax.trainers.loop import make_loader
    n = self.config.sample.num_images
    if self._image_batch is None:
      views = dict(self.views, source=("source_image", tuple(self.config.model.image_size),
                                        "symmetric"))
      cfg = self.config.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.eval.batch_size = n
      local = next(iter(make_loader(cfg, views, cfg.data.eval_split, train=False)))
      batch = sharding.global_batch(local, self.mesh)
      shown = sharding.to_host({k: batch[k] for k in ("source", "target_pose", "target")})
      self._image_batch = ({k: batch[k] for k in list(self.views) + ["pair_index"]}, shown)
    batch, shown = self._image_batch
    keys = sampling.sample_keys(self.config.seed, batch["pair_index"])
    images = sharding.to_host(self.sample_fn(model_def)(self.params_for_sampling(state),
                                                        frozen, batch, keys))
    rows = [[shown["source"][i], shown["target_pose"][i], visualize.to_uint8(images[i]),
             shown["target"][i]] for i in range(len(images))]
    return {"samples": visualize.image_grid(rows)[None]}

  def export(self, state, model_def, workdir: Path) -> None:
    """The trained UNet as a diffusers folder (+ the source projection)."""
    model = model_def(sharding.to_host(self.params_for_sampling(state)))
    if jax.process_index() != 0:
      return
    out = Path(workdir) / "export"
    unet_importer.export_unet(model.unet, out / "unet")
    hf_folder.save_safetensors(hf_folder.export_params(model.source_projection), out,
                               "source_projection.safetensors")
    logging.info("Exported the stage-2 UNet (diffusers format) to %s", out)
