"""The UNet's forward + backward, block by block: each resnet, transformer,
down/upsampler, the pose embedding and the UNet's ends on its own, ours (jitted
NNX module) against diffusers' module with the same weights, at the shapes the
whole model feeds them; then the whole UNet the same way.

  python -m benchmarks.unet_blocks [--config small|medium] [--batch 8] [--json OUT.json]

Why this exists: the UNet train-step rows of ``benchmarks.train_step`` are
where JAX is furthest from the 1.5x target (benchmarks/README.md, "Against the
targets"), and a whole-step profile cannot be compared with torch's (the
torch profiler's overhead is larger than the step). Timing each block the same
way on both sides shows which kind of block the gap is in.

Method. One process holds both models, built by ``benchmarks.common.
build_unet_pair`` (ours exported and read back by diffusers, so the weights are
the same). A forward pass of the torch model with forward pre-hooks records
every block's inputs; ours gets the same arrays in NHWC. For each block, one
call = forward and backward with a fixed random cotangent: gradients of the
block's parameters and of the inputs that need one in training (activations,
the time embedding; not the latents, the pose image or the cross-attention
context, which come from data and frozen encoders). Ours: ``jax.vjp`` of the
merged module, jitted, the gradients blocked on. Torch: ``zero_grad(set_to_
none=True)`` then ``backward`` (as a training loop does). Both in float32,
torch NCHW. --warmup untimed calls, then --repeats calls of each side in strict
alternation (``benchmarks.common.interleaved``); medians. No optimiser update:
``benchmarks.train_step`` has that.

Each block's JAX forward output is checked against torch's (relative to the
largest entry) so the table cannot compare different computations.

The "sum of blocks" row adds the medians; the whole UNet differs from it by
what lies between blocks (skip concatenations, the time embedding) and, for
JAX, by XLA fusing and scheduling across blocks.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as bc

MODULE = "benchmarks.unet_blocks"
KINDS = ("pose embedding", "ends", "resnet", "transformer", "resample", "whole UNet")


def _block_names(unet) -> list[tuple[str, str]]:
  """(torch attribute path, kind) of every block, in forward order."""

  def level(prefix, blk, samplers):
    for j in range(len(blk.resnets)):
      yield f"{prefix}.resnets.{j}", "resnet"
      if getattr(blk, "attentions", None) is not None:
        yield f"{prefix}.attentions.{j}", "transformer"
    if getattr(blk, samplers) is not None:
      yield f"{prefix}.{samplers}.0", "resample"

  out = [("pose_embedding", "pose embedding"), ("conv_in", "ends")]
  for i, blk in enumerate(unet.down_blocks):
    out += level(f"down_blocks.{i}", blk, "downsamplers")
  out += [("mid_block.resnets.0", "resnet"), ("mid_block.attentions.0", "transformer"),
          ("mid_block.resnets.1", "resnet")]
  for i, blk in enumerate(unet.up_blocks):
    out += level(f"up_blocks.{i}", blk, "upsamplers")
  out.append(("conv_norm_out", "ends"))  # conv_norm_out -> SiLU -> conv_out
  return out


def _ours_path(torch_path: str) -> str:
  """Our attribute path for a diffusers one (the renames of importers/unet.py)."""
  return (torch_path.replace("downsamplers.0", "downsampler")
          .replace("upsamplers.0", "upsampler"))


def _get(root, path: str):
  for part in path.split("."):
    root = root[int(part)] if part.isdigit() else getattr(root, part)
  return root


def _modules(ours, unet, path: str):
  """(our module, torch module) of a block. The UNet's end is conv_norm_out and
  conv_out, held in a module of their own: differentiating the whole UNet for
  them would also make (ours) or skip (torch) gradients of every other layer."""
  if path != "conv_norm_out":
    return _get(ours, _ours_path(path)), _get(unet, path)
  import torch
  from flax import nnx

  class Ends(nnx.Module):
    def __init__(self, conv_norm_out, conv_out):
      self.conv_norm_out, self.conv_out = conv_norm_out, conv_out

  return (Ends(ours.conv_norm_out, ours.conv_out),
          torch.nn.ModuleDict({"conv_norm_out": unet.conv_norm_out, "conv_out": unet.conv_out}))


def _calls(path: str, kind: str):
  """(ours(module, *inputs), torch(module, *inputs), names of the inputs).

  Inputs are taken from the recorded forward pass by name; "x" is the block's
  activation input (NCHW on the torch side)."""
  import jax
  import torch.nn.functional as F
  if kind == "transformer":
    return (lambda m, x, ctx: m(x, ctx),
            lambda m, x, ctx: m(x, encoder_hidden_states=ctx, return_dict=False)[0],
            ("x", "ctx"))
  if kind == "resnet":
    return lambda m, x, temb: m(x, temb), lambda m, x, temb: m(x, temb), ("x", "temb")
  if path.endswith("upsamplers.0"):
    return (lambda m, x, size: m(x, size), lambda m, x, size: m(x, output_size=size),
            ("x", "size"))
  if path == "conv_norm_out":
    return (lambda m, x: m.conv_out(jax.nn.silu(m.conv_norm_out(x))),
            lambda m, x: m.conv_out(F.silu(m.conv_norm_out(x))), ("x",))
  if path == "conv_in":  # F.conv2d: the module's forward hook would add the pose features
    return lambda m, x: m(x), lambda m, x: F.conv2d(x, m.weight, m.bias, padding=1), ("x",)
  return lambda m, x: m(x), lambda m, x: m(x), ("x",)


def _record_inputs(unet, forward, names, args) -> dict:
  """Runs the torch model once; per block path, its inputs by name (torch tensors
  or, for ``size``, a tuple)."""
  import torch
  seen, handles = {}, []
  for path, kind in names:
    mod = _get(unet, path)

    def hook(m, a, kw, path=path, kind=kind):
      rec = {"x": a[0].detach().clone()}
      if kind == "resnet":
        rec["temb"] = (a[1] if len(a) > 1 else kw["temb"]).detach().clone()
      elif kind == "transformer":
        rec["ctx"] = kw["encoder_hidden_states"].detach().clone()
      elif path.endswith("upsamplers.0"):
        size = a[1] if len(a) > 1 else kw.get("output_size")
        rec["size"] = None if size is None else tuple(int(s) for s in size)
      seen.setdefault(path, rec)

    handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
  with torch.no_grad():
    forward(*args["torch"], pose_image=args["torch_pose"], fusion=args["torch_fusion"])
  for h in handles:
    h.remove()
  return seen


# Inputs that get a gradient in training (the rest come from data or frozen encoders).
NEEDS_GRAD = {"x": True, "temb": True, "ctx": False, "size": False, "pose": True,
              "fusion": True, "latents": False, "t": False, "pose_image": False}


def _to_jax(name, value):
  import jax.numpy as jnp
  if value is None or name == "size":
    return value
  a = value.numpy()
  return jnp.asarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)


def _jax_runner(module, call, names, inputs, ct):
  """A no-argument callable: jitted forward + vjp of ``call(module, *inputs)``
  w.r.t. the module's parameters and the inputs in NEEDS_GRAD."""
  import jax
  from flax import nnx
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  diff = [NEEDS_GRAD[n] and inputs[n] is not None for n in names]
  static = {n: inputs[n] for n in names if n == "size"}
  dyn = [inputs[n] for n, d in zip(names, diff) if d]
  const = [inputs[n] for n, d in zip(names, diff) if not d and n not in static]

  def assemble(d_args, c_args):
    d_it, c_it = iter(d_args), iter(c_args)
    return [static[n] if n in static else next(d_it) if d else next(c_it)
            for n, d in zip(names, diff)]

  def fwd(params, d_args, c_args):
    return call(nnx.merge(graphdef, params, rest), *assemble(d_args, c_args))

  @jax.jit
  def step(params, d_args, c_args, ct):
    _, vjp = jax.vjp(lambda p, d: fwd(p, d, c_args), params, d_args)
    return vjp(ct)

  forward = jax.jit(fwd)
  run = lambda: jax.block_until_ready(step(params, dyn, const, ct))
  return run, lambda: forward(params, dyn, const)


