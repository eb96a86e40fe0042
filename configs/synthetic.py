"""The embedded default: tiny models that learn the synthetic dataset on a CPU.

  python -m data_prep.build synthetic --data-dir data
  python -m fpdm_jax.train --config configs/synthetic.py:stage1 --workdir runs/s1
  python -m fpdm_jax.train --config configs/synthetic.py:stage2 --workdir runs/s2 \
      --config.fusion.path=runs/s1/fusion_model

Variants: ``stage1``, ``stage2``, and ``:quick`` versions of each
(``stage1_quick``) for tests: a few steps, same shapes.
Stage 2 runs in pixel space (``model.latent=False``): no pretrained VAE is
needed to learn 64x64 images.
"""
import ml_collections

from configs import common

DATA = dict(data_dir="demo_out/data", name="synthetic_people/64x64_train2000_test200_seed0")


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
  stage, _, quick = arg.partition("_")
  if stage not in ("stage1", "stage2") or quick not in ("", "quick"):
    raise KeyError(f"variants: stage1, stage2, stage1_quick, stage2_quick (got {arg!r})")
  c = common.base_config(stage)
  c.data.update(DATA)
  c.data.pose_canvas_scale = 4.0
  if stage == "stage1":
    c.model = common.stage1_model()
    c.model.clip_preset = "tiny"
    c.model.clip_overrides = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=64, patch_size=8,
                                  projection_dim=64)
    c.model.combiner_dropout = 0.1
    c.loss = ml_collections.ConfigDict(dict(temperature=0.07, l1_weight=1e-4))
    c.optim.lr, c.optim.weight_decay = 3e-4, 1e-4
    c.optim.warmup_steps, c.optim.schedule = 50, "cosine"
    c.train.update(batch_size=32, num_steps=600, log_every=50, eval_every=300,
                   checkpoint_every=200)
    c.eval.batch_size = 40
  if stage == "stage2":
    c.fusion = ml_collections.ConfigDict(dict(path="demo_out/stage1/fusion_model"))
    c.model = common.stage2_model()
    # Pixel space folded 4x4 into channels: the UNet works at 16x16x48, as
    # SD's works at 1/8 resolution in latent space.
    c.model.update(latent=False, pixel_unshuffle=4, image_size=(64, 64),
                   unet_preset="custom", projection_hidden=64)
    c.model.unet_overrides = dict(
        sample_size=16, block_out_channels=(64, 128), layers_per_block=2,
        attention_head_dim=(4, 8), cross_attention_dim=64, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        pose_embedding_channels=(16, 32, 64))  # two stride-2 convs: 64x64 -> 16x16
    c.model.source_encoder.kind = "stage1"  # the trained stage-1 CLIP's tokens
    c.diffusion = common.stage2_diffusion()
    # x0-prediction, not SD 2.1's v: the 48 folded pixel channels enter a
    # 64-wide UNet, too narrow to carry 48 channels of independent noise to
    # the output, which epsilon and v targets need (v = sqrt(a) eps - ...).
    # With v the per-channel leftovers compounded over the DDIM steps into
    # saturated pixel noise (PSNR about 6, below copying the
    # source); predicting the clean image, which is smooth, does not need
    # the noise carried (the argument of Li & He 2025, "Back to Basics: Let
    # Denoising Generative Models Denoise"). The real configs keep v: SD's
    # 4 latent channels go into a 320-wide block.
    c.diffusion.scheduler_overrides = dict(prediction_type="sample")
    c.sample = common.stage2_sample()
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 5e-4, 100, "cosine"
    c.train.update(batch_size=16, num_steps=2000, ema_decay=0.999, log_every=100,
                   eval_every=1000, image_every=1000, checkpoint_every=500)
    c.eval.update(batch_size=16, max_batches=4)
  if quick:
    c.train.update(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3,
                   image_every=0, batch_size=8)
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=8, max_batches=1)
    if stage == "stage2":
      c.model.unet_overrides = dict(
          sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
          attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          pose_embedding_channels=(8, 16, 16))
      c.model.projection_hidden = 32
      c.sample.update(steps=3, num_images=2)
      c.train.image_every = 6
  return c
