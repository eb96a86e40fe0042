"""Ways to write a 3x3, stride-1 convolution's kernel gradient in JAX, and
fpdm_jax's native custom call, against XLA's own and torch's, at the pose
embedding's and the UNet's shapes (batch 8, and one at batch 1).

  python -m benchmarks.kernel_gradient [--quick] [--json OUT.json] [--torch-threads N]

Why this exists: at batch 8 the kernel gradients of the thin convolutions
(8-32 channels at 64x64-256x256, the pose embedding) are where XLA:CPU is
furthest behind torch's oneDNN, 2-3x (``benchmarks.convolution``). None of
the ``lax`` forms below closed that (benchmarks/README.md, finding 20): the
forms built from dots are slower than XLA's, and the space-to-depth one,
faster on most rows, did not move the whole train step beyond noise. The
native custom call did (finding 21), and is what fpdm_jax uses there. This
table is the evidence, so a new jaxlib can be judged in a minute and nobody
re-tries the same forms:

  xla        ``jax.vjp`` of ``lax.conv_general_dilated`` with respect to the
             kernel (what fpdm_jax uses from batch 2 on)
  per-tap    nine [C_in, N] x [N, C_out] dots over shifted windows of the
             padded input, N = batch * pixels (fpdm_jax's batch-1 rule,
             ``models.convolution.kernel_gradient``)
  im2col     the nine windows concatenated on the channel axis, one
             [9 C_in, N] x [N, C_out] dot
  row-fold   g = 4 neighbouring pixels of a row folded into the channels:
             three [(g+2) C_in, N/g] x [N/g, g C_out] dots (one per kernel
             row, 2x the FLOPs) whose diagonal blocks sum to the gradient
  s2d        the convolution written over 2x2 space-to-depth blocks (a 2x2
             convolution of 4 C_in -> 4 C_out channels, 1.8x the FLOPs) and
             differentiated by JAX
  native     ``models.native_conv.kernel_gradient``: the C++ loop nest of
             fpdm_jax/native/conv_kernel_gradient.cc as an XLA FFI custom
             call on XLA's thread pool (what fpdm_jax uses in a one-device
             CPU process; "-" if it was not built)
  torch      ``torch.ops.aten.convolution_backward`` asking for the weight
             gradient only

Method: one process, each form jitted, all timed in strict alternation
(``benchmarks.common.interleaved``), medians of --repeats calls after 3
warm-up calls; float32, NHWC for JAX, NCHW for torch. Every form is checked
against ``xla`` (the last column, max relative difference).
"""
from __future__ import annotations

import sys

from benchmarks import common as bc

MODULE = "benchmarks.kernel_gradient"
# (where, batch, height = width, channels in = out)
CASES = [
    ("pose emb. 256x256, small", 8, 256, 8),
    ("pose emb. 256x256, medium", 8, 256, 16),
    ("pose emb. 128x128, small", 8, 128, 16),
    ("pose emb. 128x128, medium", 8, 128, 32),
    ("pose emb. 64x64, small", 8, 64, 32),
    ("pose emb. 64x64, medium", 8, 64, 96),
    ("UNet level 1, medium", 8, 32, 64),
    ("UNet level 2, medium", 8, 16, 128),
    ("UNet level 1, medium, batch 1", 1, 32, 64),
]
QUICK = [("tiny", 2, 16, 8)]
FORMS = ("xla", "per-tap", "im2col", "row-fold", "s2d", "native", "torch")
_NHWC = ("NHWC", "HWIO", "NHWC")
_PAD = ((1, 1), (1, 1))


def _xla(x, dy, w_shape):
  import jax
  import jax.numpy as jnp
  from jax import lax
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), _PAD, dimension_numbers=_NHWC),
                   jnp.zeros(w_shape, x.dtype))
  return vjp(dy)[0]


def _per_tap(x, dy, w_shape):
  from fpdm_jax.models import convolution
  return convolution.kernel_gradient(x, dy, w_shape, (1, 1), _PAD)