def _torch_runner(module, call, names, inputs, ct):
  import torch
  leaves = {}
  for n in names:
    v = inputs[n]
    if isinstance(v, torch.Tensor):
      v = v.detach().clone().requires_grad_(NEEDS_GRAD[n])
    leaves[n] = v

  def run():
    module.zero_grad(set_to_none=True)
    for v in leaves.values():
      if isinstance(v, torch.Tensor):
        v.grad = None
    call(module, *(leaves[n] for n in names)).backward(ct)

  return run


def _rel_diff(ours, ref) -> float:
  import numpy as np
  r = ref.numpy()
  if r.ndim == 4:
    r = r.transpose(0, 2, 3, 1)
  return float(np.abs(np.asarray(ours) - r).max() / max(np.abs(r).max(), 1e-30))


def _shape(v) -> str:
  import torch
  if not isinstance(v, torch.Tensor):
    return ""
  s = list(v.shape)
  if len(s) == 4:  # report NHWC, our layout
    s = [s[0], s[2], s[3], s[1]]
  return "×".join(map(str, s))


def run(spec: dict) -> dict:
  import jax
  import numpy as np
  import torch
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(0)
  case = bc.UNET_CASES[spec["config"]]
  b, (h, w), tokens = spec["batch"], case["latent"], case["tokens"]
  with tempfile.TemporaryDirectory(prefix="bench_unet_blocks_") as tmp:
    ours, unet, forward = bc.build_unet_pair(spec["config"], Path(tmp))
  unet.eval()  # dropout off on both sides (ours runs deterministic), so outputs compare
  cfg = ours.config
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
  pose_image = rng.random((b, cfg.pose_conditioning_channels, 8 * h, 8 * w)).astype(np.float32)
  ctx = rng.standard_normal((b, tokens, cfg.cross_attention_dim)).astype(np.float32)
  fusion = rng.standard_normal((b, cfg.class_embed_input_dim)).astype(np.float32)
  t = torch.from_numpy(rng.integers(0, 1000, (b,)))
  args = {"torch": (torch.from_numpy(latents), t, torch.from_numpy(ctx)),
          "torch_pose": torch.from_numpy(pose_image), "torch_fusion": torch.from_numpy(fusion)}
  names = _block_names(unet)
  if spec.get("only"):
    names = [(p, k) for p, k in names if re.search(spec["only"], p)]
    if not names:
      raise SystemExit(f"--only {spec['only']!r} matches no block; the paths are diffusers', "
                       "e.g. 'up_blocks.2' or 'resnets'")
  recorded = _record_inputs(unet, forward, names, args)
  # The whole UNet from conv_in to conv_out, with the pose features and the
  # fusion embedding as inputs (the pose embedding is its own row).
  with torch.no_grad():
    pose_features = unet.pose_embedding(args["torch_pose"])
  whole = {"latents": args["torch"][0], "t": t, "ctx": args["torch"][2], "pose": pose_features,
           "fusion": args["torch_fusion"]}
  whole_names = ("latents", "t", "ctx", "pose", "fusion")

  def ours_whole(m, x, t, ctx, pose, fusion):
    return m(x, t, ctx, pose_features=pose, class_embedding=m.class_embedding(fusion))

  def torch_whole(m, x, t, ctx, pose, fusion):
    return forward(x, t, ctx, pose_features=pose, fusion=fusion)

  jobs = [(p, k, *_modules(ours, unet, p), *_calls(p, k), recorded[p]) for p, k in names]
  if not spec.get("only"):
    jobs.append(("UNet (conv_in .. conv_out)", "whole UNet", ours, unet, ours_whole, torch_whole,
                 whole_names, whole))
  rows = []
  for path, kind, our_mod, torch_mod, our_call, torch_call, in_names, inputs in jobs:
    t0 = time.perf_counter()
    with torch.no_grad():
      ref = torch_call(torch_mod, *(inputs[n] for n in in_names))
    ct_np = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    torch_ct = torch.from_numpy(ct_np)
    jax_in = {n: _to_jax(n, v) for n, v in inputs.items()}
    jax_ct = jax.numpy.asarray(ct_np.transpose(0, 2, 3, 1) if ct_np.ndim == 4 else ct_np)
    jrun, jfwd = _jax_runner(our_mod, our_call, in_names, jax_in, jax_ct)
    trun = _torch_runner(torch_mod, torch_call, in_names, inputs, torch_ct)
    diff = _rel_diff(jfwd(), ref)
    jrun()  # compile
    compile_s = time.perf_counter() - t0
    times, _ = bc.interleaved({"jax": jrun, "torch": trun}, spec["repeats"],
                              warmup=spec["warmup"])
    row = {"block": path, "kind": kind, "input": _shape(inputs["x" if "x" in inputs else "pose"]),
           "jax": bc.summarize(times["jax"]), "torch": bc.summarize(times["torch"]),
           "max_rel_diff": diff, "compile_s": compile_s}
    rows.append(row)
    print(f"[{len(rows)}/{len(jobs)}] {path}: JAX {row['jax']['median_s'] * 1e3:.2f} ms, "
          f"torch {row['torch']['median_s'] * 1e3:.2f} ms", file=sys.stderr, flush=True)
  return {"spec": spec, "torch_threads": torch.get_num_threads(), "rows": rows}


