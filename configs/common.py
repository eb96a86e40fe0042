"""Defaults every config starts from; configs change only what differs."""
import ml_collections


def base_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      data_dir="", name="", train_split="train", eval_split="test",
      worker_count=0, flip_prob=0.0, pose_canvas_scale=1.0,
      # Stage 2: train from a feature cache (python -m data_prep.cache_features)
      # instead of running the frozen networks every step; "" = off.
      cached_features=""))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0, warmup_steps=0, schedule="constant",
      decay_steps=(), decay_factor=0.5))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=100, grad_accum=1, ema_decay=0.0,
      log_every=10, eval_every=0, image_every=0, checkpoint_every=50,
      keep_last=3, keep_every=0, async_checkpoints=True,
      max_nonfinite_in_a_row=5, profile=False,
      # Stop with a checkpoint at this step, as a preemption would (0: never);
      # for time-limited jobs: rerun the same command to continue.
      stop_at_step=0,
      # JAX's persistent compilation cache: a restarted or resumed run loads
      # its compiled steps instead of compiling them again ("" = off;
      # $JAX_COMPILATION_CACHE_DIR wins). Off by itself under CPU collectives.
      compilation_cache_dir="~/.cache/fpdm_jax/xla"))

  c.eval = ml_collections.ConfigDict(dict(batch_size=8, max_batches=0))

  # Mesh axes in order; -1 takes the remaining devices.
  c.mesh = (("data", -1), ("fsdp", 1))
  # (regex over the parameter path, "replicate" | "fsdp"); the first match wins.
  c.sharding = ml_collections.ConfigDict(dict(
      rules=((".*", "fsdp"),), min_fsdp_size=2 ** 14))
  return c


def stage1_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      clip_preset="vit_l14", clip_path="", clip_overrides={},
      combiner_dropout=0.5, dtype="float32", remat=False))


def stage2_model() -> ml_collections.ConfigDict:
  """The reference FPDM stage 2: SD 2.1 in latent space, DINOv2-L source tokens."""
  return ml_collections.ConfigDict(dict(
      latent=True,
      pixel_unshuffle=1,    # latent=False: diffuse f x f pixel blocks folded into channels
      vae_path="",          # SD 2.1 pipeline folder (or its vae/)
      unet_path="",         # SD 2.1 pipeline folder (or its unet/): initialises the UNet
      unet_preset="sd21",   # architecture when unet_path is empty
      unet_overrides={},
      image_size=(512, 352),
      source_encoder=ml_collections.ConfigDict(dict(
          kind="dinov2", path="", preset="large", image_size=512, overrides={})),
      projection_hidden=768, projection_dropout=0.2,
      dtype="float32", remat=False))


def stage2_diffusion() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      scheduler="sd21",           # or a folder / scheduler_config.json
      scheduler_overrides={},
      noise_offset=0.1, cond_drop_prob=0.2, cond_drop_per_sample=True,
      min_snr_gamma=0.0))         # > 0: min-SNR-gamma loss weighting


def stage2_sample() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(kind="ddim", steps=20, guidance=2.0, num_images=8))
