"""Helpers shared by the model benchmarks (train_step, sampling, roofline).

Conventions (as ``benchmarks/input_pipeline.py``): a Markdown table on stdout,
``--json PATH`` for everything measured plus the machine, ``--quick`` smoke
mode, one fresh process per measurement where isolation matters.

The UNet configurations are stated here once so that every script (and the
README) means the same thing by "small" and "medium".
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# Model configurations (UNetConfig keyword arguments + benchmark shapes).

UNET_CASES = {
    # For --quick smoke runs only.
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(1, 2),
                  cross_attention_dim=32, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  class_embed_input_dim=32, pose_embedding_channels=(4, 8, 8, 16)),
        latent=(16, 16), tokens=16),
    # Three levels, one resnet per level, two cross-attention levels.
    "small": dict(
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                  attention_head_dim=(1, 2, 2), cross_attention_dim=64, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  class_embed_input_dim=256, pose_embedding_channels=(8, 16, 32, 64)),
        latent=(32, 32), tokens=64),
    # SD's layout scaled down: 2 resnets per level, 64-channel heads, FPDM's real
    # pose embedding widths and 768-d fusion embedding.
    "medium": dict(
        unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2,
                  attention_head_dim=(1, 2, 4), cross_attention_dim=256, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  class_embed_input_dim=768, pose_embedding_channels=(16, 32, 96, 256)),
        latent=(32, 32), tokens=64),
}


def unet_config(name: str):
  from fpdm_jax.models.unet import UNetConfig
  case = UNET_CASES[name]
  h, _ = case["latent"]
  return UNetConfig(sample_size=h, fpdm=True, use_linear_projection=True, upcast_attention=True,
                    **case["unet"])


def describe_case(name: str) -> str:
  c = UNET_CASES[name]
  u = c["unet"]
  return (f"{name}: block_out_channels {tuple(u['block_out_channels'])}, layers_per_block "
          f"{u['layers_per_block']}, heads {tuple(u['attention_head_dim'])}, cross-attention "
          f"{u['cross_attention_dim']}-d x {c['tokens']} tokens, latents {c['latent'][0]}x"
          f"{c['latent'][1]}x4 (pose image {8 * c['latent'][0]}x{8 * c['latent'][1]}, pose "
          f"embedding {tuple(u['pose_embedding_channels'])}), fusion embedding "
          f"{u['class_embed_input_dim']}-d")


def build_unet_pair(name: str, folder: Path, seed: int = 0):
  """(our FPDM UNet, torch diffusers UNet with FPDM's additions) with the SAME
  weights: ours is initialised, exported with ``export_unet``, and the torch
  model is read back from that folder. The torch model's ``forward(x, t, ctx,
  pose_image=None, fusion=None, pose_features=None)`` adds the pose embedding
  after ``conv_in`` through a forward hook (as tests/test_models_unet.py)."""
  import torch
  from flax import nnx
  from safetensors.torch import load_file

  from fpdm_jax.importers.unet import WEIGHTS_NAME, export_unet
  from fpdm_jax.models.unet import UNet2DConditionModel
  from diffusers import UNet2DConditionModel as TorchUNet
  from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

  cfg = unet_config(name)
  ours = UNet2DConditionModel(cfg, rngs=nnx.Rngs(seed))
  # The pose embedding's last conv is zero-initialised; give it weights so both
  # sides compute (and differentiate) a non-trivial branch.
  k = ours.pose_embedding.conv_out.kernel
  k.set_value(0.01 * jax_normal(seed + 1, k.get_value().shape))
  export_unet(ours, folder)
  unet = TorchUNet.from_pretrained(str(folder), low_cpu_mem_usage=False)
  d = cfg.class_embed_input_dim
  unet.class_embedding = torch.nn.Sequential(
      torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Dropout(cfg.class_embed_dropout),
      torch.nn.Linear(d, cfg.time_embed_dim), torch.nn.Dropout(cfg.class_embed_dropout))
  unet.pose_embedding = ControlNetConditioningEmbedding(
      cfg.block_out_channels[0], conditioning_channels=cfg.pose_conditioning_channels,
      block_out_channels=cfg.pose_embedding_channels)
  unet.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)), strict=True)
  hook_state = {"pose": None}

  def hook(mod, inp, out):
    return out if hook_state["pose"] is None else out + hook_state["pose"]

  unet.conv_in.register_forward_hook(hook)

  def forward(x, t, ctx, *, pose_image=None, fusion=None, pose_features=None):
    hook_state["pose"] = (unet.pose_embedding(pose_image) if pose_image is not None
                          else pose_features)
    return unet(x, t, ctx, class_labels=fusion).sample

  return ours, unet, forward


def jax_normal(seed, shape):
  import jax
  return jax.random.normal(jax.random.key(seed), shape)


# ----------------------------------------------------------------------------
# Timing and memory.

def block(tree):
  import jax
  return jax.block_until_ready(tree)


def interleaved(calls: dict, repeats: int, warmup: int = 0,
                block: int = 1) -> tuple[dict, dict]:
  """Time each no-argument call ``repeats`` times, in rounds of ``block``
  consecutive calls of each, the order rotating from round to round. This
  machine's speed drifts by up to 1.5x within minutes; interleaving makes the
  drift hit every call alike, so the ratio of their medians holds even when
  the times do not.

  ``block`` > 1 runs a call back to back, as training runs its steps: on a VM
  that hands freed memory back to its host (free page reporting), the first
  step after another framework's step re-faults its freed buffers from the
  host and can take twice as long (benchmarks/README.md, finding 17).
  Every call is timed and returned, the first of each block included.

  ``warmup`` untimed calls of each come first. Returns ``(times, results)``:
  per name, the seconds of each timed call and what each returned.
  """
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  names = list(calls)
  times = {name: [] for name in names}
  results = {name: [] for name in names}
  rounds = -(-repeats // block)
  for i in range(rounds):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      for _ in range(min(block, repeats - i * block)):
        t = time.perf_counter()
        results[name].append(calls[name]())
        times[name].append(time.perf_counter() - t)
  return times, results


def summarize(times: list[float]) -> dict:
  return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times)}


def rss_bytes() -> int:
  """Current resident set size (VmRSS)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  return 0


