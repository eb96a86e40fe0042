"""Sampling cost: seconds per image for DDIM with FPDM's three-way
classifier-free guidance, ours (one jitted ``lax.fori_loop``) vs a PyTorch loop
in the style of the diffusers pipeline, same UNet weights.

  python -m benchmarks.sampling [--quick] [--json OUT.json] [--cases ...] [--steps 20]

Per step the UNet runs once on 3B inputs: (uncond: no pose, no source context,
no fusion), (pose + source), (pose + source + fusion), and

  e = e_u + g (e_s - e_u) + g (e_f - e_s),  g = --guidance (default 2)

then one DDIM step (eta 0, Stable Diffusion 2.1 scheduler: v-prediction,
"leading" spacing). "No condition" means zeros: zero pose features, zero class
embedding (the MLP's output), zero context tokens. The pose features and class
embedding are computed once per sample, before the loop, on both sides.

  ours   ``fpdm_jax.schedulers.make_sampler_schedule("ddim", SD21_SCHEDULER, n)``;
         the whole loop is one ``jax.jit`` (AOT lowered and compiled; compile time
         reported separately) of ``lax.fori_loop`` over ``sampler_step``.
  torch  diffusers ``UNet2DConditionModel`` read from the folder ``export_unet``
         wrote from our weights, ``DDIMScheduler`` from the same config, a Python
         loop over ``scheduler.timesteps`` under ``torch.no_grad()``: cat latents
         x3, UNet, chunk, guidance, ``scheduler.step(...).prev_sample``; the pose
         features added after conv_in by a forward hook, the class embedding
         passed as ``class_labels`` to an identity ``class_embedding``.

Method: each case runs in a fresh process with both implementations; after one
warm-up loop each, --repeats loops are timed, JAX and torch interleaved (order
alternating). Reported: median seconds per loop / batch = s/image. The final
latents of both are compared (same x_T): max |JAX - torch|.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as bc

STEPS = 20  # DDIM steps of a loop
GUIDANCE = 2.0

MODULE = "benchmarks.sampling"


def run_one(spec: dict) -> dict:
  import numpy as np
  import torch
  runners, info = build(spec)
  first, outs = {}, {}
  for impl, run in runners.items():
    t = time.perf_counter()
    outs[impl] = run()
    first[impl] = time.perf_counter() - t
  info["final_latents_max_abs_diff"] = float(np.abs(outs["jax"] - outs["torch"]).max())
  info["final_latents_max_abs"] = float(np.abs(outs["torch"]).max())
  times, _ = bc.interleaved(runners, spec["repeats"])
  return {"spec": spec, "info": info, "first_loop_s": first,
          "timing": {k: bc.summarize(v) for k, v in times.items()},
          "torch_threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg()}


def build(spec: dict, want=("jax", "torch")) -> tuple[dict, dict]:
  """The sampling loops of ``spec`` (config, batch, steps, guidance,
  torch_threads): {"jax": call, "torch": call} (those in ``want``), each
  running one whole loop and returning its final latents (NHWC numpy), and
  the JAX loop's compile facts."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import DDIMScheduler
  from flax import nnx

  from fpdm_jax import schedulers
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  name, b, n_steps, g = spec["config"], spec["batch"], spec["steps"], spec["guidance"]
  case = bc.UNET_CASES[name]
  cfg = bc.unet_config(name)
  h, w = case["latent"]
  with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
    ours, tunet, _ = bc.build_unet_pair(name, Path(tmp) / "unet")
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal((b, h, w, 4), np.float32)
  pose = rng.random((b, 8 * h, 8 * w, 3), np.float32)
  fusion = rng.standard_normal((b, cfg.class_embed_input_dim), np.float32)
  context = rng.standard_normal((b, case["tokens"], cfg.cross_attention_dim), np.float32)

  # --- ours
  sched = schedulers.make_sampler_schedule("ddim", schedulers.SD21_SCHEDULER, n_steps)
  graphdef, state = nnx.split(ours)

  def sample(state, x_T, context, pose_image, fusion):
    model = nnx.merge(graphdef, state)
    pose_f, cls = model.embed_conditions(pose_image, fusion)
    zp, zc = jnp.zeros_like(pose_f), jnp.zeros_like(cls)
    pose3 = jnp.concatenate([zp, pose_f, pose_f])
    cls3 = jnp.concatenate([zc, zc, cls])
    ctx3 = jnp.concatenate([jnp.zeros_like(context), context, context])

    def body(i, x):
      out = model(jnp.concatenate([x, x, x]), sched.timesteps[i], ctx3, pose_features=pose3,
                  class_embedding=cls3)
      e_u, e_s, e_f = jnp.split(out, 3)
      e = e_u + g * (e_s - e_u) + g * (e_f - e_s)
      x, _ = schedulers.sampler_step(sched, (), i, e, x)
      return x

    return jax.lax.fori_loop(0, sched.num_steps, body, x_T)

  args = tuple(jnp.asarray(a) for a in (x_T, context, pose, fusion))
  t0 = time.perf_counter()
  lowered = jax.jit(sample).lower(state, *args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  info = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "memory": bc.jax_memory(compiled),
          "flops": bc.jax_flops(compiled)}

  def run_jax():
    return np.asarray(bc.block(compiled(state, *args)))

  runners = {"jax": run_jax}
  if "torch" not in want:
    return runners, info

  # --- torch, diffusers-pipeline style
  tunet.eval()
  scheduler = DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", prediction_type="v_prediction",
      timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
  hook_state = {}
  tunet.conv_in.register_forward_hook(lambda m, i, o: o + hook_state["pose"])
  mlp = tunet.class_embedding
  tunet.class_embedding = torch.nn.Identity()
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  tx_T, tpose, tfus, tctx = nchw(x_T), nchw(pose), torch.from_numpy(fusion), torch.from_numpy(context)

  def run_torch():
    with torch.no_grad():
      pose_f = tunet.pose_embedding(tpose)
      cls = mlp(tfus)
      hook_state["pose"] = torch.cat([torch.zeros_like(pose_f), pose_f, pose_f])
      cls3 = torch.cat([torch.zeros_like(cls), torch.zeros_like(cls), cls])
      ctx3 = torch.cat([torch.zeros_like(tctx), tctx, tctx])
      scheduler.set_timesteps(n_steps)
      latents = tx_T.clone()
      for t in scheduler.timesteps:
        latent_in = torch.cat([latents] * 3)
        latent_in = scheduler.scale_model_input(latent_in, t)
        out = tunet(latent_in, t, encoder_hidden_states=ctx3, class_labels=cls3).sample
        e_u, e_s, e_f = out.chunk(3)
        e = e_u + g * (e_s - e_u) + g * (e_f - e_s)
        latents = scheduler.step(e, t, latents).prev_sample
    return latents.numpy().transpose(0, 2, 3, 1)

  runners["torch"] = run_torch
  return runners, info


