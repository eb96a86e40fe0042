"""What one of fpdm_jax's switches is worth in a whole UNet train step: the
same step compiled with and without it, timed in one process against torch.

  python -m benchmarks.switch_ab --switch FPDM_CONV_NATIVE_KERNEL_GRADIENT \\
      [--cases unet-small-b8,...] [--repeats 24] [--block 3] [--json OUT.json]

Why: this VM's speed drifts by up to 1.5x within minutes, so two runs of
``benchmarks.train_step`` (one with ``SWITCH=0`` in the environment) cannot
tell a 5 % change from noise. Here both steps are traced and compiled in
one process, the switch set to 0 only while the second is traced (fpdm_jax
reads these switches at trace time), and the two JAX steps and torch's are
timed in interleaved blocks (``benchmarks.common.interleaved``). The
speed-up column is off / on: what the rule the switch controls buys.

Cases are ``benchmarks.train_step``'s UNet and CLIP cases (unet-<config>-b<batch>,
clip-b<batch>) and ``benchmarks.sampling``'s loops (sample-<config>-b<batch>:
one call = a whole loop of its default steps and guidance).
Switches: ``FPDM_CONV_NATIVE_KERNEL_GRADIENT`` and ``FPDM_CONV_NATIVE_FORWARD``
(models.native_conv), ``FPDM_NATIVE_ATTENTION`` (models.native_attention),
``FPDM_CONV_WINOGRAD`` (models.winograd), ``FPDM_CONV_NATIVE_WINOGRAD`` and
``FPDM_CONV_NATIVE_WINOGRAD_KERNEL_GRADIENT`` (models.native_conv),
``FPDM_CONV_NATIVE_WINOGRAD_4X4`` (models.convolution),
``FPDM_CONV_CPU_GRADIENTS``
(models.convolution's and models.dense's rules), ``FPDM_NATIVE_ADAMW``
(trainers.adamw), ``FPDM_NATIVE_LAYER_NORM`` (models.native_layer_norm).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import common as bc

MODULE = "benchmarks.switch_ab"
SWITCHES = ("FPDM_CONV_NATIVE_KERNEL_GRADIENT", "FPDM_CONV_NATIVE_FORWARD", "FPDM_NATIVE_ATTENTION",
            "FPDM_CONV_WINOGRAD", "FPDM_CONV_NATIVE_WINOGRAD",
            "FPDM_CONV_NATIVE_WINOGRAD_KERNEL_GRADIENT", "FPDM_CONV_NATIVE_WINOGRAD_4X4",
            "FPDM_CONV_CPU_GRADIENTS",
            "FPDM_NATIVE_ADAMW", "FPDM_NATIVE_LAYER_NORM")


def _builder(case: str):
  """build(want, workdir) -> {"jax": call, "torch": call} for a case name."""
  from benchmarks import sampling, train_step
  parts = case.split("-")
  if len(parts) == 2 and parts[0] == "clip" and parts[1][1:].isdigit():
    spec = {"batch": int(parts[1][1:]), "clip": train_step.CLIP_CASE}
    return lambda want, d: train_step.clip_case(spec, d, want=want)[0]
  if len(parts) != 3 or parts[0] not in ("unet", "sample") or not parts[2][1:].isdigit():
    raise SystemExit(f"--cases: {case!r} is not unet-<config>-b<batch>, "
                     "sample-<config>-b<batch> or clip-b<batch>")
  kind, config, batch = parts
  if config not in bc.UNET_CASES:
    raise SystemExit(f"--cases: no UNet config {config!r} (have {', '.join(bc.UNET_CASES)})")
  spec = {"config": config, "batch": int(batch[1:])}
  if kind == "sample":
    spec.update(steps=sampling.STEPS, guidance=sampling.GUIDANCE)
    return lambda want, d: sampling.build(spec, want)[0]
  return lambda want, d: train_step.unet_case(spec, d, want=want)[0]


def run_case(case: str, switch: str, repeats: int, block: int) -> dict:
  build = _builder(case)
  with tempfile.TemporaryDirectory(prefix="switch_ab_") as d:
    on = build(("jax", "torch"), Path(d) / "on")
    saved = os.environ.get(switch)
    os.environ[switch] = "0"
    try:
      off = build(("jax",), Path(d) / "off")
    finally:
      if saved is None:
        del os.environ[switch]
      else:
        os.environ[switch] = saved
  calls = {"on": on["jax"], "off": off["jax"], "torch": on["torch"]}
  times, _ = bc.interleaved(calls, repeats, warmup=2, block=block)
  return {"case": case, "times": {k: bc.summarize(t) for k, t in times.items()}}


def table(rows: list[dict], switch: str) -> str:
  lines = [f"| case | JAX ms, {switch} on | JAX ms, off | torch ms | speed-up (off / on) "
           "| JAX / torch, on | JAX / torch, off |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    m = {k: 1e3 * t["median_s"] for k, t in r["times"].items()}
    lines.append(f"| {r['case']} | {m['on']:.1f} | {m['off']:.1f} | {m['torch']:.1f} | "
                 f"{m['off'] / m['on']:.3f}× | {m['torch'] / m['on']:.2f}× | "
                 f"{m['torch'] / m['off']:.2f}× |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--switch", required=True, choices=SWITCHES)
  p.add_argument("--cases", default="unet-small-b1,unet-small-b8",
                 help="comma-separated unet-<config>-b<batch>, sample-<config>-b<batch> or "
                 "clip-b<batch> (default %(default)s)")
  p.add_argument("--quick", action="store_true", help="smoke run: unet-tiny-b1, 3 repeats")
  p.add_argument("--repeats", type=int, default=24, help="timed steps of each (default 24)")
  p.add_argument("--block", type=int, default=3,
                 help="consecutive steps of one before the next (default 3)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads; 0 keeps torch's default (= cores)")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  args = p.parse_args(argv)
  if args.repeats < 1 or args.block < 1:
    p.error("--repeats and --block must be >= 1")
  import torch
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  cases = ["unet-tiny-b1"] if args.quick else args.cases.split(",")
  repeats = 3 if args.quick else args.repeats
  machine = bc.machine_info()
  rows = []
  for case in cases:
    rows.append(run_case(case, args.switch, repeats, args.block))
    print(f"[{len(rows)}/{len(cases)}] {case} done", file=sys.stderr, flush=True)
  print(bc.machine_line(machine))
  print(f"torch threads {torch.get_num_threads()}; median of {repeats}, interleaved in "
        f"blocks of {args.block}")
  print()
  print(table(rows, args.switch))
  bc.write_json(args.json, {"command": "python -m " + MODULE + " " + " ".join(argv or sys.argv[1:]),
                            "machine": machine, "switch": args.switch, "repeats": repeats,
                            "block": args.block, "rows": rows})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