def hwm_bytes() -> int:
  """Peak resident set size since start or the last ``reset_hwm`` (VmHWM)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > clear_refs``)."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def jax_memory(compiled) -> dict:
  """The compiled executable's buffer sizes (bytes)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes") if hasattr(m, k)}
  out["total_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                        - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
  return out


def jax_flops(compiled) -> float | None:
  """XLA's FLOP count of ``compiled`` plus what its native convolution and
  attention custom calls do, which XLA's cost analysis counts as nothing."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  hlo = compiled.as_text()
  return float(ca.get("flops", 0.0)) + native_conv_flops(hlo) + native_attention_flops(hlo) or None


# A native convolution call in optimised HLO: result shape, target, the two
# operands' shapes, then the strides and top/left padding.
_NATIVE_CALL = re.compile(
    r"= f32\[(\d+),(\d+),(\d+),(\d+)\]\S* custom-call\(.*custom_call_target="
    r"\"fpdm_native\w*_conv_(forward|kernel_gradient)\", operand_layout_constraints=\{"
    r"f32\[(\d+),(\d+),(\d+),(\d+)\]\S*, f32\[(\d+),(\d+),(\d+),(\d+)\].*"
    r"backend_config=\{pad_left = (\d+) : i64, pad_top = (\d+) : i64, "
    r"stride_h = (\d+) : i64, stride_w = (\d+) : i64\}")


def _valid(taps: int, out: int, size: int, pad: int, stride: int) -> int:
  """(tap, output position) pairs along one axis that read inside the image."""
  return sum(0 <= stride * o + t - pad < size for t in range(taps) for o in range(out))


# A native Winograd call: result shape, which call, the two operands' shapes,
# then the top/left padding (3x3 kernel, stride 1).
_NATIVE_WINOGRAD_CALL = re.compile(
    r"= f32\[([\d,]+)\]\S* custom-call\(.*custom_call_target="
    r"\"fpdm_native\w*_winograd_(forward|kernel_gradient)\", operand_layout_constraints=\{"
    r"f32\[([\d,]+)\]\S*, f32\[([\d,]+)\].*"
    r"backend_config=\{pad_left = (\d+) : i64, pad_top = (\d+) : i64(?:, tile = \d+ : i64)?\}")


def native_conv_flops(hlo_text: str) -> float:
  """2 x the multiply-adds of every ``models.native_conv`` call in an
  optimised HLO module, counting only taps that read inside the image, as
  XLA's cost analysis counts its own convolutions. The Winograd calls count
  as the direct convolution they replace, not their 2.25x or 4x fewer
  multiplies."""
  total = 0.0
  for m in _NATIVE_CALL.finditer(hlo_text):
    kind = m.group(5)
    r, a, b = (tuple(map(int, m.group(*range(i, i + 4)))) for i in (1, 6, 10))
    pl, pt, sh, sw = map(int, m.groups()[13:])
    if kind == "forward":  # x [B, H, W, Ci], kernel [kh, kw, Ci, Co] -> y [B, Ho, Wo, Co]
      (_, h, w, _), (kh, kw, cin, cout), (batch, ho, wo, _) = a, b, r
    else:  # x [B, H, W, Ci], dy [B, Ho, Wo, Co] -> kernel [kh, kw, Ci, Co]
      (_, h, w, _), (batch, ho, wo, _), (kh, kw, cin, cout) = a, b, r
    total += 2.0 * cin * cout * batch * _valid(kh, ho, h, pt, sh) * _valid(kw, wo, w, pl, sw)
  for m in _NATIVE_WINOGRAD_CALL.finditer(hlo_text):
    r, a, b = (tuple(map(int, m.group(i).split(","))) for i in (1, 3, 4))
    pl, pt = int(m.group(5)), int(m.group(6))
    if m.group(2) == "forward":  # x [B, H, W, Ci], U [16, Ci, Co] -> y [B, Ho, Wo, Co]
      (_, h, w, cin), (batch, ho, wo, cout) = a, r
    else:  # x [B, H, W, Ci], dy [B, Ho, Wo, Co] -> kernel [3, 3, Ci, Co]
      (_, h, w, cin), (batch, ho, wo, cout) = a, b
    total += 2.0 * cin * cout * batch * _valid(3, ho, h, pt, 1) * _valid(3, wo, w, pl, 1)
  return total


# A native attention call: its (first) result's shape, which call, and its
# first two operands' shapes, all [G, tokens, D].
_NATIVE_ATTENTION_CALL = re.compile(
    r"= \(?f32\[(\d+),(\d+),(\d+)\][^=]*? custom-call\(.*custom_call_target="
    r"\"fpdm_native\w*_attention_(\w+)\", operand_layout_constraints=\{"
    r"f32\[(\d+),(\d+),(\d+)\]\S*, f32\[(\d+),(\d+),(\d+)\]")


def native_attention_flops(hlo_text: str) -> float:
  """The matmul FLOPs of every ``models.native_attention`` call in an
  optimised HLO module, as XLA counts the two batched matmuls each replaces
  (2 x G x T x S x D apiece; the softmax's few FLOPs per logit are left out):
  the forward's q k^T and p v, the query side's dO V^T and dS K, the key
  side's dS^T Q and P^T dO."""
  total = 0.0
  for m in _NATIVE_ATTENTION_CALL.finditer(hlo_text):
    g, r1, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
    kind, a1, b1 = m.group(4), int(m.group(6)), int(m.group(9))
    if kind in ("forward", "forward_p"):  # o [G, T, D] <- q [G, T, D], k [G, S, D]
      t, s = a1, b1
    elif kind == "backward_queries":  # dq [G, T, D] <- k [G, S, D], ...
      t, s = r1, a1
    elif kind == "backward_keys":  # dk [G, S, D] <- q [G, T, D], ...
      t, s = a1, r1
    else:
      raise ValueError(f"native_attention_flops: unknown call {kind!r}")
    total += 4.0 * g * t * s * d
  return total


# ----------------------------------------------------------------------------
# Sub-processes and reporting.

def run_module(module: str, spec: dict, timeout: float | None = None,
               env: dict | None = None) -> dict:
  """``python -m module --run-one JSON`` in a fresh interpreter (``env`` added to
  this process's environment); its last JSON line."""
  cmd = [sys.executable, "-m", module, "--run-one", json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=timeout,
                        env=None if env is None else {**os.environ, **env})
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-6000:])
    raise SystemExit(f"{module} measurement {spec} failed (exit {proc.returncode})")
  return json.loads(lines[-1])


