"""Memory plans: does a configuration fit an accelerator, before paying for one.

  python -m fpdm_jax.plan --config configs/fpdm_deepfashion.py:stage2 --mesh data=4,fsdp=2 \\
      --batch 6 [--what train|sample] [--find-max-batch] [--json plan.json] \\
      [--config.FIELD=VALUE ...]

Compiles, for the mesh, on simulated CPU devices, the train step exactly as
``python -m fpdm_jax.train`` jits it (``loop.jit_train_step``), or stage 2's
sampler (``--what sample``: ``DiffusionStage.sample_fn``, ``sample.steps``
DDIM steps with three-way guidance, then the VAE decode). The inputs are
abstract and every network is built under ``nnx.eval_shape``: nothing
full-size is allocated and no weights are read, so this runs on a laptop.
Reported per device: parameters, optimiser state, EMA, frozen networks and
batch (from their shardings: what stays resident across the call), and the
compiled executable's ``memory_analysis()``: arguments, outputs, the donated
state they share (aliased), temporaries (activations, gradients, workspace)
and generated code. Total = resident inputs + outputs - aliased +
temporaries. Then a table against common accelerators' HBM, keeping a
headroom (default 10%) for the runtime and fragmentation.
``--find-max-batch`` searches the largest per-device batch each accelerator
fits (doubling, then bisection; one compile per batch size tried).

What the numbers are:
- Per device. The executable of an SPMD-partitioned function is ONE
  device's program, so ``memory_analysis()`` counts one device's buffers:
  with 8 simulated devices its argument bytes equal the sum of the
  per-device shards of the state, frozen parameters and batch
  (``tests/test_plan.py`` checks this, and that fsdp=2 halves the shards of
  the large kernels).
- Arguments the executable never reads are pruned from it (``jax.jit``'s
  ``keep_unused=False``): the VAE decoder in the train step, the VAE
  encoder in the sampler, the keypoints. They are still on the device, so
  the total counts the resident inputs, not ``argument_size_in_bytes``.
- An estimate. The figures come from XLA:CPU, whose fusion, layouts,
  rematerialisation, buffer assignment and bf16 handling (some bf16 ops are
  computed in f32) differ from the TPU and GPU compilers'. Parameters,
  optimiser state and batch are exact; temporaries are the CPU compiler's
  and may be off by tens of percent on an accelerator. The headroom is for
  that too; confirm on one device before reserving a pod.
- Activations follow the micro-batch: with ``train.grad_accum`` K the step
  runs K micro-batches of batch/K per device in a ``lax.scan``.

Architectures come from the config's presets (``model.clip_preset``,
``model.unet_preset``, ``model.source_encoder.preset``, the SD VAE): the
weight folders (``*_path``) are not read, the presets being the reference
weights' architectures. Stage 2's fusion model is the stage-1 export's
architecture when ``fusion.path`` holds one, else ``--stage1-config``'s, else
CLIP ViT-L/14 (the reference).

Cost, measured on a shared 2-core CPU machine: one compile of the full-size
stage-2 train step takes 2-5 minutes and ~4 GB of RAM; stage 1 and the
sampler 20-40 s. A ``--find-max-batch`` search is 10-30 compiles.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (backends start on first use: main() sets the device count first)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fpdm_jax import config_lib, input_pipeline, sharding, skeleton  # noqa: E402
from fpdm_jax.importers import clip as clip_importer  # noqa: E402
from fpdm_jax.models.clip import CLIPVisionConfig  # noqa: E402
from fpdm_jax.models.fusion import FusionConfig, FusionModel  # noqa: E402
from fpdm_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL  # noqa: E402
from fpdm_jax.trainers import common, loop, stage1, stage2  # noqa: E402

GIB = 2 ** 30
# (name, HBM per chip in GiB).
ACCELERATORS = (("TPU v5e", 16), ("TPU v6e", 32), ("A100 40GB", 40), ("A100 80GB", 80),
                ("H100 80GB", 80), ("TPU v5p", 95))
HEADROOM = 0.10
# The fields a loader batch carries besides the views (``MakeViews.keep``), as
# ``sharding.global_batch`` makes them: per-row shape and dtype (int64 pair
# indices become int32 without jax_enable_x64).
KEPT_FIELDS = {
    "source_keypoints": ((skeleton.NUM_KEYPOINTS, 2), np.float32),
    "target_keypoints": ((skeleton.NUM_KEYPOINTS, 2), np.float32),
    "pair_index": ((), np.int64),
}
WEIGHT_PATHS = ("clip_path", "unet_path", "vae_path")


class PlanError(ValueError):
  """A plan that cannot be made as asked (bad mesh, batch, ...)."""


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """``data=4,fsdp=2`` -> ``(("data", 4), ("fsdp", 2))``."""
  axes = []
  for part in text.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
    if not m or int(m.group(2)) < 1:
      raise PlanError(f"--mesh {text!r}: expected AXIS=SIZE pairs with sizes >= 1, "
                      "e.g. data=4,fsdp=2")
    axes.append((m.group(1), int(m.group(2))))
  names = [a for a, _ in axes]
  if len(set(names)) != len(names):
    raise PlanError(f"--mesh {text!r}: an axis is named twice")
  if not set(names) & set(sharding.BATCH_AXES):
    raise PlanError(f"--mesh {text!r}: needs a batch axis ({' or '.join(sharding.BATCH_AXES)})")
  return tuple(axes)


# ----------------------------------------------------------------------------
# The networks, abstractly.

def without_weight_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose networks come from presets, not weight folders."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key in WEIGHT_PATHS:
      if key in config.model:
        config.model[key] = ""
    if "source_encoder" in config.model:
      config.model.source_encoder.path = ""
  return config


def fusion_clip_config(config, stage1_config=None) -> CLIPVisionConfig:
  """The CLIP of the stage-1 model a stage-2 config conditions on: the
  export's (``fusion.path``) when there is one, else ``stage1_config``'s,
  else ViT-L/14."""
  encoder = Path(config.fusion.path) / "encoder" if config.fusion.path else None
  if encoder is not None and (encoder / "config.json").is_file():
    return clip_importer.config_from_folder(encoder)
  if stage1_config is not None:
    return stage1.clip_config(without_weight_paths(stage1_config).model)
  return CLIPVisionConfig.vit_l14()


def abstract_stage(config: ml_collections.ConfigDict, mesh, stage1_config=None):
  """``config.stage``'s stage object around networks built by ``nnx.eval_shape``."""
  config = without_weight_paths(config)
  m = config.model
  dt = common.dtype(m.dtype)
  if config.stage == "stage1":
    model = nnx.eval_shape(lambda: stage1.build_fusion_model(m, seed=config.seed))
    return stage1.FusionStage(config, mesh, model)
  if config.stage != "stage2":
    raise PlanError(f"config.stage={config.stage!r}: stage1 or stage2")
  clip = fusion_clip_config(config, stage1_config)
  views = {}

  def networks():
    fusion = FusionModel(FusionConfig(clip), dtype=dt, rngs=nnx.Rngs(0))
    vae = AutoencoderKL(SD_VAE_CONFIG, dtype=dt, rngs=nnx.Rngs(0)) if m.latent else None
    trainable, frozen, v = stage2.build(config, fusion=fusion, vae=vae)
    views.update(v)  # not arrays: returned beside eval_shape
    return trainable, frozen

  trainable, frozen = nnx.eval_shape(networks)
  return stage2.DiffusionStage(config, mesh, networks=(trainable, frozen, views))


