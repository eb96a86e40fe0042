"""How close the stage-2 train step gets to this machine's dense float32 matmul rate.

  python -m benchmarks.roofline [--quick] [--json OUT.json] [--config medium] [--batch 8]
      [--torch]

1. Roofline: median time of an N x N x N float32 ``jnp.dot`` (jitted, N = --matmul-size,
   default 2048) -> FLOP/s = 2 N^3 / t. torch.matmul of the same size is measured in the
   same process, interleaved, for reference.
2. The step: ``benchmarks.train_step``'s JAX UNet step (``make_train_step``, AdamW,
   donation) at --config / --batch; FLOPs per step from
   ``jitted.lower(...).compile().cost_analysis()["flops"]`` (XLA's count: convolutions,
   dots and elementwise ops of forward, backward and the update).
3. Achieved FLOP/s = flops / median step time, and its fraction of the matmul rate.
4. Paired (without --from-train-step): after every timed step, three more jnp.dot
   calls give the matmul rate of that minute, and each step's achieved FLOP/s is
   divided by it; the median of those per-step fractions is reported too. This
   machine's speed drifts by up to 1.5x within minutes (both the step and the
   matmul slow down together), which moves a fraction of two medians taken
   minutes apart by as much.
5. With --torch, the PyTorch reference step of ``benchmarks.train_step`` too, timed
   after the JAX steps the same way (each step followed by three torch.matmul calls),
   and given the same FLOP count: torch runs the convolutions XLA counts directly, so
   for torch the count is its real work; fpdm_jax's Winograd calls are counted as the
   direct convolutions they replace, so ours can pass 100 %. From the two it gives the
   most JAX / torch ratio a step at exactly the jnp.dot rate would reach, the
   ceiling that kernels alone cannot pass: past it only fewer multiplies help.
   ``--config clip`` takes the stage-1 CLIP step instead of a UNet one (--batch is
   its batch of image triples).

Warm-up and compilation are excluded from timing (compile time reported).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as bc

MODULE = "benchmarks.roofline"


def matmul_rates(n: int, repeats: int) -> dict:
  runs = {"jax": _jax_matmul(n), "torch": _torch_matmul(n)}
  times, _ = bc.interleaved(runs, repeats, warmup=2)
  flops = 2.0 * n ** 3
  return {k: dict(bc.summarize(v), flops_per_s=flops / statistics.median(v))
          for k, v in times.items()}


def from_train_step(args) -> dict:
  """FLOPs and the JAX median step time from a ``benchmarks.train_step --json`` file
  (same step, same compile; saves compiling and running it again); matmul measured now."""
  data = json.loads(Path(args.from_train_step).read_text())
  name = f"unet-{args.config}-b{args.batch}"
  rows = [r for r in data["results"] if r["spec"]["name"] == name]
  if not rows:
    raise SystemExit(f"{args.from_train_step} has no {name} result")
  r = rows[0]
  mm = matmul_rates(args.matmul_size, args.matmul_repeats)
  st = r["timing"]["jax"]
  achieved = r["info"]["flops"] / st["median_s"]
  return {"matmul": mm, "matmul_after": None, "step": st, "first_step_s": r["first_step_s"]["jax"],
          "info": r["info"], "achieved_flops_per_s": achieved,
          "fraction_of_matmul": achieved / mm["jax"]["flops_per_s"],
          "step_source": f"{args.from_train_step} ({data.get('command')})",
          "loadavg_at_end": os.getloadavg()}


def _paired_steps(step, dot, n: int, repeats: int, warmup: int):
  """(first step's s, step times, the matmul's FLOP/s right after each step)."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    step()
  times, between = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    dot_times, _ = bc.interleaved({"dot": dot}, 3)
    between.append(2.0 * n ** 3 / statistics.median(dot_times["dot"]))
  return first, times, between


