"""Pose transfer for your own inputs: a person photo and a target pose.

  python -m fpdm_jax.sample --workdir RUN --source person.jpg --pose POSE --out out.png \\
      [--num 4] [--seed 0] [--steps 20] [--guidance 2.0]

POSE is one of:
  * an 18-keypoint .txt in the FPDM format (18 lines "x y" in DeepFashion's
    256x256 frame, -1 -1 for a missing point);
  * an OpenPose .json (people[0].pose_keypoints_2d, x y confidence in the
    pixels of an image of the source's size, or of --pose-size HxW);
  * a rendered pose image (.png/.jpg), used as it is.
Keypoints are drawn with the same skeleton renderer as the training data.
With --num N > 1 the images are written as OUT-0.png ... OUT-<N-1>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class InputError(ValueError):
  pass


def read_image(path: Path):
  import numpy as np
  from PIL import Image
  if not path.is_file():
    raise InputError(f"{path}: file not found")
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except Exception as e:
    raise InputError(f"{path}: not a readable image ({e})") from e


def read_keypoints(path: Path, source_hw: tuple[int, int], pose_hw=None):
  """Keypoints in the SOURCE image's pixels, [18, 2], -1 missing."""
  import numpy as np
  from fpdm_jax import skeleton
  if not path.is_file():
    raise InputError(f"{path}: file not found")
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(path.read_text())
      flat = data["people"][0]["pose_keypoints_2d"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
      raise InputError(f"{path}: not an OpenPose JSON with people[0].pose_keypoints_2d ({e})")
    k = np.asarray(flat, np.float32).reshape(-1, 3)
    if k.shape[0] != 18:
      raise InputError(f"{path}: {k.shape[0]} keypoints; expected the 18-point COCO model "
                       "(OpenPose --model_pose COCO)")
    xy = np.where((k[:, 2] > 0)[:, None], k[:, :2], -1.0)
    return skeleton.scale_keypoints(xy, pose_hw or source_hw, source_hw)
  try:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    k = np.asarray(rows, np.float32)
  except ValueError as e:
    raise InputError(f"{path}: cannot parse keypoints ({e})") from e
  if k.shape != (18, 2):
    raise InputError(f"{path}: expected 18 lines of 'x y', got {k.shape[0]} rows "
                     f"of shape {k.shape[1:]}")
  return skeleton.deepfashion_to_pixels(k, *source_hw)


def make_record(source, pose_arg: Path, out_hw, pose_hw=None) -> dict:
  """The record the input pipeline would have made for (source, target pose)."""
  import numpy as np
  from PIL import Image
  from fpdm_jax import skeleton
  if pose_arg.suffix.lower() in IMAGE_SUFFIXES:
    pose = read_image(pose_arg)
    if not pose.any():
      raise InputError(f"{pose_arg}: the pose image is empty (all black)")
    pose = np.asarray(Image.fromarray(pose).resize((out_hw[1], out_hw[0]), Image.BICUBIC))
  else:
    k = read_keypoints(pose_arg, source.shape[:2], pose_hw)
    if int(skeleton.visible(k).sum()) < 2:
      raise InputError(f"{pose_arg}: fewer than 2 visible keypoints; the pose is empty")
    k_out = skeleton.scale_keypoints(k, source.shape[:2], out_hw)
    # Drawn at the photo's size and resized with it, as the training data.
    pose = skeleton.render_pose_image(k_out, out_hw, canvas_hw=source.shape[:2])
  src = np.asarray(Image.fromarray(source).resize((out_hw[1], out_hw[0]), Image.BICUBIC))
  missing = np.full((18, 2), -1.0, np.float32)
  return {"source_image": src, "target_image": np.zeros_like(src),
          "target_pose_image": pose, "source_pose_image": np.zeros_like(src),
          "source_keypoints": missing, "target_keypoints": missing, "pair_index": np.int64(0)}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m fpdm_jax.sample", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained stage-2 run")
  p.add_argument("--config", help="the run's config (default: WORKDIR/config.json)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--source", required=True, type=Path, help="the person photo")
  p.add_argument("--pose", required=True, type=Path, help="target pose: .txt, .json or image")
  p.add_argument("--pose-size", default=None, help="HxW of the image an OpenPose JSON refers to")
  p.add_argument("--out", required=True, type=Path, help="output PNG")
  p.add_argument("--num", type=int, default=1, help="images to generate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
  p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: config)")
  args = p.parse_args(argv)
  from fpdm_jax import config_lib
  from fpdm_jax.train import setup_logging
  setup_logging()
  try:
    config = (config_lib.load_config(args.config) if args.config
              else config_lib.load_json_config(Path(args.workdir) / "config.json"))
    if config.stage != "stage2":
      raise InputError(f"{args.workdir} is a {config.stage} run; sampling needs a stage-2 run")
    source = read_image(args.source)
    pose_hw = tuple(int(v) for v in args.pose_size.split("x")) if args.pose_size else None
    record = make_record(source, args.pose, tuple(config.model.image_size), pose_hw)
  except (InputError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import jax
  import numpy as np
  from fpdm_jax import input_pipeline, sampling, sharding, visualize
  from fpdm_jax.trainers import loop
  with config.unlocked():
    if args.steps:
      config.sample.steps = args.steps
    if args.guidance is not None:
      config.sample.guidance = args.guidance
    config.mesh = (("data", 1), ("fsdp", 1))
  mesh = sharding.make_mesh(config.mesh)
  try:
    setup, params, step = loop.restore_trained(config, args.workdir, mesh, args.step)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stage = setup.stage
  views = input_pipeline.MakeViews(input_pipeline.parse_views(stage.views)).map(record)
  batch = {k: np.repeat(v[None], args.num, 0) for k, v in views.items()}
  batch = sharding.global_batch(batch, mesh)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(args.seed), i))(
      np.arange(args.num, dtype=np.uint32))
  images = visualize.to_uint8(np.asarray(stage.sample_fn(setup.model_def)(
      params, setup.frozen, batch, keys)))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  if args.num == 1:
    paths = [args.out]
  else:
    paths = [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(args.num)]
  for img, path in zip(images, paths):
    visualize.save_png(img, path)
  print(f"Wrote {', '.join(map(str, paths))} (step {step}, {config.sample.steps} "
        f"{config.sample.kind} steps, guidance {config.sample.guidance})")
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
