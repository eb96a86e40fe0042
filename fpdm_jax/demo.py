"""The whole system on the embedded synthetic dataset: ``make demo``.

1. builds the synthetic dataset (reused when present),
2. shows a training batch (batch_grid.png),
3. trains stage 1 (fusion embedding) and 4. stage 2 (diffusion, pixel space),
5. evaluates stage 2 on test pairs, 6. runs pose transfer on a user-style input,
7. writes report.md with every number and picture.

Everything lands under --workdir; rerunning resumes or reuses finished steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_dataset(args, data_dir: Path) -> str:
  from data_prep import build
  code = build.main(["synthetic", "--data-dir", str(data_dir), "--num-train", str(args.num_train),
                     "--num-test", str(args.num_test), "--image-size", args.image_size,
                     "--seed", str(args.seed)])
  if code:
    raise SystemExit(code)
  h, w = build.parse_size(args.image_size)
  return f"synthetic_people/{h}x{w}_train{args.num_train}_test{args.num_test}_seed{args.seed}"


def batch_grid(data_dir: Path, name: str, out: Path, rows: int, seed: int) -> None:
  from fpdm_jax import input_pipeline, visualize
  src = input_pipeline.open_source(data_dir, name, "train")
  h, w = input_pipeline.DecodeRecord().map(src[0])["target_image"].shape[:2]
  cfg = input_pipeline.LoaderConfig(
      data_dir=str(data_dir), name=name, batch_size=rows, seed=seed,
      views={"source": ("source_image", (h, w), "symmetric"),
             "target_pose": ("target_pose_image", (h, w), "unit"),
             "target": ("target_image", (h, w), "symmetric")})
  batch = next(iter(input_pipeline.make_loader(cfg, process_index=0, process_count=1)))
  grid = [[batch["source"][i], batch["target_pose"][i], batch["target"][i]] for i in range(rows)]
  visualize.save_png(visualize.image_grid(grid), out)


def train(stage: str, data_dir: Path, name: str, workdir: Path, overrides: list[str]) -> dict:
  from fpdm_jax import config_lib
  from fpdm_jax.trainers import loop
  cfg = config_lib.load_config(f"configs/synthetic.py:{stage}")
  cfg = config_lib.apply_overrides(cfg, [f"data.data_dir={data_dir}", f"data.name={name}",
                                         *overrides])
  return loop.train_and_evaluate(cfg, workdir)


def user_style_sample(data_dir: Path, name: str, stage2: Path, out_dir: Path) -> dict:
  """A test pair handed over the way a user would: a JPEG and an FPDM pose txt."""
  import numpy as np
  from PIL import Image
  from fpdm_jax import input_pipeline, sample, skeleton
  rec = input_pipeline.DecodeRecord().map(input_pipeline.open_source(data_dir, name, "test")[1])
  h, w = rec["source_image"].shape[:2]
  Image.fromarray(rec["source_image"]).save(out_dir / "user_source.jpg", quality=95)
  k = rec["target_keypoints"]
  k256 = np.where(skeleton.visible(k)[:, None],
                  np.stack([k[:, 0] * 176 / w + 40, k[:, 1] * 256 / h], -1), -1)
  (out_dir / "user_pose.txt").write_text("".join(f"{x:.2e} {y:.2e}\n" for x, y in k256))
  code = sample.main(["--workdir", str(stage2), "--source", str(out_dir / "user_source.jpg"),
                      "--pose", str(out_dir / "user_pose.txt"),
                      "--out", str(out_dir / "user_sample.png"), "--num", "4"])
  if code:
    raise SystemExit(code)
  from fpdm_jax import visualize
  outs = [np.asarray(Image.open(out_dir / f"user_sample-{i}.png")) for i in range(4)]
  row = [rec["source_image"], rec["target_pose_image"], *outs, rec["target_image"]]
  visualize.save_png(visualize.image_grid([row]), out_dir / "user_sample_grid.png")
  return {"source": "user_source.jpg", "pose": "user_pose.txt", "grid": "user_sample_grid.png"}


def write_report(workdir: Path, sections: dict) -> Path:
  prep, s1, s2, ev = (sections[k] for k in ("prep", "stage1", "stage2", "eval"))
  fmt = lambda v, p=4: f"{v:.{p}f}" if isinstance(v, float) else str(v)
  lines = [
      "# fpdm-jax demo report", "",
      f"Made by `make demo` in {sections['minutes']:.1f} minutes on this machine.", "",
      "## Data", "",
      f"Synthetic pose-transfer pairs: {prep['written']} written, skipped: "
      f"{prep.get('skipped_total', {})}. Batch from the training input pipeline "
      "(source | target pose | target):", "", "![batch](batch_grid.png)", "",
      "## Stage 1: fusion embedding", "",
      f"{s1['step']} steps. Train InfoNCE loss {fmt(s1.get('train_loss'))}; test retrieval of "
      f"the target among all {int(s1.get('eval_num_pairs', 0))} test targets: top-1 "
      f"{fmt(s1.get('eval_top1'), 3)}, top-5 {fmt(s1.get('eval_top5'), 3)}, mean rank "
      f"{fmt(s1.get('eval_mean_rank'), 2)}.", "",
      "## Stage 2: diffusion", "",
      f"{s2['step']} steps. Train loss {fmt(s2.get('train_loss'))}, test loss "
      f"{fmt(s2.get('eval_loss'))}.", "",
      "## Evaluation (test pairs)", "",
      f"{ev['num_pairs']} pairs, {ev['sampler']['steps']} {ev['sampler']['kind']} steps, "
      f"guidance {ev['sampler']['guidance']}. LPIPS and FID need pretrained AlexNet / "
      "Inception weights, which this demo does not have: they are reported as skipped.", "",
      "| resolution | SSIM | SSIM-256 | PSNR |", "|---|---|---|---|"]
  for res, m in ev["resolutions"].items():
    lines.append(f"| {res}, generated | {fmt(m['ssim'])} | {fmt(m['ssim_256'])} | "
                 f"{fmt(m['psnr'], 2)} |")
  for res, m in ev["copy_source_baseline"].items():
    lines.append(f"| {res}, copy the source (baseline) | {fmt(m['ssim'])} | "
                 f"{fmt(m['ssim_256'])} | {fmt(m['psnr'], 2)} |")
  lines += ["", "Test pairs (source | target pose | generated | ground truth):", "",
            f"![samples]({sections['eval_grid']})", "",
            "## Pose transfer on user-style input", "",
            "`python -m fpdm_jax.sample --source user_source.jpg --pose user_pose.txt --num 4` "
            "(source | pose | 4 samples | ground truth):", "",
            "![user](user_sample_grid.png)", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  (workdir / "report.json").write_text(json.dumps(sections, indent=2, sort_keys=True, default=str))
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fpdm_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="demo_out")
  parser.add_argument("--num-train", type=int, default=2000)
  parser.add_argument("--num-test", type=int, default=200)
  parser.add_argument("--image-size", default="64x64")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stage1-steps", type=int, default=400)
  parser.add_argument("--stage2-steps", type=int, default=800)
  parser.add_argument("--eval-pairs", type=int, default=64)
  args = parser.parse_args(argv)

  from fpdm_jax.train import setup_logging
  setup_logging()
  t0 = time.time()
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = workdir / "data"
  print(f"[1/6] Building the synthetic dataset in {data_dir}", flush=True)
  name = build_dataset(args, data_dir)
  from fpdm_jax import input_pipeline
  shutil.copy(input_pipeline.dataset_dir(data_dir, name) / "prep_report.json",
              workdir / "prep_report.json")
  batch_grid(data_dir, name, workdir / "batch_grid.png", 8, args.seed)

  print(f"[2/6] Training stage 1 ({args.stage1_steps} steps) in {workdir / 'stage1'}", flush=True)
  s1 = train("stage1", data_dir, name, workdir / "stage1",
             [f"train.num_steps={args.stage1_steps}",
              f"train.eval_every={args.stage1_steps}"])
  print(f"[3/6] Training stage 2 ({args.stage2_steps} steps) in {workdir / 'stage2'}", flush=True)
  s2 = train("stage2", data_dir, name, workdir / "stage2",
             [f"train.num_steps={args.stage2_steps}", f"train.eval_every={args.stage2_steps}",
              f"train.image_every={args.stage2_steps}",
              f"train.checkpoint_every={max(1, args.stage2_steps // 4)}",
              f"fusion.path={workdir / 'stage1' / 'fusion_model'}"])

  print(f"[4/6] Evaluating stage 2 on {args.eval_pairs} test pairs", flush=True)
  from fpdm_jax import evaluate
  if evaluate.main(["--workdir", str(workdir / "stage2"), "--limit", str(args.eval_pairs)]):
    return 1
  eval_dir = workdir / "stage2" / "eval" / f"step_{s2['step']}"
  ev = json.loads((eval_dir / "metrics.json").read_text())
  shutil.copy(eval_dir / "samples_grid.png", workdir / "eval_samples_grid.png")

  print("[5/6] Pose transfer on a user-style input (JPEG + FPDM pose txt)", flush=True)
  user = user_style_sample(data_dir, name, workdir / "stage2", workdir)

  print("[6/6] Writing the report", flush=True)
  prep = json.loads((workdir / "prep_report.json").read_text())
  path = write_report(workdir, {"prep": prep, "stage1": s1, "stage2": s2, "eval": ev,
                                "eval_grid": "eval_samples_grid.png", "user": user,
                                "minutes": (time.time() - t0) / 60})
  print(f"Done in {(time.time() - t0) / 60:.1f} min: {path}")
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