def abstract_batch(views, global_batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the loop feeds the step: uint8 views plus the kept fields."""
  spec = {name: ((*v.size, 3), np.uint8)
          for name, v in input_pipeline.parse_views(views).items()}
  spec.update(KEPT_FIELDS)
  return {k: jax.ShapeDtypeStruct((global_batch, *shape), jax.dtypes.canonicalize_dtype(dt),
                                  sharding=sharding.batch_sharding(mesh, 1 + len(shape)))
          for k, (shape, dt) in spec.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays with shardings (the largest shard)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# Plans.

@dataclasses.dataclass
class Plan:
  """One compiled function's memory, per device, in bytes."""
  what: str                 # "train" or "sample"
  mesh: dict
  batch: int                # per device
  global_batch: int
  micro_batch: int          # per device, what the activations are for
  num_params: int           # trainable (all devices)
  num_frozen: int
  params: int               # resident inputs, from their shardings ...
  opt_state: int
  ema: int
  frozen: int
  inputs: int               # the batch (+ sampling keys)
  resident: int             # ... all of them (the above + step, rng, counters)
  argument: int             # from here on: compiled.memory_analysis()
  output: int
  alias: int
  temp: int
  code: int
  compile_seconds: float

  @property
  def total(self) -> int:
    """Peak bytes on one device: inputs (read or not) + outputs not written
    over donated inputs + temporaries."""
    return self.resident + self.output - self.alias + self.temp

  def fits(self, hbm_gib: float, headroom: float = HEADROOM) -> bool:
    return self.total <= (1.0 - headroom) * hbm_gib * GIB

  def to_json(self, headroom: float = HEADROOM, accelerators=ACCELERATORS) -> dict:
    return {**dataclasses.asdict(self), "total": self.total,
            "fits": {name: self.fits(hbm, headroom) for name, hbm in accelerators}}


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend's executables have no memory_analysis()")
  return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
              code=int(m.generated_code_size_in_bytes))