def table(result: dict) -> str:
  ms = lambda r, side: r[side]["median_s"] * 1e3
  out = ["| block | input (NHWC) | JAX ms | torch ms | torch / JAX | max rel. diff |",
         "|---|---|---:|---:|---:|---:|"]
  for r in result["rows"]:
    if r["kind"] == "whole UNet":
      continue
    out.append(f"| {r['block']} | {r['input']} | {ms(r, 'jax'):.2f} | {ms(r, 'torch'):.2f} | "
               f"{ms(r, 'torch') / ms(r, 'jax'):.2f}× | {r['max_rel_diff']:.0e} |")
  out += ["", "| kind | blocks | JAX ms | torch ms | torch / JAX |", "|---|---:|---:|---:|---:|"]
  parts = [r for r in result["rows"] if r["kind"] != "whole UNet"]
  for kind in KINDS:
    sel = [r for r in result["rows"] if r["kind"] == kind]
    if not sel:
      continue
    j, t = sum(ms(r, "jax") for r in sel), sum(ms(r, "torch") for r in sel)
    out.append(f"| {kind} | {len(sel)} | {j:.1f} | {t:.1f} | {t / j:.2f}× |")
  j, t = sum(ms(r, "jax") for r in parts), sum(ms(r, "torch") for r in parts)
  out.append(f"| sum of the blocks above | {len(parts)} | {j:.1f} | {t:.1f} | {t / j:.2f}× |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="small", choices=sorted(bc.UNET_CASES),
                 help="UNet configuration of benchmarks/common.py (default small)")
  p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
  p.add_argument("--repeats", type=int, default=15, help="timed calls per side (default 15)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls per side (default 3)")
  p.add_argument("--only", metavar="REGEX",
                 help="only the blocks whose diffusers path matches (no whole-UNet row)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads; 0 keeps torch's default (= cores)")
  p.add_argument("--quick", action="store_true", help="tiny config, batch 2, 3 repeats")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  args = p.parse_args(argv)
  if args.quick:
    args.config, args.batch, args.repeats, args.warmup = "tiny", 2, 3, 1
  if args.repeats < 1 or args.batch < 1:
    p.error("--repeats and --batch must be >= 1")
  machine = bc.machine_info()
  spec = dict(config=args.config, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
              torch_threads=args.torch_threads, only=args.only)
  result = run(spec)
  print(bc.machine_line(machine))
  print(f"{bc.describe_case(args.config)}; batch {args.batch}; forward + backward, no optimiser; "
        f"torch threads {result['torch_threads']}; median of {args.repeats}, strict alternation")
  print()
  print(table(result))
  whole = [r for r in result["rows"] if r["kind"] == "whole UNet"]
  if whole:
    r = whole[0]
    j, t = r["jax"]["median_s"] * 1e3, r["torch"]["median_s"] * 1e3
    print(f"\nwhole UNet (conv_in .. conv_out, pose features and fusion embedding as inputs): "
          f"JAX {j:.1f} ms, torch {t:.1f} ms, {t / j:.2f}×")
  print(f"max |JAX - torch| / max |torch| over the forward outputs: "
        f"{max(r['max_rel_diff'] for r in result['rows']):.1e}")
  bc.write_json(args.json, {"command": "python -m " + MODULE + " " + " ".join(argv or sys.argv[1:]),
                            "machine": machine, "result": result})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
