"""LayerNorm, forward and forward + backward: ``nnx.LayerNorm``, fpdm_jax's
``models.normalization.LayerNorm`` written with XLA ops ("xla") and as its
native custom calls ("native"), and torch's, at the UNet's and CLIP's shapes.

  python -m benchmarks.layer_norm [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: nnx's gradient is four multiply-reduces per call, which
XLA:CPU's YNNPACK fusions ran at 0.3-0.7 ms each at batch 1, ~20 ms of the
medium UNet's batch-1 step; ours computes every sum as a matrix-vector
product (models/normalization.py, benchmarks/README.md finding 28), and in
a one-device CPU process with the native calls built does each row in one
pass of C++ (models/native_layer_norm.py, finding 29). This table checks
both against nnx's and torch's, so a new flax or jaxlib can be judged in a
minute: where "nnx" catches up with ours, ours can go. "native" is "-"
without a native build.

Method: one process; each function jitted; the three implementations timed in
strict alternation (``benchmarks.common.interleaved``), medians of --repeats
calls after 3 warm-up calls. Forward + backward = the gradients of the input,
scale and bias for a fixed random output cotangent; [batch, tokens, channels],
float32, inputs with a mean of 3 (where a one-pass variance would lose
digits). The last column checks that ours compute nnx's input gradient (the
largest relative difference of either).
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
IMPLS = ("nnx", "xla", "native", "torch")


def run(cases, repeats: int, torch_threads: int) -> list[dict]:
  import numpy as np
  import torch
  from flax import nnx

  from fpdm_jax.models import native_layer_norm
  from fpdm_jax.models.normalization import LayerNorm, layer_norm

  class Written(LayerNorm):
    """Ours, with the native calls or the XLA ops asked for."""

    def __init__(self, c, native):
      super().__init__(c, epsilon=1e-5)
      self.native = native

    def __call__(self, x):
      return layer_norm(x, self.scale.get_value(), self.bias.get_value(), self.epsilon,
                        native=self.native)

  if torch_threads:
    torch.set_num_threads(torch_threads)
  rows = []
  for label, b, t, c in cases:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((b, t, c)) + 3.0).astype(np.float32)
    ct = rng.standard_normal((b, t, c)).astype(np.float32)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    modules = {"nnx": nnx.LayerNorm(c, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0)),
               "xla": Written(c, native=False)}
    if native_layer_norm.available():
      modules["native"] = Written(c, native=True)
    row = bc.time_norms(modules, torch.nn.LayerNorm(c, eps=1e-5), x, ct, scale, bias, repeats)
    rows.append({"case": [label, b, t, c], **row})
    print(f"[{len(rows)}/{len(cases)}] {label}", file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  names = " / ".join(IMPLS)
  out = [f"| LayerNorm (batch, tokens, channels) | forward: {names} ms | "
         f"fwd+bwd: {names} ms | fwd+bwd: nnx / ours | fwd+bwd: torch / ours | "
         "max rel. diff of dx |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    label, b, t, c = r["case"]
    f, fb = r["forward"], r["forward+backward"]
    cell = lambda d: " / ".join(f"{d[k]:.3f}" if k in d else "-" for k in IMPLS)
    ours = fb.get("native", fb["xla"])  # what fpdm_jax runs here
    out.append(f"| {label} (b{b}, {t}, {c}) | {cell(f)} | {cell(fb)} | "
               f"{fb['nnx'] / ours:.2f}× | {fb['torch'] / ours:.2f}× | "
               f"{r['max_rel_diff']:.0e} |")
  return "\n".join(out)


def main(argv=None) -> int:
  return bc.case_table_main(MODULE, __doc__, run, table, CASES, QUICK, default_repeats=40,
                            per="part", argv=argv)


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
