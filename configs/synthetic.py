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
  if quick:
    c.train.update(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3,
                   image_every=0, batch_size=8)
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=8, max_batches=1)
  return c
