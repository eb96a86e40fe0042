"""JAX UNet train steps after a pause and back to back, block pool on and off.

What it shows (benchmarks/README.md, findings 17 and 18): XLA:CPU allocates
each step's temporaries as a few blocks of tens to hundreds of MiB and frees
them after the step. With glibc alone those blocks are mapped and unmapped
every step, so every step faults them in again, and on a VM that hands freed
memory back to its host the first step after a pause faults them in from the
host, several times slower. fpdm_jax's block pool (fpdm_jax/host_memory.py)
keeps them mapped. This script runs the same JAX-only train step in two fresh
processes, one with the pool (the default) and one with
``FPDM_CPU_BLOCK_POOL=0`` (glibc tunables only), and in each alternates a
pause of ``--pause`` seconds (the stand-in for a torch step, an eval or a
checkpoint) with steps that follow a step directly. Per step it records wall
time, minor page faults and system CPU time (``getrusage``).

  python -m benchmarks.step_pauses --config small --batch 8 --json /tmp/bench/pauses.json

Prints a Markdown table; ``--json`` writes every step. JAX only: torch is not
in these processes, so nothing else competes for the allocator.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as bc

MODULE = "benchmarks.step_pauses"
SETTINGS = {"pool": {}, "no pool": {"FPDM_CPU_BLOCK_POOL": "0"}}


def run_one(spec: dict) -> dict:
  import os

  from benchmarks import train_step

  with tempfile.TemporaryDirectory() as tmp:
    runners, info, _ = train_step.unet_case(dict(config=spec["config"], batch=spec["batch"]),
                                            Path(tmp), want=("jax",))
  step = runners["jax"]
  for _ in range(spec["warmup"]):
    step()
  steps = []
  for i in range(2 * spec["steps"]):
    after_pause = i % 2 == 0
    if after_pause:
      time.sleep(spec["pause"])
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step()
    t1, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    steps.append({"after_pause": after_pause, "s": t1 - t0,
                  "minflt": after.ru_minflt - before.ru_minflt,
                  "sys_s": after.ru_stime - before.ru_stime,
                  "user_s": after.ru_utime - before.ru_utime})
  return {"steps": steps, "preload": os.environ.get("LD_PRELOAD", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "temp_bytes": info.get("memory", {}).get("temp_size_in_bytes")}


def summary(steps: list[dict], after_pause: bool) -> dict:
  picked = [s for s in steps if s["after_pause"] is after_pause]
  return {k: statistics.median(s[k] for s in picked) for k in ("s", "minflt", "sys_s")} | {
      "min_s": min(s["s"] for s in picked), "max_s": max(s["s"] for s in picked)}


def table(results: dict) -> str:
  lines = ["| setting | steps | median ms | range ms | faults / step | system ms / step |",
           "|---|---|---:|---:|---:|---:|"]
  for name, r in results.items():
    for after_pause, label in ((True, "after a pause"), (False, "after a step")):
      s = summary(r["steps"], after_pause)
      lines.append(f"| {name} | {label} | {s['s'] * 1e3:.0f} | {s['min_s'] * 1e3:.0f}–"
                   f"{s['max_s'] * 1e3:.0f} | {s['minflt']:.0f} | {s['sys_s'] * 1e3:.0f} |")
  return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="small", choices=sorted(bc.UNET_CASES),
                 help="UNet configuration (benchmarks/common.py; default %(default)s)")
  p.add_argument("--batch", type=int, default=8, help="batch size (default %(default)s)")
  p.add_argument("--steps", type=int, default=6,
                 help="timed steps of each kind, after a pause and after a step "
                      "(default %(default)s)")
  p.add_argument("--pause", type=float, default=3.0,
                 help="seconds of sleep before each after-a-pause step (default %(default)s)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
  p.add_argument("--json", metavar="OUT.json", help="also write every step and the machine here")
  p.add_argument("--run-one", help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  if args.run_one:
    print(json.dumps(run_one(json.loads(args.run_one))), flush=True)
    return 0
  if args.steps < 1 or args.warmup < 1 or args.pause < 0:
    raise SystemExit("error: --steps and --warmup must be >= 1 and --pause >= 0")
  machine = bc.machine_info()
  spec = {k: getattr(args, k) for k in ("config", "batch", "steps", "pause", "warmup")}
  results = {}
  for name, env in SETTINGS.items():
    print(f"[run] {name}", file=sys.stderr, flush=True)
    results[name] = bc.run_module(MODULE, spec, env=env)
  if not results["pool"]["preload"]:
    print("note: the block pool was not preloaded (not built, or not a CPU-only glibc host); "
          "both rows ran without it", file=sys.stderr)
  print()
  print(bc.machine_line(machine))
  print(f"UNet {bc.describe_case(args.config)}; batch {args.batch}; JAX only; "
        f"{args.steps} steps after a {args.pause:g} s pause alternating with {args.steps} "
        f"after a step, {args.warmup} warm-up")
  print()
  print(table(results))
  bc.write_json(args.json, {
      "command": f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": machine, "settings": spec, "results": results})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