def _im2col(x, dy, w_shape):
  import jax.numpy as jnp
  b, h, w, cin = x.shape
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([x_pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
  return jnp.einsum("nk,nd->kd", cols.reshape(b * h * w, 9 * cin),
                    dy.reshape(b * h * w, -1)).reshape(w_shape)


def _row_fold(x, dy, w_shape, g=4):
  import jax.numpy as jnp
  from jax import lax
  b, h, w, cin = x.shape
  cout = w_shape[-1]
  q, span = w // g, g + 2
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # e[b, y, q, (s, c)] = x_pad[b, y, g q + s, c] for s < g + 2
  e = jnp.stack([lax.slice(x_pad, (0, 0, s, 0), (b, h + 2, s + g * (q - 1) + 1, cin), (1, 1, g, 1))
                 for s in range(span)], axis=3).reshape(b, h + 2, q, span * cin)
  dyg = dy.reshape(b, h, q, g * cout)
  gm = jnp.stack([jnp.einsum("byqk,byqn->kn", e[:, t:t + h], dyg) for t in range(3)], axis=1)
  gm = gm.reshape(span, cin, 3, g, cout)
  # dW[t, j] = sum_r gm[r + j, :, t, r, :]
  dw = jnp.stack([sum(gm[r + j, :, :, r, :] for r in range(g)) for j in range(3)])
  return dw.transpose(2, 0, 1, 3)


def _s2d_conv(x, w):
  """The 3x3, pad-1 convolution as a VALID 2x2 one over 2x2 blocks (even H, W)."""
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  b, h, wd, cin = x.shape
  cout = w.shape[-1]
  hz, wz = h // 2 + 1, wd // 2 + 1
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  z = x_pad.reshape(b, hz, 2, wz, 2, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, hz, wz, 4 * cin)
  # w2[di, dj, (p, q, c), (a, e, d)] = w[2 di + p - a, 2 dj + q - e, c, d], zero outside 0..2
  tap = np.array([[[2 * di + p - a + 1 for a in range(2)] for p in range(2)] for di in range(2)])
  w_pad = jnp.pad(w, ((1, 1), (1, 1), (0, 0), (0, 0)))
  w2 = w_pad[tap[:, :, :, None, None, None], tap[None, None, None]]  # [di, p, a, dj, q, e, c, d]
  w2 = w2.transpose(0, 3, 1, 4, 6, 2, 5, 7).reshape(2, 2, 4 * cin, 4 * cout)
  y = lax.conv_general_dilated(z, w2, (1, 1), "VALID", dimension_numbers=_NHWC)
  return y.reshape(b, h // 2, wd // 2, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, wd, cout)


def _s2d(x, dy, w_shape):
  import jax
  import jax.numpy as jnp
  _, vjp = jax.vjp(lambda w: _s2d_conv(x, w), jnp.zeros(w_shape, x.dtype))
  return vjp(dy)[0]


def _native(x, dy, w_shape):
  from fpdm_jax.models import native_conv
  return native_conv.kernel_gradient(x, dy, w_shape, (1, 1), _PAD)


def run(cases, repeats: int, torch_threads: int) -> list[dict]:
  import jax
  import numpy as np
  import torch
  if torch_threads:
    torch.set_num_threads(torch_threads)
  from fpdm_jax.models import native_conv
  jax_forms = {"xla": _xla, "per-tap": _per_tap, "im2col": _im2col, "row-fold": _row_fold,
               "s2d": _s2d}
  if native_conv.kernel_gradient_available():
    jax_forms["native"] = _native
  else:
    print("the native kernel gradient is not built (or switched off): its column is left out",
          file=sys.stderr)
  rows = []
  for where, b, size, ch in cases:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, size, size, ch), np.float32)
    dy = rng.standard_normal((b, size, size, ch), np.float32)
    w_shape = (3, 3, ch, ch)
    xj, dyj = jax.device_put(x), jax.device_put(dy)
    calls, outs = {}, {}
    for name, fn in jax_forms.items():
      jitted = jax.jit(fn, static_argnums=2)
      outs[name] = np.asarray(jitted(xj, dyj, w_shape))
      calls[name] = lambda jitted=jitted: bc.block(jitted(xj, dyj, w_shape))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
    tw = torch.zeros(ch, ch, 3, 3)

    def torch_kgrad():
      return torch.ops.aten.convolution_backward(tdy, tx, tw, None, (1, 1), (1, 1), (1, 1), False,
                                                 (0, 0), 1, (False, True, False))[1]

    outs["torch"] = torch_kgrad().numpy().transpose(2, 3, 1, 0)
    calls["torch"] = torch_kgrad
    times, _ = bc.interleaved(calls, repeats, warmup=3)
    ref = outs["xla"]
    rows.append({
        "where": where, "batch": b, "size": size, "channels": ch,
        "gflop": 2 * b * size * size * 9 * ch * ch / 1e9,
        "times": {name: bc.summarize(t) for name, t in times.items()},
        "max_rel_diff": max(float(np.abs(outs[n] - ref).max() / np.abs(ref).max()) for n in outs),
    })
    print(f"[{len(rows)}/{len(cases)}] {where}: "
          + ", ".join(f"{n} {1e3 * rows[-1]['times'][n]['median_s']:.2f}" for n in times) + " ms",
          file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  head = ("| kernel gradient (batch, size, channels) | GFLOP | "
          + " | ".join(f"{n} ms" for n in FORMS)
          + " | torch / xla | torch / native | max rel. diff |")
  lines = [head, "|---|---:|" + "---:|" * len(FORMS) + "---:|---:|---:|"]
  for r in rows:
    med = {n: 1e3 * t["median_s"] for n, t in r["times"].items()}
    lines.append(f"| {r['where']} (b{r['batch']}, {r['size']}², {r['channels']}→{r['channels']}) | "
                 f"{r['gflop']:.2f} | "
                 + " | ".join(f"{med[n]:.2f}" if n in med else "-" for n in FORMS)
                 + f" | {med['torch'] / med['xla']:.2f}× | "
                 + (f"{med['torch'] / med['native']:.2f}×" if "native" in med else "-")
                 + f" | {r['max_rel_diff']:.0e} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  return bc.case_table_main(MODULE, __doc__, run, table, CASES, QUICK, default_repeats=15,
                            per="form", argv=argv)

if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
