"""LayerNorm, forward and forward + backward: ``nnx.LayerNorm``, fpdm_jax's
``models.normalization.LayerNorm`` and torch's, at the UNet's and CLIP's shapes.

  python -m benchmarks.layer_norm [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: nnx's gradient is four multiply-reduces per call, which
XLA:CPU's YNNPACK fusions ran at 0.3-0.7 ms each at batch 1, ~20 ms of the
medium UNet's batch-1 step; ours computes every sum as a matrix-vector
product (models/normalization.py, benchmarks/README.md finding 28). This
table checks the replacement against both, so a new flax or jaxlib can be
judged in a minute: where "nnx" catches up with "fpdm", ours can go.

Method: one process; each function jitted; the three implementations timed in
strict alternation (``benchmarks.common.interleaved``), medians of --repeats
calls after 3 warm-up calls. Forward + backward = the gradients of the input,
scale and bias for a fixed random output cotangent; [batch, tokens, channels],
float32, inputs with a mean of 3 (where a one-pass variance would lose
digits). The last column checks that ours computes nnx's input gradient.
"""
from __future__ import annotations

import sys

from benchmarks import common as bc

MODULE = "benchmarks.layer_norm"
# (where, batch, tokens, channels)
CASES = [
    ("medium UNet, 32x32, b1", 1, 1024, 64),
    ("medium UNet, 16x16, b1", 1, 256, 128),
    ("small UNet, 32x32, b1", 1, 1024, 32),
    ("medium UNet, 32x32, b8", 8, 1024, 64),
    ("medium UNet, 16x16, b8", 8, 256, 128),
    ("CLIP stage 1 (3 x 8 images)", 24, 197, 256),
]
QUICK = [("tiny", 2, 16, 32)]
IMPLS = ("nnx", "fpdm", "torch")


def run(cases, repeats: int, torch_threads: int) -> list[dict]:
  import numpy as np
  import torch
  from flax import nnx

  from fpdm_jax.models.normalization import LayerNorm
  if torch_threads:
    torch.set_num_threads(torch_threads)
  rows = []
  for label, b, t, c in cases:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((b, t, c)) + 3.0).astype(np.float32)
    ct = rng.standard_normal((b, t, c)).astype(np.float32)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    modules = {"nnx": nnx.LayerNorm(c, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0)),
               "fpdm": LayerNorm(c, epsilon=1e-5)}
    row = bc.time_norms(modules, torch.nn.LayerNorm(c, eps=1e-5), x, ct, scale, bias, repeats)
    rows.append({"case": [label, b, t, c], **row})
    print(f"[{len(rows)}/{len(cases)}] {label}", file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  out = ["| LayerNorm (batch, tokens, channels) | forward: nnx / fpdm / torch ms | "
         "fwd+bwd: nnx / fpdm / torch ms | fwd+bwd: nnx / fpdm | fwd+bwd: torch / fpdm | "
         "max rel. diff of dx |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    label, b, t, c = r["case"]
    f, fb = r["forward"], r["forward+backward"]
    cell = lambda d: " / ".join(f"{d[k]:.3f}" for k in IMPLS)
    out.append(f"| {label} (b{b}, {t}, {c}) | {cell(f)} | {cell(fb)} | "
               f"{fb['nnx'] / fb['fpdm']:.2f}× | {fb['torch'] / fb['fpdm']:.2f}× | "
               f"{r['max_rel_diff']:.0e} |")
  return "\n".join(out)


def main(argv=None) -> int:
  return bc.case_table_main(MODULE, __doc__, run, table, CASES, QUICK, default_repeats=40,
                            per="part", argv=argv)


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