def table(rows: list[dict]) -> str:
  out = ["| config | batch | JAX s/image (median) | torch s/image (median) | JAX / torch | "
         "JAX loop s (min–max) | torch loop s (min–max) | JAX compile s | max abs Δ latents |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    b = r["spec"]["batch"]
    j, t = r["timing"]["jax"], r["timing"]["torch"]
    out.append(f"| {r['spec']['config']} | {b} | {j['median_s'] / b:.3f} | {t['median_s'] / b:.3f} | "
               f"{t['median_s'] / j['median_s']:.2f}× | {j['min_s']:.2f}–{j['max_s']:.2f} | "
               f"{t['min_s']:.2f}–{t['max_s']:.2f} | {r['info']['compile_s']:.1f} | "
               f"{r['info']['final_latents_max_abs_diff']:.1e} |")
  return "\n".join(out)


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: tiny config, batch 1, 4 steps, 1 timed loop "
                      "(explicit flags still win)")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--cases", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                 help="comma-separated <config>-b<B> with config in "
                      f"{sorted(bc.UNET_CASES)} (default small-b1,small-b4,medium-b1,medium-b4)")
  p.add_argument("--steps", type=int, help=f"DDIM steps (default {STEPS}; quick 4)")
  p.add_argument("--guidance", type=float, default=GUIDANCE, help="g (default %(default)s)")
  p.add_argument("--repeats", type=int, help="timed loops per implementation (default 5; quick 1)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads; 0 keeps torch's default (= cores)")
  p.add_argument("--run-one", help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  if args.run_one:
    print(json.dumps(run_one(json.loads(args.run_one)), default=str), flush=True)
    return 0
  quick = dict(cases=["tiny-b1"], steps=4, repeats=1)
  full = dict(cases=["small-b1", "small-b4", "medium-b1", "medium-b4"], steps=STEPS, repeats=5)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  t_start = time.perf_counter()
  machine = bc.machine_info()
  rows = []
  for case in args.cases:
    cfg, bpart = case.rsplit("-", 1)
    if cfg not in bc.UNET_CASES:
      raise SystemExit(f"unknown config {cfg!r}; one of {sorted(bc.UNET_CASES)}")
    spec = dict(config=cfg, batch=int(bpart[1:]), steps=args.steps, guidance=args.guidance,
                repeats=args.repeats, torch_threads=args.torch_threads)
    print(f"[run] {case}", file=sys.stderr, flush=True)
    r = bc.run_module(MODULE, spec)
    print(f"[run]   jax {r['timing']['jax']['median_s']:.2f} s/loop, torch "
          f"{r['timing']['torch']['median_s']:.2f} s/loop", file=sys.stderr, flush=True)
    rows.append(r)
  print()
  print(bc.machine_line(machine))
  for name in sorted({r["spec"]["config"] for r in rows}):
    print(f"UNet {bc.describe_case(name)}")
  print(f"DDIM {args.steps} steps, three-way CFG g={args.guidance} (UNet on 3B per step); "
        f"median of {args.repeats} loops after 1 warm-up loop, interleaved; torch threads "
        f"{rows[0]['torch_threads'] if rows else '?'}")
  print()
  print(table(rows))
  bc.write_json(args.json, {
      "command": f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "run_one"},
      "unet_cases": {k: bc.describe_case(k) for k in bc.UNET_CASES}, "results": rows,
      "total_s": time.perf_counter() - t_start})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
