"""Evaluates a trained run with the papers' protocol.

  python -m fpdm_jax.evaluate --config configs/X.py:stage2 --workdir RUN \\
      [--limit N] [--num-images K] [--fid-reference test|train] \\
      [--inception inception_v3_google.pth] \\
      [--lpips-alexnet alexnet-owt-7be5be79.pth --lpips-lin alex.pth]

Stage 2: generates every test pair (or the first --limit), writes the images
as PNGs under RUN/eval/step_<S>/images named after the pair, and computes at
176x256 and 352x512 (bicubic resize, uint8 quantisation): SSIM (uniform
window 51), SSIM-256 (gaussian sigma 1.5), PSNR, LPIPS (AlexNet) and FID
(Inception-v3 pool features). A metric whose weights are not given is
reported as skipped, never as zero. Results: metrics.json, report.md, a
sample grid PNG and TensorBoard scalars.

Stage 1: retrieval top-1/top-5/mean rank of the fusion embedding against the
target embeddings of the test split.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESOLUTIONS = ((256, 176), (512, 352))  # (height, width), as the papers report


def _resize_uint8(images, hw):
  from PIL import Image
  import numpy as np
  return np.stack([np.asarray(Image.fromarray(im).resize((hw[1], hw[0]), Image.BICUBIC))
                   for im in images])


def batched(fn, batch: int):
  """Applies ``fn`` to fixed-size chunks (the last one padded), so each jitted
  metric compiles once per resolution instead of once per batch shape."""
  import numpy as np

  def run(*arrays):
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch):
      chunk = [a[start:start + batch] for a in arrays]
      m = len(chunk[0])
      if m < batch:
        chunk = [np.concatenate([c, np.repeat(c[-1:], batch - m, 0)]) for c in chunk]
      outs.append(np.asarray(fn(*chunk))[:m])
    return np.concatenate(outs)
  return run


class Metrics:
  """Accumulates the protocol's metrics at one resolution."""

  def __init__(self, hw, batch: int, lpips=None, inception=None):
    import jax
    import numpy as np
    from fpdm_jax import metrics
    self.hw, self.inception = hw, inception
    self.ssim = batched(jax.jit(lambda g, t: metrics.ssim(g, t, variant="uniform51")), batch)
    self.ssim_256 = batched(jax.jit(lambda g, t: metrics.ssim(g, t, variant="gaussian")), batch)
    self.psnr = batched(jax.jit(metrics.psnr), batch)
    self.lpips = batched(lpips, batch) if lpips is not None else None
    self.values = {"ssim": [], "ssim_256": [], "psnr": [], "lpips": []}
    self.fake_stats = metrics.FeatureStats() if inception is not None else None
    self._np = np

  def update(self, generated_u8, target_u8):
    g = _resize_uint8(generated_u8, self.hw).astype(self._np.float32) / 255.0
    t = _resize_uint8(target_u8, self.hw).astype(self._np.float32) / 255.0
    self.values["ssim"] += list(self.ssim(g, t))
    self.values["ssim_256"] += list(self.ssim_256(g, t))
    self.values["psnr"] += list(self.psnr(g, t))
    if self.lpips is not None:
      self.values["lpips"] += list(self.lpips(g, t))
    if self.inception is not None:
      self.fake_stats.update(self.inception(g))

  def result(self, ref_stats=None) -> dict:
    np = self._np
    out = {"num_images": len(self.values["ssim"])}
    for k in ("ssim", "ssim_256", "psnr"):
      out[k] = float(np.mean(self.values[k])) if self.values[k] else None
    out["lpips"] = float(np.mean(self.values["lpips"])) if self.lpips is not None else "skipped"
    if self.inception is not None and ref_stats is not None:
      out["fid"] = float(self.fake_stats.frechet_distance(ref_stats))
    else:
      out["fid"] = "skipped"
    return out


def inception_features(model, batch: int):
  """[0, 1] images of any size -> pool features; the network compiles once
  (images are resized to 299 first, in a small per-size jitted function)."""
  import numpy as np
  from flax import nnx
  pre = nnx.jit(lambda m, x: m.preprocess(x))
  fwd = batched(lambda x: nnx.jit(lambda m, y: m.forward_features(y))(model, x), batch)
  return lambda images: fwd(np.asarray(pre(model, images)))


