"""One 3x3 convolution's forward, kernel gradient and input gradient: XLA:CPU
with its defaults, fpdm_jax's model convolution with fpdm_jax's flags
(``fpdm_jax/models/convolution.py``, ``fpdm_jax/xla_cpu_flags.py``) and torch,
at the UNet's and the pose embedding's shapes.

  python -m benchmarks.convolution [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: jaxlib 0.10 runs convolutions through YNNPACK, whose kernel
gradients (a convolution whose window is the whole activation) were the
slowest part of the UNet train step (benchmarks/README.md, finding 11), and
fpdm_jax's convolution writes its gradients and forwards its own way on
the CPU (batch-1 kernel gradients, thin stride-2 input gradients, finding 12;
RGB-input forwards, finding 16; in a one-device process the native forward,
input and kernel gradients of thin convolutions, findings 21 and 22). This table
shows each of the three parts on its own, so a new jaxlib can be checked in a
minute: where the "XLA default" column catches up with "fpdm", the flag or
the custom gradient can go.

Method. Each configuration runs in a fresh process, because XLA reads
``XLA_FLAGS`` once per process: "XLA default" sets ``FPDM_XLA_CPU_DEFAULTS=0``
(fpdm_jax adds nothing) and calls ``lax.conv_general_dilated``; "fpdm" is
what every fpdm_jax model gets: its flags and
``fpdm_jax.models.convolution.conv_general_dilated``. torch is
timed in the "fpdm" process (``torch.ops.aten.convolution_backward`` with the
output mask asking for one gradient at a time). NHWC / HWIO float32 for JAX,
NCHW for torch; each function jitted separately; median of --repeats calls
after 2 warm-up calls.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import common as bc
from fpdm_jax import xla_cpu_flags

MODULE = "benchmarks.convolution"
# (label, batch, height = width, C_in, C_out, stride): where they occur.
CASES = [
    ("UNet level 1", 8, 32, 64, 64, 1),
    ("UNet level 3", 8, 16, 128, 128, 1),
    ("medium UNet level 3", 8, 8, 256, 256, 1),
    ("medium UNet up level 2", 8, 16, 256, 128, 1),
    ("pose emb. 64x64", 8, 64, 96, 96, 1),
    ("pose emb. conv_in", 8, 256, 3, 8, 1),
    ("pose emb. conv_in, medium", 8, 256, 3, 16, 1),
    ("pose emb. 256x256 same width", 8, 256, 8, 8, 1),
    ("pose emb. 256x256 same width, medium", 8, 256, 16, 16, 1),
    ("pose emb. 128x128", 8, 128, 32, 32, 1),
    ("pose emb. down", 8, 128, 16, 32, 2),
    ("pose emb. 256x256", 8, 256, 8, 16, 2),
    ("pose emb. 256x256, medium", 8, 256, 16, 32, 2),
    ("pose emb. 128x128 down, medium", 8, 128, 32, 96, 2),
    ("pose emb. 64x64 down, medium", 8, 64, 96, 256, 2),
    ("pose emb. conv_out, medium", 8, 32, 256, 64, 1),
    ("UNet level 1, b1", 1, 32, 64, 64, 1),
    ("pose emb. 128x128, b1", 1, 128, 32, 32, 1),
]
QUICK = [("UNet level 1, b1", 1, 16, 32, 32, 1), ("pose emb. down, b2", 2, 32, 16, 32, 2)]
PARTS = ("forward", "kernel grad", "input grad")
CONFIGS = ("XLA default", "fpdm")


def _config_env(name: str) -> dict:
  """The child's environment changes. Importing ``benchmarks`` put fpdm_jax's
  flags into this process's ``XLA_FLAGS``, which a child inherits: "XLA
  default" takes them out again and keeps fpdm_jax from re-adding them."""
  if name == "fpdm":
    return {}
  return {xla_cpu_flags.ENV_OPT_OUT: "0",
          "XLA_FLAGS": xla_cpu_flags.without_defaults(os.environ.get("XLA_FLAGS", ""))}