MODEL_PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy")


def machine_info(packages=MODEL_PACKAGES) -> dict:
  """CPU, Python, load average and the versions of ``packages``."""
  from importlib.metadata import PackageNotFoundError, version
  cpu = "unknown"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  versions = {}
  for pkg in packages:
    try:
      versions[pkg] = version(pkg)
    except PackageNotFoundError:
      pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"nproc": os.cpu_count(), "sched_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
          "python": platform.python_version(), "platform": platform.platform(),
          "versions": versions, "loadavg_at_start": load}


def machine_line(m: dict) -> str:
  v = m["versions"]
  load = m.get("loadavg_at_start")
  load_s = f" · load avg at start {load[0]:.1f}" if load else ""
  return (f"Machine: {m['sched_cpus']} CPUs (nproc) · {m['cpu']} · Python {m['python']} · "
          f"jax {v.get('jax', '?')} · flax {v.get('flax', '?')} · torch {v.get('torch', '?')} · "
          f"diffusers {v.get('diffusers', '?')} · transformers {v.get('transformers', '?')}"
          f"{load_s}")


def write_json(path: str | None, payload: dict) -> None:
  if path:
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def case_table_main(module: str, doc: str, run, table, cases, quick_cases, *,
                    default_repeats: int, per: str, argv=None) -> int:
  """The command line of a one-process benchmark over a list of cases:
  ``--quick`` / ``--repeats`` / ``--torch-threads`` / ``--json``, then
  ``run(cases, repeats, torch_threads)`` -> rows, the machine line and
  ``table(rows)`` printed, and everything written to the JSON file."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m " + module, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smoke run: one tiny case, 3 repeats")
  p.add_argument("--repeats", type=int, default=None,
                 help=f"timed calls per {per} (default {default_repeats})")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads; 0 keeps torch's default (= cores)")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  args = p.parse_args(argv)
  if args.repeats is not None and args.repeats < 1:
    p.error("--repeats must be >= 1")
  repeats = args.repeats or (3 if args.quick else default_repeats)
  machine = machine_info()
  rows = run(quick_cases if args.quick else cases, repeats, args.torch_threads)
  import torch
  print(machine_line(machine))
  print(f"torch threads {torch.get_num_threads()}; median of {repeats}, strict alternation")
  print()
  print(table(rows))
  write_json(args.json, {"command": "python -m " + module + " " + " ".join(argv or sys.argv[1:]),
                         "machine": machine, "repeats": repeats, "rows": rows})
  return 0


def mib(x: float | None) -> str:
  return "" if x is None else f"{x / 2 ** 20:.0f}"


def time_norms(jax_modules: dict, torch_module, x, ct, scale, bias, repeats: int, *,
               activation=None, torch_activation=None, channels_first: bool = False) -> dict:
  """One normalisation layer's forward and forward + backward, each JAX module
  of ``jax_modules`` (name -> nnx module with ``scale``/``bias``) and the torch
  module, on the same float32 ``x``, output cotangent ``ct`` and parameters,
  ``activation`` (JAX) / ``torch_activation`` after it; ``channels_first``
  moves torch's channels to axis 1. Timed in strict alternation
  (``interleaved``), medians of ``repeats`` calls after 3 warm-up calls, in ms.
  Returns ``{"forward": {name: ms}, "forward+backward": {...}, "max_rel_diff"}``,
  the last the largest relative difference of another JAX module's input
  gradient from the first's.
  Shared by ``benchmarks.group_norm`` and ``benchmarks.layer_norm``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  act = activation or (lambda y: y)
  t_act = torch_activation or (lambda y: y)
  fwd, both, grads = {}, {}, {}
  xj, ctj = jnp.asarray(x), jnp.asarray(ct)
  for name, m in jax_modules.items():
    m.scale.set_value(jnp.asarray(scale))
    m.bias.set_value(jnp.asarray(bias))
    graphdef, params = nnx.split(m)
    f = lambda p, x, graphdef=graphdef: act(nnx.merge(graphdef, p)(x))
    jf = jax.jit(f)
    jb = jax.jit(lambda p, x, ct, f=f: jax.vjp(f, p, x)[1](ct))
    fwd[name] = lambda jf=jf, p=params: jax.block_until_ready(jf(p, xj))
    both[name] = lambda jb=jb, p=params: jax.block_until_ready(jb(p, xj, ctj))
    grads[name] = np.asarray(jb(params, xj, ctj)[1])
  with torch.no_grad():
    torch_module.weight.copy_(torch.from_numpy(scale))
    torch_module.bias.copy_(torch.from_numpy(bias))
  perm = (0, x.ndim - 1, *range(1, x.ndim - 1)) if channels_first else tuple(range(x.ndim))
  tx = torch.from_numpy(x.transpose(perm).copy()).requires_grad_(True)
  tct = torch.from_numpy(ct.transpose(perm).copy())

  def t_fwd():
    with torch.no_grad():
      return t_act(torch_module(tx))

  def t_both():
    torch_module.zero_grad(set_to_none=True)
    tx.grad = None
    t_act(torch_module(tx)).backward(tct)

  fwd["torch"], both["torch"] = t_fwd, t_both
  first, *others = list(jax_modules)
  row = {"max_rel_diff": max(float(np.abs(grads[o] - grads[first]).max()
                                   / np.abs(grads[first]).max()) for o in others)}
  for part, calls in (("forward", fwd), ("forward+backward", both)):
    times, _ = interleaved(calls, repeats, warmup=3)
    row[part] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  return row
