"""Where a JAX UNet train step's time goes, op by op, from a ``jax.profiler`` trace.

  python -m benchmarks.profile_step --config medium --batch 1 [--steps 10] [--top 15]

Why this exists: ``benchmarks.train_step`` says how fast a step is and
``benchmarks.unet_blocks`` which kind of block is behind torch's, but neither
says which ops of the compiled step take the time: the native custom calls
(by target), XLA's dots (plain and YNNPACK-fused), its convolutions, and its
elementwise loops, which at batch 1 are most of the step. Findings 25 and 26
of benchmarks/README.md were read off this table.

Method. ``benchmarks.train_step``'s JAX step (JAX only, no torch model), after
3 untimed steps, traced for --steps steps with ``jax.profiler.trace``; every
complete event of the trace is summed by name and mapped to its instruction
in the compiled step's HLO: custom calls by their target, fusions by whether
they hold a dot (``dots``), an AdamW update (the fusions that read the
optimiser's moments, ``optimizer``) or neither (``elementwise``). Times are
per step. XLA:CPU's thunk executor runs independent ops on both threads at
once and a native call's chunks run on pool threads the trace does not
attribute to it, so the rows do not add up to the step's wall time; their
shares are what to read. A row is an upper bound on what removing its ops
saves, not an estimate: ops that depend only on the weights (a kernel's
flipped copy for an input gradient, say) run beside the forward pass on
the other thread, and taking out 23 ms of such fusions from the medium
batch-1 trace changed the step by 0.995-1.018x (finding 27). Measure a
change with ``benchmarks.switch_ab``.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

from benchmarks import common as bc

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? (fusion|custom-call|dot|convolution|"
                          r"concatenate|copy|transpose)\(")
_TARGET = re.compile(r'custom_call_target="(?:fpdm_native\w*?_)?([^"]+)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _kinds(hlo: str) -> dict[str, str]:
  """Instruction name -> its row in the table."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  kinds = {}
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if not m or m.group(1) in kinds:
      continue
    name, op = m.groups()
    if op == "custom-call":
      target = _TARGET.search(line)
      kinds[name] = f"custom call {target.group(1) if target else '?'}"
    elif op == "fusion":
      called = _CALLS.search(line)
      body = "\n".join(bodies.get(called.group(1), [])) if called else ""
      if " dot(" in body:
        kinds[name] = "fusion: dots"
      elif "opt_state" in line:
        kinds[name] = "fusion: optimizer"
      else:
        kinds[name] = "fusion: elementwise"
    else:
      kinds[name] = op
  return kinds


def profile(config: str, batch: int, steps: int) -> dict:
  import jax

  from benchmarks import train_step

  compiled_text = {}
  compile_step = train_step._compile

  def keep_text(*args, **kwargs):
    compiled, info = compile_step(*args, **kwargs)
    compiled_text["hlo"] = compiled.as_text()
    return compiled, info

  train_step._compile = keep_text
  try:
    with tempfile.TemporaryDirectory(prefix="profile_step_") as d:
      call = train_step.unet_case({"config": config, "batch": batch}, Path(d),
                                  want=("jax",))[0]["jax"]
      for _ in range(3):
        call()
      with jax.profiler.trace(str(Path(d) / "trace"), create_perfetto_trace=True):
        for _ in range(steps):
          call()
      trace = sorted((Path(d) / "trace").rglob("*.trace.json.gz"))[-1]
      events = json.load(gzip.open(trace))
  finally:
    train_step._compile = compile_step
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = _kinds(compiled_text["hlo"])
  rows, ops = collections.Counter(), collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in kinds:
      kind = kinds[e["name"]]
      rows[kind] += e.get("dur", 0) / 1e3 / steps
      ops[(kind, e["name"])] += e.get("dur", 0) / 1e3 / steps
      count[kind] += 1
  return {"config": config, "batch": batch, "steps": steps,
          "rows": [{"kind": k, "ms_per_step": t, "ops_per_step": count[k] / steps}
                   for k, t in rows.most_common()],
          "top_ops": [{"kind": k, "op": n, "ms_per_step": t} for (k, n), t in ops.most_common(50)]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--config", choices=sorted(bc.UNET_CASES), default="medium")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=10, help="traced steps (default 10)")
  p.add_argument("--top", type=int, default=15, help="single ops listed (default 15)")
  p.add_argument("--json", metavar="OUT.json", help="also write the table and the machine here")
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    p.error("--batch and --steps must be >= 1")
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  result = profile(args.config, args.batch, args.steps)
  machine = bc.machine_info()
  print(bc.machine_line(machine))
  print(f"{bc.describe_case(args.config)}; batch {args.batch}; {args.steps} traced steps")
  print()
  print("| ops | per step | ms per step |")
  print("|---|---:|---:|")
  for r in result["rows"]:
    print(f"| {r['kind']} | {r['ops_per_step']:.0f} | {r['ms_per_step']:.1f} |")
  print()
  print("| op | kind | ms per step |")
  print("|---|---|---:|")
  for r in result["top_ops"][:args.top]:
    print(f"| {r['op']} | {r['kind']} | {r['ms_per_step']:.2f} |")
  if args.json:
    Path(args.json).write_text(json.dumps({"machine": machine, **result}, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
