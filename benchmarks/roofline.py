"""How close the stage-2 train step gets to this machine's dense float32 matmul rate.

  python -m benchmarks.roofline [--quick] [--json OUT.json] [--config medium] [--batch 8]

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
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  ta, tb = (torch.from_numpy(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  runs = {"jax": _jax_matmul(n), "torch": lambda: torch.matmul(ta, tb)}
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


def run(args) -> dict:
  from benchmarks import train_step
  mm = matmul_rates(args.matmul_size, args.matmul_repeats)
  spec = dict(kind="unet", config=args.config, batch=args.batch, check=False)
  with tempfile.TemporaryDirectory(prefix="bench_roofline_") as tmp:
    runners, info, b = train_step.unet_case(spec, Path(tmp), want=("jax",))
  step = runners["jax"]
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(args.warmup - 1):
    step()
  dot = _jax_matmul(args.matmul_size)
  times, between = [], []
  for _ in range(args.repeats):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    dot_times, _ = bc.interleaved({"dot": dot}, 3)
    between.append(2.0 * args.matmul_size ** 3 / statistics.median(dot_times["dot"]))
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
          "loadavg_at_end": os.getloadavg()}


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


def table(r: dict, args) -> str:
  mm, mm2 = r["matmul"], r["matmul_after"] or r["matmul"]
  g = lambda x: f"{x / 1e9:.1f}"
  rows = ["| quantity | value |", "|---|---:|",
          f"| jnp.dot {args.matmul_size}³ f32, GFLOP/s (median; re-measured after the step) | "
          f"{g(mm['jax']['flops_per_s'])} ({g(mm2['jax']['flops_per_s'])}) |",
          f"| torch.matmul {args.matmul_size}³ f32, GFLOP/s (median; after) | "
          f"{g(mm['torch']['flops_per_s'])} ({g(mm2['torch']['flops_per_s'])}) |",
          f"| step: {args.config} UNet, batch {args.batch}, XLA GFLOP per step | "
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
  return "\n".join(rows)


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: tiny UNet batch 1, 1024³ matmul, 2 timed steps")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--config", help=f"UNet config, one of {sorted(bc.UNET_CASES)} "
                 "(default medium; quick tiny)")
  p.add_argument("--batch", type=int, help="batch size (default 8; quick 1)")
  p.add_argument("--matmul-size", type=int, help="N of the N³ matmul (default 2048; quick 1024)")
  p.add_argument("--matmul-repeats", type=int, default=9, help="timed matmuls (default 9)")
  p.add_argument("--repeats", type=int, help="timed steps (default 5; quick 2)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
  p.add_argument("--from-train-step", metavar="TRAIN_STEP.json",
                 help="take the step's FLOPs and JAX median time from a benchmarks.train_step "
                      "--json result (case unet-<config>-b<batch>) instead of compiling and "
                      "running it again; only the matmul is measured")
  return p


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
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
  print(f"UNet {bc.describe_case(args.config)}; batch {args.batch}")
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
