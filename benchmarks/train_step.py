"""Training-step throughput: ours (JAX, the real ``make_train_step``) vs the
PyTorch reference's stack (diffusers / transformers + torch AdamW), same
weights, same shapes, on this machine's CPU.

  python -m benchmarks.train_step [--quick] [--json OUT.json] [--cases ...]

Cases
  unet-<config>-b<B>   stage-2-like step. Ours: ``fpdm_jax.trainers.common.
                       make_train_step`` (AdamW via ``make_optimizer``, grad clip 1.0,
                       non-finite guard, no EMA, grad_accum 1) around a loss that draws
                       noise and t, ``add_noise``, v target (SD 2.1 scheduler), runs
                       the FPDM UNet with pose features (PoseEmbedding of the pose
                       image) and class embedding (MLP of the fusion embedding, train
                       -mode dropout) and ``diffusion_mse``; jitted with the state
                       donated. Torch: diffusers ``UNet2DConditionModel`` loaded from
                       the folder ``export_unet`` wrote from OUR initial weights, plus
                       ``ControlNetConditioningEmbedding`` (pose, added after conv_in by
                       a forward hook) and ``Sequential(Linear, GELU, Dropout, Linear,
                       Dropout)`` as ``class_embedding``; same noise/v-target/MSE,
                       ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW``.
  clip-b<B>            stage-1 step: one CLIP vision call on 3B images (source, pose,
                       target), the Combiner, FPDM's InfoNCE (+ L1). Ours: FusionModel +
                       ``losses.fusion_infonce_loss`` through ``make_train_step``.
                       Torch: transformers ``CLIPVisionModelWithProjection`` from the
                       folder ``export_clip_vision`` wrote from our weights, a torch
                       Combiner with our Combiner's weights, the same loss, AdamW.
  stage2-<config>-b<B> what the feature cache saves (JAX only, no torch): the real
                       stage-2 step (``DiffusionStage.loss_fn`` in latent space through
                       ``make_train_step``) from uint8 images, running the frozen VAE
                       encoder, source encoder (DINOv2) and stage-1 fusion model (CLIP +
                       Combiner) in the step, against the same step from cached
                       features (``data.cached_features``: posterior mean/logvar, tokens,
                       fusion embedding, pose image). The UNet is the <config> case;
                       the frozen networks are scaled down with it (STAGE2_FROZEN).

Both optimisers: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2, global
grad-norm clip 1.0. Inputs are random arrays of the right shapes (NHWC for ours, NCHW
for torch), made once; the per-step noise and timesteps are drawn inside the step.

Method. Each case runs in a fresh process holding both implementations. After
building, ours is lowered and compiled ahead of time (compile time reported
separately), then --warmup steps of each, then --repeats timed steps, JAX and torch
interleaved in rounds of --block consecutive steps each (the order alternates every
round) so that load from other jobs on the shared machine hits both alike. Reported:
median step time, the ratio of each side's fastest step, images/s = batch /
median (stage 1: pairs/s, each pair = 3 encoder images), ratio ours/torch.

Memory, two figures:
  JAX compiled   ``compiled.memory_analysis()`` of the step: arguments + outputs -
                 aliased (donated) + temporaries, i.e. the step's live buffers.
  peak RSS delta measured in a separate process per implementation: RSS right after
                 imports is the baseline; the model is built, the step compiled (JAX)
                 and one warm-up step run (torch's AdamW state exists from then),
                 VmHWM is reset (``/proc/self/clear_refs``), 2 steps run, and the
                 result is VmHWM - baseline (params, optimiser state, gradients,
                 activations, allocator slack; excludes the compiler's transient peak).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as bc

MODULE = "benchmarks.train_step"
CLIP_CASE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, patch_size=16, image_size=224, projection_dim=256)
CLIP_QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=16, image_size=64, projection_dim=64)
# The stage2-* case's frozen networks, about as much smaller than the reference's
# (SD 2.1's VAE encoder, DINOv2-L at 512, CLIP ViT-L/14 at 224) as the UNet cases
# are than SD 2.1's UNet (~10x narrower, fewer layers). The target is 8x the
# latent size; the source encoder sees it at the nearest multiple of 14 below.
STAGE2_FROZEN = dict(
    vae=dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8),
    dinov2=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=14),
    clip=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, patch_size=14, image_size=224))
OPTIM = dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
             grad_clip=1.0, warmup_steps=0, schedule="constant")


# ----------------------------------------------------------------------------
# Builders: each returns (jax_step_runner, torch_step_runner, info).

def _optimizer():
  import ml_collections

  from fpdm_jax.trainers import common
  return common.make_optimizer(ml_collections.ConfigDict(OPTIM), num_steps=10 ** 6)


def _compile(step_fn, state, batch, frozen=None):
  import jax
  jitted = jax.jit(step_fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = jitted.lower(state, {} if frozen is None else frozen, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {"trace_lower_s": t1 - t0, "compile_s": t2 - t1,
                    "memory": bc.jax_memory(compiled), "flops": bc.jax_flops(compiled)}


def _jax_runner(compiled, state, batch, frozen=None):
  holder = {"state": state}
  frozen = {} if frozen is None else frozen

  def run():
    # Blocks on the loss only, as the trainer reads its metrics and never
    # waits on the state. Blocking on the state tree too (1,038 arrays at
    # small, 1,554 at medium) cost ~3 ms per step, 3-4 % of the small
    # batch-1 step, mostly the waits themselves: when the loss is ready the
    # runtime is still marking the last ~10-20 % of the outputs ready, done
    # 1.2-2.5 ms later, of which a block call on the finished tree takes
    # 0.3-0.8 ms. The next step waits for those outputs (they are its
    # donated inputs), so back-to-back steps count that tail; only the last
    # step of a block leaves it to the next call (benchmarks/README.md,
    # finding 28).
    new_state, metrics = compiled(holder["state"], frozen, batch)
    holder["state"] = new_state
    return float(metrics["loss"])

  return run


def unet_case(spec: dict, workdir: Path, want=("jax", "torch")):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from fpdm_jax import losses, schedulers
  from fpdm_jax.trainers import common

  name, b = spec["config"], spec["batch"]
  case = bc.UNET_CASES[name]
  cfg = bc.unet_config(name)
  h, w = case["latent"]
  ours, tunet, tforward = bc.build_unet_pair(name, workdir / "unet")
  info = {"params": common.count_params(common.pure_params(ours))}
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((b, h, w, 4), np.float32)
  pose = rng.random((b, 8 * h, 8 * w, 3), np.float32)
  fusion = rng.standard_normal((b, cfg.class_embed_input_dim), np.float32)
  context = rng.standard_normal((b, case["tokens"], cfg.cross_attention_dim), np.float32)
  sched = schedulers.SD21_SCHEDULER
  table = schedulers.alphas_cumprod(sched)
  runners = {}

  if spec.get("check"):
    # Same weights: one eval-mode forward on identical inputs.
    from flax import nnx
    t = np.array([500] * b)
    fwd = nnx.jit(lambda m, x, t, c, p, f: m(x, t, c, **dict(zip(
        ("pose_features", "class_embedding"), m.embed_conditions(p, f)))))
    out = np.asarray(fwd(ours, latents, t, context, pose, fusion))
    tunet.eval()
    with torch.no_grad():
      ref = tforward(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                     torch.from_numpy(context),
                     pose_image=torch.from_numpy(pose.transpose(0, 3, 1, 2).copy()),
                     fusion=torch.from_numpy(fusion)).numpy().transpose(0, 2, 3, 1)
    info["forward_max_abs_diff"] = float(np.abs(out - ref).max())
    info["forward_output_max_abs"] = float(np.abs(ref).max())

  if "jax" in want:
    model_def = common.ModelDef(ours)
    params = common.pure_params(ours)
    tx = _optimizer()
    table_j = jnp.asarray(table)

    def loss_fn(params, frozen, batch, rng):
      del frozen
      model = model_def(params)
      k_noise, k_t, k_drop = jax.random.split(rng, 3)
      x0 = batch["latents"]
      noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
      t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
      xt = schedulers.add_noise(table_j, x0, noise, t)
      target = schedulers.get_velocity(table_j, x0, noise, t)  # SD 2.1: v_prediction
      pose_f, cls = model.embed_conditions(batch["pose"], batch["fusion"], deterministic=False,
                                           rngs=k_drop)
      pred = model(xt, t, batch["context"], pose_features=pose_f, class_embedding=cls)
      return losses.diffusion_mse(pred, target), {}

    state = common.init_state(params, tx, seed=0, ema=False)
    batch = {k: jnp.asarray(v) for k, v in
             dict(latents=latents, pose=pose, fusion=fusion, context=context).items()}
    compiled, cinfo = _compile(common.make_train_step(loss_fn, tx), state, batch)
    info.update(cinfo)
    runners["jax"] = _jax_runner(compiled, state, batch)
    del ours

  if "torch" in want:
    tunet.train()
    opt = torch.optim.AdamW(tunet.parameters(), lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    plist = list(tunet.parameters())
    alphas = torch.from_numpy(np.asarray(table, np.float32))
    tl = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    tp = torch.from_numpy(pose.transpose(0, 3, 1, 2).copy())
    tf, tc = torch.from_numpy(fusion), torch.from_numpy(context)

    def run_torch():
      noise = torch.randn_like(tl)
      t = torch.randint(0, sched.num_train_timesteps, (b,))
      a = alphas[t].view(-1, 1, 1, 1)
      sa, s1a = a.sqrt(), (1 - a).sqrt()
      xt = sa * tl + s1a * noise
      target = sa * noise - s1a * tl
      pred = tforward(xt, t, tc, pose_image=tp, fusion=tf)
      loss = torch.nn.functional.mse_loss(pred, target)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(plist, OPTIM["grad_clip"])
      opt.step()
      return float(loss)

    runners["torch"] = run_torch
  return runners, info, b


def clip_case(spec: dict, workdir: Path, want=("jax", "torch")):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  from fpdm_jax import losses
  from fpdm_jax.importers import hf_folder
  from fpdm_jax.importers.clip import export_clip_vision
  from fpdm_jax.models.clip import CLIPVisionConfig
  from fpdm_jax.models.fusion import FusionConfig, FusionModel
  from fpdm_jax.trainers import common

  b = spec["batch"]
  ccfg = CLIPVisionConfig(**spec["clip"])
  model = FusionModel(FusionConfig(ccfg, dropout=0.5), rngs=nnx.Rngs(0))
  export_clip_vision(model.encoder, workdir / "clip")
  comb = {k: np.asarray(v) for k, v in hf_folder.export_params(model.combiner).items()}
  info = {"params": common.count_params(common.pure_params(model))}
  s = ccfg.image_size
  rng = np.random.default_rng(0)
  imgs = {k: rng.standard_normal((b, s, s, 3), np.float32) for k in ("source", "pose", "target")}
  temperature, l1_weight = 0.07, 1e-4
  runners = {}

  from transformers import CLIPVisionModelWithProjection
  tenc = CLIPVisionModelWithProjection.from_pretrained(str(workdir / "clip"))
  d = ccfg.projection_dim

  class Combiner(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.pose_projection = torch.nn.Linear(d, d)
      self.image_projection = torch.nn.Linear(d, d)
      self.combiner_layer = torch.nn.Linear(2 * d, d)
      self.dynamic_scalar_1 = torch.nn.Linear(2 * d, d)
      self.dynamic_scalar_2 = torch.nn.Linear(d, 1)
      self.output_layer = torch.nn.Linear(d, d)
      self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x_img, x_pose):
      relu, drop = torch.nn.functional.relu, self.dropout
      p = drop(relu(self.pose_projection(x_pose)))
      q = drop(relu(self.image_projection(x_img)))
      r = torch.cat([p, q], -1)
      hh = drop(relu(self.combiner_layer(r)))
      lam = torch.sigmoid(self.dynamic_scalar_2(drop(relu(self.dynamic_scalar_1(r)))))
      out = self.output_layer(hh) + lam * x_pose + (1 - lam) * x_img
      return torch.nn.functional.normalize(out, dim=-1)

  tcomb = Combiner()
  sd = {}
  for k, v in comb.items():
    mod, _, leaf = k.rpartition(".")
    sd[f"{mod}.{'weight' if leaf == 'kernel' else leaf}"] = torch.from_numpy(
        np.ascontiguousarray(v.T if leaf == "kernel" else v))
  tcomb.load_state_dict(sd, strict=True)

  if spec.get("check"):
    out = np.asarray(nnx.jit(lambda m, x: m.embed(x))(model, imgs["source"]))
    with torch.no_grad():
      tenc.eval()
      ref = tenc(pixel_values=torch.from_numpy(imgs["source"].transpose(0, 3, 1, 2).copy())
                 ).image_embeds.numpy()
    info["embed_max_abs_diff"] = float(np.abs(out - ref).max())
    info["embed_max_abs"] = float(np.abs(ref).max())

  if "jax" in want:
    model_def = common.ModelDef(model)
    params = common.pure_params(model)
    tx = _optimizer()

    def loss_fn(params, frozen, batch, rng):  # FusionStage.loss_fn minus uint8 normalise
      del frozen
      m = model_def(params)
      n = batch["source"].shape[0]
      e = m.embed(jnp.concatenate([batch["source"], batch["pose"], batch["target"]], 0))
      s_, p_, t_ = e[:n], e[n:2 * n], e[2 * n:]
      f = m.combiner(s_, p_, deterministic=False, rngs=rng)
      return losses.fusion_infonce_loss(t_, s_, f, temperature=temperature, l1_weight=l1_weight)

    state = common.init_state(params, tx, seed=0, ema=False)
    batch = {k: jnp.asarray(v) for k, v in imgs.items()}
    compiled, cinfo = _compile(common.make_train_step(loss_fn, tx), state, batch)
    info.update(cinfo)
    runners["jax"] = _jax_runner(compiled, state, batch)

  if "torch" in want:
    tenc.train()
    tcomb.train()
    plist = list(tenc.parameters()) + list(tcomb.parameters())
    opt = torch.optim.AdamW(plist, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    timgs = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for k, v in imgs.items()}
    F = torch.nn.functional

    def run_torch():
      e = tenc(pixel_values=torch.cat([timgs["source"], timgs["pose"], timgs["target"]])
               ).image_embeds
      s_, p_, t_ = e[:b], e[b:2 * b], e[2 * b:]
      f = tcomb(s_, p_)
      T = torch.cat([t_, s_])
      Fm = torch.cat([f, s_])
      S = torch.cat([s_, s_])
      logits = F.normalize(T, dim=-1) @ F.normalize(Fm, dim=-1).T / temperature
      loss = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
      loss = loss + l1_weight * (S - Fm).abs().mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(plist, OPTIM["grad_clip"])
      opt.step()
      return float(loss)

    runners["torch"] = run_torch
  return runners, info, b


def stage2_case(spec: dict, workdir: Path, want=("images", "cached")):
  import jax
  import numpy as np
  from flax import nnx

  from fpdm_jax import config_lib, input_pipeline
  from fpdm_jax.importers.vae import export_vae
  from fpdm_jax.models.vae import AutoencoderKL, VAEConfig
  from fpdm_jax.trainers import common, stage1, stage2

  name, b = spec["config"], spec["batch"]
  case = bc.UNET_CASES[name]
  lh, lw = case["latent"]
  size, src = (8 * lh, 8 * lw), 14 * (8 * lh // 14)
  fz = STAGE2_FROZEN
  s1 = config_lib.load_config("configs/synthetic.py:stage1")
  clip = dict(fz["clip"], projection_dim=case["unet"]["class_embed_input_dim"])
  s1 = config_lib.apply_overrides(s1, [f"model.clip_overrides={clip!r}"])
  stage1.export_fusion_model(stage1.build_fusion_model(s1.model, seed=0), workdir / "fusion")
  export_vae(AutoencoderKL(VAEConfig(**fz["vae"]), rngs=nnx.Rngs(0)), workdir / "vae")
  unet = dict(case["unet"], sample_size=lh, use_linear_projection=True, upcast_attention=True)
  cfg = config_lib.apply_overrides(config_lib.load_config("configs/synthetic.py:stage2"), [
      f"fusion.path={workdir / 'fusion'}", "model.latent=True",
      f"model.vae_path={workdir / 'vae'}", f"model.image_size={size!r}",
      f"model.unet_overrides={unet!r}", "model.source_encoder.kind=dinov2",
      "model.source_encoder.preset=tiny", f"model.source_encoder.image_size={src}",
      f"model.source_encoder.overrides={dict(fz['dinov2'], image_size=src)!r}",
      f"model.projection_hidden={case['unet']['cross_attention_dim']}"])
  stage = stage2.DiffusionStage(cfg, None)
  model_def = common.ModelDef(stage.trainable)
  params = common.pure_params(stage.trainable)
  frozen = stage.frozen_params()
  info = {"params": common.count_params(params), "frozen_params": common.count_params(frozen),
          "image_size": size, "source_size": src}
  rng = np.random.default_rng(0)
  views = input_pipeline.parse_views(stage.views)
  images = {k: rng.integers(0, 256, (b, *v.size, 3), dtype=np.uint8) for k, v in views.items()}
  nets = stage.frozen_def(frozen)
  features = nnx.jit(lambda n, x: stage2.frozen_outputs(
      n, input_pipeline.normalise(x, stage.views), encode_target=True))(nets, images)
  cached = {**{k: np.asarray(v) for k, v in features.items()},
            "target_pose": images["target_pose"]}
  info["cached_record_bytes"] = int(sum(v[0].nbytes for v in cached.values()))
  info["image_record_bytes"] = int(sum(v[0].nbytes for v in images.values()))
  tx = _optimizer()

  def loss_fn(p, f, batch, r):
    return stage.loss_fn(model_def(p), f, batch, r)

  step = common.make_train_step(loss_fn, tx)
  runners = {}
  for impl, batch, fro in (("images", images, frozen), ("cached", cached, None)):
    if impl not in want:
      continue
    own = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), params)  # the step donates it
    state = common.init_state(own, tx, seed=0, ema=False)
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    compiled, cinfo = _compile(step, state, batch, fro)
    info[impl] = cinfo
    runners[impl] = _jax_runner(compiled, state, batch, fro)
  return runners, info, b


IMPLS = {"unet": ("jax", "torch"), "clip": ("jax", "torch"), "stage2": ("images", "cached")}


def reference_flops(spec: dict) -> dict:
  """XLA's FLOP count of the stage-2 gradient step at a real config's size
  (default the reference: SD 2.1, DINOv2-L at 512, CLIP ViT-L/14) from images
  and from cached features. Built under ``nnx.eval_shape`` and lowered only
  (``fpdm_jax.plan.abstract_stage``): nothing full-size is allocated, no time
  is measured; the machine-independent share of a step the cache removes."""
  import jax
  import jax.numpy as jnp

  from fpdm_jax import config_lib, input_pipeline, plan
  from fpdm_jax.trainers import common, stage2

  t0 = time.perf_counter()
  cfg = config_lib.load_config(spec["config"])
  stage = plan.abstract_stage(cfg, None)
  model_def = common.ModelDef(stage.trainable)
  params, frozen = common.pure_params(stage.trainable), stage.frozen_params()
  b = spec["batch"]
  views = input_pipeline.parse_views(stage.views)
  images = {k: jax.ShapeDtypeStruct((b, *v.size, 3), jnp.uint8) for k, v in views.items()}

  def frozen_fwd(f, x):
    return stage2.frozen_outputs(stage.frozen_def(f), input_pipeline.normalise(x, stage.views),
                                 encode_target=True)

  feats = jax.eval_shape(frozen_fwd, frozen, images)
  cached = dict(feats, target_pose=images["target_pose"])
  grad = jax.value_and_grad(lambda p, f, x, r: stage.loss_fn(model_def(p), f, x, r),
                            has_aux=True)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  flops = lambda lowered: float((lowered.cost_analysis() or {}).get("flops", 0.0))
  out = {"config": spec["config"], "batch": b, "dtype": cfg.model.dtype,
         "images_flops": flops(jax.jit(grad).lower(params, frozen, images, key)),
         "cached_flops": flops(jax.jit(grad).lower(params, None, cached, key)),
         "frozen_forward_flops": flops(jax.jit(frozen_fwd).lower(frozen, images)),
         "cached_record_bytes": int(sum(v.size // b * jnp.dtype(v.dtype).itemsize
                                        for v in cached.values())),
         "fields": {k: [list(v.shape[1:]), jnp.dtype(v.dtype).name] for k, v in cached.items()}}
  out["build_and_lower_s"] = time.perf_counter() - t0
  return out


# ----------------------------------------------------------------------------
# One measurement (fresh process).

def run_one(spec: dict) -> dict:
  baseline = bc.rss_bytes()
  import torch
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  mode = spec["mode"]  # "time", "mem-<impl>": "mem-jax", "mem-torch", "mem-cached" ...
  if mode == "flops":
    return reference_flops(spec)
  want = IMPLS[spec["kind"]] if mode == "time" else (mode.split("-")[1],)
  build = {"unet": unet_case, "clip": clip_case, "stage2": stage2_case}[spec["kind"]]
  with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
    t0 = time.perf_counter()
    runners, info, b = build(spec, Path(tmp), want)
    info["build_s"] = time.perf_counter() - t0
  out = {"spec": spec, "info": info, "torch_threads": torch.get_num_threads()}
  if mode != "time":
    impl = want[0]
    runners[impl]()  # warm-up: first-call work, torch optimiser state
    reset_ok = bc.reset_hwm()
    rss0 = bc.rss_bytes()
    for _ in range(2):
      runners[impl]()
    out.update(impl=impl, peak_rss_delta=bc.hwm_bytes() - baseline, rss_before_steps=rss0 - baseline,
               hwm_reset=reset_ok)
    return out
  first = {}
  for impl, run in runners.items():
    t = time.perf_counter()
    run()
    first[impl] = time.perf_counter() - t
  for _ in range(max(0, spec["warmup"] - 1)):
    for run in runners.values():
      run()
  times, losses = bc.interleaved(runners, spec["repeats"], block=spec.get("block", 1))
  out.update(first_step_s=first, timing={k: bc.summarize(v) for k, v in times.items()},
             losses=losses, loadavg_at_end=os.getloadavg())
  return out


# ----------------------------------------------------------------------------
# Reporting.

def case_specs(args) -> list[dict]:
  specs = []
  for case in args.cases:
    if case.startswith(("unet-", "stage2-")):
      kind, cfg, bpart = case.split("-")
      b = int(bpart[1:])
      specs.append(dict(kind=kind, config=cfg, batch=b, check=b == 1 and kind == "unet",
                        name=case))
    else:
      b = int(case.split("-")[1][1:])
      specs.append(dict(kind="clip", batch=b, check=True, name=case,
                        clip=CLIP_QUICK if args.quick else CLIP_CASE))
  for s in specs:
    s.update(warmup=args.warmup, repeats=args.repeats, block=args.block,
             torch_threads=args.torch_threads)
  return specs


def table(rows: list[dict]) -> str:
  """The main table. Besides the ratio of medians it gives the ratio of each
  side's fastest step: on a VM that hands freed memory back to its host, a
  JAX step after a pause (such as torch's step) can take twice as long
  (benchmarks/README.md, finding 17). Such noise only ever slows a step, so
  the fastest steps compare the code."""
  out = ["| case | unit | JAX step ms (median) | torch step ms (median) | JAX /s | torch /s | "
         "JAX / torch | fastest steps: JAX / torch | JAX compile s | "
         "JAX compiled MiB (temp) | JAX peak RSS Δ MiB | torch peak RSS Δ MiB |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["spec"]["kind"] == "stage2":
      continue
    tj, tt = r["timing"]["jax"]["median_s"], r["timing"]["torch"]["median_s"]
    fastest = r["timing"]["torch"]["min_s"] / r["timing"]["jax"]["min_s"]
    n = r["spec"]["batch"]
    unit = "pairs" if r["spec"]["kind"] == "clip" else "images"
    mem = r["info"].get("memory", {})
    out.append(
        f"| {r['spec']['name']} | {unit} | {tj * 1e3:.1f} | {tt * 1e3:.1f} | {n / tj:.2f} | "
        f"{n / tt:.2f} | {tt / tj:.2f}× | {fastest:.2f}× | {r['info']['compile_s']:.1f} | "
        f"{bc.mib(mem.get('total_bytes'))} ({bc.mib(mem.get('temp_size_in_bytes'))}) | "
        f"{bc.mib(r.get('mem', {}).get('jax'))} | {bc.mib(r.get('mem', {}).get('torch'))} |")
  return "\n".join(out)


def cache_table(rows: list[dict]) -> str:
  """What training from cached features saves per stage-2 step."""
  out = ["| case | from images ms (median) | from cache ms (median) | saved ms/step | "
         "cache / images time | images /s: from images | from cache | XLA GFLOP/step: "
         "from images | from cache | compiled MiB: from images | from cache | "
         "peak RSS Δ MiB: from images | from cache |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["spec"]["kind"] != "stage2":
      continue
    ti, tc = r["timing"]["images"]["median_s"], r["timing"]["cached"]["median_s"]
    n, i = r["spec"]["batch"], r["info"]
    gf = lambda k: f"{(i[k].get('flops') or 0) / 1e9:.1f}"
    mem = lambda k: bc.mib(i[k].get("memory", {}).get("total_bytes"))
    out.append(
        f"| {r['spec']['name']} | {ti * 1e3:.1f} | {tc * 1e3:.1f} | {(ti - tc) * 1e3:.1f} | "
        f"{tc / ti:.2f} | {n / ti:.2f} | {n / tc:.2f} | {gf('images')} | {gf('cached')} | "
        f"{mem('images')} | {mem('cached')} | {bc.mib(r.get('mem', {}).get('images'))} | "
        f"{bc.mib(r.get('mem', {}).get('cached'))} |")
  return "\n".join(out)


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: unet-tiny-b1 and a tiny clip-b2, 1 warm-up + 2 timed steps, "
                      "no memory processes (explicit flags still win)")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--cases", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                 help="comma-separated: unet-{small,medium}-b<B>, clip-b<B>, "
                      "stage2-{tiny,small,medium}-b<B> (default unet-small-b1,unet-small-b8,"
                      "unet-medium-b1,unet-medium-b8,clip-b8,stage2-small-b8)")
  p.add_argument("--repeats", type=int, help="timed steps per implementation (default 5; quick 2)")
  p.add_argument("--warmup", type=int, help="untimed steps per implementation, the first "
                 "reported separately (default 1; quick 1)")
  p.add_argument("--block", type=int, default=1,
                 help="consecutive steps of one implementation before switching (default 1: "
                      "strict alternation). Training runs steps back to back; see "
                      "benchmarks/README.md finding 17 for why that matters on a VM")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                 help="run the per-implementation peak-RSS processes (default on; quick off)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads; 0 keeps torch's default (= cores)")
  p.add_argument("--reference-flops", nargs="?", const="configs/fpdm_deepfashion.py:stage2",
                 metavar="CONFIG", help="also count the stage-2 step's FLOPs from images and "
                 "from cached features at a real config's size (default the reference, "
                 "%(const)s; abstract: nothing allocated, ~2 min)")
  p.add_argument("--run-one", help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  if args.run_one:
    import json
    print(json.dumps(run_one(json.loads(args.run_one)), default=str), flush=True)
    return 0
  quick = dict(cases=["unet-tiny-b1", "clip-b2"], repeats=2, warmup=1, memory=False)
  full = dict(cases=["unet-small-b1", "unet-small-b8", "unet-medium-b1", "unet-medium-b8",
                     "clip-b8", "stage2-small-b8"], repeats=5, warmup=1, memory=True)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.repeats < 1 or args.warmup < 1 or args.block < 1:
    raise SystemExit("error: --repeats, --warmup and --block must be >= 1")
  t_start = time.perf_counter()
  machine = bc.machine_info()
  rows = []
  for spec in case_specs(args):
    print(f"[run] {spec['name']}", file=sys.stderr, flush=True)
    r = bc.run_module(MODULE, dict(spec, mode="time"))
    r["mem"] = {}
    impls = IMPLS[spec["kind"]]
    if args.memory:
      for impl in impls:
        m = bc.run_module(MODULE, dict(spec, mode=f"mem-{impl}"))
        r["mem"][impl] = m["peak_rss_delta"]
        r.setdefault("mem_detail", {})[impl] = m
    ta, tb = (r["timing"][k]["median_s"] for k in impls)
    print(f"[run]   {impls[0]} {ta * 1e3:.1f} ms, {impls[1]} {tb * 1e3:.1f} ms, ratio "
          f"{tb / ta:.2f}x", file=sys.stderr, flush=True)
    rows.append(r)
    if args.json:  # after every case, so an interrupted run keeps what it measured
      bc.write_json(args.json + ".partial", {"machine": machine, "results": rows})
  print()
  print(bc.machine_line(machine))
  for name in sorted({s["config"] for s in (r["spec"] for r in rows) if s["kind"] == "unet"}):
    print(f"UNet {bc.describe_case(name)}")
  if any(r["spec"]["kind"] == "clip" for r in rows):
    c = next(r["spec"]["clip"] for r in rows if r["spec"]["kind"] == "clip")
    print(f"Stage 1: CLIP ViT hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
          f"{c['num_attention_heads']} heads, MLP {c['intermediate_size']}, patch "
          f"{c['patch_size']}, {c['image_size']}px, projection {c['projection_dim']}; one encoder "
          "call on 3B images; rate = pairs/s (x3 for encoder images/s)")
  print(f"Timing: median of {args.repeats} steps after {args.warmup} warm-up, the two "
        "implementations of a case (JAX and torch; stage2-*: from images and from cache) "
        f"interleaved in one process per case, in blocks of {args.block} consecutive steps; "
        "torch threads "
        f"{rows[0]['torch_threads'] if rows else '?'}")
  if any(r["spec"]["kind"] != "stage2" for r in rows):
    print()
    print(table(rows))
  if any(r["spec"]["kind"] == "stage2" for r in rows):
    f = STAGE2_FROZEN
    print()
    print("Stage-2 step from images (frozen VAE encoder, DINOv2, stage-1 CLIP run in the step) "
          f"vs from cached features; frozen: VAE encoder {f['vae']['block_out_channels']}, "
          f"DINOv2 hidden {f['dinov2']['hidden_size']} x {f['dinov2']['num_hidden_layers']} "
          f"layers, CLIP hidden {f['clip']['hidden_size']} x {f['clip']['num_hidden_layers']} "
          "layers at 224 (on source and pose)")
    print()
    print(cache_table(rows))
  ref = None
  if args.reference_flops:
    print(f"[run] reference FLOPs of {args.reference_flops}", file=sys.stderr, flush=True)
    ref = bc.run_module(MODULE, dict(mode="flops", config=args.reference_flops, batch=1))
    print()
    print(f"Stage-2 gradient step at the size of {ref['config']} (batch 1, {ref['dtype']}; "
          "XLA's count on the lowered step, optimiser update excluded):")
    print()
    print("| step | TFLOP per image | share |")
    print("|---|---:|---:|")
    fi, fc, ff = ref["images_flops"], ref["cached_flops"], ref["frozen_forward_flops"]
    print(f"| from images | {fi / 1e12:.2f} | 100 % |")
    print(f"| from cached features | {fc / 1e12:.2f} | {100 * fc / fi:.0f} % |")
    print(f"| (frozen networks' forward alone) | {ff / 1e12:.2f} | {100 * ff / fi:.0f} % |")
    print()
    print(f"Cache record at this size: {ref['cached_record_bytes'] / 2 ** 20:.2f} MiB ("
          + ", ".join(f"{k} {'x'.join(map(str, s)) or 'scalar'} {d}"
                      for k, (s, d) in ref["fields"].items()) + ")")
  print()
  for r in rows:
    i = r["info"]
    if r["spec"]["kind"] == "stage2":
      print(f"{r['spec']['name']}: trainable params {i['params']:,}, frozen "
            f"{i['frozen_params']:,}; "
            f"target {i['image_size'][0]}x{i['image_size'][1]}, source {i['source_size']}px; "
            f"record: cached {i['cached_record_bytes'] / 1024:.0f} KiB vs uint8 views "
            f"{i['image_record_bytes'] / 1024:.0f} KiB; compile s: images "
            f"{i['images']['compile_s']:.1f}, cached {i['cached']['compile_s']:.1f}")
      continue
    extra = []
    if "forward_max_abs_diff" in i:
      extra.append(f"forward max|JAX-torch| {i['forward_max_abs_diff']:.2e} "
                   f"(output max {i['forward_output_max_abs']:.2f})")
    if "embed_max_abs_diff" in i:
      extra.append(f"image_embeds max|JAX-torch| {i['embed_max_abs_diff']:.2e} "
                   f"(max {i['embed_max_abs']:.2f})")
    print(f"{r['spec']['name']}: params {i['params']:,}; first JAX step "
          f"{r['first_step_s']['jax']:.2f}s, first torch step {r['first_step_s']['torch']:.2f}s; "
          f"XLA flops/step {i.get('flops') or 0:.3g}" + ("; " + "; ".join(extra) if extra else ""))
  bc.write_json(args.json, {
      "command": f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "run_one"},
      "reference_flops": ref,
      "unet_cases": {k: bc.describe_case(k) for k in bc.UNET_CASES}, "results": rows,
      "total_s": time.perf_counter() - t_start})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
