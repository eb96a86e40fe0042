"""One attention's forward and backward at the UNet's and CLIP's shapes: our CPU
paths (``fpdm_jax/models/attention.py``) and torch's
``scaled_dot_product_attention``.

  python -m benchmarks.attention [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: XLA:CPU has no fused attention kernel, so the CPU path is
either written out in XLA (heads-major batched matmuls, a flash-style
backward) or, in a one-device process, the native calls of
``models.native_attention``. In the XLA path, how XLA places each dot
decides its speed: dK = dS^T Q and dV = P^T dO contract the query axis of
both operands, and written plainly XLA gives that dot to Eigen, several
times slower than the same FLOPs as a batched matmul (benchmarks/README.md,
finding 15). Columns: "plain" is the XLA path with that form
(``TRANSPOSED_FORM_MIN_QUERIES`` set out of reach), "xla" the XLA path as
shipped (what multi-device processes, masks and bfloat16 get), "fpdm" what
the models run here (the native calls, finding 23). A new jaxlib can be
checked in a minute: where "plain" catches up with "xla", the transposed
form can go; where "xla" catches up with "fpdm", the native calls can.

Method: q, k, v, dO standard normal float32, [batch, tokens, heads, head_dim]
for JAX and [batch, heads, tokens, head_dim] for torch; one jitted function
per column returning the output and the three gradients (``jax.vjp``); torch
runs SDPA forward and ``backward`` with fresh leaf tensors. Median of
--repeats calls after 2 warm-up calls, the four columns timed in rotating
rounds; all in one process, torch on --torch-threads threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks import common as bc

MODULE = "benchmarks.attention"
# (label, batch, query tokens, key tokens, heads, head_dim)
CASES = [
    ("small UNet, 32x32 latents", 8, 1024, 1024, 1, 32),
    ("medium UNet, 32x32 latents", 8, 1024, 1024, 1, 64),
    ("small UNet, 16x16", 8, 256, 256, 2, 32),
    ("cross-attention, 32x32", 8, 1024, 64, 1, 64),
    ("CLIP stage 1 (3 x 8 images)", 24, 197, 197, 4, 64),
    ("small UNet, 32x32, b1", 1, 1024, 1024, 1, 32),
]
QUICK = [("small UNet, 16x16, b1", 1, 256, 256, 2, 32), ("cross-attention, b1", 1, 300, 16, 1, 32)]


def _interleaved_medians_ms(calls: dict, repeats: int) -> dict:
  times, _ = bc.interleaved(calls, repeats, warmup=2)
  return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def run(cases, repeats: int, torch_threads: int) -> list[dict]:
  import jax
  import numpy as np
  import torch

  from fpdm_jax.models import attention, native_attention

  def step(q, k, v, do):
    out, vjp = jax.vjp(attention.dot_product_attention, q, k, v)
    return out, vjp(do)

  if torch_threads:
    torch.set_num_threads(torch_threads)
  rows = []
  for label, b, t, s, n, d in cases:
    rng = np.random.default_rng(0)
    q, do = (rng.standard_normal((b, t, n, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for _ in range(2))
    args = [jax.numpy.asarray(x) for x in (q, k, v, do)]
    compiled, results = {}, {}
    shipped = attention.TRANSPOSED_FORM_MIN_QUERIES
    for name, threshold, native in (("plain", 1 << 62, "0"), ("xla", shipped, "0"),
                                    ("fpdm", shipped, None)):
      # Both switches are read while tracing, and JAX caches the traced
      # backward of a custom_vjp: clear that cache so each column is traced
      # with its own.
      attention.TRANSPOSED_FORM_MIN_QUERIES = threshold
      saved = os.environ.get(native_attention.OPT_OUT)
      if native is not None:
        os.environ[native_attention.OPT_OUT] = native
      jax.clear_caches()
      try:
        compiled[name] = jax.jit(step).lower(*args).compile()
      finally:
        attention.TRANSPOSED_FORM_MIN_QUERIES = shipped
        if saved is None:
          os.environ.pop(native_attention.OPT_OUT, None)
        else:
          os.environ[native_attention.OPT_OUT] = saved
      results[name] = jax.tree.map(np.asarray, compiled[name](*args))
    tq, tk, tv, tdo = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v, do))

    def torch_step():
      leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]
      out = torch.nn.functional.scaled_dot_product_attention(*leaves)
      out.backward(tdo)
      return out, [x.grad for x in leaves]

    calls = {name: (lambda c=c: bc.block(c(*args))) for name, c in compiled.items()}
    calls["torch"] = torch_step
    row = {"case": [label, b, t, s, n, d],
           "gflop": 4 * b * n * t * s * d * 3 / 1e9,  # QK^T, PV forward; four dots backward
           "ms": _interleaved_medians_ms(calls, repeats)}
    out, grads = torch_step()
    want = [out.detach().numpy()] + [g.numpy() for g in grads]
    for name, (o, gs) in results.items():
      got = [o] + list(gs)
      row.setdefault("max_rel_diff", {})[name] = max(
          float(np.abs(w.transpose(0, 2, 1, 3) - g).max() / np.abs(w).max())
          for w, g in zip(want, got))
    rows.append(row)
    print(f"[run] {label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items()),
          file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  out = ["| attention (batch, queries x keys, heads x dim) | GFLOP | plain ms | xla ms | fpdm ms "
         "| torch ms | plain / xla | xla / fpdm | torch / fpdm |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    label, b, t, s, n, d = r["case"]
    ms = r["ms"]
    out.append(f"| {label} (b{b}, {t}x{s}, {n}x{d}) | {r['gflop']:.2f} | {ms['plain']:.1f} | "
               f"{ms['xla']:.1f} | {ms['fpdm']:.1f} | {ms['torch']:.1f} | "
               f"{ms['plain'] / ms['xla']:.2f}× | {ms['xla'] / ms['fpdm']:.2f}× | "
               f"{ms['torch'] / ms['fpdm']:.2f}× |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="two small cases, 3 repeats")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per column (default 10)")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="torch.set_num_threads (default 1, as the other tables; 0 = torch's default)")
  args = p.parse_args(argv)
  if args.repeats is not None and args.repeats < 1:
    p.error("--repeats must be >= 1")
  cases = QUICK if args.quick else CASES
  repeats = args.repeats or (3 if args.quick else 10)
  machine = bc.machine_info()
  rows = run(cases, repeats, args.torch_threads)
  print(bc.machine_line(machine))
  print(f"fwd + bwd of one attention; torch threads {args.torch_threads or 'default'}; "
        f"median of {repeats}")
  print()
  print(table(rows))
  diffs = [max(r["max_rel_diff"].values()) for r in rows]
  print(f"\nmax |JAX - torch| / max |torch| over output and gradients: {max(diffs):.1e}")
  bc.write_json(args.json, {"command": "python -m " + MODULE + " " + " ".join(argv or sys.argv[1:]),
                            "machine": machine, "repeats": repeats, "results": rows})
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
