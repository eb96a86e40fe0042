"""GroupNorm + SiLU, forward and forward + backward: ``nnx.GroupNorm``,
fpdm_jax's ``models.normalization.GroupNorm`` and torch's, at the UNet's shapes.

  python -m benchmarks.group_norm [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: every resnet of the UNet and VAE runs two group norms and
every transformer one; nnx's formulation was 3-7x slower than torch's on
XLA:CPU at batch 8 (models/normalization.py says why). This table checks the
replacement against both, so a new flax or jaxlib can be judged in a minute.

Method: one process; each function jitted; the three implementations timed in
strict alternation (``benchmarks.common.interleaved``), medians of --repeats
calls after 3 warm-up calls. Forward + backward = the gradients of the input,
scale and bias for a fixed random output cotangent. torch NCHW, JAX NHWC,
float32. The last column checks that ours computes nnx's input gradient.
"""
from __future__ import annotations

import sys

from benchmarks import common as bc

MODULE = "benchmarks.group_norm"
# (where, batch, height = width, channels, groups)
CASES = [
    ("small UNet, level 1", 8, 32, 32, 16),
    ("small UNet, up level 1", 8, 32, 96, 16),
    ("small UNet, level 2", 8, 16, 64, 16),
    ("medium UNet, level 1", 8, 32, 64, 32),
    ("medium UNet, level 3", 8, 8, 256, 32),
    ("medium UNet, level 1, b1", 1, 32, 64, 32),
    ("VAE decoder top, b1", 1, 256, 64, 8),
]
QUICK = [("tiny", 2, 8, 32, 8)]
IMPLS = ("nnx", "fpdm", "torch")


def run(cases, repeats: int, torch_threads: int) -> list[dict]:
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from fpdm_jax.models.normalization import GroupNorm
  if torch_threads:
    torch.set_num_threads(torch_threads)
  rows = []
  for label, b, h, c, g in cases:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((b, h, h, c)) + 0.5).astype(np.float32)
    ct = rng.standard_normal((b, h, h, c)).astype(np.float32)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    modules = {"nnx": nnx.GroupNorm(c, num_groups=g, epsilon=1e-5, use_fast_variance=False,
                                    rngs=nnx.Rngs(0)),
               "fpdm": GroupNorm(c, num_groups=g, epsilon=1e-5)}
    row = bc.time_norms(modules, torch.nn.GroupNorm(g, c, eps=1e-5), x, ct, scale, bias, repeats,
                        activation=jax.nn.silu, torch_activation=torch.nn.functional.silu,
                        channels_first=True)
    rows.append({"case": [label, b, h, c, g], **row})
    print(f"[{len(rows)}/{len(cases)}] {label}", file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  out = ["| GroupNorm + SiLU (batch, size, channels, groups) | forward: nnx / fpdm / torch ms | "
         "fwd+bwd: nnx / fpdm / torch ms | fwd+bwd: nnx / fpdm | fwd+bwd: torch / fpdm | "
         "max rel. diff of dx |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    label, b, h, c, g = r["case"]
    f, fb = r["forward"], r["forward+backward"]
    cell = lambda d: " / ".join(f"{d[k]:.2f}" for k in IMPLS)
    out.append(f"| {label} (b{b}, {h}², {c}, {g}) | {cell(f)} | {cell(fb)} | "
               f"{fb['nnx'] / fb['fpdm']:.2f}× | {fb['torch'] / fb['fpdm']:.2f}× | "
               f"{r['max_rel_diff']:.0e} |")
  return "\n".join(out)


def main(argv=None) -> int:
  return bc.case_table_main(MODULE, __doc__, run, table, CASES, QUICK, default_repeats=20,
                            per="part", argv=argv)

if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
