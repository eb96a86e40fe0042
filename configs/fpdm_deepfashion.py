"""FPDM on DeepFashion In-shop, with the reference release's hyper-parameters.

Build the data, then train stage 1 and stage 2 (weights from local Hugging
Face folders; nothing is downloaded at run time):

  python -m data_prep.build deepfashion --src /data/deepfashion --layout fpdm \\
      --data-dir data --image-size 512x352
  python -m fpdm_jax.train --config configs/fpdm_deepfashion.py:stage1 --workdir runs/s1 \\
      --config.model.clip_path=/ckpt/clip-vit-large-patch14
  python -m fpdm_jax.train --config configs/fpdm_deepfashion.py:stage2 --workdir runs/s2 \\
      --config.fusion.path=runs/s1/fusion_model \\
      --config.model.unet_path=/ckpt/stable-diffusion-2-1 \\
      --config.model.vae_path=/ckpt/stable-diffusion-2-1 \\
      --config.model.source_encoder.path=/ckpt/dinov2-large
  python -m fpdm_jax.evaluate --workdir runs/s2 --inception ... --lpips-alexnet ... --lpips-lin ...

What the papers report (DESIGN.md): FPDM FID 7.318 at 256x176. Variants:
``stage1`` and ``stage2``. Where the reference is silent (warm-up length,
decay steps, total stage-2 steps) the values below are our choices, marked.
"""
import ml_collections

from configs import common

TRAIN_PAIRS = 101_966


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
  if arg not in ("stage1", "stage2"):
    raise KeyError(f"variants: stage1, stage2 (got {arg!r})")
  c = common.base_config(arg)
  c.data.update(data_dir="data", name="deepfashion/fpdm_512x352", worker_count=8)
  c.data.pose_canvas_scale = 1101 / 512  # flips redraw poses at the originals' size
  c.mesh = (("data", -1), ("fsdp", 1))
  if arg == "stage1":
    c.model = common.stage1_model()     # CLIP ViT-L/14 (+ visual projection)
    c.model.dtype = "bfloat16"
    c.loss = ml_collections.ConfigDict(dict(temperature=0.07, l1_weight=1e-4))
    c.optim.update(lr=1e-5, weight_decay=1e-4, warmup_steps=0, schedule="constant",
                   grad_clip=0.0)
    c.train.update(batch_size=48, num_steps=5 * TRAIN_PAIRS // 48,  # 5 epochs
                   log_every=100, eval_every=2000, checkpoint_every=1000)
    c.eval.batch_size = 64
  else:
    c.fusion = ml_collections.ConfigDict(dict(path=""))
    c.model = common.stage2_model()     # SD 2.1 UNet + VAE, DINOv2-L at 512x512
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.diffusion = common.stage2_diffusion()  # SD 2.1 scheduler: v-prediction
    c.sample = common.stage2_sample()        # 20 DDIM steps, guidance 2.0
    # Reference: batch 42 with gradient accumulation 3 (126 per update).
    c.optim.update(lr=1e-4, weight_decay=0.0, grad_clip=1.0,
                   warmup_steps=1000,              # ours: the reference says "linear warm-up"
                   schedule="step", decay_steps=(30_000, 45_000), decay_factor=0.5)  # ours
    c.train.update(batch_size=126, grad_accum=3, num_steps=60_000,  # ours: total steps
                   ema_decay=0.0, log_every=100, eval_every=5000, image_every=2000,
                   checkpoint_every=1000, keep_every=10_000)
    c.eval.batch_size = 32
    # FSDP: shard kernels with >= 1M parameters along the fsdp axis when it is > 1.
    c.sharding.min_fsdp_size = 2 ** 20
  return c