def run(args) -> dict:
  from benchmarks import train_step
  mm = matmul_rates(args.matmul_size, args.matmul_repeats)
  want = ("jax", "torch") if args.torch else ("jax",)
  with tempfile.TemporaryDirectory(prefix="bench_roofline_") as tmp:
    if args.config == "clip":
      spec = dict(kind="clip", batch=args.batch,
                  clip=train_step.CLIP_QUICK if args.quick else train_step.CLIP_CASE)
      runners, info, _ = train_step.clip_case(spec, Path(tmp), want=want)
    else:
      spec = dict(kind="unet", config=args.config, batch=args.batch, check=False)
      runners, info, _ = train_step.unet_case(spec, Path(tmp), want=want)
  dot = _jax_matmul(args.matmul_size)
  first, times, between = _paired_steps(runners["jax"], dot, args.matmul_size, args.repeats,
                                        args.warmup)
  torch_side = None
  if args.torch:
    torch_dot = _torch_matmul(args.matmul_size)
    t_first, t_times, t_between = _paired_steps(runners["torch"], torch_dot, args.matmul_size,
                                                args.repeats, args.warmup)
    t_st = bc.summarize(t_times)
    t_paired = [info["flops"] / t / rate for t, rate in zip(t_times, t_between)]
    torch_side = {"step": t_st, "first_step_s": t_first,
                  "achieved_flops_per_s": info["flops"] / t_st["median_s"],
                  "matmul_between_steps_flops_per_s": t_between,
                  "paired_fractions": t_paired,
                  "paired_fraction_median": statistics.median(t_paired)}
  mm_after = matmul_rates(args.matmul_size, max(3, args.matmul_repeats // 2))
  st = bc.summarize(times)
  achieved = info["flops"] / st["median_s"] if info.get("flops") else None
  peak = mm["jax"]["flops_per_s"]
  paired = ([info["flops"] / t / rate for t, rate in zip(times, between)]
            if info.get("flops") else None)
  return {"matmul": mm, "matmul_after": mm_after, "step": st, "first_step_s": first,
          "info": info, "achieved_flops_per_s": achieved,
          "fraction_of_matmul": achieved / peak if achieved else None,
          "matmul_between_steps_flops_per_s": between,
          "paired_fractions": paired,
          "paired_fraction_median": statistics.median(paired) if paired else None,
          "torch": torch_side,
          **(_ceiling(st, torch_side, info["flops"], between) if torch_side else {}),
          "loadavg_at_end": os.getloadavg()}


def _ceiling(jax_step: dict, torch_side: dict, flops: float, jax_rates: list) -> dict:
  """JAX / torch now, and at a JAX step of the median jnp.dot rate between its steps."""
  at_roofline_s = flops / statistics.median(jax_rates)
  return {"jax_over_torch": torch_side["step"]["median_s"] / jax_step["median_s"],
          "jax_over_torch_at_roofline": torch_side["step"]["median_s"] / at_roofline_s}


def _jax_matmul(n: int):
  """A compiled N x N x N float32 jnp.dot, as a no-argument call that blocks."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  f = jax.jit(jnp.dot).lower(a, b).compile()
  bc.block(f(a, b))
  return lambda: bc.block(f(a, b))


def _torch_matmul(n: int):
  """torch.matmul of the same size, as a no-argument call."""
  import numpy as np
  import torch
  rng = np.random.default_rng(1)
  a, b = (torch.from_numpy(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  return lambda: torch.matmul(a, b)


def table(r: dict, args) -> str:
  mm, mm2 = r["matmul"], r["matmul_after"] or r["matmul"]
  g = lambda x: f"{x / 1e9:.1f}"
  rows = ["| quantity | value |", "|---|---:|",
          f"| jnp.dot {args.matmul_size}³ f32, GFLOP/s (median; re-measured after the step) | "
          f"{g(mm['jax']['flops_per_s'])} ({g(mm2['jax']['flops_per_s'])}) |",
          f"| torch.matmul {args.matmul_size}³ f32, GFLOP/s (median; after) | "
          f"{g(mm['torch']['flops_per_s'])} ({g(mm2['torch']['flops_per_s'])}) |",
          f"| step: {_step_name(args)}, batch {args.batch}, XLA GFLOP per step | "
          f"{r['info']['flops'] / 1e9:.1f} |",
          f"| step time, s (median of {len(r['step']['times_s'])}; min–max) | "
          f"{r['step']['median_s']:.3f} "
          f"({r['step']['min_s']:.3f}–{r['step']['max_s']:.3f}) |",
          f"| achieved GFLOP/s | {g(r['achieved_flops_per_s'])} |",
          f"| fraction of the jnp.dot rate | {100 * r['fraction_of_matmul']:.1f} % |",
          *([f"| paired: median over steps of (step's FLOP/s / jnp.dot rate right after it) | "
             f"{100 * r['paired_fraction_median']:.1f} % "
             f"({100 * min(r['paired_fractions']):.1f}–{100 * max(r['paired_fractions']):.1f}) |"]
            if r.get("paired_fractions") else []),
          f"| compile s | {r['info']['compile_s']:.1f} |"]
  t = r.get("torch")
  if t:
    rows += [f"| torch step time, s (median of {len(t['step']['times_s'])}; min–max) | "
             f"{t['step']['median_s']:.3f} ({t['step']['min_s']:.3f}–{t['step']['max_s']:.3f}) |",
             f"| torch achieved GFLOP/s (the same FLOP count) | {g(t['achieved_flops_per_s'])} |",
             f"| torch paired: median over steps of (step's FLOP/s / torch.matmul rate right "
             f"after it) | {100 * t['paired_fraction_median']:.1f} % "
             f"({100 * min(t['paired_fractions']):.1f}–{100 * max(t['paired_fractions']):.1f}) |",
             f"| JAX / torch (median steps) | {r['jax_over_torch']:.2f}× |",
             f"| JAX / torch with the JAX step at the jnp.dot rate (the kernels' ceiling) | "
             f"{r['jax_over_torch_at_roofline']:.2f}× |"]
  return "\n".join(rows)


def _step_name(args) -> str:
  return "stage-1 CLIP" if args.config == "clip" else f"{args.config} UNet"


def _clip_description(args) -> str:
  from benchmarks import train_step
  case = train_step.CLIP_QUICK if args.quick else train_step.CLIP_CASE
  return ", ".join(f"{k} {v}" for k, v in case.items())


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: tiny UNet batch 1, 1024³ matmul, 2 timed steps")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--config", help=f"UNet config, one of {sorted(bc.UNET_CASES)}, or clip "
                 "for the stage-1 CLIP step (default medium; quick tiny)")
  p.add_argument("--batch", type=int, help="batch size (default 8; quick 1)")
  p.add_argument("--matmul-size", type=int, help="N of the N³ matmul (default 2048; quick 1024)")
  p.add_argument("--matmul-repeats", type=int, default=9, help="timed matmuls (default 9)")
  p.add_argument("--repeats", type=int, help="timed steps (default 5; quick 2)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
  p.add_argument("--from-train-step", metavar="TRAIN_STEP.json",
                 help="take the step's FLOPs and JAX median time from a benchmarks.train_step "
                      "--json result (case unet-<config>-b<batch>) instead of compiling and "
                      "running it again; only the matmul is measured")
  p.add_argument("--torch", action="store_true",
                 help="also time the PyTorch reference step (paired with torch.matmul) and "
                      "report the JAX / torch ceiling at the matmul rate")
  return p


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.config not in (None, "clip", *bc.UNET_CASES):
    parser.error(f"--config {args.config!r}: not one of {sorted(bc.UNET_CASES)} or clip")
  if args.from_train_step and (args.torch or args.config == "clip"):
    parser.error("--from-train-step reads a UNet JAX step only: no --torch, no --config clip")
  quick = dict(config="tiny", batch=1, matmul_size=1024, repeats=2)
  full = dict(config="medium", batch=8, matmul_size=2048, repeats=5)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  machine = bc.machine_info()
  t0 = time.perf_counter()
  r = from_train_step(args) if args.from_train_step else run(args)
  print()
  print(bc.machine_line(machine))
  print(f"CLIP {_clip_description(args)}; batch {args.batch}" if args.config == "clip"
        else f"UNet {bc.describe_case(args.config)}; batch {args.batch}")
  if r.get("step_source"):
    print(f"Step FLOPs and time from {r['step_source']}")
  print()
  print(table(r, args))
  bc.write_json(args.json, {
      "command": f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": machine, "settings": vars(args), "result": r,
      "total_s": time.perf_counter() - t0})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