class Planner:
  """The abstract set-up of a config on a mesh, built once; ``plan(batch)``
  compiles one per-device batch size (each size once)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, what: str = "train",
               stage1_config=None, log: Callable[[str], None] | None = None):
    if what not in ("train", "sample"):
      raise PlanError(f"what={what!r}: train or sample")
    if what == "sample" and config.stage != "stage2":
      raise PlanError(f"--what sample plans stage 2's sampler; this is a {config.stage} "
                      "config")
    if config.data.get("cached_features"):
      raise PlanError("data.cached_features is set: the plans cover training from images "
                      "(the cached-feature step's batch is not planned yet); plan without it")
    self.config, self.mesh, self.what = config, mesh, what
    self.grad_accum = config.train.grad_accum if what == "train" else 1
    self.setup = loop.build_setup(config, mesh, abstract_stage(config, mesh, stage1_config))
    self.log = log or (lambda _: None)
    self.plans: dict[int, Plan] = {}  # by per-device batch

  @property
  def batch_step(self) -> int:
    """Per-device batches are multiples of this (whole micro-batches)."""
    return self.grad_accum

  def inputs(self, batch: int) -> tuple:
    """The abstract arguments of the compiled function for a per-device batch."""
    if batch < 1 or batch % self.grad_accum:
      raise PlanError(f"per-device batch {batch} must be a positive multiple of "
                      f"train.grad_accum={self.grad_accum} (each device runs grad_accum "
                      "micro-batches of batch/grad_accum)")
    setup, mesh = self.setup, self.mesh
    n = batch * sharding.num_batch_shards(mesh)
    data = abstract_batch(setup.stage.views, n, mesh)
    if self.what == "train":
      return setup.abstract, setup.frozen, data
    keys = jax.ShapeDtypeStruct((n, 2), jnp.uint32, sharding=sharding.batch_sharding(mesh, 2))
    return setup.abstract["params"], setup.frozen, data, keys

  def compile(self, batch: int):
    """The executable for a per-device batch: what training (or sampling) runs."""
    args = self.inputs(batch)
    if self.what == "train":
      fn = loop.jit_train_step(self.config, self.setup, self.mesh,
                               jax.tree.map(lambda x: x.sharding, args[2]))
    else:
      fn = self.setup.stage.sample_fn(self.setup.model_def)
    return fn.lower(*args).compile()

  def held_bytes(self, batch: int) -> dict[str, int]:
    """Per device: what stays on the device across the call (no compile needed)."""
    args, state = self.inputs(batch), self.setup.abstract
    train = self.what == "train"
    return dict(params=per_device_bytes(state["params"]),
                opt_state=per_device_bytes(state["opt_state"]) if train else 0,
                ema=per_device_bytes(state["ema"]) if train else 0,
                frozen=per_device_bytes(self.setup.frozen),
                inputs=per_device_bytes(args[2:]), resident=per_device_bytes(args))

  def plan(self, batch: int) -> Plan:
    if batch not in self.plans:
      held = self.held_bytes(batch)
      start = time.perf_counter()
      compiled = self.compile(batch)
      seconds = time.perf_counter() - start
      p = Plan(what=self.what, mesh=dict(self.mesh.shape), batch=batch,
               global_batch=batch * sharding.num_batch_shards(self.mesh),
               micro_batch=batch // self.grad_accum,
               num_params=common.count_params(self.setup.abstract["params"]),
               num_frozen=common.count_params(self.setup.frozen),
               compile_seconds=round(seconds, 1), **held, **memory_stats(compiled))
      self.log(f"per-device batch {batch}: {p.total / GIB:.2f} GiB "
               f"(compiled in {seconds:.0f} s)")
      self.plans[batch] = p
    return self.plans[batch]


def find_max_batch(fits: Callable[[int], bool], *, step: int = 1, limit: int = 1024) -> int:
  """The largest multiple of ``step`` up to ``limit`` for which ``fits``
  (assumed monotone) holds, 0 if none: doubling from ``step``, then bisection."""
  lo, hi = 0, 1  # in units of step: fits(lo) (or lo == 0), hi to try
  while hi * step <= limit and fits(hi * step):
    lo, hi = hi, 2 * hi
  hi = min(hi, limit // step + 1)  # the first size known not to fit (or past limit)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
  return lo * step


def max_batches(planner: Planner, headroom: float = HEADROOM, limit: int = 1024,
                accelerators=ACCELERATORS) -> dict[str, int]:
  """Per accelerator: the largest per-device batch whose plan fits its HBM
  (the plans are shared, so each batch size is compiled once)."""
  return {name: find_max_batch(lambda b, hbm=hbm: planner.plan(b).fits(hbm, headroom),
                               step=planner.batch_step, limit=limit)
          for name, hbm in accelerators}


def parse_accelerators(specs: Sequence[str]) -> tuple[tuple[str, float], ...]:
  """``["L4=24", ...]`` -> ``(("L4", 24.0), ...)``."""
  out = []
  for spec in specs:
    name, _, gib = spec.partition("=")
    try:
      value = float(gib)
    except ValueError:
      value = 0.0
    if not name.strip() or not value > 0:
      raise PlanError(f"--hbm {spec!r}: expected NAME=GIB, e.g. L4=24")
    out.append((name.strip(), value))
  return tuple(out)


# ----------------------------------------------------------------------------
# Reports.

def format_plan(plan: Plan, title: str, headroom: float = HEADROOM,
                accelerators=ACCELERATORS) -> str:
  unit, scale = ("GiB", GIB) if plan.total >= GIB else ("MiB", 2 ** 20)
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  what = "train step" if plan.what == "train" else "sampler"
  lines = [f"Memory plan per device: {title}, {what}",
           f"  mesh {mesh} ({math.prod(plan.mesh.values())} simulated CPU devices); "
           f"per-device batch {plan.batch} (global {plan.global_batch})"]
  if plan.batch != plan.micro_batch:
    lines.append(f"  grad_accum {plan.batch // plan.micro_batch}: activations are for "
                 f"micro-batches of {plan.micro_batch} per device")
  lines += [f"  compiled in {plan.compile_seconds:.0f} s on XLA:CPU", "",
            f"  {'':38}{unit:>8}"]
  rows = [(f"trainable parameters ({plan.num_params / 1e6:.1f}M)", plan.params)]
  if plan.what == "train":
    rows += [("optimiser state", plan.opt_state), ("EMA", plan.ema)]
  rows += [(f"frozen networks ({plan.num_frozen / 1e6:.1f}M)", plan.frozen),
           ("batch" + (" + keys" if plan.what == "sample" else ""), plan.inputs),
           ("resident inputs", plan.resident),
           ("  of which the executable reads", plan.argument),
           ("outputs", plan.output),
           ("  written over donated inputs", -plan.alias),
           ("temporaries (activations, grads, ...)", plan.temp),
           ("total", plan.total),
           ("generated code (CPU; not in total)", plan.code)]
  lines += [f"  {name:38}{n / scale:8.2f}" for name, n in rows]
  usable = f"usable ({1 - headroom:.0%})"
  lines += ["", f"  {'accelerator':12}{'HBM GiB':>9}{usable:>14}  fits"]
  for name, hbm in accelerators:
    lines.append(f"  {name:12}{hbm:9g}{(1 - headroom) * hbm:14.1f}  "
                 f"{'yes' if plan.fits(hbm, headroom) else 'no'}")
  return "\n".join(lines)


def format_max_batches(planner: Planner, found: dict[str, int], limit: int,
                       accelerators=ACCELERATORS) -> str:
  shards = sharding.num_batch_shards(planner.mesh)
  head = f"  largest per-device batch that fits (global = {shards} x batch on this mesh"
  if planner.grad_accum > 1:
    head += f"; micro-batch = batch / {planner.grad_accum}"
  lines = [head + "):", f"  {'accelerator':12}{'HBM GiB':>9}{'batch':>7}{'total GiB':>11}"]
  for name, hbm in accelerators:
    b = found[name]
    total = f"{planner.plan(b).total / GIB:11.2f}" if b else f"{'-':>11}"
    note = f"  (the search stops at --max-batch {limit})" if b + planner.batch_step > limit else ""
    lines.append(f"  {name:12}{hbm:9g}{b:7d}{total}{note}")
  return "\n".join(lines)


NOTE = ("XLA:CPU estimate: TPU and GPU compilers fuse, lay out and rematerialise "
        "differently;\nparameters, optimiser state and batch are exact, temporaries "
        "approximate (see python -m fpdm_jax.plan --help).")


# ----------------------------------------------------------------------------
# Command line.

def set_cpu_devices(n: int) -> None:
  """Simulates ``n`` CPU devices; must run before JAX starts its backends."""
  jax.config.update("jax_platforms", "cpu")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already up (an in-process caller): use what is there
    if jax.device_count() < n:
      raise PlanError(f"the mesh needs {n} devices; JAX already started with "
                      f"{jax.device_count()}") from None


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(
      prog="python -m fpdm_jax.plan", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any config field can be overridden as --config.FIELD=VALUE "
             "(e.g. --config.train.grad_accum=1, --config.model.remat=False).")
  parser.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
  parser.add_argument("--mesh", default="data=1",
                      help="mesh axes and sizes, e.g. data=4,fsdp=2 (default: %(default)s); "
                           "that many CPU devices are simulated")
  parser.add_argument("--batch", type=int,
                      help="per-device batch (global = batch x data x fsdp); for the train "
                           "step a multiple of train.grad_accum")
  parser.add_argument("--what", choices=("train", "sample"), default="train",
                      help="the train step, or stage 2's sampler (default: %(default)s)")
  parser.add_argument("--find-max-batch", action="store_true",
                      help="search the largest per-device batch each accelerator fits")
  parser.add_argument("--max-batch", type=int, default=1024,
                      help="where that search stops (default: %(default)s)")
  parser.add_argument("--headroom", type=float, default=HEADROOM,
                      help="fraction of HBM left to the runtime (default: %(default)s)")
  parser.add_argument("--hbm", action="append", default=[], metavar="NAME=GIB",
                      help="another accelerator for the tables (repeatable), e.g. L4=24")
  parser.add_argument("--stage1-config",
                      help="stage 2: the stage-1 config whose CLIP the fusion model has "
                           "when fusion.path holds no export (default: ViT-L/14)")
  parser.add_argument("--json", type=Path, help="also write the results here")
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  say = lambda msg: print(msg, file=sys.stderr, flush=True)

  try:
    if args.batch is None and not args.find_max_batch:
      raise PlanError("give --batch N, --find-max-batch, or both")
    if args.batch is not None and args.batch < 1:
      raise PlanError(f"--batch {args.batch}: must be >= 1")
    if not 0 <= args.headroom < 1:
      raise PlanError(f"--headroom {args.headroom}: must be in [0, 1)")
    accelerators = ACCELERATORS + parse_accelerators(args.hbm)
    axes = parse_mesh(args.mesh)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    stage1_config = (config_lib.load_config(args.stage1_config)
                     if args.stage1_config else None)
    set_cpu_devices(math.prod(size for _, size in axes))
    mesh = sharding.make_mesh(axes)
    with config.unlocked():
      config.mesh = axes
    say(f"Building {args.config} abstractly on mesh {args.mesh} ...")
    planner = Planner(config, mesh, args.what, stage1_config, log=say)
    if args.batch is not None:
      planner.inputs(args.batch)  # a bad batch fails before any compile
  except (PlanError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  out = {"config": args.config, "overrides": overrides, "mesh": args.mesh,
         "what": args.what, "headroom": args.headroom}
  if args.batch is not None:
    plan = planner.plan(args.batch)
    print(format_plan(plan, args.config, args.headroom, accelerators))
    out["plan"] = plan.to_json(args.headroom, accelerators)
  if args.find_max_batch:
    found = max_batches(planner, args.headroom, args.max_batch, accelerators)
    print()
    print(format_max_batches(planner, found, args.max_batch, accelerators))
    out["max_batch"] = found
    out["plans"] = [p.to_json(args.headroom, accelerators)
                    for _, p in sorted(planner.plans.items())]
  print()
  print(NOTE)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