def reference_stats(source, inception, hw, cache: Path, limit: int | None, batch: int = 32):
  """Inception statistics of a split's target images at ``hw`` (cached)."""
  import numpy as np
  from fpdm_jax import input_pipeline, metrics
  if cache.is_file():
    return metrics.FeatureStats.load(cache)
  stats = metrics.FeatureStats()
  n = len(source) if limit is None else min(limit, len(source))
  seen = set()
  decode = input_pipeline.DecodeRecord(("target_image",))
  images = []
  for i in range(n):
    r = decode.map(source[i])
    if r["target_name"] in seen:  # each distinct image once
      continue
    seen.add(r["target_name"])
    images.append(r["target_image"])
    if len(images) == batch:
      stats.update(inception(_resize_uint8(images, hw).astype(np.float32) / 255.0))
      images = []
  if images:
    stats.update(inception(_resize_uint8(images, hw).astype(np.float32) / 255.0))
  cache.parent.mkdir(parents=True, exist_ok=True)
  stats.save(cache)
  return stats


def write_report(out_dir: Path, results: dict, header: str) -> None:
  (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
  lines = [f"# Evaluation: {header}", ""]
  rows = results.get("resolutions", {})
  if rows:
    lines += ["| resolution | SSIM | SSIM-256 | PSNR | LPIPS | FID | images |",
              "|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=4: f"{v:.{p}f}" if isinstance(v, float) else str(v)
    for res, m in rows.items():
      lines.append(f"| {res} | {fmt(m['ssim'])} | {fmt(m['ssim_256'])} | {fmt(m['psnr'], 3)} "
                   f"| {fmt(m['lpips'])} | {fmt(m['fid'], 3)} | {m['num_images']} |")
    base = results.get("copy_source_baseline", {})
    for res, m in base.items():
      lines.append(f"| {res}, copy source (baseline) | {fmt(m['ssim'])} | {fmt(m['ssim_256'])} "
                   f"| {fmt(m['psnr'], 3)} | {fmt(m['lpips'])} | - | {m['num_images']} |")
    lines += ["", f"FID reference set: {results.get('fid_reference')}"]
  for k, v in results.get("retrieval", {}).items():
    lines.append(f"- {k}: {v}")
  (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def evaluate_stage2(config, workdir: Path, args) -> dict:
  import jax
  import numpy as np
  from tqdm import tqdm
  from fpdm_jax import input_pipeline, metrics, sampling, sharding, visualize
  from fpdm_jax.trainers import loop

  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  setup, params, step = loop.restore_trained(config, workdir, mesh, args.step)
  stage = setup.stage
  out_dir = workdir / "eval" / f"step_{step}"
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  logging.info("Evaluating %s at step %d into %s", workdir, step, out_dir)

  from flax import nnx
  bs = config.eval.batch_size
  lpips = inception = None
  if args.lpips_alexnet or args.lpips_lin:
    lpips_model = metrics.load_lpips(args.lpips_alexnet, args.lpips_lin)
    lpips_fn = nnx.jit(lambda m, x, y: m(x, y))
    lpips = lambda x, y: lpips_fn(lpips_model, x, y)
  else:
    logging.warning("LPIPS skipped: pass --lpips-alexnet and --lpips-lin")
  if args.inception:
    inception = inception_features(metrics.load_inception(args.inception), bs)
  else:
    logging.warning("FID skipped: pass --inception (torchvision inception_v3 weights)")
  per_res = {hw: Metrics(hw, bs, lpips, inception) for hw in RESOLUTIONS}
  # The naive answer "copy the source photo", scored the same way: a model
  # that has learned the task must beat it clearly.
  copy_source = {hw: Metrics(hw, bs, lpips) for hw in RESOLUTIONS}

  d = config.data
  source = input_pipeline.open_source(d.data_dir, d.name, d.eval_split)
  names = {}
  n_pairs = len(source) if args.limit is None else min(args.limit, len(source))
  cfg = input_pipeline.LoaderConfig(
      data_dir=d.data_dir, name=d.name, split=d.eval_split, views=stage.views, batch_size=bs,
      shuffle=False, num_epochs=1, drop_remainder=False, worker_count=d.worker_count)
  loader = input_pipeline.make_loader(cfg, source=source)
  sample = stage.sample_fn(setup.model_def)
  decode = input_pipeline.DecodeRecord(("source_image", "target_image", "target_pose_image"))
  grid_rows = []
  bar = tqdm(total=n_pairs * args.num_images, desc="generating", unit="image", disable=None)
  done = 0
  for local in loader:
    if done >= n_pairs:
      break
    n = min(local["pair_index"].shape[0], n_pairs - done)
    padded = {k: np.concatenate([v, np.repeat(v[-1:], bs - len(v), 0)]) if len(v) < bs else v
              for k, v in local.items()}
    batch = sharding.global_batch(padded, mesh)
    for k in range(args.num_images):
      keys = sampling.sample_keys(args.seed, batch["pair_index"], k)
      images = visualize.to_uint8(np.asarray(sample(params, setup.frozen, batch, keys)))[:n]
      records = [decode.map(source[int(i)]) for i in local["pair_index"][:n]]
      targets = [r["target_image"] for r in records]
      for img, r, idx in zip(images, records, local["pair_index"][:n]):
        stem = lambda p: Path(p).stem
        name = f"{int(idx):05d}_{stem(r['source_name'])}_to_{stem(r['target_name'])}_{k}.png"
        visualize.save_png(img, out_dir / "images" / name)
        names[int(idx)] = name
        if k == 0 and len(grid_rows) < 8:
          hw = img.shape[:2]
          grid_rows.append([_resize_uint8([r["source_image"]], hw)[0],
                            _resize_uint8([r["target_pose_image"]], hw)[0], img,
                            _resize_uint8([r["target_image"]], hw)[0]])
      for m in per_res.values():
        m.update(images, targets)
      if k == 0:
        sources = _resize_uint8([r["source_image"] for r in records], images.shape[1:3])
        for m in copy_source.values():
          m.update(sources, targets)
      bar.update(n)
    done += n
  bar.close()

  results = {"step": step, "num_pairs": done, "num_images_per_pair": args.num_images,
             "sampler": dict(config.sample), "fid_reference": args.fid_reference,
             "resolutions": {}}
  for hw, m in per_res.items():
    ref = None
    if inception is not None:
      split = d.eval_split if args.fid_reference == "test" else d.train_split
      ref_source = input_pipeline.open_source(d.data_dir, d.name, split)
      ref = reference_stats(ref_source, inception, hw,
                            workdir / "eval" / f"fid_ref_{split}_{hw[0]}x{hw[1]}.npz",
                            args.fid_reference_limit, batch=bs)
    results["resolutions"][f"{hw[1]}x{hw[0]}"] = m.result(ref)
  results["copy_source_baseline"] = {f"{hw[1]}x{hw[0]}": m.result()
                                     for hw, m in copy_source.items()}
  if grid_rows:
    visualize.save_png(visualize.image_grid(grid_rows), out_dir / "samples_grid.png")
  write_report(out_dir, results, f"{workdir} step {step}, FID reference: {args.fid_reference} "
               "split targets")
  if jax.process_index() == 0:
    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir / "tensorboard")
    scalars = {f"eval_{res}/{k}": v for res, m in results["resolutions"].items()
               for k, v in m.items() if isinstance(v, float)}
    writer.write_scalars(step, scalars)
    if grid_rows:
      writer.write_images(step, {"eval_samples": visualize.image_grid(grid_rows)[None]})
    writer.flush()
  return results


def evaluate_stage1(config, workdir: Path, args) -> dict:
  from fpdm_jax import sharding
  from fpdm_jax.trainers import loop
  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  setup, params, step = loop.restore_trained(config, workdir, mesh, args.step)
  with config.unlocked():
    config.eval.max_batches = 0  # the whole split
  state = {"params": params, "ema": None}
  retrieval = setup.stage.evaluate(state, setup.frozen, setup.model_def)
  out_dir = workdir / "eval" / f"step_{step}"
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {"step": step, "retrieval": retrieval}
  write_report(out_dir, results, f"{workdir} step {step} (stage 1 retrieval)")
  return results


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from fpdm_jax import config_lib
  from fpdm_jax.train import setup_logging
  overrides, rest = config_lib.split_argv(argv)
  p = argparse.ArgumentParser(prog="python -m fpdm_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="the run's config (default: WORKDIR/config.json)")
  p.add_argument("--workdir", required=True, help="the training run to evaluate")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
  p.add_argument("--num-images", type=int, default=1, help="images generated per pair")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--fid-reference", choices=("test", "train"), default="test",
                 help="FID reference set: test-split targets (FPDM's script) or train "
                      "images (CFLD's); the number depends on it (default: %(default)s)")
  p.add_argument("--fid-reference-limit", type=int, default=None)
  p.add_argument("--inception", help="torchvision Inception-v3 weights (.pth/.safetensors)")
  p.add_argument("--lpips-alexnet", help="torchvision AlexNet weights (alexnet-owt-*.pth)")
  p.add_argument("--lpips-lin", help="the lpips package's linear heads (alex.pth)")
  args = p.parse_args(rest)
  setup_logging()
  workdir = Path(args.workdir)
  try:
    if args.config:
      config = config_lib.load_config(args.config)
    else:
      config = config_lib.load_json_config(workdir / "config.json")
    config = config_lib.apply_overrides(config, overrides)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    run = evaluate_stage1 if config.stage == "stage1" else evaluate_stage2
    results = run(config, workdir, args)
  except (FileNotFoundError, ValueError) as e:  # missing weights / runs, bad files
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(results, indent=2, sort_keys=True, default=str))
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
