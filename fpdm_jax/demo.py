"""The whole system on the embedded synthetic dataset: ``make demo``.

Builds the synthetic dataset (cached: a second run reuses it), reads a batch
through the training input pipeline and writes, under --workdir:

  data/                      the TFDS ArrayRecord dataset + prep_report.json
  batch_grid.png             rows of (source | target pose | target)
  prep_report.json           a copy of the build report
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fpdm_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="demo_out")
  parser.add_argument("--num-train", type=int, default=2000)
  parser.add_argument("--num-test", type=int, default=200)
  parser.add_argument("--image-size", default="64x64")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rows", type=int, default=8, help="examples in the batch grid")
  args = parser.parse_args(argv)

  from data_prep import build
  from fpdm_jax import input_pipeline, visualize

  workdir = Path(args.workdir)
  data_dir = workdir / "data"
  print(f"[1/2] Building the synthetic dataset in {data_dir}")
  code = build.main(["synthetic", "--data-dir", str(data_dir), "--num-train", str(args.num_train),
                     "--num-test", str(args.num_test), "--image-size", args.image_size,
                     "--seed", str(args.seed)])
  if code:
    return code
  h, w = build.parse_size(args.image_size)
  name = f"synthetic_people/{h}x{w}_train{args.num_train}_test{args.num_test}_seed{args.seed}"
  ds_dir = input_pipeline.dataset_dir(data_dir, name)
  shutil.copy(ds_dir / "prep_report.json", workdir / "prep_report.json")

  print("[2/2] Reading one training batch through the input pipeline")
  cfg = input_pipeline.LoaderConfig(
      data_dir=str(data_dir), name=name, batch_size=args.rows, seed=args.seed,
      views={"source": ("source_image", (h, w), "symmetric"),
             "target_pose": ("target_pose_image", (h, w), "unit"),
             "target": ("target_image", (h, w), "symmetric")})
  batch = next(iter(input_pipeline.make_loader(cfg, process_index=0, process_count=1)))
  rows = [[batch["source"][i], batch["target_pose"][i], batch["target"][i]]
          for i in range(args.rows)]
  visualize.save_png(visualize.image_grid(rows), workdir / "batch_grid.png")
  report = json.loads((workdir / "prep_report.json").read_text())
  print(f"Wrote {workdir / 'batch_grid.png'} (source | target pose | target) and "
        f"{workdir / 'prep_report.json'} (written: {report['written']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