def _median_ms(fn, repeats: int) -> float:
  import statistics
  for _ in range(2):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def run_one(spec: dict) -> dict:
  import jax
  import numpy as np
  from jax import lax

  from fpdm_jax.models import convolution
  conv_general_dilated = (convolution.conv_general_dilated if spec.get("ours")
                          else lax.conv_general_dilated)
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": []}
  for label, b, h, cin, cout, s in spec["cases"]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, h, cin)).astype(np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) * 0.1).astype(np.float32)
    ho = (h - 1) // s + 1
    dy = rng.standard_normal((b, ho, ho, cout)).astype(np.float32)

    def conv(x, w, s=s):
      return conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    kgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    igrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    row = {"case": [label, b, h, cin, cout, s],
           "gflop": 2 * b * ho * ho * cin * cout * 9 / 1e9, "jax": {
               "forward": _median_ms(lambda: fwd(x, w).block_until_ready(), spec["repeats"]),
               "kernel grad": _median_ms(lambda: kgrad(x, w, dy).block_until_ready(),
                                         spec["repeats"]),
               "input grad": _median_ms(lambda: igrad(x, w, dy).block_until_ready(),
                                        spec["repeats"])}}
    if spec.get("torch"):
      import torch
      torch.set_num_threads(spec["torch_threads"] or torch.get_num_threads())
      tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
      tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())

      def tback(mask):
        return torch.ops.aten.convolution_backward(tdy, tx, tw, None, [s, s], [1, 1], [1, 1],
                                                   False, [0, 0], 1, mask)

      with torch.no_grad():
        row["torch"] = {
            "forward": _median_ms(lambda: torch.nn.functional.conv2d(tx, tw, None, s, 1),
                                  spec["repeats"]),
            "kernel grad": _median_ms(lambda: tback([False, True, False]), spec["repeats"]),
            "input grad": _median_ms(lambda: tback([True, False, False]), spec["repeats"])}
        # Same maths on both sides (checked once, not timed).
        ref = tback([True, True, False])
        want = {"kernel grad": ref[1].numpy().transpose(2, 3, 1, 0),
                "input grad": ref[0].numpy().transpose(0, 2, 3, 1)}
        got = {"kernel grad": np.asarray(kgrad(x, w, dy)), "input grad": np.asarray(igrad(x, w, dy))}
        # Relative to the largest entry: a kernel gradient sums B*H*W products.
        row["max_rel_diff"] = {k: float(np.abs(want[k] - got[k]).max() / np.abs(want[k]).max())
                               for k in want}
    out["cases"].append(row)
  return out


def table(rows: dict) -> str:
  head = ("| conv (batch, size, channels, stride) | GFLOP | "
          + " | ".join(f"{p}: XLA default / fpdm / torch ms" for p in PARTS)
          + " | all three: torch / fpdm |")
  out = [head, "|---|---:|" + "---:|" * (len(PARTS) + 1)]
  default, ours = rows["XLA default"]["cases"], rows["fpdm"]["cases"]
  for d, f in zip(default, ours):
    label, b, h, cin, cout, s = f["case"]
    cells = [f"{d['jax'][p]:.1f} / {f['jax'][p]:.1f} / {f['torch'][p]:.1f}" for p in PARTS]
    ratio = sum(f["torch"].values()) / sum(f["jax"].values())
    out.append(f"| {label} (b{b}, {h}², {cin}→{cout}, s{s}) | {f['gflop']:.2f} | "
               + " | ".join(cells) + f" | {ratio:.2f}× |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="two small cases, 3 repeats")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per part (default 10)")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="torch.set_num_threads (default 1, as the other tables; 0 = torch's default)")
  p.add_argument("--run-one", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.run_one:
    import json
    print(json.dumps(run_one(json.loads(args.run_one))), flush=True)
    return 0
  if args.repeats is not None and args.repeats < 1:
    p.error("--repeats must be >= 1")
  cases = QUICK if args.quick else CASES
  repeats = args.repeats or (3 if args.quick else 10)
  machine = bc.machine_info()
  rows = {}
  for name in CONFIGS:
    print(f"[run] {name}", file=sys.stderr, flush=True)
    rows[name] = bc.run_module(MODULE, dict(cases=cases, repeats=repeats, torch=name == "fpdm",
                                            ours=name == "fpdm", torch_threads=args.torch_threads),
                               env=_config_env(name))
  if any(k in rows["XLA default"]["xla_flags"] for k in xla_cpu_flags.ALL_DEFAULTS):
    raise SystemExit("the 'XLA default' process still had fpdm_jax's XLA flags: "
                     f"{rows['XLA default']['xla_flags']!r}")
  print(bc.machine_line(machine))
  print(f"XLA_FLAGS of the two processes: default {rows['XLA default']['xla_flags']!r}, "
        f"fpdm {rows['fpdm']['xla_flags']!r}; torch threads {args.torch_threads or 'default'}; "
        f"median of {repeats}")
  print()
  print(table(rows))
  diffs = [max(r["max_rel_diff"].values()) for r in rows["fpdm"]["cases"]]
  print(f"\nmax |JAX - torch| / max |torch| over the gradients: {max(diffs):.1e}")
  bc.write_json(args.json, {"command": "python -m " + MODULE + " " + " ".join(argv or sys.argv[1:]),
                            "machine": machine, "repeats": repeats, "results": rows})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
